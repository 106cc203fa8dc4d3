"""SGLangEngine against a stand-in for SGLang's /generate (SGLang itself needs a GPU): the logprob mode is probed,
top-k / top-p samples get the logprob of the distribution they were drawn from, what cannot be recovered is refused.

The stand-in samples like SGLang's sampler (python/sglang/srt/layers/sampler.py): probabilities softmax(logits / T),
kept when among the top_k and when the mass above them is <= top_p (both on the unfiltered distribution), and
reports log softmax(logits / T) before filtering ("temperature_scaled") or log softmax(logits) ("raw",
SGLANG_RETURN_ORIGINAL_LOGPROB=1). Its logits are one fixed vector at every step, so the reference is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request

from bus.schema import Sampling
from rollout_node.engines.sglang import SGLangEngine, SGLangError, support_logprob
from rollout_node.server_config import SGLangConfig
from telemetry.http import ServerHandle, serve_in_thread

LOGITS = np.random.default_rng(0).normal(0.0, 2.0, 16)  # (V,) the stand-in model's logits at every step


@dataclass
class FakeSGLang:
    """What the stand-in reports: logprob mode, weight versions (before / at the end of a request), server args."""

    mode: str
    start_version: str = "default"
    end_version: str = "default"
    deterministic: bool = False  # as --enable-deterministic-inference: a request without sampling_seed gets 42
    server_args: dict[str, Any] = field(default_factory=dict)  # more of /server_info (tp_size, dp_size, ...)
    weight_versions: list[dict[str, Any]] | None = None  # meta_info.weight_versions, SGLang >= 0.5.22's spans


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def kept(temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """(V,) bool: SGLang's joint top-k / top-p support of softmax(LOGITS / T)."""
    probs = np.exp(log_softmax(LOGITS / temperature))
    order = np.argsort(-probs)
    above = np.cumsum(probs[order]) - probs[order]
    keep_sorted = (np.arange(len(order)) < (top_k if top_k > 0 else len(order))) & (above <= top_p)
    keep = np.zeros(len(order), dtype=bool)
    keep[order] = keep_sorted
    return keep


def reference(token: int, temperature: float, top_k: int, top_p: float) -> float:
    """The log-probability of `token` under the renormalised distribution the stand-in samples from."""
    probs = np.exp(log_softmax(LOGITS / temperature)) * kept(temperature, top_k, top_p)
    return float(np.log(probs[token] / probs.sum()))


def fake_app(fake: FakeSGLang) -> FastAPI:
    app = FastAPI()
    rng = np.random.default_rng(1)

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {}

    @app.get("/server_info")
    def server_info() -> dict[str, Any]:
        return {"version": "0.5.23", "enable_deterministic_inference": fake.deterministic, **fake.server_args}

    @app.get("/model_info")
    def model_info() -> dict[str, Any]:
        return {"weight_version": fake.start_version}

    @app.post("/generate")
    async def generate(request: Request) -> list[dict[str, Any]]:
        body = await request.json()
        params = body["sampling_params"]
        rows = [
            (prompt, params if isinstance(params, dict) else params[i])
            for i, prompt in enumerate(body["input_ids"])
            for _ in range(params.get("n", 1) if isinstance(params, dict) else 1)
        ]
        return [one_output(p, body.get("top_logprobs_num", 0)) for _, p in rows]

    def one_output(params: dict[str, Any], top_n: int) -> dict[str, Any]:
        draw = np.random.default_rng(params.get("sampling_seed", 42)) if fake.deterministic else rng
        temperature = params.get("temperature", 1.0)
        greedy = temperature < 1e-6
        logprobs = log_softmax(LOGITS if greedy or fake.mode == "raw" else LOGITS / temperature)
        ids: list[int] = []
        for _ in range(params["max_new_tokens"]):
            if greedy:
                ids.append(int(np.argmax(LOGITS)))
                continue
            probs = np.exp(log_softmax(LOGITS / temperature))
            probs *= kept(temperature, params.get("top_k", -1), params.get("top_p", 1.0))
            ids.append(int(draw.choice(len(probs), p=probs / probs.sum())))
        top = [[float(logprobs[i]), int(i), None] for i in np.argsort(-logprobs)[:top_n]]
        meta = {
            "finish_reason": {"type": "length", "length": len(ids)},
            "weight_version": fake.end_version,
            "output_token_logprobs": [[float(logprobs[t]), t, None] for t in ids],
        }
        if fake.weight_versions is not None:
            meta["weight_versions"] = fake.weight_versions
        if top_n:
            meta["output_top_logprobs"] = [top] * len(ids)
        return {"text": "", "output_ids": ids, "meta_info": meta}

    return app


@pytest.fixture(params=["temperature_scaled", "raw"])
def fake(request: pytest.FixtureRequest) -> FakeSGLang:
    return FakeSGLang(mode=request.param)


@pytest.fixture
def server(fake: FakeSGLang) -> Iterator[ServerHandle]:
    handle = serve_in_thread(fake_app(fake))
    yield handle
    handle.stop()


def connect(server: ServerHandle, **config: Any) -> SGLangEngine:
    return SGLangEngine(server.url, SGLangConfig(url=server.url, api_key_env=None, **config))


CASES = [  # (temperature, top_k, top_p) for each mode; the others must be refused (see below)
    (0.7, -1, 1.0),
    (1.0, -1, 0.8),
    (0.7, 5, 1.0),
    (1.3, -1, 0.8),
    (0.7, 6, 0.7),
]


def recoverable(mode: str, temperature: float, top_k: int, top_p: float) -> bool:
    return mode == "temperature_scaled" or temperature == 1.0 or (top_k > 0 and top_p == 1.0)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), CASES)
def test_behaviour_logprobs_are_those_of_the_distribution_sampled_from(
    server: ServerHandle, fake: FakeSGLang, temperature: float, top_k: int, top_p: float
) -> None:
    engine = connect(server)
    assert engine.logprob_semantics == fake.mode  # probed
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=40)
    if not recoverable(fake.mode, temperature, top_k, top_p):
        with pytest.raises(ValueError, match="sampling.temperature: .* raw logprobs"):
            engine.generate([[1, 2]], sampling, n=2)
        return
    samples = [s for group in engine.generate([[1, 2], [3]], sampling, n=2) for s in group]
    assert len({tuple(s.response_ids) for s in samples}) > 1
    for sample in samples:
        expected = [reference(t, temperature, top_k, top_p) for t in sample.response_ids]
        np.testing.assert_allclose(sample.behavior_logprobs, expected, rtol=0, atol=1e-9)
        raw = [float(log_softmax(LOGITS)[t]) for t in sample.response_ids]
        if fake.mode == "raw" or temperature == 1.0:
            np.testing.assert_allclose(sample.model_logprobs, raw, rtol=0, atol=1e-9)
        else:  # SGLang cannot say: unknown, not wrong
            assert all(math.isnan(v) for v in sample.model_logprobs)


def test_greedy_tokens_have_a_point_mass_behaviour_and_the_raw_model_logprob(server: ServerHandle) -> None:
    [[sample]] = connect(server).generate([[1]], Sampling(temperature=0.0, max_new_tokens=3))
    assert sample.response_ids == [int(np.argmax(LOGITS))] * 3 and sample.behavior_logprobs == [0.0] * 3
    assert sample.model_logprobs == [float(log_softmax(LOGITS).max())] * 3


@pytest.mark.parametrize("fake", [FakeSGLang("temperature_scaled")], ids=["temperature_scaled"])
def test_supports_the_top_logprobs_cannot_span_are_refused(server: ServerHandle) -> None:
    engine = connect(server, max_top_logprobs=4)
    with pytest.raises(ValueError, match=r"sampling.top_k: 8 is above sglang.max_top_logprobs \(4\)"):
        engine.generate([[1]], Sampling(top_k=8, max_new_tokens=2))
    with pytest.raises(SGLangError, match="nucleus is wider than the 4 top logprobs") as wide:
        engine.generate([[1]], Sampling(top_p=0.99, max_new_tokens=2))
    assert wide.value.reason == "protocol"


@pytest.mark.parametrize(
    "fake", [FakeSGLang("temperature_scaled", start_version="3", end_version="5")], ids=["changed"]
)
def test_a_version_change_during_a_request_counts_every_token_from_the_older_version(server: ServerHandle) -> None:
    engine = connect(server)
    assert engine.version == 3
    [[sample]] = engine.generate([[1]], Sampling(max_new_tokens=4))
    assert sample.policy_version == 3 and sample.version_ranges == [(0, 4, 3)]


SPANS = [{"version": v, "start": start, "end": end} for v, start, end in [("3", 0, 1), ("4", 1, 3), ("5", 3, 4)]]


@pytest.mark.parametrize(
    "fake", [FakeSGLang("temperature_scaled", start_version="3", end_version="5", weight_versions=SPANS)], ids=["spans"]
)
def test_per_token_weight_versions_become_the_samples_version_ranges(server: ServerHandle) -> None:
    engine = connect(server)
    [[sample]] = engine.generate([[1]], Sampling(max_new_tokens=4))
    assert sample.version_ranges == [(0, 1, 3), (1, 3, 4), (3, 4, 5)] and sample.policy_version == 3


@pytest.mark.parametrize(
    "fake", [FakeSGLang("temperature_scaled", weight_versions=[{"version": "3", "start": 1, "end": 4}])], ids=["gap"]
)
def test_spans_that_do_not_cover_the_tokens_are_a_protocol_error(server: ServerHandle) -> None:
    engine = connect(server)
    with pytest.raises(SGLangError, match="weight_versions: .* do not cover the 4 tokens") as caught:
        engine.generate([[1]], Sampling(max_new_tokens=4))
    assert caught.value.reason == "protocol"


@pytest.mark.parametrize(
    ("fake", "n_ranks"),
    [(FakeSGLang("raw"), 1), (FakeSGLang("raw", server_args={"tp_size": 4, "dp_size": 1, "pp_size": 1}), 4)],
    ids=["no-tp", "tp4"],
)
def test_the_engine_takes_one_weight_group_rank_per_tensor_parallel_worker(server: ServerHandle, n_ranks: int) -> None:
    assert connect(server, logprobs="raw").n_ranks == n_ranks


@pytest.mark.parametrize(
    ("fake", "arg"),
    [(FakeSGLang("raw", server_args={"tp_size": 2, "dp_size": 2}), "dp_size"),
     (FakeSGLang("raw", server_args={"pp_size": 2}), "pp_size")],
    ids=["dp2", "pp2"],
)  # fmt: skip
def test_servers_whose_workers_would_collide_in_the_weight_group_are_refused(server: ServerHandle, arg: str) -> None:
    with pytest.raises(ValueError, match=f"{arg}: 2 on this SGLang server"):
        connect(server, logprobs="raw")


@pytest.mark.parametrize("fake", [FakeSGLang("raw", deterministic=True)], ids=["deterministic"])
def test_a_deterministic_server_gives_each_sample_of_a_prompt_its_own_seed(server: ServerHandle) -> None:
    engine = connect(server, logprobs="raw")  # configured: no probe
    sampling = Sampling(max_new_tokens=6)
    [group] = engine.generate([[1]], sampling, n=4)
    assert len({tuple(s.response_ids) for s in group}) > 1  # one seed (42) for all would make them identical
    seeded = Sampling(seed=3, max_new_tokens=6)
    first, again = (engine.generate([[1], [2]], seeded, n=4) for _ in range(2))
    assert [[s.response_ids for s in g] for g in first] == [[s.response_ids for s in g] for g in again]
    assert len({tuple(s.response_ids) for s in first[0]}) > 1


def test_support_logprob_renormalises_over_the_listed_support_or_says_it_cannot() -> None:
    top = [(math.log(0.5), 0), (math.log(0.3), 1), (math.log(0.15), 2), (math.log(0.05), 3)]
    assert support_logprob(math.log(0.3), 1, top, 1.0, 2, 1.0) == pytest.approx(math.log(0.3 / 0.8))
    assert support_logprob(math.log(0.3), 1, top, 1.0, -1, 0.6) == pytest.approx(math.log(0.3 / 0.8))
    assert support_logprob(math.log(0.3), 1, top[:2], 1.0, -1, 0.9) is None  # the nucleus may go on past the list
    assert support_logprob(math.log(0.3), 1, top[:2], 1.0, 3, 1.0) is None  # the top 3 are not all listed
    # A drawn token left out by a float tie at the nucleus edge was kept: it joins the support.
    assert support_logprob(math.log(0.15), 2, top, 1.0, -1, 0.5) == pytest.approx(math.log(0.15 / 0.95))
