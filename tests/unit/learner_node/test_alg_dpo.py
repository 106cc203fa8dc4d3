"""dpo_loss (sigmoid, IPO, hinge, cDPO) against float64 references, gradcheck, metrics, and online pair building."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from learner_node.algorithms import dpo_loss, online_dpo_pairs

pytestmark = pytest.mark.usefixtures("float64_by_default")


def random_pairs(seed: int, pairs: int = 6) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    chosen = (-10 * torch.rand(pairs, generator=generator)).requires_grad_()
    rejected = (-10 * torch.rand(pairs, generator=generator)).requires_grad_()
    ref_chosen = chosen.detach() + torch.randn(pairs, generator=generator)
    ref_rejected = rejected.detach() + torch.randn(pairs, generator=generator)
    return chosen, rejected, ref_chosen, ref_rejected


def reference_pair_loss(margin: float, beta: float, loss_type: str, smoothing: float) -> float:
    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    if loss_type == "sigmoid":
        return -(1 - smoothing) * log_sigmoid(beta * margin) - smoothing * log_sigmoid(-beta * margin)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * margin)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"beta": 0.5},
        {"label_smoothing": 0.1},
        {"loss_type": "ipo", "beta": 0.2},
        {"loss_type": "hinge", "beta": 0.3},
    ],
)
def test_dpo_loss_matches_reference_and_gradcheck(config: dict[str, Any]) -> None:
    chosen, rejected, ref_chosen, ref_rejected = random_pairs(len(config))
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, **config)
    margins = (chosen - ref_chosen - rejected + ref_rejected).tolist()
    beta, loss_type = config.get("beta", 0.1), config.get("loss_type", "sigmoid")
    expected = sum(reference_pair_loss(m, beta, loss_type, config.get("label_smoothing", 0.0)) for m in margins)
    torch.testing.assert_close(loss, torch.tensor(expected / len(margins)))
    assert torch.autograd.gradcheck(
        lambda c, r: dpo_loss(c, r, ref_chosen, ref_rejected, **config)[0], (chosen, rejected)
    )


def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_margin() -> None:
    chosen, rejected, ref_chosen, ref_rejected = random_pairs(7, pairs=1)
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.25)
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(0.25 * margin).sum())
    torch.testing.assert_close(metrics["reward_margin"], 0.25 * margin.detach().sum())


def test_dpo_metrics_hand_computed() -> None:
    chosen = torch.tensor([-1.0, -2.0, -3.0])
    rejected = torch.tensor([-2.0, -1.0, -3.0])
    zeros = torch.zeros(3)
    _, metrics = dpo_loss(chosen, rejected, zeros, zeros, beta=0.5)
    torch.testing.assert_close(metrics["rewards_chosen"], torch.tensor(-1.0))  # 0.5 * mean(-1, -2, -3)
    torch.testing.assert_close(metrics["rewards_rejected"], torch.tensor(-1.0))
    torch.testing.assert_close(metrics["reward_margin"], torch.tensor(0.0))
    torch.testing.assert_close(metrics["reward_accuracy"], torch.tensor(1 / 3))  # a tie is not a win


def test_dpo_gradient_only_through_policy_and_safe_for_extremes() -> None:
    chosen, rejected, ref_chosen, ref_rejected = random_pairs(8)
    ref_chosen.requires_grad_()
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected)
    loss.backward()
    assert ref_chosen.grad is None and chosen.grad is not None
    big = torch.tensor([5000.0, -5000.0], dtype=torch.float32, requires_grad=True)
    for loss_type in ("sigmoid", "ipo", "hinge"):
        loss, metrics = dpo_loss(big, -big, torch.zeros(2), torch.zeros(2), loss_type=loss_type)  # type: ignore[arg-type]
        (grad,) = torch.autograd.grad(loss, big)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in metrics.values())
    empty, metrics = dpo_loss(*(torch.zeros(0) for _ in range(4)))
    assert empty == 0 and all(v == 0 for v in metrics.values())


def test_dpo_rejects_bad_input() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(x, x, x, torch.zeros(2))


def test_online_dpo_pairs_best_versus_worst() -> None:
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 1.0])
    chosen, rejected = online_dpo_pairs(rewards, 3)
    # group 0: best index 1, worst 0; group 1 flat: no pair; group 2: best 6 (first of the ties), worst 7
    assert chosen.tolist() == [1, 6] and rejected.tolist() == [0, 7]
    assert chosen.dtype == torch.int64
    with pytest.raises(ValueError, match="group_size"):
        online_dpo_pairs(rewards, 4)
