"""TorchEngine weight updates, pause/resume and abort, with generation running in another thread."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bus.schema import Sampling
from rollout_node.engines.base import Sample, TorchEngineConfig
from rollout_node.engines.torch_engine import TorchEngine
from slipstream.demo_model import build_demo_model

WAIT_S = 30.0  # upper bound on every wait below; a healthy run needs well under a second
# No eos: every sample runs to max_new_tokens, so a switch always lands mid-generation.
NO_EOS = {"eos_token_ids": []}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    shape = {"hidden_size": 64, "intermediate_size": 128, "init_std": 0.3}
    return (
        build_demo_model(tmp_path_factory.mktemp("old"), seed=1, **shape),
        build_demo_model(tmp_path_factory.mktemp("new"), seed=2, **shape),
    )


def make_engine(path: Path, **config: object) -> TorchEngine:
    return TorchEngine.from_config(TorchEngineConfig(model_path=str(path), **config))


def run_in_thread(fn: Callable[[], list[list[Sample]]]) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return thread, result


@pytest.fixture
def forward_calls() -> Iterator[Callable[[TorchEngine, Callable[[int], None]], None]]:
    """Install `on_call(k)` as a forward hook (k = 1 for the prefill, then one per decode step); removed after."""
    handles = []

    def install(engine: TorchEngine, on_call: Callable[[int], None]) -> None:
        count = iter(range(1, 10**6))
        handles.append(engine.model.register_forward_hook(lambda *_: on_call(next(count))))

    yield install
    for handle in handles:
        handle.remove()


def test_load_weights_between_calls_gives_the_new_model(model_paths: tuple[Path, Path]) -> None:
    engine = make_engine(model_paths[0])
    new_model = AutoModelForCausalLM.from_pretrained(model_paths[1])
    prompt = engine.tokenizer.encode("3+4=")
    engine.load_weights(new_model.state_dict().items(), version=1)  # tied aliases included
    [[sample]] = engine.generate([prompt], Sampling(temperature=0, max_new_tokens=16))
    expected = new_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=16,
    )[0, len(prompt) :].tolist()
    assert sample.response_ids == expected
    assert engine.version == 1 and sample.policy_version == 1 and sample.version_ranges[0][2] == 1


def test_update_mid_generation_switches_between_steps(model_paths: tuple[Path, Path], forward_calls) -> None:
    engine = make_engine(model_paths[0], **NO_EOS)
    reference = make_engine(model_paths[0])  # the old weights, untouched
    prompts = [engine.tokenizer.encode(t) for t in ("3+4=", "12+7=")]
    reached = threading.Event()

    def pause_at_step_5(call: int) -> None:
        if call == 6:  # inside the 5th decode step: the engine stops before the next one
            engine.pause()
            reached.set()

    forward_calls(engine, pause_at_step_5)
    thread, result = run_in_thread(lambda: engine.generate(prompts, Sampling(max_new_tokens=16, seed=3), n=2))
    assert reached.wait(WAIT_S)
    # The new weights zero the final norm: every later logit is 0, so later tokens are uniform draws.
    engine.load_weights([("model.norm.weight", torch.zeros(engine.model.config.hidden_size))], version=7)
    engine.resume()
    thread.join(WAIT_S)
    [completions] = result
    for prompt, group in zip(prompts, completions, strict=True):
        for sample in group:
            # Token t comes from forward call t + 1: tokens 0..5 from the old weights, 6.. from version 7.
            assert sample.version_ranges == [(0, 6, 0), (6, 16, 7)]
            assert sample.policy_version == 0 and engine.version == 7
            assert sample.behavior_logprobs[6:] == pytest.approx([-math.log(engine.vocab_size)] * 10, abs=1e-5)
            ids = torch.tensor([prompt + sample.response_ids[:6]])
            with torch.no_grad():
                old_logits = reference.model(input_ids=ids).logits[0, len(prompt) - 1 :].log_softmax(-1)
            expected = old_logits.gather(-1, torch.tensor(sample.response_ids[:6])[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(sample.behavior_logprobs[:6]), expected, atol=1e-4, rtol=0)


def test_concurrent_calls_and_updates_all_finish_consistently(model_paths: tuple[Path, Path]) -> None:
    engine = make_engine(model_paths[0], **NO_EOS)
    new_state = AutoModelForCausalLM.from_pretrained(model_paths[1]).state_dict()
    prompt = engine.tokenizer.encode("3+4=")
    calls = [run_in_thread(lambda: engine.generate([prompt] * 3, Sampling(max_new_tokens=40), n=2)) for _ in range(3)]
    for version in range(1, 6):
        engine.load_weights(new_state.items(), version=version)
    for thread, _ in calls:
        thread.join(WAIT_S)
    assert engine.version == 5
    for _, [completions] in calls:
        for sample in sum(completions, []):
            ranges = sample.version_ranges
            assert len(sample.response_ids) == 40 and ranges[0][0] == 0 and ranges[-1][1] == 40
            assert all(a[1] == b[0] and a[2] < b[2] for a, b in zip(ranges, ranges[1:], strict=False))


def test_a_failed_update_changes_nothing(model_paths: tuple[Path, Path]) -> None:
    engine = make_engine(model_paths[0])
    norm = engine.model.model.norm.weight
    before = norm.detach().clone()
    with pytest.raises(ValueError, match=r"weights\['model.nope.weight'\]: not a tensor of this model"):
        engine.load_weights([("model.norm.weight", torch.zeros_like(norm)), ("model.nope.weight", norm)], version=1)
    with pytest.raises(ValueError, match=r"weights\['model.norm.weight'\]: shape \(3,\) does not match"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))], version=1)
    with pytest.raises(RuntimeError, match="receiver died"), engine.update_weights(version=1) as update:
        update.add([("model.norm.weight", torch.zeros_like(norm))])
        raise RuntimeError("receiver died")
    assert engine.version == 0 and torch.equal(norm, before)
    update = engine.update_weights(version=2)
    update.commit()
    with pytest.raises(RuntimeError, match="already committed"):
        update.add([])
    assert engine.version == 2  # a commit with no tensors only moves the version
    with pytest.raises(ValueError, match="version: must be >= 0"):
        engine.update_weights(version=-1)


def test_a_swap_that_cannot_reach_a_step_boundary_times_out(model_paths: tuple[Path, Path], forward_calls) -> None:
    engine = make_engine(model_paths[0], weight_swap_timeout_s=0.2)
    errors: list[BaseException] = []

    def commit_inside_a_step(call: int) -> None:  # a step in progress never ends while it waits for itself
        if call == 2:
            try:
                engine.load_weights([("model.norm.weight", torch.zeros(64))], version=1)
            except TimeoutError as exc:
                errors.append(exc)

    forward_calls(engine, commit_inside_a_step)
    engine.generate([[5, 6]], Sampling(max_new_tokens=4))
    assert len(errors) == 1 and "did not end within 0.2s" in str(errors[0])
    assert engine.version == 0 and engine.model.model.norm.weight.abs().sum() > 0


def test_pause_holds_new_calls_until_resume(model_paths: tuple[Path, Path], forward_calls) -> None:
    engine = make_engine(model_paths[0])
    calls: list[int] = []
    forward_calls(engine, calls.append)
    engine.pause()
    thread, result = run_in_thread(lambda: engine.generate([[5, 6]], Sampling(max_new_tokens=4)))
    thread.join(0.3)
    assert thread.is_alive() and calls == []  # not a single forward while paused
    engine.resume()
    thread.join(WAIT_S)
    assert len(result[0][0][0].response_ids) > 0


def test_a_pause_nobody_lifts_expires(model_paths: tuple[Path, Path]) -> None:
    engine = make_engine(model_paths[0], pause_timeout_s=0.2, **NO_EOS)
    engine.pause()  # ... and the pauser dies
    [[sample]] = engine.generate([[5, 6]], Sampling(max_new_tokens=4))
    assert sample.finish_reason == "length" and len(sample.response_ids) == 4


def test_abort_ends_calls_in_flight_with_their_tokens(model_paths: tuple[Path, Path], forward_calls) -> None:
    engine = make_engine(model_paths[0], **NO_EOS)
    reached = threading.Event()

    def pause_at_step_3(call: int) -> None:
        if call == 4:
            engine.pause()
            reached.set()

    forward_calls(engine, pause_at_step_3)
    thread, result = run_in_thread(lambda: engine.generate([[5, 6], [7]], Sampling(max_new_tokens=30), n=2))
    assert reached.wait(WAIT_S)
    engine.abort()  # wakes the paused call, which ends at once
    thread.join(WAIT_S)
    samples = sum(result[0], [])
    assert [(s.finish_reason, len(s.response_ids), len(s.behavior_logprobs)) for s in samples] == [("abort", 4, 4)] * 4
    engine.resume()
    [[after]] = engine.generate([[5]], Sampling(max_new_tokens=3))  # later calls are unaffected
    assert after.finish_reason == "length"
