"""value_loss and kl_penalty against float64 references, gradcheck, and the KL estimators' unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from learner_node.algorithms import kl_penalty, value_loss

pytestmark = pytest.mark.usefixtures("float64_by_default")


def random_values(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    old_values = torch.randn(4, 5, generator=generator)
    values = (old_values + 0.5 * torch.randn(4, 5, generator=generator)).requires_grad_()
    returns = torch.randn(4, 5, generator=generator)
    mask = torch.rand(4, 5, generator=generator) > 0.3
    mask[0] = True
    return values, old_values, returns, mask


@pytest.mark.parametrize("clip", [None, 0.2, 10.0])
def test_value_loss_matches_reference(clip: float | None) -> None:
    values, old_values, returns, mask = random_values(0)
    loss, metrics = value_loss(values, old_values, returns, mask, clip)
    terms = []
    for b, t in mask.nonzero().tolist():
        v, old, target = values[b, t], float(old_values[b, t]), float(returns[b, t])
        error = (v - target) ** 2
        if clip is not None:
            clipped_v = old + torch.clamp(v - old, -clip, clip)
            error = torch.maximum(error, (clipped_v - target) ** 2)
        terms.append(0.5 * error)
    expected = sum(terms) / len(terms)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, values)[0], torch.autograd.grad(expected, values)[0])
    v, r = values.detach()[mask], returns[mask]
    torch.testing.assert_close(metrics["explained_variance"], 1 - (r - v).var(unbiased=False) / r.var(unbiased=False))
    assert (metrics["value_clip_frac"] > 0) == (clip == 0.2)


def test_value_loss_hand_computed_and_gradcheck() -> None:
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    # token 0: unclipped (1-2)^2 = 1, clipped (0.5-2)^2 = 2.25 -> 2.25; token 1: 1 and 1 -> 1
    loss, metrics = value_loss(values, old_values, returns, torch.ones(1, 2), clip=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (2.25 + 1) / 2))
    assert metrics["value_clip_frac"] == 0.5
    x, old, target, mask = random_values(1)
    for clip in (None, 0.3):
        assert torch.autograd.gradcheck(lambda v, c=clip: value_loss(v, old, target, mask, c)[0], (x,))


def test_value_loss_ignores_masked_tokens_and_empty_mask() -> None:
    values, old_values, returns, mask = random_values(2)
    loss, _ = value_loss(values, old_values, returns, mask, 0.2)
    nan = torch.full_like(returns, math.nan)
    loss2, _ = value_loss(values, torch.where(mask, old_values, nan), torch.where(mask, returns, nan), mask, 0.2)
    assert torch.equal(loss, loss2)
    empty, metrics = value_loss(values, old_values, returns, torch.zeros_like(mask), 0.2)
    assert empty == 0 and all(torch.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="clip"):
        value_loss(values, old_values, returns, mask, 0.0)


def test_kl_estimators_hand_computed() -> None:
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    # x = log ref - log pi = [-log 2, log 2]
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([[math.log(2), -math.log(2)]]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k2"), torch.full((1, 2), 0.5 * math.log(2) ** 2))
    k3 = torch.tensor([[0.5 - 1 + math.log(2), 2 - 1 - math.log(2)]])
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k3"), k3)


def test_kl_estimators_are_unbiased_where_schulman_says() -> None:
    generator = torch.Generator().manual_seed(3)
    pi = torch.softmax(torch.randn(6, generator=generator), -1)
    ref = torch.softmax(pi.log() + 0.3 * torch.randn(6, generator=generator), -1)
    exact = (pi * (pi.log() - ref.log())).sum()
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=generator)
    logprobs, ref_logprobs = pi.log()[samples][None], ref.log()[samples][None]
    for estimator in ("k1", "k3"):
        estimate = kl_penalty(logprobs, ref_logprobs, estimator).mean()
        assert abs(estimate - exact) < 0.1 * exact, estimator
    assert torch.all(kl_penalty(logprobs, ref_logprobs, "k3") >= 0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_gradcheck_and_extreme_gaps(estimator: str) -> None:
    generator = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(3, 4, generator=generator).requires_grad_()
    ref = (logprobs.detach() + torch.randn(3, 4, generator=generator)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, estimator), (logprobs, ref))  # type: ignore[arg-type]
    gaps = torch.tensor([[50.0, -50.0]])
    base = torch.full((1, 2), -60.0, dtype=torch.float32, requires_grad=True)
    kl = kl_penalty(base, base.detach() + gaps.float(), estimator)  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(kl.sum(), base)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logprobs, ref, "k4")  # type: ignore[arg-type]
