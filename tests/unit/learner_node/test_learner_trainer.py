"""The optimizer step on one rank: exact gradient accumulation, GRPO/PPO/DPO steps that learn, the LR schedule."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from bus.schema import Preference, Trajectory
from learner_node.algorithms import token_logprobs
from learner_node.batching import collate
from learner_node.config import LearnerConfig
from learner_node.groups import Unit
from learner_node.model import (
    build_optimizer,
    build_scheduler,
    build_value_head,
    forward,
    full_state_dict,
    init_distributed,
    load_policy,
    lr_factor,
)
from learner_node.trainer import Trainer, group_advantage_values, share
from slipstream.demo_model import build_demo_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_demo_model(tmp_path_factory.mktemp("demo")))


def make_trainer(model_path: str, **overrides: object) -> Trainer:
    cfg = LearnerConfig(**{"lr": 1e-2, "max_new_tokens": 8, **overrides})  # type: ignore[arg-type]
    runtime = init_distributed(cfg)
    policy = load_policy(model_path, runtime, activation_checkpointing=cfg.activation_checkpointing)
    head = build_value_head(policy, runtime) if cfg.algorithm == "ppo" else None
    reference = load_policy(model_path, runtime, trainable=False) if cfg.beta > 0 or cfg.algorithm == "dpo" else None
    optimizer = build_optimizer(cfg, [policy] + ([head] if head is not None else []))
    return Trainer(
        cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer), value_head=head, reference=reference
    )


def groups(seed: int = 0, count: int = 3, size: int = 4) -> list[Unit]:
    rng = np.random.default_rng(seed)
    units = []
    for g in range(count):
        members = []
        for i in range(size):
            response = rng.integers(4, 90, rng.integers(1, 6)).astype(np.int32)
            members.append(
                Trajectory(
                    id=f"t{g}-{i}",
                    group_id=f"g{g}",
                    producer="test",
                    prompt_ids=rng.integers(4, 90, rng.integers(2, 7)).astype(np.int32),
                    response_ids=response,
                    behavior_logprobs=np.full(len(response), -4.5, np.float32),
                    reward=float(i % 2),
                    loss_mask=(rng.random(len(response)) > 0.2).astype(np.uint8),
                )  # fmt: skip
            )
        units.append(Unit(f"g{g}", members))
    return units


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return full_state_dict(trainer.policy)


CUTS = {  # ways to run one step that must not change it
    "3 rows": {"micro_batch_size": 3},
    "24 tokens": {"max_tokens_per_micro_batch": 24},  # length-sorted, each micro-batch within 24 padded tokens
    "checkpointed": {"micro_batch_size": 5, "activation_checkpointing": True},
}


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_step(model_path: str, loss_agg: str, cut: str) -> None:
    # A large Adam epsilon keeps the update linear in the gradient: rounding in near-zero gradients stays tiny.
    whole = make_trainer(model_path, loss_agg=loss_agg, micro_batch_size=64, beta=0.1, adam_epsilon=1e-2)
    pieces = make_trainer(model_path, loss_agg=loss_agg, beta=0.1, adam_epsilon=1e-2, **CUTS[cut])
    whole_metrics = whole.step(groups())
    piece_metrics = pieces.step(groups())
    if cut == "24 tokens":  # sorted by length, the micro-batches pad less than the whole batch padded at once
        assert piece_metrics["padding_efficiency"] > whole_metrics["padding_efficiency"] + 0.1, piece_metrics
    assert piece_metrics["loss"] == pytest.approx(whole_metrics["loss"], rel=1e-4, abs=1e-6)
    assert piece_metrics["grad_norm"] == pytest.approx(whole_metrics["grad_norm"], rel=1e-4)
    for name, tensor in weights(whole).items():
        assert torch.allclose(tensor, weights(pieces)[name], atol=1e-6), name


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_skipping_zero_advantage_samples_does_not_change_the_step(model_path: str, loss_agg: str) -> None:
    units = groups(count=3)
    units[1] = Unit(units[1].key, [msgspec.structs.replace(s, reward=0.5) for s in units[1].samples])  # no signal
    skipping = make_trainer(model_path, loss_agg=loss_agg, adam_epsilon=1e-2)
    running = make_trainer(model_path, loss_agg=loss_agg, adam_epsilon=1e-2, skip_zero_advantage=False)
    skipped, ran = skipping.step(units), running.step(units)
    assert skipped["zero_advantage_skipped_frac"] == pytest.approx(1 / 3)
    assert ran["zero_advantage_skipped_frac"] == 0.0
    assert skipped["loss"] == pytest.approx(ran["loss"], rel=1e-5, abs=1e-7)
    assert skipped["grad_norm"] == pytest.approx(ran["grad_norm"], rel=1e-5)
    for name, tensor in weights(running).items():
        assert torch.allclose(tensor, weights(skipping)[name], atol=1e-6), name
    # With an entropy bonus the flat group has a gradient of its own: nothing is skipped.
    assert make_trainer(model_path, entropy_coef=0.1).step(units)["zero_advantage_skipped_frac"] == 0.0


def test_grpo_steps_raise_the_likelihood_of_rewarded_samples(model_path: str) -> None:
    trainer = make_trainer(model_path, lr=3e-3)
    units = groups()
    batch = collate([s for u in units for s in u.samples])

    def rewarded_minus_unrewarded() -> float:
        with torch.no_grad():
            logits, _ = forward(trainer.policy, batch, trainer.runtime)
            per_sample = (token_logprobs(logits, batch.response_ids) * batch.mask).sum(-1)
        return float(per_sample[batch.rewards == 1].mean() - per_sample[batch.rewards == 0].mean())

    before = rewarded_minus_unrewarded()
    for _ in range(5):
        metrics = trainer.step(units)
    assert rewarded_minus_unrewarded() > before + 1.0
    assert {"loss", "policy_loss", "entropy", "clip_frac_low", "importance_weight_max", "grad_norm", "lr"} <= set(
        metrics
    )


def test_entropy_bonus_keeps_the_policy_spread_out(model_path: str) -> None:
    # Rewards that carry no signal (all equal): the policy term is 0, so only the bonus moves the weights.
    flat = [Unit(u.key, [msgspec.structs.replace(s, reward=1.0) for s in u.samples]) for u in groups()]
    plain, bonus = make_trainer(model_path, lr=3e-3), make_trainer(model_path, lr=3e-3, entropy_coef=1.0)
    first = bonus.step(flat)
    for _ in range(4):
        still, last = plain.step(flat), bonus.step(flat)
    assert still["grad_norm"] == pytest.approx(0.0, abs=1e-6)
    assert last["entropy"] > first["entropy"] + 0.01 and last["loss"] < first["loss"]


@pytest.mark.parametrize("advantage", ["gae", "vtrace"])
def test_ppo_trains_the_value_head_towards_the_returns(model_path: str, advantage: str) -> None:
    trainer = make_trainer(model_path, algorithm="ppo", advantage=advantage, lr=3e-3, value_clip=None)
    units = groups()
    first = trainer.step(units)
    for _ in range(10):
        last = trainer.step(units)
    assert last["value_loss"] < first["value_loss"] and last["explained_variance"] > first["explained_variance"]


def test_dpo_from_pairs_and_from_scored_groups(model_path: str) -> None:
    trainer = make_trainer(model_path, algorithm="dpo", lr=3e-3, dpo_beta=0.5)
    ids = np.array([5, 6, 7], np.int32)
    pairs = [
        Unit(f"p{i}", [], pair=Preference(f"p{i}", "x", ids, np.array([8 + i], np.int32), np.array([40, 41], np.int32)))
        for i in range(3)
    ]
    first = trainer.step(pairs)
    for _ in range(5):
        last = trainer.step(pairs)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert last["loss"] < first["loss"] and last["reward_accuracy"] == 1.0
    online = trainer.step(groups())  # best-vs-worst of each scored group
    assert online["loss"] > 0


def test_group_advantages_and_rank_shares() -> None:
    units = groups(count=2, size=4)
    values = group_advantage_values(units, LearnerConfig(scale_rewards="none"))
    assert values == [[-0.5, 0.5, -0.5, 0.5]] * 2  # rewards 0,1,0,1 minus their mean
    assert [share(7, 3, r) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]


def test_learning_rate_schedule() -> None:
    cfg = LearnerConfig(lr_scheduler="cosine", warmup_steps=2, max_steps=12, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == pytest.approx(1.0)
    assert lr_factor(7, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_factor(12, cfg) == pytest.approx(0.1)
    assert lr_factor(5, LearnerConfig(warmup_steps=2)) == 1.0


def test_trainer_refuses_what_its_algorithm_needs_but_lacks(model_path: str, tmp_path: Path) -> None:
    cfg = LearnerConfig(algorithm="ppo")
    runtime = init_distributed(cfg)
    policy = load_policy(model_path, runtime)
    optimizer = build_optimizer(cfg, [policy])
    with pytest.raises(ValueError, match="needs a value head"):
        Trainer(cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer))


def test_a_non_finite_gradient_is_never_applied(model_path: str) -> None:
    """Behaviour logprobs at the wire's floor (-1000) under the unbounded "raw" correction make weights of e^995:
    the loss and gradient are not finite. The step must leave the weights, the optimizer state and the schedule as
    they were and say so; the next finite step trains as usual."""
    trainer = make_trainer(model_path, importance_correction="raw")
    before = {name: tensor.clone() for name, tensor in weights(trainer).items()}
    epoch = trainer.scheduler.last_epoch
    units = groups()
    for unit in units:
        for sample in unit.samples:
            sample.behavior_logprobs[:] = -1000.0
    metrics = trainer.step(units)
    assert metrics["nonfinite_gradient"] == 1.0 and not math.isfinite(metrics["grad_norm"])
    assert all(torch.equal(tensor, before[name]) for name, tensor in weights(trainer).items())
    assert not trainer.optimizer.state and trainer.scheduler.last_epoch == epoch
    assert all(p.grad is None for p in trainer.params)
    metrics = trainer.step(groups())
    assert metrics["nonfinite_gradient"] == 0.0 and math.isfinite(metrics["grad_norm"])
    assert any(not torch.equal(tensor, before[name]) for name, tensor in weights(trainer).items())


def test_advantages_at_the_reward_bound_are_finite() -> None:
    """The wire bounds rewards at +-MAX_ABS_REWARD: there, every scaling still gives finite, exact advantages."""
    from bus.schema import MAX_ABS_REWARD

    rewards = [MAX_ABS_REWARD, -MAX_ABS_REWARD, 0.0, 0.0]
    unit = Unit("g", [msgspec.structs.replace(groups(count=1)[0].samples[0], id=f"t{i}", reward=r) for i, r in
                      enumerate(rewards)])  # fmt: skip
    for scale in ("group", "batch", "none"):
        values = group_advantage_values([unit], LearnerConfig(scale_rewards=scale))[0]
        assert all(math.isfinite(v) for v in values), (scale, values)
    assert group_advantage_values([unit], LearnerConfig(scale_rewards="none"))[0] == rewards


def test_activation_checkpointing_recomputes_each_block_in_the_backward(model_path: str) -> None:
    from transformers import AutoModelForCausalLM

    from learner_node.model import checkpoint_blocks

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    calls: list[int] = []
    for layer in model.model.layers:  # count the block's own forward, under the checkpoint wrapper
        inner = layer.forward
        layer.forward = lambda *a, _inner=inner, **k: (calls.append(1), _inner(*a, **k))[1]
    assert checkpoint_blocks(model) == len(model.model.layers)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2 * len(model.model.layers)  # forward, then recomputed in the backward
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == len(model.model.layers)  # nothing to recompute without a backward


def test_bf16_shards_compute_in_bf16_and_keep_float32_master_weights_and_gradients(model_path: str) -> None:
    """The GPU precision path (runtime.autocast = bf16), run on CPU, where torch computes bf16 too."""
    from learner_node.model import Runtime

    init_distributed(LearnerConfig())
    runtime = Runtime(0, 1, torch.device("cpu"), torch.bfloat16)
    policy = load_policy(model_path, runtime)
    batch = collate(groups(count=1)[0].samples)
    logits, _ = forward(policy, batch, runtime)
    assert logits.dtype == torch.bfloat16
    token_logprobs(logits, batch.response_ids).sum().backward()
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in policy.parameters() if p.grad is not None} == {torch.float32}
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in policy.parameters())
