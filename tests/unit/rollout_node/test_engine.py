"""TorchEngine sampling: logprobs against a plain forward pass, greedy against transformers, stops, n, seeds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from bus.schema import Sampling
from rollout_node.engines.base import Sample, TorchEngineConfig, version_ranges
from rollout_node.engines.torch_engine import TorchEngine
from slipstream.demo_model import build_demo_model

# Different lengths, so the batch is left padded.
PROMPTS = ["3+4=", "12+7=", "9*9=", "rev 123=", "1-1="]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Peaked random weights (init_std 0.3): logits then depend strongly on every position, padding and cache entry.
    folder = tmp_path_factory.mktemp("demo")
    return build_demo_model(folder, hidden_size=64, intermediate_size=128, init_std=0.3, seed=3)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> TorchEngine:
    return TorchEngine.from_config(TorchEngineConfig(model_path=str(model_path)))


def encode(engine: TorchEngine, texts: list[str]) -> list[list[int]]:
    return [engine.tokenizer.encode(t) for t in texts]


def reference_logprobs(engine: TorchEngine, prompt: list[int], sample: Sample, sampling: Sampling) -> tuple:
    """(behaviour, model) logprobs of the sample's tokens from one unpadded forward pass over prompt + response,
    processed with transformers' own warpers: the engine's numbers must match these."""
    ids = torch.tensor([prompt + sample.response_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (T, V)
    tokens = torch.tensor(sample.response_ids)[:, None]
    processed = logits
    for warper in (
        TemperatureLogitsWarper(sampling.temperature),
        TopKLogitsWarper(sampling.top_k) if sampling.top_k > 0 else None,
        TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1 else None,
    ):
        processed = warper(None, processed) if warper is not None else processed
    behavior = processed.log_softmax(-1).gather(-1, tokens)[:, 0]
    model = logits.log_softmax(-1).gather(-1, tokens)[:, 0]
    return behavior, model


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(temperature=1.0, max_new_tokens=24, seed=14),
        Sampling(temperature=0.7, top_k=12, top_p=0.9, max_new_tokens=24, seed=14),
    ],
    ids=["raw", "temperature-topk-topp"],
)
def test_logprobs_are_those_of_the_distribution_sampled_from(engine: TorchEngine, sampling: Sampling) -> None:
    prompts = encode(engine, PROMPTS)
    completions = engine.generate(prompts, sampling, n=3)
    samples = [(p, s) for p, group in zip(prompts, completions, strict=True) for s in group]
    # eos ends rows at different steps, so rows are dropped from the batch mid-way (cache compaction).
    assert {s.finish_reason for _, s in samples} == {"stop", "length"}
    assert len({len(s.response_ids) for _, s in samples}) >= 4
    for prompt, sample in samples:
        behavior, model = reference_logprobs(engine, prompt, sample, sampling)
        torch.testing.assert_close(torch.tensor(sample.behavior_logprobs), behavior, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(sample.model_logprobs), model, atol=1e-4, rtol=0)
        assert all(lp > -math.inf for lp in sample.behavior_logprobs)  # never a token outside top-k / top-p
    if sampling.temperature != 1.0:
        assert any(s.behavior_logprobs != s.model_logprobs for _, s in samples)


def test_greedy_matches_transformers_generate(engine: TorchEngine, model_path: Path) -> None:
    prompts = encode(engine, PROMPTS)
    completions = engine.generate(prompts, Sampling(temperature=0, max_new_tokens=20), n=2)
    reference_model = AutoModelForCausalLM.from_pretrained(model_path)
    for prompt, group in zip(prompts, completions, strict=True):
        expected = reference_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
        )[0, len(prompt) :].tolist()
        for sample in group:
            assert sample.response_ids == expected
            assert sample.behavior_logprobs == [0.0] * len(expected)  # a point mass
            _, model = reference_logprobs(engine, prompt, sample, Sampling())
            torch.testing.assert_close(torch.tensor(sample.model_logprobs), model, atol=1e-4, rtol=0)


def sample_one(engine: TorchEngine, prompt: list[int], **params: object) -> Sample:
    # One row and a fixed seed: the same draws at every step, so a run that stops early is a prefix of a free run.
    [[sample]] = engine.generate([prompt], Sampling(temperature=1.0, seed=21, **params))
    return sample


def test_stops_on_stop_ids_eos_stop_strings_and_length(engine: TorchEngine) -> None:
    prompt = encode(engine, ["3+4="])[0]
    free = sample_one(engine, prompt, max_new_tokens=30)
    assert free.finish_reason == "length" and len(free.response_ids) == 30 and free.matched_stop is None
    assert engine.tokenizer.eos_token_id not in free.response_ids

    cut = next(t for t in range(5, 30) if free.response_ids[t] not in free.response_ids[:t]) + 1
    stop_id = free.response_ids[cut - 1]
    by_id = sample_one(engine, prompt, max_new_tokens=30, stop_token_ids=(stop_id,))
    assert (by_id.response_ids, by_id.finish_reason, by_id.matched_stop) == (free.response_ids[:cut], "stop", stop_id)

    # The checkpoint's eos id is the default; the config can replace it.
    assert engine.eos_token_ids == [engine.tokenizer.eos_token_id]
    eos_engine = TorchEngine(engine.model, engine.tokenizer, TorchEngineConfig(eos_token_ids=[stop_id]))
    by_eos = sample_one(eos_engine, prompt, max_new_tokens=30)
    assert (by_eos.response_ids, by_eos.finish_reason, by_eos.matched_stop) == (
        free.response_ids[:cut],
        "stop",
        stop_id,
    )

    stop_text = free.text[12:14]
    by_text = sample_one(engine, prompt, max_new_tokens=30, stop=("no such text", stop_text))
    decoded = [engine.tokenizer.decode(free.response_ids[:n], skip_special_tokens=True) for n in range(31)]
    first_hit = next(n for n, text in enumerate(decoded) if stop_text in text)
    assert first_hit > 2
    assert (by_text.response_ids, by_text.finish_reason) == (free.response_ids[:first_hit], "stop")
    assert by_text.matched_stop == stop_text and by_text.text.endswith(stop_text)


def test_n_samples_per_prompt_and_seeds(engine: TorchEngine) -> None:
    prompts = encode(engine, PROMPTS[:3])
    sampling = Sampling(temperature=1.0, max_new_tokens=12, seed=5)
    first = engine.generate(prompts, sampling, n=4)
    assert [len(group) for group in first] == [4, 4, 4]
    for group in first:
        assert len({tuple(s.response_ids) for s in group}) > 1  # n draws, not one copied n times
        for s in group:
            assert s.version_ranges == [(0, len(s.response_ids), 0)] and s.policy_version == 0
            assert s.text == engine.tokenizer.decode(s.response_ids, skip_special_tokens=True)
    assert engine.generate(prompts, sampling, n=4) == first
    other = engine.generate(prompts, Sampling(temperature=1.0, max_new_tokens=12, seed=6), n=4)
    assert [s.response_ids for g in other for s in g] != [s.response_ids for g in first for s in g]


def test_batches_larger_than_max_batch_size_run_in_chunks(engine: TorchEngine) -> None:
    small = TorchEngine(engine.model, engine.tokenizer, TorchEngineConfig(max_batch_size=4))
    prompts = encode(engine, PROMPTS)
    chunked = small.generate(prompts, Sampling(temperature=0, max_new_tokens=8), n=2)
    whole = engine.generate(prompts, Sampling(temperature=0, max_new_tokens=8), n=2)
    assert [[s.response_ids for s in g] for g in chunked] == [[s.response_ids for s in g] for g in whole]
    for chunked_sample, sample in zip(sum(chunked, []), sum(whole, []), strict=True):
        torch.testing.assert_close(chunked_sample.model_logprobs, sample.model_logprobs, atol=1e-5, rtol=0)


def test_on_token_reports_every_token_of_every_row_in_order(engine: TorchEngine) -> None:
    # Chunks of 4 rows (2 prompts x 2) over 5 prompts, with stops: rows are numbered over the whole call.
    small = TorchEngine(engine.model, engine.tokenizer, TorchEngineConfig(max_batch_size=4))
    reported: dict[int, list[tuple[int, float]]] = {}
    sampling = Sampling(temperature=1.0, max_new_tokens=10, seed=2, stop=["1"])
    groups = small.generate(
        encode(engine, PROMPTS),
        sampling,
        n=2,
        on_token=lambda row, token, lp: reported.setdefault(row, []).append((token, lp)),
    )  # noqa: E501
    samples = [s for group in groups for s in group]
    assert sorted(reported) == list(range(len(samples)))
    for row, sample in enumerate(samples):
        assert [t for t, _ in reported[row]] == sample.response_ids
        assert [lp for _, lp in reported[row]] == pytest.approx(sample.behavior_logprobs, abs=0)
    assert len({len(s.response_ids) for s in samples}) > 1  # rows ended at different steps
    assert small.generate(encode(engine, PROMPTS), sampling, n=2) == groups  # reporting changes nothing


@pytest.mark.parametrize(
    ("prompts", "n", "message"),
    [
        ([[5, 6], []], 1, "prompts[1]: must hold at least one token id"),
        ([[5, 100_000]], 1, "prompts[0]: token id 100000 is outside the vocabulary"),
        ([[-1]], 1, "prompts[0]: token id -1"),
        ([[5]], 0, "n: must be >= 1"),
        ([[5] * 510], 1, "prompts[0]: 510 tokens + sampling.max_new_tokens 8 exceed the model's context of 512"),
    ],
)
def test_bad_requests_name_the_field(engine: TorchEngine, prompts: list[list[int]], n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        engine.generate(prompts, Sampling(max_new_tokens=8), n=n)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -0.1}, "sampling.temperature: must be >= 0"),
        ({"top_p": 0.0}, r"sampling.top_p: must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "sampling.max_new_tokens: must be >= 1"),
        ({"stop": [""]}, "sampling.stop: must hold non-empty strings"),
        ({"stop_token_ids": [-3]}, "sampling.stop_token_ids: must hold token ids >= 0"),
        ({"stop_token_ids": [100]}, "sampling.stop_token_ids: ids must be < the vocabulary size 100"),
    ],
)
def test_bad_sampling_params_name_the_field(engine: TorchEngine, params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.generate([[5]], Sampling(**params))


def test_version_ranges_group_runs() -> None:
    assert version_ranges([]) == []
    assert version_ranges([3, 3, 4, 4, 4]) == [(0, 2, 3), (2, 5, 4)]
    assert version_ranges([1, 2, 1]) == [(0, 1, 1), (1, 2, 2), (2, 3, 1)]


def test_engine_bench_prints_one_json_object() -> None:
    tiny = ["--batch", "3", "--new-tokens", "5", "--repeats", "1", "--hidden-size", "32", "--num-layers", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "slipstream", "bench", "engine", "--json", "--intermediate-size", "64", *tiny],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["bench"] == "engine" and report["engine_ratio"] > 0
    assert (report["batch"], report["new_tokens"]) == (3, 5)  # both sides produced exactly 5 tokens per row
