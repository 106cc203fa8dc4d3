"""policy_loss and aggregate_loss against a per-token float64 reference, invariants, gradcheck, numerical safety."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

from learner_node.algorithms import aggregate_loss, group_advantages, policy_loss

pytestmark = pytest.mark.usefixtures("float64_by_default")


def reference_policy_loss(
    logprobs: torch.Tensor,
    proximal: torch.Tensor,
    behavior: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    importance_correction: str = "truncate",
    importance_cap: float = 2.0,
    importance_floor: float = 0.0,
    importance_sampling_level: str = "token",
    loss_agg: str = "token-mean",
    max_tokens: int | None = None,
) -> torch.Tensor:
    """The objective token by token, as the papers write it: J = w * min(r A, clip(r) A), loss = -J."""
    batch, steps = logprobs.shape
    high = epsilon if epsilon_high is None else epsilon_high
    per_sequence: list[list[torch.Tensor]] = []
    for b in range(batch):
        trained = [t for t in range(steps) if mask[b, t]]
        terms = []
        for t in trained:
            if importance_sampling_level == "sequence":
                log_r = sum(logprobs[b, s] - proximal[b, s] for s in trained) / len(trained)
                log_w = float(sum(proximal[b, s] - behavior[b, s] for s in trained)) / len(trained)
            else:
                log_r, log_w = logprobs[b, t] - proximal[b, t], float(proximal[b, t] - behavior[b, t])
            r = torch.exp(log_r)
            w = math.exp(log_w)
            if importance_correction == "truncate":
                w = min(w, importance_cap)
            elif importance_correction == "mask":
                w = w if importance_floor <= w <= importance_cap else 0.0
            elif importance_correction == "none":
                w = 1.0  # no correction; "raw" keeps w as it is
            a = float(advantages[b] if advantages.dim() == 1 else advantages[b, t])
            objective = torch.minimum(r * a, torch.clamp(r, 1 - epsilon, 1 + high) * a)
            if dual_clip is not None and a < 0:
                objective = torch.maximum(objective, torch.tensor(dual_clip * a))
            terms.append(-w * objective)
        per_sequence.append(terms)
    zero = logprobs.sum() * 0
    all_terms = [x for terms in per_sequence for x in terms]
    if loss_agg == "token-mean":
        return sum(all_terms, zero) / max(len(all_terms), 1)
    if loss_agg == "seq-mean-token-mean":
        means = [sum(terms, zero) / len(terms) for terms in per_sequence if terms]
        return sum(means, zero) / max(len(means), 1)
    return sum(all_terms, zero) / (batch * (max_tokens or steps))


def random_batch(
    batch: int = 4, steps: int = 6, seed: int = 0, gap: float = 0.4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logprobs (leaf with grad), proximal, behaviour, advantages [B], mask with one empty and one full row."""
    generator = torch.Generator().manual_seed(seed)
    behavior = -torch.rand(batch, steps, generator=generator) * 4
    proximal = behavior + gap * torch.randn(batch, steps, generator=generator)
    logprobs = (proximal + gap * torch.randn(batch, steps, generator=generator)).requires_grad_()
    advantages = torch.randn(batch, generator=generator)
    mask = torch.rand(batch, steps, generator=generator) > 0.3
    mask[0] = False
    mask[1] = True
    return logprobs, proximal, behavior, advantages, mask


CONFIGS: list[dict[str, Any]] = [
    {},
    {"epsilon_high": 0.28},
    {"dual_clip": 3.0},
    {"importance_correction": "mask", "importance_floor": 0.7, "importance_cap": 1.3},
    {"importance_correction": "none"},
    {"importance_correction": "raw"},
    {"importance_correction": "truncate", "importance_cap": 1.1},
    {"importance_sampling_level": "sequence", "epsilon": 0.05},
    {"importance_sampling_level": "sequence", "importance_correction": "mask", "importance_cap": 1.2},
    {"loss_agg": "seq-mean-token-mean"},
    {"loss_agg": "seq-mean-token-sum-norm", "max_tokens": 10},
    {"loss_agg": "seq-mean-token-sum-norm"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_policy_loss_matches_reference(config: dict[str, Any], per_token_advantages: bool) -> None:
    logprobs, proximal, behavior, advantages, mask = random_batch(seed=len(str(config)))
    if per_token_advantages:
        advantages = advantages[:, None] + 0.5 * torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(9))
    loss, _ = policy_loss(logprobs, proximal, behavior, advantages, mask, **config)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = reference_policy_loss(logprobs, proximal, behavior, advantages, mask, **config)
    (expected_grad,) = torch.autograd.grad(expected, logprobs)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("config", CONFIGS[:9], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_policy_loss_gradcheck(config: dict[str, Any]) -> None:
    logprobs, proximal, behavior, advantages, mask = random_batch(batch=3, steps=4, seed=11)
    assert torch.autograd.gradcheck(
        lambda x: policy_loss(x, proximal, behavior, advantages, mask, **config)[0], (logprobs,)
    )


def test_policy_loss_hand_computed() -> None:
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    proximal = torch.zeros(1, 2)
    behavior = torch.tensor([[0.0, math.log(0.25)]])  # w = 1 and 4 (truncated to 2)
    advantages = torch.tensor([[1.0, -1.0]])
    loss, metrics = policy_loss(logprobs, proximal, behavior, advantages, torch.ones(1, 2))
    # token 0: r = 1.5 clipped to 1.2 (A > 0): -1.2; token 1: r = 0.5 clipped to 0.8 (A < 0): -w * min(-.5, -.8) = 1.6
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 1.6) / 2))
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.equal(grad, torch.zeros(1, 2))  # both tokens are clipped: no gradient
    assert metrics["clip_frac_high"] == 0.5 and metrics["clip_frac_low"] == 0.5
    assert metrics["importance_truncated_frac"] == 0.5
    torch.testing.assert_close(metrics["importance_weight_mean"], torch.tensor(2.5))
    torch.testing.assert_close(metrics["importance_weight_max"], torch.tensor(4.0))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(1.0))
    # KL(mu || pi_theta) by k3 with x = log pi - log mu: token 0: 1.5 - 1 - log 1.5; token 1: 2 - 1 - log 2
    expected_kl = ((0.5 - math.log(1.5)) + (1 - math.log(2))) / 2
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(expected_kl))
    torch.testing.assert_close(metrics["mismatch_kl"], torch.tensor((4 - 1 - math.log(4)) / 2))
    assert metrics["tokens"] == 2


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_on_policy_reduces_to_the_plain_policy_gradient(level: str, loss_agg: str) -> None:
    _, _, behavior, advantages, mask = random_batch(seed=3)
    logprobs = behavior.clone().requires_grad_()
    loss, metrics = policy_loss(
        logprobs, behavior, behavior, advantages, mask, importance_sampling_level=level, loss_agg=loss_agg
    )
    plain = aggregate_loss(-advantages[:, None] * logprobs, mask, loss_agg)  # REINFORCE: -A log pi
    torch.testing.assert_close(loss, aggregate_loss(-advantages[:, None].expand_as(mask) * 1.0, mask, loss_agg))
    torch.testing.assert_close(torch.autograd.grad(loss, logprobs)[0], torch.autograd.grad(plain, logprobs)[0])
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == metrics["approx_kl"] == 0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_a_cap_above_every_weight_equals_no_truncation(level: str) -> None:
    logprobs, proximal, behavior, advantages, mask = random_batch(seed=4, gap=1.0)
    uncapped, _ = policy_loss(
        logprobs, proximal, behavior, advantages, mask, importance_correction="raw", importance_sampling_level=level
    )
    for correction in ("truncate", "mask"):
        capped, metrics = policy_loss(
            logprobs,
            proximal,
            behavior,
            advantages,
            mask,
            importance_correction=correction,
            importance_cap=1e6,
            importance_sampling_level=level,
        )
        torch.testing.assert_close(capped, uncapped)
        assert metrics["importance_truncated_frac"] == metrics["importance_masked_frac"] == 0
    truncated, metrics = policy_loss(logprobs, proximal, behavior, advantages, mask, importance_cap=1.01)
    assert metrics["importance_truncated_frac"] > 0 and not torch.allclose(truncated, uncapped)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_no_correction_weighs_every_token_one(level: str) -> None:
    # "none" (TRL's vllm_importance_sampling_correction=False): w' = 1, as if the samples came from pi_prox itself
    logprobs, proximal, behavior, advantages, mask = random_batch(seed=15, gap=1.0)
    none: dict[str, Any] = {"importance_correction": "none", "importance_sampling_level": level}
    raw: dict[str, Any] = {"importance_correction": "raw", "importance_sampling_level": level}
    loss, metrics = policy_loss(logprobs, proximal, behavior, advantages, mask, **none)
    on_policy, _ = policy_loss(logprobs, proximal, proximal, advantages, mask, **raw)
    weighted, raw_metrics = policy_loss(logprobs, proximal, behavior, advantages, mask, **raw)
    torch.testing.assert_close(loss, on_policy)
    torch.testing.assert_close(torch.autograd.grad(loss, logprobs)[0], torch.autograd.grad(on_policy, logprobs)[0])
    assert not torch.allclose(loss, weighted)  # the weights are far from 1 here: applying them would show
    # the raw weight is still reported (a diagnostic of the mismatch); nothing is truncated or masked
    assert metrics["importance_weight_mean"] == raw_metrics["importance_weight_mean"] != 1
    assert metrics["importance_weight_max"] == raw_metrics["importance_weight_max"]
    assert metrics["importance_truncated_frac"] == metrics["importance_masked_frac"] == 0


def test_equal_rewards_in_a_group_give_zero_gradient() -> None:
    logprobs, proximal, behavior, _, _ = random_batch(batch=8, seed=5)
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    advantages = group_advantages(rewards, 4)
    for level in ("token", "sequence"):
        loss, _ = policy_loss(
            logprobs, proximal, behavior, advantages, torch.ones(8, 6), importance_sampling_level=level
        )
        assert torch.equal(torch.autograd.grad(loss, logprobs)[0], torch.zeros(8, 6))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_masked_tokens_never_change_the_loss(config: dict[str, Any]) -> None:
    logprobs, proximal, behavior, _, mask = random_batch(seed=6)
    advantages = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(7))
    loss, metrics = policy_loss(logprobs, proximal, behavior, advantages, mask, **config)
    (grad,) = torch.autograd.grad(loss, logprobs)
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30, 50.0]).repeat(4)[:24].view(4, 6)

    def spoil(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.detach(), garbage)

    spoiled = spoil(logprobs).requires_grad_()
    loss2, metrics2 = policy_loss(spoiled, spoil(proximal), spoil(behavior), spoil(advantages), mask, **config)
    (grad2,) = torch.autograd.grad(loss2, spoiled)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad, grad2) and torch.all(grad2[~mask] == 0)
    assert all(torch.equal(metrics[k], metrics2[k]) for k in metrics)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_empty_mask_gives_zero_loss_and_gradient(loss_agg: str) -> None:
    logprobs, proximal, behavior, advantages, _ = random_batch(seed=8)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for level in ("token", "sequence"):
        loss, metrics = policy_loss(
            logprobs, proximal, behavior, advantages, mask, loss_agg=loss_agg, importance_sampling_level=level
        )
        assert loss == 0 and torch.equal(torch.autograd.grad(loss, logprobs)[0], torch.zeros(4, 6))
        assert all(torch.isfinite(v) and v == 0 for v in metrics.values())


@pytest.mark.parametrize(
    ("correction", "level", "dtype"),
    list(
        itertools.product(["truncate", "mask", "raw", "none"], ["token", "sequence"], [torch.float32, torch.bfloat16])
    ),
)
def test_extreme_logprob_gaps_stay_finite(correction: str, level: str, dtype: torch.dtype) -> None:
    # one column per case, as (log w, log pi_theta - log mu): every pair of the three logprobs is 0 or 50 nats apart
    offsets = torch.tensor([[50.0, 50.0], [-50.0, -50.0], [0.0, 50.0], [0.0, -50.0], [50.0, 0.0], [-50.0, 0.0]])
    behavior = -torch.rand(4, 6, generator=torch.Generator().manual_seed(10)) - 55
    proximal = behavior + offsets[:, 0]
    logprobs = (behavior + offsets[:, 1]).to(dtype).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 2.0, -0.5])
    loss, metrics = policy_loss(
        logprobs,
        proximal.to(dtype),
        behavior.to(dtype),
        advantages,
        torch.ones(4, 6),
        importance_correction=correction,
        importance_sampling_level=level,
        dual_clip=3.0,
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_mask_correction_drops_tokens_outside_the_window() -> None:
    logprobs, proximal, behavior, advantages, mask = random_batch(seed=12, gap=1.0)
    mask = torch.ones_like(mask)
    loss, metrics = policy_loss(
        logprobs,
        proximal,
        behavior,
        advantages,
        mask,
        importance_correction="mask",
        importance_floor=0.5,
        importance_cap=2.0,
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    weights = (proximal - behavior).exp()
    outside = (weights < 0.5) | (weights > 2.0)
    assert outside.any() and torch.all(grad[outside] == 0)
    torch.testing.assert_close(metrics["importance_masked_frac"], outside.double().mean())


def test_sequence_level_clips_whole_sequences() -> None:
    # sequence 0: geometric-mean ratio e^{0.5} > 1 + epsilon; its token ratios straddle 1 (e^{1.5}, e^{-0.5})
    logprobs = torch.tensor([[1.5, -0.5], [0.01, -0.01]], requires_grad=True)
    zeros = torch.zeros(2, 2)
    loss, metrics = policy_loss(
        logprobs, zeros, zeros, torch.tensor([1.0, 1.0]), torch.ones(2, 2), importance_sampling_level="sequence"
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.all(grad[0] == 0) and torch.all(grad[1] != 0)
    assert metrics["clip_frac_high"] == 0.5
    # unclipped sequence: d/dlogp_t of -(1/4) * 2 * exp(mean) = -(1/4) * exp(0) = -0.25 per token
    torch.testing.assert_close(grad[1], torch.full((2,), -0.25))


def test_dual_clip_bounds_negative_advantage_loss() -> None:
    logprobs = torch.tensor([[5.0, 5.0]], requires_grad=True)  # r = e^5 ~ 148
    zeros = torch.zeros(1, 2)
    advantages = torch.tensor([[-2.0, 2.0]])
    loss, metrics = policy_loss(logprobs, zeros, zeros, advantages, torch.ones(1, 2), dual_clip=3.0)
    # token 0: min(2 * 148, 3 * 2) = 6; token 1: clipped at 1.2 -> -2.4
    torch.testing.assert_close(loss, torch.tensor((6.0 - 2.4) / 2))
    assert torch.equal(torch.autograd.grad(loss, logprobs)[0], torch.zeros(1, 2))
    assert metrics["dual_clip_frac"] == 0.5


def test_entropy_metric_when_logits_are_given() -> None:
    logprobs, proximal, behavior, advantages, mask = random_batch(seed=13)
    logits = torch.randn(4, 6, 11, generator=torch.Generator().manual_seed(14))
    _, metrics = policy_loss(logprobs, proximal, behavior, advantages, mask, logits=logits)
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(metrics["entropy"], entropy[mask].mean())
    _, metrics = policy_loss(logprobs, proximal, behavior, advantages, mask)
    assert "entropy" not in metrics


def test_aggregate_loss_hand_computed() -> None:
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(aggregate_loss(losses, mask.bool(), "token-mean"), torch.tensor(10.0 / 4))
    torch.testing.assert_close(aggregate_loss(losses, mask.bool(), "seq-mean-token-mean"), torch.tensor((2.0 + 4) / 2))
    torch.testing.assert_close(aggregate_loss(losses, mask.bool(), "seq-mean-token-sum-norm"), torch.tensor(10.0 / 9))
    torch.testing.assert_close(
        aggregate_loss(losses, mask.bool(), "seq-mean-token-sum-norm", max_tokens=5), torch.tensor(10.0 / 15)
    )


def test_policy_loss_rejects_bad_input() -> None:
    logprobs, proximal, behavior, advantages, mask = random_batch()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"loss_agg": "sum"}, "loss_agg"),
        ({"importance_correction": "clip"}, "importance_correction"),
        ({"importance_sampling_level": "group"}, "importance_sampling_level"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"importance_cap": 1.0, "importance_floor": 1.0}, "importance_floor"),
        ({"max_tokens": 0, "loss_agg": "seq-mean-token-sum-norm"}, "max_tokens"),
        ({"logits": torch.zeros(4, 5, 3)}, "logits"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValueError, match=field):
            policy_loss(logprobs, proximal, behavior, advantages, mask, **kwargs)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logprobs, proximal, behavior, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="behavior_logprobs"):
        policy_loss(logprobs, proximal, behavior[:, :5], advantages, mask)
