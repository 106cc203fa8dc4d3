"""group_advantages, gae and vtrace against float64 references written here from the papers' definitions."""

from __future__ import annotations

import math

import pytest
import torch

from learner_node.algorithms import gae, group_advantages, vtrace

pytestmark = pytest.mark.usefixtures("float64_by_default")


def reference_group_advantages(rewards: list[float], group_size: int, scale: str, estimator: str) -> list[float]:
    """Straight from the definitions, one sample at a time."""
    out = []
    batch_mean = sum(rewards) / len(rewards)
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in rewards) / (len(rewards) - 1))
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        for i, r in enumerate(group):
            if max(group) == min(group):
                out.append(0.0)
                continue
            others = [x for j, x in enumerate(group) if j != i]
            advantage = r - mean if estimator == "grpo" else r - sum(others) / len(others)
            divisor = {"group": std + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
            out.append(advantage / divisor)
    return out


def test_group_advantages_hand_computed() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, 4)
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0])
    expected[:4] /= 0.5 + 1e-4
    torch.testing.assert_close(advantages, expected)
    rloo = group_advantages(rewards, 4, scale_rewards="none", estimator="rloo")
    torch.testing.assert_close(rloo, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_advantages_match_reference(scale: str, estimator: str) -> None:
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=generator)
    rewards[6:12] = 0.7  # one flat group
    got = group_advantages(rewards, 6, scale_rewards=scale, estimator=estimator)
    expected = reference_group_advantages(rewards.tolist(), 6, scale, estimator)
    torch.testing.assert_close(got, torch.tensor(expected))


def test_rloo_is_rescaled_grpo() -> None:
    rewards = torch.randn(32, generator=torch.Generator().manual_seed(1))
    grpo = group_advantages(rewards, 8, scale_rewards="none")
    rloo = group_advantages(rewards, 8, scale_rewards="none", estimator="rloo")
    torch.testing.assert_close(rloo, grpo * 8 / 7)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_flat_groups_get_exact_zero_never_nan(scale: str) -> None:
    # 0.1 * 3 is not exactly representable: r - mean would be ~1e-17, and ~1e-13 after dividing by eps.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.3, 0.3], dtype=torch.float32)
    advantages = group_advantages(rewards, 3, scale_rewards=scale)
    assert advantages.dtype == torch.float32
    assert torch.equal(advantages, torch.zeros(6, dtype=torch.float32))


def test_group_advantages_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(6), 3, scale_rewards="std")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.zeros(6), 3, estimator="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(2, 3), 3)


def trained_positions(mask: torch.Tensor, row: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if mask[row, t]]


def reference_gae(rewards, values, mask, gamma, lam):  # type: ignore[no-untyped-def]
    """Per sequence over its trained tokens only: A_t = sum_k (gamma lam)^k delta_{t+k}."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = trained_positions(mask, b)
        r = [float(rewards[b, t]) for t in steps]
        v = [float(values[b, t]) for t in steps] + [0.0]
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(steps))]
        for i, t in enumerate(steps):
            advantages[b, t] = sum((gamma * lam) ** k * deltas[i + k] for k in range(len(steps) - i))
    returns = torch.where(mask.bool(), advantages + values, torch.zeros(()))
    return advantages, returns


def random_episode(batch: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, generator=generator)
    values = torch.randn(batch, steps, generator=generator)
    mask = torch.rand(batch, steps, generator=generator) > 0.3
    mask[0] = False  # an empty sequence
    mask[1] = True
    return rewards, values, mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.9, 0.95), (0.5, 0.0), (0.0, 0.7)])
def test_gae_matches_reference(gamma: float, lam: float) -> None:
    rewards, values, mask = random_episode(5, 7, seed=2)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected_advantages, expected_returns = reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


def test_gae_hand_computed() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 0.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.5)
    # deltas: 0 + .5*.25 - .5 = -.375; 0 + .5*.5 - .25 = 0; 1 - .5 = .5
    # A_2 = .5; A_1 = 0 + .25*.5 = .125; A_0 = -.375 + .25*.125 = -.34375
    torch.testing.assert_close(advantages, torch.tensor([[-0.34375, 0.125, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[0.15625, 0.375, 1.0]]))


def test_gae_with_unit_gamma_lambda_is_reward_to_go_minus_values() -> None:
    rewards, values, _ = random_episode(4, 9, seed=3)
    mask = torch.ones(4, 9, dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(advantages, reward_to_go - values)
    torch.testing.assert_close(returns, reward_to_go)


def test_gae_skips_untrained_tokens_whatever_they_hold() -> None:
    rewards, values, mask = random_episode(5, 8, seed=4)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    garbage = torch.tensor([math.nan, math.inf, -1e30]).repeat(40)[:40].view(5, 8)
    advantages2, returns2 = gae(
        torch.where(mask, rewards, garbage), torch.where(mask, values, garbage), mask, gamma=0.9, lam=0.8
    )
    assert torch.equal(advantages, advantages2) and torch.equal(returns, returns2)
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)
    # a tool-output token in the middle is passed through: same result as the sequence without it
    middle = gae(rewards[1:2, [0, 1, 3]], values[1:2, [0, 1, 3]], torch.ones(1, 3), gamma=0.9, lam=0.8)[0]
    holed_mask = torch.tensor([[True, True, False, True]])
    holed = gae(rewards[1:2, :4], values[1:2, :4], holed_mask, gamma=0.9, lam=0.8)[0]
    torch.testing.assert_close(holed[:, [0, 1, 3]], middle)


def test_gae_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma=1.5)
    with pytest.raises(ValueError, match="values"):
        gae(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


def reference_vtrace(behavior, target, rewards, values, bootstrap, mask, gamma, rho_bar, c_bar):  # type: ignore[no-untyped-def]
    """IMPALA eq. (1) as a sum of products, per sequence over its trained tokens."""
    vs = torch.zeros_like(rewards)
    pg = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = trained_positions(mask, b)
        n = len(steps)
        ratio = [math.exp(float(target[b, t] - behavior[b, t])) for t in steps]
        rho = [min(rho_bar, x) for x in ratio]
        c = [min(c_bar, x) for x in ratio]
        r = [float(rewards[b, t]) for t in steps]
        v = [float(values[b, t]) for t in steps] + [float(bootstrap[b])]
        delta = [rho[i] * (r[i] + gamma * v[i + 1] - v[i]) for i in range(n)]
        v_s = []
        for s in range(n):
            total = v[s]
            for t in range(s, n):
                total += gamma ** (t - s) * math.prod(c[s:t]) * delta[t]
            v_s.append(total)
        v_s.append(float(bootstrap[b]))
        for i, t in enumerate(steps):
            vs[b, t] = v_s[i]
            pg[b, t] = rho[i] * (r[i] + gamma * v_s[i + 1] - v[i])
    return vs, pg


@pytest.mark.parametrize(("gamma", "rho_bar", "c_bar"), [(1.0, 1.0, 1.0), (0.9, 1.0, 0.9), (0.95, 2.0, 1.0)])
def test_vtrace_matches_reference(gamma: float, rho_bar: float, c_bar: float) -> None:
    rewards, values, mask = random_episode(5, 7, seed=5)
    generator = torch.Generator().manual_seed(6)
    behavior = -torch.rand(5, 7, generator=generator) * 3
    target = behavior + torch.randn(5, 7, generator=generator)
    bootstrap = torch.randn(5, generator=generator)
    vs, pg = vtrace(behavior, target, rewards, values, bootstrap, mask, gamma=gamma, rho_bar=rho_bar, c_bar=c_bar)
    expected_vs, expected_pg = reference_vtrace(
        behavior, target, rewards, values, bootstrap, mask, gamma, rho_bar, c_bar
    )
    torch.testing.assert_close(vs, expected_vs)
    torch.testing.assert_close(pg, expected_pg)


def test_vtrace_on_policy_is_the_n_step_return() -> None:
    rewards, values, _ = random_episode(3, 6, seed=7)
    mask = torch.ones(3, 6, dtype=torch.bool)
    logprobs = -torch.rand(3, 6, generator=torch.Generator().manual_seed(8))
    bootstrap = torch.tensor([0.0, 1.5, -2.0])
    gamma = 0.9
    vs, pg = vtrace(logprobs, logprobs.clone(), rewards, values, bootstrap, mask, gamma=gamma)
    discounts = gamma ** torch.arange(6.0)
    for t in range(6):
        n_step = (rewards[:, t:] * discounts[: 6 - t]).sum(-1) + gamma ** (6 - t) * bootstrap
        torch.testing.assert_close(vs[:, t], n_step)
    next_vs = torch.cat([vs[:, 1:], bootstrap[:, None]], dim=1)
    torch.testing.assert_close(pg, rewards + gamma * next_vs - values)


def test_vtrace_is_finite_for_extreme_gaps_and_truncates() -> None:
    rewards, values, mask = random_episode(4, 5, seed=9)
    behavior = torch.full((4, 5), -60.0)
    target = torch.full((4, 5), -10.0)  # pi / mu = e^50
    target[:, ::2] = -110.0  # pi / mu = e^-50
    for dtype in (torch.float32, torch.float64):
        vs, pg = vtrace(behavior.to(dtype), target.to(dtype), rewards.to(dtype), values.to(dtype), torch.zeros(4), mask)
        assert torch.isfinite(vs).all() and torch.isfinite(pg).all()
    expected_vs, expected_pg = reference_vtrace(behavior, target, rewards, values, torch.zeros(4), mask, 1.0, 1.0, 1.0)
    torch.testing.assert_close(vs, expected_vs)
    torch.testing.assert_close(pg, expected_pg)


def test_vtrace_rejects_bad_input() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rho_bar"):
        vtrace(x, x, x, x, torch.zeros(2), torch.ones(2, 3), rho_bar=0.0)
    with pytest.raises(ValueError, match="bootstrap_values"):
        vtrace(x, x, x, x, torch.zeros(3), torch.ones(2, 3))
