"""SGLangEngine: the `Engine` interface over an SGLang server's HTTP API (SGLang >= 0.5), or over `serve-engine`.

    engine = SGLangEngine.from_config(SGLangConfig(url="http://127.0.0.1:30000"))   # attach
    engine = SGLangEngine.from_config(SGLangConfig(model_path="Qwen/Qwen3-1.7B"))   # launch sglang.launch_server
    [[a, b]] = engine.generate([prompt_ids], Sampling(temperature=1.0, max_new_tokens=256), n=2)

One `generate` call is one POST /generate: `input_ids` is the batch of prompts, `sampling_params.n` the samples per
prompt (SGLang prefills each prompt once and answers prompt-major, output i * n + j), `return_logprob` true,
`no_stop_trim` true (a `Sample`'s text is not cut at its stop string).

Behaviour logprobs. `Sample.behavior_logprobs` must be the log-probability under the distribution each token was
drawn from. What SGLang's `meta_info.output_token_logprobs` hold (python/sglang/srt/layers/sampler.py):

- greedy (temperature < 1e-6): log softmax(logits), the raw model. The sample's behaviour logprobs are 0.0 (a point
  mass, as for every engine) and its model logprobs these values.
- sampled, default: log softmax(logits / T), taken *before* top-k / top-p / min-p ("temperature_scaled"). Exact
  behaviour logprobs without top-k / top-p. With them, the sampled token's value is renormalised over the kept
  support, rebuilt from the top logprobs asked for with the request (`support_logprob`: SGLang keeps the top_k most
  likely tokens whose exclusive cumulative probability is <= top_p, both on the full distribution).
- sampled, server started with env SGLANG_RETURN_ORIGINAL_LOGPROB=1: log softmax(logits) ("raw"). At T = 1 that is
  the temperature_scaled case; at T != 1 the behaviour logprob needs the full-vocabulary normaliser, so only top-k
  without top-p can be recovered (renormalising value / T over the top k). Other requests are refused with a
  ValueError naming the field: a learner must never receive the wrong distribution's logprobs.

The mode is probed once on connecting (`SGLangConfig.logprobs = "auto"`): the top logprobs of one greedy and one
T = 0.5 token of the same prompt are twice as spread under temperature_scaled. A `serve-engine` says in /server_info
that its logprobs are already those of the sampled distribution, and adds per-token weight versions and the raw
model logprobs to each output. Model logprobs SGLang cannot give (temperature_scaled at T != 1) are NaN.

Versions: SGLang >= 0.5.22 reports which weight version produced which tokens (`meta_info.weight_versions`, spans
of {version, start, end}); they become the sample's `version_ranges` and its `policy_version` is the oldest. Without
spans, only the version when the request finished is known. When it differs from the version read before the
request, weights changed mid-generation at an unknown token: the sample then counts all its tokens from the older
version, which can only over-state staleness.

Tensor parallelism: each of a server's `tp_size` workers joins the weight group (at `rank_offset + tp_rank`), so the
engine takes `n_ranks = tp_size` ranks there. Servers with `dp_size` or `pp_size` > 1 are refused: their workers
would join at the same ranks; run one server per data-parallel replica instead.

Weights reach SGLang from the learner over NCCL (`weight_broadcast.links.HttpLink(name, engine.url)` drives
/init_weights_update_group and /update_weights_from_distributed), never through this client: `update_weights` raises.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import httpx
import structlog

from bus.schema import Sampling
from rollout_node.engines.base import (
    Engine,
    FinishReason,
    OnToken,
    Sample,
    VersionRange,
    WeightUpdate,
    check_request,
)
from rollout_node.server_config import SGLangConfig

log = structlog.get_logger(__name__)

LogprobSemantics = Literal["sampled", "temperature_scaled", "raw"]
GREEDY_TEMPERATURE = 1e-6  # SGLang samples greedily below this temperature (sampling_params.py)
PROBE_TEMPERATURE = 0.5
PROBE_TOP_LOGPROBS = 8


class SGLangError(RuntimeError):
    """A call to the server failed. `route` is the HTTP route, `status` the HTTP status if one came back, and
    `reason` one of: timeout (no answer in time), unreachable (no connection: server down or crashed), http (an error
    status), protocol (an answer this client cannot read)."""

    def __init__(self, message: str, *, route: str, reason: str, status: int | None = None) -> None:
        super().__init__(message)
        self.route = route
        self.reason = reason
        self.status = status


class SGLangRequestError(SGLangError, ValueError):
    """The server refused the request's content (HTTP 400/422): bad input, like the ValueError of any engine."""


class SGLangEngine(Engine):
    """A client of one SGLang-compatible server at `url` (see the module docstring). Thread-safe.

    process: the server this client launched; `close()` stops it. Construction waits for /health (up to
    `config.startup_timeout_s`) and learns how the server's logprobs read.
    """

    def __init__(self, url: str, config: SGLangConfig | None = None, process: subprocess.Popen[bytes] | None = None):
        self.url = url.rstrip("/")
        self.config = config or SGLangConfig(url=self.url)
        self.process = process
        api_key = self.config.api_key()
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(self.config.request_timeout_s, connect=self.config.connect_timeout_s),
        )
        self._pause_lock = threading.Lock()
        self._pause_timer: threading.Timer | None = None
        try:
            self._wait_ready()
            _, info = self._route("/server_info", "/get_server_info")
            self._model_info_route, _ = self._route("/model_info", "/get_model_info")
            self.deterministic = bool(info.get("enable_deterministic_inference"))
            self.n_ranks = _weight_ranks(info)
            self.logprob_semantics = self._logprob_semantics(info)
        except BaseException:
            self._release()
            raise
        log.info("sglang engine ready", url=self.url, logprobs=self.logprob_semantics, version=self.version)

    n_ranks: int = 1  # ranks this server takes in the weight group: its tp_size (/server_info)

    @classmethod
    def from_config(cls, config: SGLangConfig) -> SGLangEngine:
        """Attach to `config.url`, or launch a server for `config.model_path` when no url is set."""
        return cls(config.url, config) if config.url else cls.launch(config)

    @classmethod
    def launch(cls, config: SGLangConfig) -> SGLangEngine:
        """Start `python -m sglang.launch_server` in its own process group (its output goes to our stderr) and
        attach to it; `close()` stops it."""
        if config.model_path is None:
            raise ValueError("model_path: required to launch an SGLang server")
        if importlib.util.find_spec("sglang") is None:
            raise SGLangError(
                "sglang is not installed here (pip install '.[gpu]')", route="launch", reason="unreachable"
            )
        port = config.port or _free_port(config.host)
        command = launch_command(config, port)
        log.info("launching sglang", command=" ".join(command))
        api_key = config.api_key()
        if api_key:  # SGLang takes its key on the command line only: visible in `ps` to users of this host
            command += ["--api-key", api_key]
        process = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
        host = f"[{config.host}]" if ":" in config.host else config.host
        return cls(f"http://{host}:{port}", config, process)

    # --- Engine interface ----------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int = 1, on_token: OnToken | None = None
    ) -> list[list[Sample]]:
        """See `Engine.generate`; `on_token` gets every token once the server's whole answer is in (this client
        posts /generate without SGLang's `stream`)."""
        check_request(prompts, sampling, n)
        sampled = sampling.temperature >= GREEDY_TEMPERATURE
        top_logprobs = self._top_logprobs_needed(sampling) if sampled else 0
        start_version = self.version if self.logprob_semantics != "sampled" else 0
        params: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "n": n,
            "no_stop_trim": True,
        }
        if sampling.stop:
            params["stop"] = list(sampling.stop)
        if sampling.stop_token_ids:
            params["stop_token_ids"] = [int(i) for i in sampling.stop_token_ids]
        if sampling.seed is not None:
            params["sampling_seed"] = sampling.seed
        body: dict[str, Any] = {
            "input_ids": [[int(t) for t in prompt] for prompt in prompts],
            "sampling_params": params,
            "return_logprob": True,
        }
        if top_logprobs:
            body["top_logprobs_num"] = top_logprobs
        if self.deterministic and sampled and n > 1:
            # Deterministic mode seeds every request without sampling_seed with 42, n copies included: the n samples
            # of a prompt would be identical. One request per sample, each with its own seed, in the same order.
            base = sampling.seed if sampling.seed is not None else secrets.randbelow(2**31)
            body["input_ids"] = [ids for ids in body["input_ids"] for _ in range(n)]
            body["sampling_params"] = [params | {"n": 1, "sampling_seed": base + j} for _ in prompts for j in range(n)]
        outputs = self._call("POST", "/generate", body, timeout=self.config.generate_timeout_s)
        if not isinstance(outputs, list) or len(outputs) != len(prompts) * n:
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise self._protocol_error("/generate", f"expected {len(prompts) * n} outputs, got {got}")
        samples = [self._sample(output, sampling, start_version) for output in outputs]
        if on_token is not None:
            for row, sample in enumerate(samples):
                for token_id, logprob in zip(sample.response_ids, sample.behavior_logprobs, strict=True):
                    on_token(row, token_id, logprob)
        return [samples[i : i + n] for i in range(0, len(samples), n)]

    @property
    def version(self) -> int:
        """The server's weight version (GET /model_info); SGLang's initial label "default" reads as 0."""
        route = self._model_info_route
        return _parse_version(self._call("GET", route).get("weight_version"), route)

    def pause(self) -> None:
        """POST /pause_generation with `config.pause_mode`; lifted by `resume()` or after `config.pause_timeout_s`."""
        self._call("POST", "/pause_generation", {"mode": self.config.pause_mode})
        with self._pause_lock:
            if self._pause_timer is not None:
                self._pause_timer.cancel()
            self._pause_timer = threading.Timer(self.config.pause_timeout_s, self._expire_pause)
            self._pause_timer.daemon = True
            self._pause_timer.start()

    def resume(self) -> None:
        with self._pause_lock:
            if self._pause_timer is not None:
                self._pause_timer.cancel()
                self._pause_timer = None
        self._call("POST", "/continue_generation", {})

    def abort(self) -> None:
        """Abort every request on the server (SGLang's abort_all: the engine is this rollout node's alone)."""
        self._call("POST", "/abort_request", {"abort_all": True})

    def update_weights(self, version: int) -> WeightUpdate:
        raise NotImplementedError(
            "SGLangEngine.update_weights: SGLang gets its weights from the learner's WeightSender over NCCL; register "
            f"it there as weight_broadcast.links.HttpLink(name, {self.url!r})"
        )

    def close(self) -> None:
        """Abort the calls in flight and close the connections; a launched server is stopped (SIGTERM, then
        SIGKILL to its process group after 30 s)."""
        if self.process is None:
            with contextlib.suppress(SGLangError):
                self.abort()
        self._release()

    # --- more of SGLang's routes ---------------------------------------------------------------------------------

    def flush_cache(self) -> None:
        """POST /flush_cache: drop the prefix cache (SGLang refuses while requests run: SGLangError)."""
        self._call("POST", "/flush_cache")

    def update_weight_version(self, version: int, abort_all_requests: bool = False) -> None:
        """POST /update_weight_version: relabel the loaded weights as `version` (e.g. after loading a checkpoint)."""
        self._call(
            "POST", "/update_weight_version", {"new_version": str(version), "abort_all_requests": abort_all_requests}
        )

    def health(self) -> bool:
        """Whether GET /health answers 200 within the request timeout."""
        try:
            return self._http.get("/health").is_success
        except httpx.HTTPError:
            return False

    # --- logprobs ------------------------------------------------------------------------------------------------

    def _logprob_semantics(self, info: dict[str, Any]) -> LogprobSemantics:
        """ "sampled" for a serve-engine; else the configured SGLang mode, or the probed one."""
        if (info.get("slipstream") or {}).get("logprobs") == "sampled":
            return "sampled"
        if self.config.logprobs != "auto":
            return self.config.logprobs
        body = {
            "input_ids": [[0], [0]],
            "sampling_params": [
                {"temperature": 0.0, "max_new_tokens": 1},
                {"temperature": PROBE_TEMPERATURE, "max_new_tokens": 1},
            ],
            "return_logprob": True,
            "top_logprobs_num": PROBE_TOP_LOGPROBS,
        }
        greedy, tempered = self._call("POST", "/generate", body, timeout=self.config.generate_timeout_s)
        spreads = []
        for output in (greedy, tempered):
            top = sorted((float(entry[0]) for entry in output["meta_info"]["output_top_logprobs"][0]), reverse=True)
            spreads.append(top[0] - top[-1])
        if spreads[0] < 1e-3:
            raise self._protocol_error(
                "/generate",
                "logprob probe: the model's top logprobs are too flat to tell "
                "the mode; set logprobs to temperature_scaled or raw",
            )
        # temperature_scaled divides the logits by 0.5: the spread doubles; raw leaves it as it is.
        semantics: LogprobSemantics = "temperature_scaled" if spreads[1] / spreads[0] > 1.5 else "raw"
        log.info("sglang logprob mode probed", logprobs=semantics, spread_ratio=round(spreads[1] / spreads[0], 3))
        return semantics

    def _top_logprobs_needed(self, sampling: Sampling) -> int:
        """How many top logprobs per token recover the behaviour logprob of `sampling` (0: none needed); raises
        ValueError naming the field when this server's logprobs cannot give it."""
        if self.logprob_semantics == "sampled":
            return 0
        top_k = sampling.top_k if sampling.top_k > 0 else 0
        if self.logprob_semantics == "raw" and sampling.temperature != 1.0 and (not top_k or sampling.top_p < 1):
            raise ValueError(
                f"sampling.temperature: {sampling.temperature} with this SGLang server's raw logprobs "
                "(SGLANG_RETURN_ORIGINAL_LOGPROB) cannot give the sampled distribution's logprobs without top_k alone; "
                "unset that variable on the server, sample at temperature 1, or use top_k without top_p"
            )
        if not top_k and sampling.top_p >= 1:
            return 0
        if top_k and top_k <= self.config.max_top_logprobs:
            return top_k
        if sampling.top_p < 1:
            return self.config.max_top_logprobs  # the nucleus must close within these (checked per token)
        raise ValueError(
            f"sampling.top_k: {top_k} is above sglang.max_top_logprobs ({self.config.max_top_logprobs}), the most "
            "top logprobs asked for to renormalise onto the top-k support"
        )

    def _sample(self, output: dict[str, Any], sampling: Sampling, start_version: int) -> Sample:
        """One SGLang output (T response tokens) as a Sample."""
        try:
            meta = output["meta_info"]
            ids = [int(t) for t in output["output_ids"]]
            entries = meta.get("output_token_logprobs") or []
            values = [float(entry[0]) for entry in entries]
            if [int(entry[1]) for entry in entries] != ids:
                raise ValueError("output_token_logprobs do not follow output_ids")
            finish, matched = _finish_reason(meta["finish_reason"])
            extension = meta.get("slipstream")
            if extension is not None:
                greedy = sampling.temperature == 0
                behavior = [0.0] * len(ids) if greedy else values
                model = [float(v) for v in extension["model_logprobs"]]
                ranges: list[VersionRange] = [(int(s), int(e), int(v)) for s, e, v in extension["version_ranges"]]
                policy_version = int(extension["policy_version"])
            else:
                behavior, model = self._sglang_logprobs(values, ids, meta.get("output_top_logprobs"), sampling)
                ranges, policy_version = _versions(meta, len(ids), start_version)
            text = str(output["text"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise self._protocol_error("/generate", f"unreadable output: {exc!r}") from exc
        return Sample(
            response_ids=ids,
            behavior_logprobs=behavior,
            model_logprobs=model,
            finish_reason=finish,
            version_ranges=ranges,
            policy_version=policy_version,
            text=text,
            matched_stop=matched,
        )

    def _sglang_logprobs(
        self, values: list[float], ids: list[int], top: list[list[Any]] | None, sampling: Sampling
    ) -> tuple[list[float], list[float]]:
        """(behaviour, model) logprobs of T tokens from SGLang's values (T,) and top logprobs (T, K) [lp, id, _]."""
        temperature = sampling.temperature
        if temperature < GREEDY_TEMPERATURE:
            return [0.0] * len(values), values
        raw = self.logprob_semantics == "raw"
        model = values if raw or temperature == 1.0 else [math.nan] * len(values)
        if not (sampling.top_k > 0 or sampling.top_p < 1):
            return values, model
        if top is None or len(top) != len(values):
            raise ValueError("output_top_logprobs: missing, or not one list per output token")
        scale = 1.0 / temperature if raw else 1.0
        behavior = []
        for t, (value, token) in enumerate(zip(values, ids, strict=True)):
            entries = [(float(entry[0]), int(entry[1])) for entry in top[t]]
            logprob = support_logprob(value, token, entries, scale, sampling.top_k, sampling.top_p)
            if logprob is None:
                raise SGLangError(
                    f"POST /generate: token {t}'s top_p {sampling.top_p} nucleus is wider than the "
                    f"{len(entries)} top logprobs returned; raise sglang.max_top_logprobs or set sampling.top_k",
                    route="/generate",
                    reason="protocol",
                )
            behavior.append(logprob)
        return behavior, model

    # --- HTTP ----------------------------------------------------------------------------------------------------

    def _call(self, method: str, route: str, body: Any = None, timeout: float | None = None) -> Any:
        """One request; the parsed JSON answer (or None for an empty / non-JSON 2xx). Raises SGLangError."""
        seconds = timeout or self.config.request_timeout_s
        try:
            response = self._http.request(
                method, route, json=body, timeout=httpx.Timeout(seconds, connect=self.config.connect_timeout_s)
            )
        except httpx.TimeoutException as exc:
            raise SGLangError(
                f"{method} {route}: no answer from {self.url} within {seconds}s ({type(exc).__name__}){self._exited()}",
                route=route,
                reason="timeout",
            ) from exc
        except httpx.HTTPError as exc:
            raise SGLangError(
                f"{method} {route}: {self.url} unreachable ({type(exc).__name__}: {exc}){self._exited()}",
                route=route,
                reason="unreachable",
            ) from exc
        if not response.is_success:
            error = SGLangRequestError if response.status_code in (400, 422) else SGLangError
            raise error(
                f"{method} {route} -> {response.status_code}: {_error_message(response)}",
                route=route,
                reason="http",
                status=response.status_code,
            )
        if not response.headers.get("content-type", "").startswith("application/json"):
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise self._protocol_error(route, f"invalid JSON ({exc})") from exc

    def _wait_ready(self) -> None:
        """Poll /health until it answers 200; fail when the launched process exits or the startup timeout passes."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise SGLangError(
                    f"SGLang server exited with code {self.process.returncode} before answering /health (its log "
                    "is on stderr)",
                    route="/health",
                    reason="unreachable",
                )
            with contextlib.suppress(httpx.HTTPError):
                if self._http.get("/health", timeout=min(5.0, self.config.request_timeout_s)).is_success:
                    return
            if time.monotonic() > deadline:
                raise SGLangError(
                    f"GET /health: {self.url} did not answer 200 within {self.config.startup_timeout_s}s",
                    route="/health",
                    reason="timeout",
                )
            time.sleep(0.25)

    def _route(self, route: str, alias: str) -> tuple[str, Any]:
        """GET `route`, or its older name `alias` where the server answers 404 for the newer one: (route, answer)."""
        try:
            return route, self._call("GET", route)
        except SGLangError as exc:
            if exc.status != 404:
                raise
        return alias, self._call("GET", alias)

    def _release(self) -> None:
        """Cancel the pause timer, stop a launched server, close the connections."""
        with self._pause_lock:
            if self._pause_timer is not None:
                self._pause_timer.cancel()
                self._pause_timer = None
        if self.process is not None:
            _stop_process_group(self.process)
        self._http.close()

    def _expire_pause(self) -> None:
        log.warning("pause expired without resume; resuming", pause_timeout_s=self.config.pause_timeout_s)
        with contextlib.suppress(SGLangError):
            self._call("POST", "/continue_generation", {})

    def _exited(self) -> str:
        if self.process is not None and self.process.poll() is not None:
            return f"; the SGLang process exited with code {self.process.returncode}"
        return ""

    def _protocol_error(self, route: str, problem: str) -> SGLangError:
        return SGLangError(f"{route} of {self.url}: {problem}", route=route, reason="protocol")


def support_logprob(
    value: float, token: int, top: Iterable[tuple[float, int]], scale: float, top_k: int, top_p: float
) -> float | None:
    """The sampled token's log-probability renormalised over SGLang's top-k / top-p support, or None when `top` does
    not determine that support.

    value: the token's logprob as SGLang returned it; top: (logprob, token id) of the K most likely tokens (any
    order), same semantics; scale: 1 for temperature-scaled logprobs, 1/T for raw ones (raw requires top_p == 1 unless
    T == 1). SGLang keeps a token when it is among the top_k (top_k <= 0: all) and the probability of the tokens above
    it is <= top_p; both rules apply to the temperature-scaled distribution before filtering.
    """
    ranked = sorted(top, reverse=True)
    candidates = ranked[:top_k] if top_k > 0 else ranked
    closed = 0 < top_k <= len(ranked)  # all of the top-k are listed
    support: list[tuple[float, int]] = []
    mass_above = 0.0
    for logprob, token_id in candidates:
        if top_p < 1 and mass_above > top_p:  # this token and all less likely ones are outside the nucleus
            closed = True
            break
        support.append((logprob * scale, token_id))
        mass_above += math.exp(logprob)
    if not closed:
        return None
    if all(token_id != token for _, token_id in support):
        support.append((value * scale, token))  # it was drawn, so it was kept: a float tie at the nucleus edge
    peak = max(lp for lp, _ in support)
    normaliser = peak + math.log(sum(math.exp(lp - peak) for lp, _ in support))
    return value * scale - normaliser


def _finish_reason(reason: Any) -> tuple[FinishReason, int | str | None]:
    kind = reason.get("type") if isinstance(reason, dict) else None
    if kind == "stop":
        return "stop", reason.get("matched")
    if kind in ("length", "abort"):
        return kind, None
    raise ValueError(f"finish_reason: expected type stop, length or abort, got {reason!r}")


def _parse_version(value: Any, route: str) -> int:
    if value in (None, "default"):  # SGLang's label before any update
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SGLangError(
            f"{route}: weight_version {value!r} is not an integer policy version", route=route, reason="protocol"
        ) from None


def _error_message(response: httpx.Response) -> str:
    """The message of an error answer: SGLang's {"error": {"message"}}, {"message"}, {"detail"}, or the text."""
    with contextlib.suppress(ValueError):
        body = response.json()
        if isinstance(body, dict):
            error = body.get("error")
            message = error.get("message") if isinstance(error, dict) else body.get("message") or body.get("detail")
            if message:
                return str(message)
    return response.text[:500] or response.reason_phrase


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the process group the launched server leads (its scheduler and detokenizer too), SIGKILL if needed."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(grace_s)


def launch_command(config: SGLangConfig, port: int) -> list[str]:
    """The command that starts an SGLang server for `config` on `port` (the API key, when set, is added after)."""
    if config.model_path is None:
        raise ValueError("model_path: required to launch an SGLang server")
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", config.model_path]
    return command + ["--host", config.host, "--port", str(port), *config.launch_args]


def _weight_ranks(info: dict[str, Any]) -> int:
    """The ranks a server's workers take in the weight group (its `tp_size`); ValueError naming the server argument
    for layouts whose workers would collide there."""
    for arg in ("dp_size", "pp_size"):
        if int(info.get(arg) or 1) > 1:
            raise ValueError(
                f"{arg}: {info[arg]} on this SGLang server; the weight broadcast joins the tp_size workers of one "
                "replica (rank_offset + tp_rank), so run one server per replica with dp_size = pp_size = 1"
            )
    return int(info.get("tp_size") or 1)


def _versions(meta: dict[str, Any], length: int, start_version: int) -> tuple[list[VersionRange], int]:
    """(version_ranges, policy_version) of one output of `length` tokens: SGLang's per-token spans when present,
    else every token at the older of the versions before and after the request."""
    spans = meta.get("weight_versions")
    if spans:
        ranges = [
            (int(span["start"]), int(span["end"]), _parse_version(span["version"], "/generate"))
            for span in spans
            if int(span["end"]) > int(span["start"])
        ]
        bounds = [0] + [b for start, end, _ in ranges for b in (start, end)] + [length]
        if any(bounds[i] != bounds[i + 1] for i in range(0, len(bounds), 2)):  # each span starts where one ended
            raise ValueError(f"meta_info.weight_versions: spans {spans} do not cover the {length} tokens in order")
        return ranges, min((v for _, _, v in ranges), default=_parse_version(spans[-1]["version"], "/generate"))
    policy_version = min(start_version, _parse_version(meta.get("weight_version"), "/generate"))
    return ([(0, length, policy_version)] if length else []), policy_version
