"""Shared pieces of the loss functions: input checks, masked reductions and loss aggregation.

Shapes: B sequences, T response tokens; `mask` is [B, T] with 1 (or True) on trained tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal

import torch

Metrics = dict[str, torch.Tensor]
"""Detached 0-dim tensors (no host sync is forced: call `.item()` when logging)."""

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def check_choice(name: str, value: str, choices: Collection[str]) -> None:
    """Raise ValueError naming `name` when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_range(name: str, value: float, *, low: float | None = None, high: float | None = None) -> None:
    """Raise ValueError naming `name` unless `low <= value <= high` (a bound of None is open)."""
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def check_shapes(expected: torch.Size | tuple[int, ...], **tensors: torch.Tensor) -> None:
    """Raise ValueError naming the first keyword tensor whose shape is not `expected`."""
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")


def as_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool view of a 0/1 mask of any dtype."""
    return mask if mask.dtype == torch.bool else mask != 0


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64: losses never run in low precision."""
    return torch.promote_types(tensor.dtype, torch.float32)


def clean(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` [B, T] cast to `dtype` with 0 at untrained positions.

    `torch.where` (not a product) so that NaN/inf padding can neither reach the loss nor its gradient.
    """
    return torch.where(mask, values.to(dtype), torch.zeros((), dtype=dtype, device=values.device))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T] over `mask` [B, T] (bool); 0 when the mask is empty."""
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp(min=1)


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of `values` [B, T] over `mask` [B, T] (bool); 0 when the mask is empty (no host sync either way)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    if values.numel() == 0:
        return zero
    largest = torch.where(mask, values, torch.full((), -torch.inf, dtype=values.dtype, device=values.device)).amax()
    return torch.where(mask.any(), largest, zero)


def aggregate_loss(
    loss_per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str, max_tokens: int | None = None
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar over the trained tokens (verl's `loss_agg_mode` names).

    With m the mask, L the per-token loss, N_i = sum_t m_it:
      token-mean:              sum_it m L / max(sum_i N_i, 1)                  (DAPO: every token weighs the same)
      seq-mean-token-mean:     mean over sequences with N_i > 0 of sum_t m L / N_i   (GRPO: every sequence the same)
      seq-mean-token-sum-norm: sum_it m L / (B * max_tokens), max_tokens = T if None (Dr.GRPO: a constant divisor,
                               so no length bias)
    An all-zero mask gives 0 (with a zero gradient), never NaN.
    """
    check_choice("loss_agg", loss_agg, LOSS_AGG_MODES)
    zero = torch.zeros((), dtype=loss_per_token.dtype, device=loss_per_token.device)
    masked = torch.where(mask, loss_per_token, zero)
    if loss_agg == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(dim=-1)
        seq_means = masked.sum(dim=-1) / tokens_per_seq.clamp(min=1)
        return seq_means.sum() / (tokens_per_seq > 0).sum().clamp(min=1)
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    divisor = mask.shape[-1] if max_tokens is None else max_tokens
    return masked.sum() / (mask.shape[0] * divisor)
