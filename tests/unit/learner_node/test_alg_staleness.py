"""version_lag and filter_stale: per-sample lag, per-token versions, whole-group dropping, the report."""

from __future__ import annotations

import pytest
import torch

from learner_node.algorithms import filter_stale, version_lag


def test_version_lag_per_sample_and_per_token() -> None:
    assert version_lag(torch.tensor([10, 7, 12]), 10).tolist() == [0, 3, -2]
    # per-token versions (weights updated mid-sample): the oldest trained token sets the lag
    per_token = torch.tensor([[5, 5, 6, 7], [8, 8, 8, 8], [3, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    assert version_lag(per_token, 9).tolist() == [4, 1, 6]
    assert version_lag(per_token, 9, mask).tolist() == [4, 1, 0]
    assert version_lag(per_token, 9, torch.zeros_like(mask)).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="policy_versions"):
        version_lag(torch.zeros(2, 2, 2), 1)
    with pytest.raises(ValueError, match="mask"):
        version_lag(per_token, 9, mask[:, :2])


def test_filter_stale_keeps_within_max_staleness_and_reports_the_rest() -> None:
    result = filter_stale(torch.tensor([10, 8, 7, 10, 6, 9]), current_version=10, max_staleness=2)
    assert result.keep.tolist() == [True, True, False, True, False, True]
    assert result.dropped.tolist() == [2, 4]
    assert result.lag.tolist() == [0, 2, 3, 0, 4, 1]
    assert result.metrics() == {"kept": 4.0, "dropped": 2.0, "lag_mean": 0.75, "lag_max": 2.0}


def test_filter_stale_drops_whole_groups() -> None:
    versions = torch.tensor([10, 10, 7, 10, 9, 9])
    result = filter_stale(versions, current_version=10, max_staleness=1, group_size=3)
    assert result.keep.tolist() == [False, False, False, True, True, True]
    assert result.dropped.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="group_size"):
        filter_stale(versions, 10, 1, group_size=4)


def test_filter_stale_edge_cases() -> None:
    nothing_kept = filter_stale(torch.tensor([1, 2]), current_version=10, max_staleness=0)
    assert nothing_kept.metrics() == {"kept": 0.0, "dropped": 2.0, "lag_mean": 0.0, "lag_max": 0.0}
    empty = filter_stale(torch.zeros(0, dtype=torch.long), current_version=3, max_staleness=1)
    assert empty.keep.numel() == 0 and empty.dropped.numel() == 0
    assert filter_stale([3, 4], current_version=4, max_staleness=0).keep.tolist() == [False, True]
    with pytest.raises(ValueError, match="max_staleness"):
        filter_stale(torch.tensor([1]), 1, -1)
