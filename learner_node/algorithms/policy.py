"""The off-policy-corrected clipped policy loss (decoupled PPO) that GRPO, DAPO, Dr.GRPO and GSPO specialise.

Shapes: B sequences, T response tokens, V vocabulary; `mask` is [B, T] with 1 on trained tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from learner_node.algorithms.common import (
    LossAgg,
    Metrics,
    aggregate_loss,
    as_mask,
    check_choice,
    check_range,
    check_shapes,
    clean,
    compute_dtype,
    masked_max,
    masked_mean,
)
from learner_node.algorithms.kl import kl_penalty
from learner_node.algorithms.logits import token_entropy

ImportanceCorrection = Literal["truncate", "mask", "raw", "none"]
SamplingLevel = Literal["token", "sequence"]


def policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    importance_correction: ImportanceCorrection = "truncate",
    importance_cap: float = 2.0,
    importance_floor: float = 0.0,
    importance_sampling_level: SamplingLevel = "token",
    loss_agg: LossAgg = "token-mean",
    max_tokens: int | None = None,
    logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Decoupled clipped surrogate with a behaviour-policy importance weight: -> (loss scalar, metrics).

    logprobs [B, T]: log pi_theta(y_t), the only input that carries a gradient.
    proximal_logprobs [B, T]: log pi_prox(y_t), the trust-region anchor (the learner's weights before this step).
    behavior_logprobs [B, T]: log mu(y_t), what the rollout engine sampled with (older weights, maybe low precision).
    advantages [B] (one per sequence, broadcast over T) or [B, T]. mask [B, T]. logits [B, T, V], optional: only
    to report the entropy. Untrained positions may hold anything (even NaN): they never reach the loss.

    Per token (log space throughout; exp is applied to log-ratios only):
      r_t = exp(logprobs_t - proximal_t),   w_t = exp(proximal_t - behavior_t)   (w carries no gradient)
      L_t = -w'_t * min(r_t A_t, clip(r_t, 1 - epsilon, 1 + epsilon_high) A_t)   (epsilon_high=None: = epsilon)
      dual_clip = c > 1 (arXiv 1912.09729): for A_t < 0, L_t = min(L_t', -c A_t w'_t) bounds the loss of a huge r_t
    importance_correction gives w'_t:
      truncate (TIS): w'_t = min(w_t, importance_cap)
      mask (MIS / IcePop): w'_t = w_t if importance_floor <= w_t <= importance_cap else 0
      raw: w'_t = w_t (AReaL's decoupled PPO without a cap; unbounded)
      none: w'_t = 1, no correction (TRL's vllm_importance_sampling_correction=False): the behaviour policy is
        treated as pi_prox; w is still reported in the metrics
    importance_sampling_level="sequence" (GSPO, arXiv 2507.18071) replaces both log-ratios by their mean over the
    sequence's trained tokens (length-normalised geometric mean), so a whole sequence is clipped, truncated or
    masked together: log r_i = (1/N_i) sum_t m_it (logprobs_it - proximal_it), the same for w.
    The loss is `aggregate_loss(L, mask, loss_agg, max_tokens)`.

    Metrics (over trained tokens): loss; clip_frac_low (A < 0, r < 1 - epsilon); clip_frac_high (A > 0,
    r > 1 + epsilon_high); dual_clip_frac; ratio_mean; importance_weight_mean / _max (w before correction, for
    none too, as a diagnostic); importance_truncated_frac (TIS: w > cap); importance_masked_frac (MIS: w outside
    [floor, cap]); approx_kl (k3 estimate of KL(mu || pi_theta)); mismatch_kl (KL(mu || pi_prox), the
    rollout/learner mismatch); entropy (only when logits are given); tokens (count of trained tokens).
    """
    check_choice("importance_correction", importance_correction, ("truncate", "mask", "raw", "none"))
    check_choice("importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    check_range("epsilon", epsilon, low=0.0, high=1.0)
    if epsilon_high is not None:
        check_range("epsilon_high", epsilon_high, low=0.0)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it bounds the loss at dual_clip * |A|), got {dual_clip}")
    if importance_cap <= 0 or not 0 <= importance_floor < importance_cap:
        raise ValueError(
            f"importance_floor and importance_cap must satisfy 0 <= floor < cap, got {importance_floor}, "
            f"{importance_cap}"
        )
    check_shapes(logprobs.shape, proximal_logprobs=proximal_logprobs, behavior_logprobs=behavior_logprobs, mask=mask)
    if advantages.dim() == 1:
        check_shapes(logprobs.shape[:1], advantages=advantages)
        advantages = advantages[:, None].expand_as(logprobs)
    check_shapes(logprobs.shape, advantages=advantages)
    if logits is not None and logits.shape[:-1] != logprobs.shape:
        raise ValueError(f"logits must have shape [B, T, V] with [B, T] = {tuple(logprobs.shape)}, got {logits.shape}")

    trained = as_mask(mask)
    dtype = compute_dtype(logprobs)
    current = clean(logprobs, trained, dtype)
    proximal = clean(proximal_logprobs.detach(), trained, dtype)
    behavior = clean(behavior_logprobs.detach(), trained, dtype)
    advantages = clean(advantages.detach(), trained, dtype)
    log_ratio = current - proximal
    log_weight = proximal - behavior
    if importance_sampling_level == "sequence":
        log_ratio, log_weight = (_sequence_mean(x, trained) for x in (log_ratio, log_weight))

    ratio = log_ratio.exp()
    low, high = 1.0 - epsilon, 1.0 + (epsilon if epsilon_high is None else epsilon_high)
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(low, high))
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    weight, truncated, masked_out = _correct(log_weight, importance_correction, importance_floor, importance_cap)
    loss = aggregate_loss(per_token * weight, trained, loss_agg, max_tokens)

    with torch.no_grad():
        raw_weight = log_weight.exp()
        metrics: Metrics = {
            "loss": loss.detach(),
            "clip_frac_low": masked_mean(((advantages < 0) & (ratio < low)).to(dtype), trained),
            "clip_frac_high": masked_mean(((advantages > 0) & (ratio > high)).to(dtype), trained),
            "dual_clip_frac": masked_mean(((advantages < 0) & (ratio > (dual_clip or math.inf))).to(dtype), trained),
            "ratio_mean": masked_mean(ratio, trained),
            "importance_weight_mean": masked_mean(raw_weight, trained),
            "importance_weight_max": masked_max(raw_weight, trained),
            "importance_truncated_frac": masked_mean(truncated.to(dtype), trained),
            "importance_masked_frac": masked_mean(masked_out.to(dtype), trained),
            # kl_penalty(a, b) estimates KL(a || b) from samples of a: here the samples came from mu.
            "approx_kl": masked_mean(kl_penalty(behavior, current.detach()), trained),
            "mismatch_kl": masked_mean(kl_penalty(behavior, proximal), trained),
            "tokens": trained.sum(),
        }
        if logits is not None:
            metrics["entropy"] = masked_mean(token_entropy(logits.detach()), trained)
    return loss, metrics


def _sequence_mean(values: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T] (0 where untrained) over each sequence's trained tokens, broadcast back to [B, T]."""
    lengths = trained.sum(dim=-1, keepdim=True).clamp(min=1)
    return (values.sum(dim=-1, keepdim=True) / lengths).expand_as(values)


def _correct(
    log_weight: torch.Tensor, correction: str, floor: float, cap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Importance weights [B, T] from log w [B, T] -> (w', truncated [B, T] bool, masked out [B, T] bool)."""
    no_tokens = torch.zeros_like(log_weight, dtype=torch.bool)
    if correction == "none":
        return torch.ones_like(log_weight), no_tokens, no_tokens
    log_cap = math.log(cap)
    # Clamping before exp keeps huge gaps finite; for "raw" the weight is unbounded by request.
    weight = log_weight.exp() if correction == "raw" else log_weight.clamp(max=log_cap).exp()
    if correction == "truncate":
        return weight, log_weight > log_cap, no_tokens
    if correction == "mask":
        log_floor = math.log(floor) if floor > 0 else -math.inf
        outside = (log_weight < log_floor) | (log_weight > log_cap)
        return torch.where(outside, torch.zeros_like(weight), weight), no_tokens, outside
    return weight, no_tokens, no_tokens
