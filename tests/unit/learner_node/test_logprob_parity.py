"""Parity of the learner with the rollout engine and with TRL, on the tiny demo model.

Logprobs: the learner's logprob of a sampled token (`forward` with `LearnerConfig.temperature`, then
`token_logprobs`) must equal the behaviour logprob the torch engine reported for it at the same weights, or the
importance weights w = exp(proximal - behaviour) are not 1 on-policy and every GRPO/PPO step is biased. Checked for
sampling at temperatures 1, 0.7 and 1.5, for greedy decoding (behaviour logprob 0, a point mass; the raw model
logprob rides in `model_logprobs`) and for top-p 0.9, where the engine reports the logprob in the truncated,
renormalised nucleus: the full tempered softmax differs from it by log(nucleus mass), so the learner restricts its
logits to the same nucleus (`nucleus_logits`) and then matches. A padded batch must also give each row what it
gives alone.

Optimizer: one Slipstream step (`build_optimizer` + the trainer's clipping) must move the weights exactly as the
optimizer of transformers' `Trainer` (what TRL's GRPOTrainer uses) given the same gradients: AdamW with the same
betas, eps and lr, weight decay on matrices and embeddings but not on biases and norm weights, the global gradient
norm clipped to `max_grad_norm`, constant schedule, no warmup.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.tensor import distribute_tensor
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.generation.logits_process import TopPLogitsWarper

from bus.schema import Sampling, Trajectory
from learner_node.algorithms import nucleus_logits, token_logprobs
from learner_node.batching import collate
from learner_node.config import LearnerConfig
from learner_node.model import (
    Runtime,
    build_optimizer,
    build_scheduler,
    decays,
    forward,
    full_state_dict,
    init_distributed,
    load_policy,
)
from learner_node.trainer import Trainer as SlipstreamTrainer
from rollout_node.engines.base import Sample, TorchEngineConfig
from rollout_node.engines.torch_engine import TorchEngine
from slipstream.demo_model import build_demo_model

# Different lengths, so both the engine's batch and the learner's are padded.
PROMPTS = ["3+4=", "12+7=", "9*9=", "rev 123="]
ATOL = 1e-5
# float32 log-softmax error grows with the value (a -4 logprob is off by ~1e-5 between two batch layouts).
RTOL = 1e-5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Peaked random weights: the next-token distributions are far from uniform and depend on every position.
    folder = tmp_path_factory.mktemp("demo")
    return build_demo_model(folder, hidden_size=64, intermediate_size=128, init_std=0.3, seed=3)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> TorchEngine:
    return TorchEngine.from_config(TorchEngineConfig(model_path=str(model_path), dtype="float32"))


@pytest.fixture(scope="module")
def learner(model_path: Path) -> tuple[nn.Module, Runtime]:
    runtime = init_distributed(LearnerConfig())
    return load_policy(str(model_path), runtime, trainable=False), runtime


def rollouts(engine: TorchEngine, sampling: Sampling, n: int = 3) -> list[tuple[list[int], Sample]]:
    prompts = [engine.tokenizer.encode(text) for text in PROMPTS]
    groups = engine.generate(prompts, sampling, n=n)
    return [(prompt, sample) for prompt, group in zip(prompts, groups, strict=True) for sample in group]


def trajectory(prompt: list[int], response: list[int], behaviour: list[float] | None = None) -> Trajectory:
    return Trajectory(
        id="t",
        group_id="g",
        producer="test",
        prompt_ids=np.asarray(prompt, dtype=np.int32),
        response_ids=np.asarray(response, dtype=np.int32),
        behavior_logprobs=np.asarray(behaviour if behaviour is not None else [0.0] * len(response), np.float32),
    )


def learner_logits(
    learner: tuple[nn.Module, Runtime], rows: list[tuple[list[int], list[int]]], temperature: float, pad_id: int = 0
) -> list[torch.Tensor]:
    """The learner's response logits [T_i, V] of each (prompt, response) row, from one padded batch."""
    policy, runtime = learner
    batch = collate([trajectory(p, r) for p, r in rows], pad_id=pad_id)
    with torch.no_grad():
        logits, _ = forward(policy, batch, runtime, temperature=temperature)
    return [logits[i, : len(r)] for i, (_, r) in enumerate(rows)]


def learner_logprobs(
    learner: tuple[nn.Module, Runtime], rows: list[tuple[list[int], list[int]]], temperature: float, pad_id: int = 0
) -> list[torch.Tensor]:
    """What the trainer computes: token_logprobs of the response tokens under the tempered logits, per row."""
    logits = learner_logits(learner, rows, temperature, pad_id)
    return [token_logprobs(lg[None], torch.tensor([r]))[0] for lg, (_, r) in zip(logits, rows, strict=True)]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_sampled_behaviour_logprobs_equal_the_learners_logprobs_at_the_same_weights(
    engine: TorchEngine, learner: tuple[nn.Module, Runtime], temperature: float
) -> None:
    sampling = Sampling(temperature=temperature, max_new_tokens=10, seed=11)
    samples = rollouts(engine, sampling)
    rows = [(p, s.response_ids) for p, s in samples]
    tempered = learner_logprobs(learner, rows, temperature, engine._pad_id)
    raw = learner_logprobs(learner, rows, 1.0, engine._pad_id)
    assert sum(len(s.response_ids) for _, s in samples) > 3 * len(samples)  # enough tokens to mean something
    for (_, sample), lp, raw_lp in zip(samples, tempered, raw, strict=True):
        torch.testing.assert_close(torch.tensor(sample.behavior_logprobs), lp, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(torch.tensor(sample.model_logprobs), raw_lp, atol=ATOL, rtol=RTOL)


def test_greedy_behaviour_logprobs_are_a_point_mass_and_model_logprobs_the_learners(
    engine: TorchEngine, learner: tuple[nn.Module, Runtime]
) -> None:
    # Greedy decoding samples from a point mass on the argmax: behaviour logprob log 1 = 0 for every token (what
    # `sample_next` documents); the model's own temperature-1 logprob is reported as `model_logprobs`.
    samples = rollouts(engine, Sampling(temperature=0.0, max_new_tokens=10), n=1)
    rows = [(p, s.response_ids) for p, s in samples]
    logits = learner_logits(learner, rows, 1.0, engine._pad_id)
    for (_, sample), row_logits, (_, response) in zip(samples, logits, rows, strict=True):
        assert sample.behavior_logprobs == [0.0] * len(response)
        assert row_logits.argmax(-1).tolist() == response  # the engine's tokens are the learner's argmax
        expected = token_logprobs(row_logits[None], torch.tensor([response]))[0]
        torch.testing.assert_close(torch.tensor(sample.model_logprobs), expected, atol=ATOL, rtol=RTOL)


def top_p_case(engine: TorchEngine, learner: tuple[nn.Module, Runtime]) -> tuple[list[Sample], list, list]:
    """Samples at temperature 0.7, top_p 0.9, with the learner's tempered logits and logprobs of their tokens."""
    samples = rollouts(engine, Sampling(temperature=0.7, top_p=0.9, max_new_tokens=10, seed=5))
    rows = [(p, s.response_ids) for p, s in samples]
    logits = learner_logits(learner, rows, 0.7, engine._pad_id)
    logprobs = [token_logprobs(lg[None], torch.tensor([r]))[0] for lg, (_, r) in zip(logits, rows, strict=True)]
    return [s for _, s in samples], logits, logprobs


def test_top_p_behaviour_logprobs_are_the_nucleus_renormalised_ones(
    engine: TorchEngine, learner: tuple[nn.Module, Runtime]
) -> None:
    # The engine reports log p(token | nucleus) = learner logprob - log(nucleus mass), the nucleus taken from the
    # learner's own tempered logits with transformers' TopPLogitsWarper (the rule the engine follows).
    samples, logits, logprobs = top_p_case(engine, learner)
    gaps = []
    for sample, row_logits, lp in zip(samples, logits, logprobs, strict=True):
        nucleus = TopPLogitsWarper(0.9)(None, row_logits.clone())
        log_mass = torch.logsumexp(nucleus, -1) - torch.logsumexp(row_logits, -1)  # [T], <= 0
        torch.testing.assert_close(torch.tensor(sample.behavior_logprobs), lp - log_mass, atol=ATOL, rtol=RTOL)
        gaps.append(-log_mass)
    gap = torch.cat(gaps)
    # The mismatch is real and one-sided: on-policy w = exp(learner - behaviour) = nucleus mass < 1 wherever the
    # nucleus drops any token (at this model's distributions, most tokens).
    assert (gap >= 0).all() and (gap > ATOL).float().mean() > 0.5


def test_learner_logprobs_equal_behaviour_logprobs_under_top_p(
    engine: TorchEngine, learner: tuple[nn.Module, Runtime]
) -> None:
    # What the trainer computes with top_p < 1: the tempered logits restricted to the nucleus (nucleus_logits), so
    # on-policy importance weights are 1 and not the nucleus mass.
    samples, logits, _ = top_p_case(engine, learner)
    for sample, row_logits in zip(samples, logits, strict=True):
        tokens = torch.tensor([sample.response_ids])
        lp = token_logprobs(nucleus_logits(row_logits[None], tokens, 0.9), tokens)[0]
        torch.testing.assert_close(torch.tensor(sample.behavior_logprobs), lp, atol=ATOL, rtol=RTOL)


def test_a_padded_batch_gives_each_row_the_logprobs_it_gives_alone(learner: tuple[nn.Module, Runtime]) -> None:
    # Prompts of 2..9 tokens (left padded to 9) and responses of 1..7 (right padded to 7), pads included in the
    # vocabulary range so a pad that leaked into attention would change the numbers.
    rng = np.random.default_rng(0)
    rows = [
        (rng.integers(4, 90, p).tolist(), rng.integers(4, 90, t).tolist())
        for p, t in [(2, 7), (9, 1), (5, 4), (3, 6), (8, 2)]
    ]
    batched = learner_logprobs(learner, rows, 0.7, pad_id=7)
    for row, lp in zip(rows, batched, strict=True):
        alone = learner_logprobs(learner, [row], 0.7)[0]
        torch.testing.assert_close(lp, alone, atol=ATOL, rtol=RTOL)
    # ... and alone equals a plain unpadded forward of prompt + response.
    policy, _ = learner
    prompt, response = rows[0]
    with torch.no_grad():
        plain = policy(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1] / 0.7
    expected = plain.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
    torch.testing.assert_close(batched[0], expected, atol=ATOL, rtol=RTOL)


# --- one optimizer step against transformers' Trainer (TRL's optimizer) -------------------------------------------

OPTIM = {"lr": 1e-3, "weight_decay": 0.1, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6}


def hf_trainer(model: nn.Module, out: Path) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        learning_rate=OPTIM["lr"],
        weight_decay=OPTIM["weight_decay"],
        adam_beta1=OPTIM["adam_beta1"],
        adam_beta2=OPTIM["adam_beta2"],
        adam_epsilon=OPTIM["adam_epsilon"],
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
    )
    return Trainer(model=model, args=args)


def slipstream_trainer(model_path: Path) -> SlipstreamTrainer:
    cfg = LearnerConfig(
        lr=OPTIM["lr"],
        weight_decay=OPTIM["weight_decay"],
        adam_beta1=OPTIM["adam_beta1"],
        adam_beta2=OPTIM["adam_beta2"],
        adam_epsilon=OPTIM["adam_epsilon"],
        max_grad_norm=1.0,
        lr_scheduler="constant",
        warmup_steps=0,
    )
    runtime = init_distributed(cfg)
    policy = load_policy(str(model_path), runtime)
    optimizer = build_optimizer(cfg, [policy])
    return SlipstreamTrainer(cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer))


def test_weight_decay_groups_and_hyperparameters_match_transformers_trainer(model_path: Path, tmp_path: Path) -> None:
    hf = hf_trainer(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), tmp_path)
    hf_optimizer = hf.create_optimizer()
    ours = slipstream_trainer(model_path)
    hf_names = {id(p): n for n, p in hf.model.named_parameters()}
    our_names = {id(p): n for n, p in ours.policy.named_parameters()}

    def groups(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[float, set[str]]:
        return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}

    expected = groups(hf_optimizer, hf_names)
    assert groups(ours.optimizer, our_names) == expected
    assert any("norm" in n for n in expected[0.0]) and any("embed" in n for n in expected[0.1])
    for group in ours.optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (OPTIM["lr"], (0.8, 0.95), 1e-6)
    assert not decays("score.bias", torch.zeros(2, 2)) and not decays("v.weight", torch.zeros(3))


def test_one_step_moves_the_weights_exactly_as_transformers_trainer(model_path: Path, tmp_path: Path) -> None:
    hf = hf_trainer(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), tmp_path)
    hf_optimizer = hf.create_optimizer()
    hf_scheduler = hf.create_scheduler(num_training_steps=10, optimizer=hf_optimizer)
    ours = slipstream_trainer(model_path)
    before = {n: p.detach().clone() for n, p in hf.model.named_parameters()}
    # The same gradients on both, large enough (norm ~50) that clipping to 1.0 matters.
    generator = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=generator) for n, p in hf.model.named_parameters()}
    for n, p in hf.model.named_parameters():
        p.grad = grads[n].clone()
    for n, p in ours.policy.named_parameters():
        p.grad = distribute_tensor(grads[n], p.device_mesh, p.placements)

    hf_norm = torch.nn.utils.clip_grad_norm_(hf.model.parameters(), hf.args.max_grad_norm)  # Trainer's clipping
    hf_optimizer.step()
    hf_scheduler.step()
    our_norm = ours._optimizer_step()

    assert our_norm == pytest.approx(float(hf_norm), rel=1e-6) and our_norm > 10
    after = full_state_dict(ours.policy)
    for n, p in hf.model.named_parameters():
        assert not torch.equal(p.detach(), before[n])
        torch.testing.assert_close(after[n], p.detach(), atol=1e-7, rtol=1e-6, msg=n)


def test_without_weight_decay_the_optimizer_keeps_one_parameter_group(model_path: Path) -> None:
    # One group when the split changes nothing: checkpoints from before the split (one group) still load.
    runtime = init_distributed(LearnerConfig())
    policy = load_policy(str(model_path), runtime)
    optimizer = build_optimizer(LearnerConfig(weight_decay=0.0), [policy])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0]
    assert len(optimizer.param_groups[0]["params"]) == len(list(policy.parameters()))
