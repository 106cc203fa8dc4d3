"""Advantage estimators: group baselines (GRPO, RLOO), GAE and V-trace.

Shapes: B sequences, T response tokens, G samples per group (a group is G consecutive rows); `mask` is [B, T]
with 1 on trained tokens. Outputs are targets: computed without gradient, in float32 (float64 for float64 inputs).
GAE and V-trace loop over T (the recursion runs backwards in time) and are vectorised over B.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from learner_node.algorithms.common import as_mask, check_choice, check_range, check_shapes, clean, compute_dtype

ScaleRewards = Literal["group", "batch", "none"]
Estimator = Literal["grpo", "rloo"]

STD_EPS = 1e-4
"""Added to the standard deviation before dividing (TRL's value), so a tiny spread does not explode."""


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_rewards: ScaleRewards = "group",
    estimator: Estimator = "grpo",
) -> torch.Tensor:
    """One advantage per sample from the rewards of its group: [B] -> [B].

    rewards: [B], B = num_groups * G, the G samples of a group adjacent.
    With r_i the rewards of one group:
      grpo: A_i = r_i - mean_j r_j                       (arXiv 2402.03300)
      rloo: A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_j r_j)   (arXiv 2402.14740)
    then divided by s + 1e-4 where s is, per `scale_rewards`:
      group: the (unbiased) std of the group's rewards   (GRPO)
      batch: the (unbiased) std of all B rewards         (arXiv 2508.08221 "group mean, batch std")
      none:  no division at all                          (Dr.GRPO, arXiv 2503.20783)
    A group whose rewards are all equal gets exactly 0 (it carries no signal), never NaN.
    """
    check_choice("scale_rewards", scale_rewards, ("group", "batch", "none"))
    check_choice("estimator", estimator, ("grpo", "rloo"))
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a baseline needs other samples), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards length {rewards.numel()} must be a multiple of group_size {group_size}")
    grouped = rewards.to(compute_dtype(rewards)).view(-1, group_size)
    if estimator == "grpo":
        baseline = grouped.mean(dim=1, keepdim=True)
    else:
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    advantages = grouped - baseline
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (grouped.std() + STD_EPS)
    # Exact zero for flat groups: r - mean is not exactly 0 in floating point, and dividing by ~eps would amplify it.
    flat = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(advantages), advantages).reshape(-1)


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (arXiv 1506.02438): -> (advantages [B, T], returns [B, T]).

    rewards, values, mask: [B, T]. Over the trained tokens of a sequence (untrained ones, e.g. tool output or
    padding, are skipped: their reward and value are ignored and the recursion passes through them):
      delta_t = r_t + gamma * V_{t'} - V_t          (t' the next trained token; V after the last one is 0)
      A_t     = delta_t + gamma * lam * A_{t'}
      R_t     = A_t + V_t                            (the value target)
    With gamma = lam = 1, A_t = sum_{k >= t} r_k - V_t. Both outputs are 0 at untrained positions.
    """
    check_shapes(rewards.shape, values=values, mask=mask)
    check_range("gamma", gamma, low=0.0, high=1.0)
    check_range("lam", lam, low=0.0, high=1.0)
    trained = as_mask(mask)
    dtype = compute_dtype(rewards)
    rewards, values = clean(rewards, trained, dtype), clean(values, trained, dtype)
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        advantage = rewards[:, t] - values[:, t] + gamma * (next_value + lam * next_advantage)
        advantages[:, t] = advantage
        next_value = torch.where(trained[:, t], values[:, t], next_value)
        next_advantage = torch.where(trained[:, t], advantage, next_advantage)
    advantages = clean(advantages, trained, dtype)
    return advantages, clean(advantages + values, trained, dtype)


@torch.no_grad()
def vtrace(
    behavior_logprobs: torch.Tensor,
    target_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace off-policy value targets (IMPALA, arXiv 1802.01561): -> (vs [B, T], pg_advantages [B, T]).

    behavior_logprobs (mu), target_logprobs (pi), rewards, values, mask: [B, T]; bootstrap_values: [B], the value
    after the last token (0 for a finished sequence). Untrained tokens are skipped as in `gae`. With t' the next
    trained token (V_{t'} = bootstrap, vs_{t'} = bootstrap after the last one):
      rho_t = min(rho_bar, pi_t / mu_t),   c_t = min(c_bar, pi_t / mu_t)      (computed in log space)
      delta_t = rho_t (r_t + gamma V_{t'} - V_t)
      vs_t = V_t + delta_t + gamma c_t (vs_{t'} - V_{t'})
      pg_advantage_t = rho_t (r_t + gamma vs_{t'} - V_t)
    With pi = mu and rho_bar = c_bar = 1, vs_t is the on-policy n-step return
    sum_{k >= t} gamma^{k-t} r_k + gamma^{n} bootstrap. Both outputs are 0 at untrained positions.
    """
    check_shapes(rewards.shape, behavior_logprobs=behavior_logprobs, target_logprobs=target_logprobs)
    check_shapes(rewards.shape, values=values, mask=mask)
    check_shapes(rewards.shape[:1], bootstrap_values=bootstrap_values)
    check_range("gamma", gamma, low=0.0, high=1.0)
    if rho_bar <= 0 or c_bar <= 0:
        raise ValueError(f"rho_bar and c_bar must be > 0, got rho_bar={rho_bar}, c_bar={c_bar}")
    trained = as_mask(mask)
    dtype = compute_dtype(rewards)
    log_ratio = clean(target_logprobs, trained, dtype) - clean(behavior_logprobs, trained, dtype)
    rho = log_ratio.clamp(max=math.log(rho_bar)).exp()
    c = log_ratio.clamp(max=math.log(c_bar)).exp()
    rewards, values = clean(rewards, trained, dtype), clean(values, trained, dtype)
    vs = torch.zeros_like(values)
    pg_advantages = torch.zeros_like(values)
    next_value = bootstrap_values.to(dtype)
    next_correction = torch.zeros_like(next_value)  # vs_{t'} - V_{t'}
    for t in reversed(range(values.shape[1])):
        td_error = rewards[:, t] + gamma * next_value - values[:, t]
        correction = rho[:, t] * td_error + gamma * c[:, t] * next_correction
        vs[:, t] = values[:, t] + correction
        pg_advantages[:, t] = rho[:, t] * (td_error + gamma * next_correction)
        next_value = torch.where(trained[:, t], values[:, t], next_value)
        next_correction = torch.where(trained[:, t], correction, next_correction)
    return clean(vs, trained, dtype), clean(pg_advantages, trained, dtype)
