"""Any `Engine` behind SGLang's HTTP routes and payloads (a faithful subset), so one client drives SGLang and ours.

    app = build_app(engine, api_key=key, receiver=HttpReceiver(weight_loader(engine)), model_path=path)
    server = telemetry.http.serve_in_thread(app, "127.0.0.1", 0)   # .port, .url, .stop()

Routes (request and response JSON as SGLang >= 0.5's; docs/sglang.md lists every field):

- POST /generate: `input_ids` (one prompt or a batch), `sampling_params` (incl. `n`, `sampling_seed`, `stop`,
  `stop_token_ids`, `no_stop_trim`), `return_logprob`. One output per sample, prompt-major (i * n + j); a single
  object when the input is one prompt and n = 1.
- GET /health (liveness), /health_generate (also decodes one token; 503 when that takes over its timeout).
- GET /model_info (alias /get_model_info): model path and `weight_version`; GET /weight_version (alias
  /get_weight_version); GET /server_info (alias /get_server_info): `slipstream.logprobs = "sampled"` tells a client
  how to read the logprobs.
- POST /pause_generation `{"mode": "abort" | "retract" | "in_place"}` (abort ends the calls in flight, the others
  keep them), POST /continue_generation, POST /abort_request `{"abort_all": true}`.
- POST /update_weight_version `{"new_version": "7"}`: relabels the live weights.
- GET|POST /flush_cache: 200, nothing to flush (the engine keeps no cache across calls).
- POST /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group: when a
  `receiver` is given (`weight_broadcast.http_receiver.weight_routes`).
- GET /metrics: `telemetry.metrics.REGISTRY` in the Prometheus text format.

Differences from SGLang, all on purpose: `output_token_logprobs` of a sampled (temperature > 0) token is its logprob
under the distribution it was drawn from (temperature, top-k, top-p applied and renormalised), where SGLang gives
log softmax(logits / T) before top-k / top-p; greedy tokens carry the raw model logprob in both. Top-k then top-p
follow the torch engine's rule (transformers'), not SGLang's joint filter. Each output's `meta_info.slipstream` adds
what SGLang cannot say: `version_ranges` (per-token weight versions of in-flight updates), `policy_version` and the raw
`model_logprobs`. Only token ids go in (no `text`), no streaming, no top logprobs.

Guards: with an API key every route but /health, /health_generate and /metrics needs `Authorization: Bearer <key>`
(SGLang's `--api-key` rule; 401 otherwise). Bodies over `max_body_bytes` get 413, bodies slower than
`body_timeout_s` 408, malformed JSON and invalid fields 400 naming the field; never a 500 for bad input.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import anyio
import structlog
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    field_validator,
    model_validator,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bus.schema import Sampling
from rollout_node.engines.base import Engine, Sample
from telemetry.logs import set_policy_version
from telemetry.metrics import REGISTRY, ROLLOUT_POLICY_VERSION, ROLLOUT_WEIGHT_LOAD_DURATION
from weight_broadcast.http_receiver import HttpReceiver, weight_routes

log = structlog.get_logger(__name__)

OPEN_PATHS = frozenset({"/health", "/health_generate", "/metrics"})  # answered without the API key, as SGLang does
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
LOGPROB_SEMANTICS = "sampled"  # what /server_info and each output's meta_info.slipstream say about logprobs

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Prompt = Annotated[list[TokenId], Field(min_length=1, max_length=1_000_000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is named in a 400 instead of silently ignored


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


class SamplingParams(_Body):
    """SGLang's `sampling_params` that this engine serves; the penalties are accepted at their neutral value only."""

    max_new_tokens: int = Field(128, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0, le=1e4, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=2**31 - 1)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=32)  # SGLang's MAX_STOP_COUNT
    stop_token_ids: list[TokenId] | None = Field(None, max_length=1024)
    n: int = Field(1, ge=1, le=4096)
    sampling_seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # SGLang's int64 range
    no_stop_trim: bool = False
    skip_special_tokens: Literal[True] = True
    spaces_between_special_tokens: bool = True
    ignore_eos: Literal[False] = False
    min_p: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    presence_penalty: float = Field(0.0, ge=0, le=0)
    repetition_penalty: float = Field(1.0, ge=1, le=1)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, top_k: int) -> int:
        if top_k == 0:
            raise ValueError("must be -1 (no top-k) or >= 1, as in SGLang")
        return top_k

    def to_sampling(self) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            seed=self.sampling_seed,
        )


class GenerateRequest(BaseModel):
    """SGLang's `GenerateReqInput`, token-id prompts only. One prompt (a flat list) is held as a batch of one.

    Unknown top-level keys are ignored, as SGLang ignores them (`api_types.GenerateRequest`); unknown sampling keys are
    refused, as SGLang refuses them. Fields SGLang serves and this engine cannot (text prompts, streaming, top
    logprobs) are refused by name."""

    model_config = ConfigDict(extra="ignore")

    input_ids: Annotated[list[Prompt], Field(min_length=1, max_length=65536)]
    sampling_params: Annotated[list[SamplingParams], Field(min_length=1), BeforeValidator(_as_list)] = Field(
        default_factory=lambda: [SamplingParams()]
    )
    return_logprob: bool = False
    logprob_start_len: int = -1  # only output logprobs are returned, whatever this says
    top_logprobs_num: int = Field(0, ge=0, le=0)
    return_text_in_logprobs: bool = False
    stream: Literal[False] = False
    text: None = None
    rid: str | list[str] | None = None
    # SGLang fields that would change what comes back, which this engine does not serve: refused by name if set.
    token_ids_logprob: None = None
    return_hidden_states: Literal[False, None] = None
    return_prompt_token_ids: Literal[False] = False
    input_embeds: None = None
    image_data: None = None
    video_data: None = None
    audio_data: None = None
    lora_path: None = None
    session_params: None = None
    custom_logit_processor: None = None
    _single: bool = PrivateAttr(False)  # the input was one prompt, not a batch

    @model_validator(mode="wrap")
    @classmethod
    def _one_prompt(cls, data: Any, handler: ModelWrapValidatorHandler[GenerateRequest]) -> GenerateRequest:
        ids = data.get("input_ids") if isinstance(data, dict) else None
        single = isinstance(ids, list) and bool(ids) and not isinstance(ids[0], list)
        request = handler({**data, "input_ids": [ids]} if single else data)
        request._single = single
        return request

    def one_sampling(self) -> SamplingParams:
        """The sampling params of every prompt (a list must hold one equal entry per prompt: one engine call)."""
        params = self.sampling_params
        if len(params) == 1:
            return params[0]
        if len(params) != len(self.input_ids) or any(p != params[0] for p in params):
            raise ValueError("sampling_params: a list needs one entry per prompt, all equal, on this server")
        return params[0]


class PauseRequest(_Body):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class AbortRequest(_Body):
    rid: str = ""
    abort_all: bool = False


class WeightVersionRequest(_Body):
    new_version: str = Field(pattern=r"^\d{1,18}$")
    abort_all_requests: bool = True


def build_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    receiver: HttpReceiver | None = None,
    model_path: str = "",
    tokenizer: Any = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = 30.0,
    health_timeout_s: float = 20.0,
) -> FastAPI:
    """The FastAPI app serving `engine` on SGLang's routes (see the module docstring).

    receiver: mounts the weight-update routes (None: the engine gets its weights another way; those routes 404).
    model_path: what /model_info and /server_info report (a string, as SGLang's always is).
    tokenizer: decodes `return_text_in_logprobs` pieces and trims a matched stop token from `text` as SGLang does
    (None: pieces are null and the text keeps a stop token that is not a special token).
    """
    if api_key is not None and not api_key:
        raise ValueError("api_key: must be a non-empty string or None")
    app = FastAPI(title="slipstream serve-engine", openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    ROLLOUT_POLICY_VERSION.set(engine.version)

    @app.post("/generate")
    def generate(request: GenerateRequest) -> Response:
        started = time.monotonic()
        try:
            params = request.one_sampling()
            prompts = request.input_ids
            completions = engine.generate(prompts, params.to_sampling(), params.n)
        except ValueError as exc:
            return _error(400, str(exc))
        latency = time.monotonic() - started
        outputs = [
            _output(sample, prompt, params, request, tokenizer, latency)
            for prompt, group in zip(prompts, completions, strict=True)
            for sample in group
        ]
        # JSONResponse straight away: FastAPI's encoder would walk every float of every logprob list again.
        return JSONResponse(outputs[0] if request._single and params.n == 1 else outputs)

    @app.get("/health")
    def health() -> Response:
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        one_token = Sampling(temperature=0.0, max_new_tokens=1)
        with anyio.move_on_after(health_timeout_s):
            try:
                await anyio.to_thread.run_sync(engine.generate, [[0]], one_token, abandon_on_cancel=True)
            except Exception as exc:  # any failure to decode is "unhealthy", with the reason in the log
                log.warning("health check generation failed", error=str(exc))
                return Response(status_code=503)
            return Response(status_code=200)
        log.warning("health check generation timed out", timeout_s=health_timeout_s)
        return Response(status_code=503)

    @app.get("/model_info")
    @app.get("/get_model_info")
    def model_info() -> dict[str, Any]:
        return {
            "model_path": model_path,
            "tokenizer_path": model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": str(engine.version),
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }

    @app.get("/weight_version")
    @app.get("/get_weight_version")
    def weight_version() -> dict[str, str]:
        return {"weight_version": str(engine.version)}

    @app.get("/server_info")
    @app.get("/get_server_info")
    def server_info() -> dict[str, Any]:
        return {
            "model_path": model_path,
            "weight_version": str(engine.version),
            "engine": type(engine).__name__,
            "slipstream": {"logprobs": LOGPROB_SEMANTICS, "version_ranges": True},
        }

    @app.post("/pause_generation")
    def pause_generation(request: PauseRequest | None = None) -> dict[str, str]:
        mode = (request or PauseRequest()).mode
        engine.pause()
        if mode == "abort":
            engine.abort()
        log.info("generation paused", mode=mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    def continue_generation() -> dict[str, str]:
        engine.resume()
        log.info("generation continued")
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.post("/abort_request")
    def abort_request(request: AbortRequest) -> Response:
        if not request.abort_all:
            return _error(400, "rid: aborting one request is not served; send abort_all=true")
        engine.abort()
        return Response(status_code=200)

    @app.post("/update_weight_version")
    def update_weight_version(request: WeightVersionRequest) -> JSONResponse:
        if request.abort_all_requests:
            engine.abort()
        try:
            engine.update_weights(int(request.new_version)).commit()  # nothing staged: the label changes alone
        except TimeoutError as exc:
            return JSONResponse({"success": False, "message": f"update_weight_version: {exc}"}, status_code=400)
        _note_version(int(request.new_version))
        message = f"Weight version updated to {request.new_version}"
        return JSONResponse({"success": True, "message": message, "new_version": request.new_version})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    def flush_cache() -> Response:
        return Response("Cache flushed.\n", status_code=200)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    if receiver is not None:
        app.include_router(weight_routes(receiver))
    return app


def weight_loader(engine: Engine) -> Callable[[list[tuple[str, torch.Tensor]], int], None]:
    """An `HttpReceiver` load function: the engine's staged update, timed, with the version exported."""

    def load(named_tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        started = time.monotonic()
        engine.load_weights(named_tensors, version)
        ROLLOUT_WEIGHT_LOAD_DURATION.observe(time.monotonic() - started)
        _note_version(version)

    return load


def _note_version(version: int) -> None:
    ROLLOUT_POLICY_VERSION.set(version)
    set_policy_version(version)


def _output(
    sample: Sample,
    prompt: Sequence[int],
    params: SamplingParams,
    request: GenerateRequest,
    tokenizer: Any,
    latency: float,
) -> dict[str, Any]:
    """One SGLang output object for `sample` (T tokens): text, output_ids (T,), meta_info."""
    ids = sample.response_ids
    last_version = sample.version_ranges[-1][2] if sample.version_ranges else sample.policy_version
    extension: dict[str, Any] = {
        "logprobs": LOGPROB_SEMANTICS,
        "policy_version": sample.policy_version,
        "version_ranges": [list(r) for r in sample.version_ranges],
    }
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "finish_reason": _finish_reason(sample),
        "prompt_tokens": len(prompt),
        "completion_tokens": len(ids),
        "cached_tokens": 0,
        "weight_version": str(last_version),
        "e2e_latency": round(latency, 6),
    }
    if request.return_logprob:
        # Greedy tokens: the raw model logprob, as SGLang gives (their sampling distribution is a point mass).
        values = sample.model_logprobs if params.temperature == 0 else sample.behavior_logprobs
        pieces = [tokenizer.decode([t]) if tokenizer and request.return_text_in_logprobs else None for t in ids]
        meta["output_token_logprobs"] = [[v, t, p] for v, t, p in zip(values, ids, pieces, strict=True)]
        extension["model_logprobs"] = sample.model_logprobs
    meta["slipstream"] = extension
    return {"text": _text(sample, params, tokenizer), "output_ids": ids, "meta_info": meta}


def _finish_reason(sample: Sample) -> dict[str, Any]:
    if sample.finish_reason == "stop":
        return {"type": "stop", "matched": sample.matched_stop}
    if sample.finish_reason == "length":
        return {"type": "length", "length": len(sample.response_ids)}
    return {"type": "abort", "message": "aborted"}


def _text(sample: Sample, params: SamplingParams, tokenizer: Any) -> str:
    """SGLang's text: cut before a matched stop string, without a matched stop token, unless no_stop_trim."""
    matched = sample.matched_stop
    if params.no_stop_trim or matched is None:
        return sample.text
    if isinstance(matched, str):
        cut = sample.text.find(matched)
        return sample.text[:cut] if cut >= 0 else sample.text
    if tokenizer is not None:
        return tokenizer.decode(sample.response_ids[:-1], skip_special_tokens=True)
    return sample.text


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


async def _invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    """400 naming each bad field (SGLang answers validation errors with 400 too)."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"][1:]) or "body"
        if error["type"] == "json_invalid":
            where, error["msg"] = "body", f"invalid JSON at character {error['loc'][-1]} ({error['ctx']['error']})"
        problems.append(f"{where}: {error['msg']}")
    return _error(400, "; ".join(problems))


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware run before routing: API key, body size and body read deadline. The body is read here in full
    (bounded) and replayed to the app, so a refusal never reaches a handler and never becomes a 500."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await _reply(send, 401, "Authorization: a 'Bearer <api key>' header with this server's key is required")
            return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            await _reply(send, 400, f"Content-Length: not a byte count ({declared[:32]!r})")
            return
        if int(declared) > self.max_body_bytes:
            await _reply(send, 413, f"body: {int(declared)} bytes exceed the limit of {self.max_body_bytes}")
            return
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await self._read_body(receive)
        except TimeoutError:
            await _reply(send, 408, f"body: not received within {self.body_timeout_s}s")
            return
        except _BodyTooLarge:
            await _reply(send, 413, f"body: more than the limit of {self.max_body_bytes} bytes")
            return
        if body is None:  # the client went away
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later reads only wait for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key or b"")

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _reply(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
