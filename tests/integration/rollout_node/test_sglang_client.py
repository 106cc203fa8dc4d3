"""SGLangEngine driven against serve-engine over real HTTP: the same samples as the engine in-process, stops,
pause / resume / abort, versions, clear errors for bad input, a wrong key and a server that is not there."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.schema import Sampling
from rollout_node.engines.base import Sample, TorchEngineConfig
from rollout_node.engines.sglang import SGLangEngine, SGLangError, SGLangRequestError
from rollout_node.engines.torch_engine import TorchEngine
from rollout_node.server import build_app
from rollout_node.server_config import SGLangConfig
from slipstream.demo_model import build_demo_model
from telemetry.http import ServerHandle, serve_in_thread

KEY = "client-test-key"
PROMPTS = ["3+4=", "12+7=", "rev 123="]  # different lengths: the batch is left padded


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo"), hidden_size=64, intermediate_size=128, init_std=0.3)


@pytest.fixture(scope="module")
def served(model_path: Path) -> TorchEngine:
    """The engine behind the server."""
    return TorchEngine.from_config(TorchEngineConfig(model_path=str(model_path)))


@pytest.fixture(scope="module")
def local(model_path: Path) -> TorchEngine:
    """A second engine from the same checkpoint, in this process: the reference."""
    return TorchEngine.from_config(TorchEngineConfig(model_path=str(model_path)))


@pytest.fixture(scope="module")
def server(served: TorchEngine) -> Iterator[ServerHandle]:
    handle = serve_in_thread(build_app(served, api_key=KEY, tokenizer=served.tokenizer))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "engine-key"
    path.write_text(KEY + "\n")
    return path


@pytest.fixture(scope="module")
def client(server: ServerHandle, key_file: Path) -> Iterator[SGLangEngine]:
    engine = SGLangEngine(server.url, SGLangConfig(url=server.url, api_key_file=str(key_file), generate_timeout_s=120))
    yield engine
    engine.close()


def encode(engine: TorchEngine, texts: list[str]) -> list[list[int]]:
    return [engine.tokenizer.encode(text) for text in texts]


def flat(completions: list[list[Sample]]) -> list[Sample]:
    return [sample for group in completions for sample in group]


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=24, seed=7),
        Sampling(temperature=1.0, max_new_tokens=24, seed=8, stop=["7"], stop_token_ids=[9]),
        Sampling(temperature=0.0, max_new_tokens=12),
    ],
    ids=["filtered", "stops", "greedy"],
)
def test_samples_equal_the_in_process_engine_for_the_same_seed(
    client: SGLangEngine, local: TorchEngine, sampling: Sampling
) -> None:
    prompts = encode(local, PROMPTS)
    reported: list[tuple[int, int, float]] = []
    remote = client.generate(prompts, sampling, n=3, on_token=lambda *token: reported.append(token))
    expected = local.generate(prompts, sampling, n=3)
    assert [len(group) for group in remote] == [3, 3, 3]
    assert flat(remote) == flat(expected)  # ids, both logprobs, finish reasons, stops, text and versions, exactly
    rows = []
    for row, sample in enumerate(flat(remote)):
        rows += [(row, token, lp) for token, lp in zip(sample.response_ids, sample.behavior_logprobs, strict=True)]
    assert reported == rows  # every token, row by row (this client reports them once the answer is in)
    if sampling.temperature > 0:
        assert len({tuple(s.response_ids) for s in remote[0]}) > 1  # n samples, not n copies
    else:
        assert all(lp == 0.0 for s in flat(remote) for lp in s.behavior_logprobs)


def test_stop_strings_and_ids_end_samples_and_the_text_keeps_the_stop(client: SGLangEngine, local: TorchEngine) -> None:
    free = flat(client.generate(encode(local, PROMPTS), Sampling(max_new_tokens=24, seed=3)))
    stop = next(s.text[2:4] for s in free if len(s.text) >= 4)
    samples = flat(client.generate(encode(local, PROMPTS), Sampling(max_new_tokens=24, seed=3, stop=[stop])))
    stopped = [s for s in samples if s.matched_stop == stop]
    assert stopped and all(s.finish_reason == "stop" and stop in s.text for s in stopped)  # no_stop_trim


def test_pause_holds_calls_until_resume_and_abort_ends_them(client: SGLangEngine, local: TorchEngine) -> None:
    prompts = encode(local, PROMPTS[:1])
    results: list[list[list[Sample]]] = []

    def generate() -> None:
        results.append(client.generate(prompts, Sampling(max_new_tokens=16, seed=1)))

    client.pause()
    held = threading.Thread(target=generate)
    held.start()
    held.join(0.5)
    assert held.is_alive()  # paused: the call waits (it cannot finish while no step may start)
    client.resume()
    held.join(60)
    assert not held.is_alive() and results[0][0][0].finish_reason in ("stop", "length")

    client.pause()
    aborted = threading.Thread(target=generate)
    aborted.start()
    for _ in range(300):  # abort until the call, held by the pause, has reached the server and ended
        client.abort()
        aborted.join(0.2)
        if not aborted.is_alive():
            break
    client.resume()
    assert not aborted.is_alive() and results[1][0][0].finish_reason == "abort"


def test_versions_follow_the_server_and_weights_cannot_be_pushed_through_the_client(
    client: SGLangEngine, local: TorchEngine
) -> None:
    client.update_weight_version(6)
    try:
        assert client.version == 6
        [[sample]] = client.generate(encode(local, PROMPTS[:1]), Sampling(max_new_tokens=4))
        assert sample.policy_version == 6 and sample.version_ranges == [(0, len(sample.response_ids), 6)]
    finally:
        client.update_weight_version(0)
    with pytest.raises(NotImplementedError, match="HttpLink"):
        client.update_weights(1)


def test_bad_input_raises_value_error_naming_the_field(client: SGLangEngine) -> None:
    with pytest.raises(SGLangRequestError, match=r"prompts\[0\]: token id 100000") as refused:
        client.generate([[5, 100000]], Sampling(max_new_tokens=4))
    assert isinstance(refused.value, ValueError) and refused.value.status == 400 and refused.value.route == "/generate"
    with pytest.raises(ValueError, match="n: must be >= 1"):
        client.generate([[5]], Sampling(), n=0)


def test_a_missing_or_wrong_key_is_an_error_naming_route_and_status(server: ServerHandle) -> None:
    with pytest.raises(SGLangError, match=r"GET /server_info -> 401") as refused:
        SGLangEngine(server.url, SGLangConfig(url=server.url, api_key_env=None))
    assert refused.value.reason == "http" and refused.value.status == 401


def test_a_server_that_is_not_there_fails_within_the_startup_timeout() -> None:
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(SGLangError, match=r"GET /health: http://127.0.0.1:9 did not answer 200 within 1.0s"):
        SGLangEngine(url, SGLangConfig(url=url, startup_timeout_s=1.0))
