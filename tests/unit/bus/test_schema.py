"""The message Structs: defaults, derived properties, ids and the error type."""

from __future__ import annotations

import pickle
import re
import time
import typing

import numpy as np
import pytest

from bus.schema import (
    DTYPE_SIZES,
    KINDS,
    Group,
    Heartbeat,
    Join,
    Leave,
    Message,
    MessageError,
    NodeEvent,
    Sampling,
    Task,
    TensorSpec,
    Trajectory,
    new_id,
)


def make_trajectory(**overrides: typing.Any) -> Trajectory:
    fields = {
        "id": "t1",
        "group_id": "g1",
        "producer": "rollout-0",
        "prompt_ids": np.array([1, 2], np.int32),
        "response_ids": np.array([3, 4, 5], np.int32),
        "behavior_logprobs": np.array([-0.1, -0.2, -0.3], np.float32),
    }
    fields.update(overrides)
    return Trajectory(**fields)


def test_message_error_splits_field_and_rule_and_survives_pickling() -> None:
    error = MessageError("trajectories[3].response_ids", "token id -1 < 0")
    assert str(error) == "trajectories[3].response_ids: token id -1 < 0"
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.field, copy.rule, str(copy)) == (error.field, error.rule, str(error))


def test_new_id_is_unique_url_safe_and_sorted_by_creation_time() -> None:
    ids = []
    for _ in range(200):
        ids.append(new_id())
        time.sleep(0.00001)
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-v]{26}", i) for i in ids)
    assert ids == sorted(ids)


def test_defaults_are_fresh_objects_per_instance() -> None:
    a, b = Task(id="a", prompt="x"), Task(id="b", prompt="y")
    a.meta["k"] = 1
    a.sampling.stop.append("\n")
    assert b.meta == {} and b.sampling.stop == []
    assert Sampling() == Sampling(1.0, 1.0, -1, 64, [], [], None)
    assert abs(a.created_at - time.time()) < 60


def test_policy_version_range_comes_from_version_ranges_or_policy_version() -> None:
    plain = make_trajectory(policy_version=7)
    assert (plain.min_policy_version, plain.max_policy_version) == (7, 7)
    mixed = make_trajectory(policy_version=5, version_ranges=[(0, 1, 5), (1, 2, 7), (2, 3, 6)])
    assert (mixed.min_policy_version, mixed.max_policy_version) == (5, 7)


def test_tensor_spec_sizes() -> None:
    assert TensorSpec("w", "bfloat16", [3, 4]).nbytes == 24
    assert TensorSpec("scale", "float32", []).numel == 1
    assert TensorSpec("empty", "int64", [0, 5]).nbytes == 0
    assert DTYPE_SIZES["float8_e4m3fn"] == 1


def test_every_message_class_has_a_kind_and_node_events_share_fields() -> None:
    assert set(KINDS) == set(typing.get_args(Message))
    assert len(set(KINDS.values())) == len(KINDS)
    join = Join("n1", "rollout", 3, address="10.0.0.1:30000")
    assert isinstance(join, NodeEvent) and join.address == "10.0.0.1:30000"
    assert not hasattr(Leave("n1", "rollout"), "address")
    assert Heartbeat("n1", "learner").version == 0


def test_slots_reject_unknown_attributes() -> None:
    group = Group(id="g1", producer="p", trajectories=[make_trajectory()])
    with pytest.raises(AttributeError):
        group.trajectory_count = 1  # type: ignore[attr-defined]
