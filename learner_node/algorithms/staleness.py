"""How stale each sample is (in policy versions) and the filter that drops what is too stale.

Shapes: B samples, T response tokens, G samples per group. Pacing the rollouts (admission) is the first defence
against staleness; this filter is the last, and it reports what it dropped so that nothing disappears silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learner_node.algorithms.common import as_mask, check_shapes


def version_lag(
    policy_versions: torch.Tensor | Sequence[int], current_version: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Policy versions behind the learner, per sample: [B] or [B, T] -> [B] int64.

    policy_versions: [B], the version each sample was generated with, or [B, T], the version of each token (weights
    updated while a sample was in flight); then the lag is the oldest trained token's (mask [B, T], default all),
    lag_i = current_version - min_{t: mask_it} v_it (0 for a sample without trained tokens). A sample from a newer
    version than `current_version` (a learner restarted from an older checkpoint) has a negative lag.
    """
    versions = torch.as_tensor(policy_versions).long()
    if versions.dim() == 2:
        trained = torch.ones_like(versions, dtype=torch.bool) if mask is None else as_mask(mask)
        check_shapes(versions.shape, mask=trained)
        oldest = torch.where(trained, versions, torch.full_like(versions, current_version)).amin(dim=-1)
        return current_version - oldest
    if versions.dim() != 1:
        raise ValueError(f"policy_versions must have shape [B] or [B, T], got {tuple(versions.shape)}")
    return current_version - versions


@dataclass(frozen=True)
class StalenessFilter:
    """Outcome of `filter_stale` for B samples.

    keep: [B] bool, the samples to train on. lag: [B] int64, each sample's version lag.
    dropped: [D] int64, indices of the dropped samples (D = B - keep.sum()), for the dead stream and the counters.
    """

    keep: torch.Tensor
    lag: torch.Tensor
    dropped: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """kept / dropped counts and the lag's mean and max over the kept samples (0 when none is kept)."""
        kept_lag = self.lag[self.keep].double()
        return {
            "kept": float(self.keep.sum()),
            "dropped": float(self.dropped.numel()),
            "lag_mean": float(kept_lag.mean()) if kept_lag.numel() else 0.0,
            "lag_max": float(kept_lag.max()) if kept_lag.numel() else 0.0,
        }


def filter_stale(
    policy_versions: torch.Tensor | Sequence[int],
    current_version: int,
    max_staleness: int,
    *,
    mask: torch.Tensor | None = None,
    group_size: int | None = None,
) -> StalenessFilter:
    """Keep the samples at most `max_staleness` versions behind: policy_versions [B] or [B, T] -> StalenessFilter.

    keep_i = version_lag_i <= max_staleness (see `version_lag` for [B, T] versions and `mask`). With `group_size`
    G (B = num_groups * G, groups adjacent), a group is kept or dropped whole: one stale member drops its group,
    because a group baseline computed from a partial group would be biased.
    """
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    lag = version_lag(policy_versions, current_version, mask)
    keep = lag <= max_staleness
    if group_size is not None:
        if group_size < 1 or lag.numel() % group_size != 0:
            raise ValueError(f"group_size must be >= 1 and divide the batch size {lag.numel()}, got {group_size}")
        keep = keep.view(-1, group_size).all(dim=1).repeat_interleave(group_size)
    return StalenessFilter(keep=keep, lag=lag, dropped=torch.nonzero(~keep).flatten())
