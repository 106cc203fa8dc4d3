"""PPO's critic loss. Shapes: B sequences, T response tokens; `mask` is [B, T] with 1 on trained tokens."""

from __future__ import annotations

import torch

from learner_node.algorithms.common import (
    LossAgg,
    Metrics,
    aggregate_loss,
    as_mask,
    check_shapes,
    clean,
    compute_dtype,
    masked_mean,
)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = None,
    *,
    loss_agg: LossAgg = "token-mean",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value regression (PPO, arXiv 1707.06347): values, old_values, returns, mask [B, T] -> (loss, metrics).

    values carry the gradient; old_values (the critic that produced the targets) and returns (from `gae` or
    `vtrace`) are constants. Per token:
      L_t = 1/2 (V_t - R_t)^2                                                  (clip=None)
      L_t = 1/2 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -clip, clip) - R_t)^2)
    reduced by `aggregate_loss(L, mask, loss_agg, max_tokens)`.
    Metrics: loss; value_clip_frac (the clipped term is the larger); value_mean; explained_variance
    1 - Var(R - V) / Var(R) over trained tokens (0 when Var(R) = 0).
    """
    check_shapes(values.shape, old_values=old_values, returns=returns, mask=mask)
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 (or None for no clipping), got {clip}")
    trained = as_mask(mask)
    dtype = compute_dtype(values)
    current = clean(values, trained, dtype)
    targets = clean(returns.detach(), trained, dtype)
    squared_error = (current - targets).square()
    if clip is None:
        per_token = squared_error
        clipped_larger = torch.zeros_like(trained)
    else:
        old = clean(old_values.detach(), trained, dtype)
        clipped_error = (old + (current - old).clamp(-clip, clip) - targets).square()
        per_token = torch.maximum(squared_error, clipped_error)
        clipped_larger = clipped_error > squared_error
    loss = 0.5 * aggregate_loss(per_token, trained, loss_agg, max_tokens)

    with torch.no_grad():
        target_variance = _masked_variance(targets, trained)
        explained = 1.0 - _masked_variance(targets - current, trained) / target_variance.clamp(min=1e-12)
        metrics: Metrics = {
            "loss": loss.detach(),
            "value_clip_frac": masked_mean(clipped_larger.to(dtype), trained),
            "value_mean": masked_mean(current.detach(), trained),
            "explained_variance": torch.where(target_variance > 0, explained, torch.zeros_like(explained)),
        }
    return loss, metrics


def _masked_variance(values: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """Population variance of `values` [B, T] over `trained` [B, T] (bool); 0 for an empty mask."""
    mean = masked_mean(values, trained)
    return masked_mean((values - mean).square(), trained)
