"""Each bus message kind to and from its msgpack map (`CODECS`, `CODECS_BY_KIND`); `bus.codec` packs the maps.

A from_map(wire, prefix) converts arrays (`field_rules.wire_array`: bin zero-copy, or a list) and nested maps and
leaves scalar checks to the kind's check (`bus.validation`). A missing required key raises KeyError, which the
nearest caller that knows the path turns into "required field missing" (`missing_field`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import numpy as np

from bus.field_rules import (
    WIRE_FLOAT32,
    WIRE_INT32,
    WIRE_UINT8,
    Limits,
    kind_of,
    show,
    version_ranges_from_wire,
    wire_array,
)
from bus.schema import (
    KINDS,
    SCHEMA_VERSION,
    Group,
    Heartbeat,
    Join,
    Leave,
    MessageError,
    NodeEvent,
    Preference,
    Sampling,
    Task,
    TensorSpec,
    Trajectory,
    Weights,
)
from bus.validation import (
    check_group,
    check_node_event,
    check_preference,
    check_task,
    check_trajectory,
    check_weights,
    plain_trajectory_from_map,
)

_SAMPLING_FIELDS = tuple(f.name for f in fields(Sampling))


def missing_field(exc: KeyError, prefix: str) -> MessageError:
    """The error of a required key that a from_map found missing (its KeyError), at the path `prefix`."""
    return MessageError(prefix + str(exc.args[0]), "required field missing")


def _submap(value: Any, field: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise MessageError(field, f"must be a map (got {kind_of(value)})")
    return value


def _optional(wire: dict[str, Any], key: str, default: Any) -> Any:
    """An optional field: absent and nil both mean `default`."""
    value = wire.get(key)
    return default if value is None else value


def _bin(value: Any, dtype: np.dtype) -> bytes:
    """The wire bytes of an array field (little-endian `dtype`)."""
    if type(value) is np.ndarray and value.dtype is dtype:
        return value.tobytes()  # cheaper than handing msgpack a memoryview, which saves a 4 KB copy but costs more
    return np.asarray(value, dtype).tobytes()


def _task_to_map(task: Task) -> dict[str, Any]:
    prompt = task.prompt if type(task.prompt) is str else _bin(task.prompt, WIRE_INT32)
    sampling = {name: getattr(task.sampling, name) for name in _SAMPLING_FIELDS}
    return {
        "kind": "task",
        "v": SCHEMA_VERSION,
        "id": task.id,
        "prompt": prompt,
        "n": task.n,
        "sampling": sampling,
        "meta": task.meta,
        "min_version": task.min_version,
        "created_at": task.created_at,
    }


def _task_from_map(wire: dict[str, Any], prefix: str) -> Task:
    prompt = wire["prompt"]
    if type(prompt) is not str:
        prompt = wire_array(prompt, WIRE_INT32, prefix + "prompt")
    given = _submap(_optional(wire, "sampling", {}), prefix + "sampling")
    sampling = Sampling(**{name: given[name] for name in _SAMPLING_FIELDS if given.get(name) is not None})
    return Task(
        wire["id"],
        prompt,
        _optional(wire, "n", 1),
        sampling,
        _optional(wire, "meta", {}),
        _optional(wire, "min_version", 0),
        wire["created_at"],
    )


def _trajectory_to_map(traj: Trajectory) -> dict[str, Any]:
    wire = {
        "kind": "trajectory",
        "v": SCHEMA_VERSION,
        "id": traj.id,
        "group_id": traj.group_id,
        "producer": traj.producer,
        "prompt_ids": _bin(traj.prompt_ids, WIRE_INT32),
        "response_ids": _bin(traj.response_ids, WIRE_INT32),
        "behavior_logprobs": _bin(traj.behavior_logprobs, WIRE_FLOAT32),
        "reward": traj.reward,
        "policy_version": traj.policy_version,
        "finish_reason": traj.finish_reason,
        "created_at": traj.created_at,
    }
    # Optional fields go on the wire only when set (absent means the default): the most frequent message is shorter
    # to pack and to unpack. An invalid value (validate=False) is written, so that decode names it.
    if traj.loss_mask is not None:
        wire["loss_mask"] = _bin(traj.loss_mask, WIRE_UINT8)
    if traj.rewards or type(traj.rewards) is not dict:
        wire["rewards"] = traj.rewards
    if traj.version_ranges is not None:
        wire["version_ranges"] = traj.version_ranges
    if traj.meta or type(traj.meta) is not dict:
        wire["meta"] = traj.meta
    return wire


def _trajectory_from_map(wire: dict[str, Any], prefix: str) -> Trajectory:
    mask = wire.get("loss_mask")
    return Trajectory(
        wire["id"],
        wire["group_id"],
        wire["producer"],
        wire_array(wire["prompt_ids"], WIRE_INT32, prefix + "prompt_ids"),
        wire_array(wire["response_ids"], WIRE_INT32, prefix + "response_ids"),
        wire_array(wire["behavior_logprobs"], WIRE_FLOAT32, prefix + "behavior_logprobs"),
        None if mask is None else wire_array(mask, WIRE_UINT8, prefix + "loss_mask"),
        wire["reward"],
        _optional(wire, "rewards", {}),
        wire["policy_version"],
        version_ranges_from_wire(wire.get("version_ranges")),
        wire["finish_reason"],
        wire["created_at"],
        _optional(wire, "meta", {}),
    )


def _decode_trajectory(wire: dict[str, Any], limits: Limits, encoded_size: int) -> Trajectory:
    traj = plain_trajectory_from_map(wire, limits, "")
    if traj is None:
        traj = _trajectory_from_map(wire, "")
        check_trajectory(traj, limits, "", encoded_size)
    else:
        check_trajectory(traj, limits, "", encoded_size, core_checked=True)
    return traj


def _group_to_map(group: Group) -> dict[str, Any]:
    return {
        "kind": "group",
        "v": SCHEMA_VERSION,
        "id": group.id,
        "producer": group.producer,
        "trajectories": [_trajectory_to_map(traj) for traj in group.trajectories],
        "task_id": group.task_id,
        "created_at": group.created_at,
        "meta": group.meta,
    }


def _decode_group(wire: dict[str, Any], limits: Limits, encoded_size: int) -> Group:
    members = wire["trajectories"]
    if type(members) is not list:
        raise MessageError("trajectories", f"must be an array of trajectories (got {kind_of(members)})")
    built = [_member_from_map(member, f"trajectories[{i}].", limits) for i, member in enumerate(members)]
    trajectories = [traj for traj, _ in built]
    group = Group(
        wire["id"], wire["producer"], trajectories, wire.get("task_id"), wire["created_at"], _optional(wire, "meta", {})
    )
    check_group(group, limits, "", encoded_size, [core_checked for _, core_checked in built])
    return group


def _member_from_map(member: Any, prefix: str, limits: Limits) -> tuple[Trajectory, bool]:
    """A group member (a trajectory map whose kind and v, optional here, must be right when present), and whether
    its required fields were found valid on the way (see `plain_trajectory_from_map`)."""
    member = _submap(member, prefix[:-1])
    kind = _optional(member, "kind", "trajectory")
    if kind != "trajectory":
        raise MessageError(prefix + "kind", f"must be 'trajectory' (got {show(kind)})")
    version = _optional(member, "v", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:
        raise MessageError(prefix + "v", f"unsupported schema version {show(version)}")
    try:
        traj = plain_trajectory_from_map(member, limits, prefix)
        return (traj, True) if traj is not None else (_trajectory_from_map(member, prefix), False)
    except KeyError as exc:
        raise missing_field(exc, prefix) from None


def _preference_to_map(pref: Preference) -> dict[str, Any]:
    return {
        "kind": "preference",
        "v": SCHEMA_VERSION,
        "id": pref.id,
        "producer": pref.producer,
        "prompt_ids": _bin(pref.prompt_ids, WIRE_INT32),
        "chosen_ids": _bin(pref.chosen_ids, WIRE_INT32),
        "rejected_ids": _bin(pref.rejected_ids, WIRE_INT32),
        "ref_chosen_logp": pref.ref_chosen_logp,
        "ref_rejected_logp": pref.ref_rejected_logp,
        "created_at": pref.created_at,
        "meta": pref.meta,
    }


def _preference_from_map(wire: dict[str, Any], prefix: str) -> Preference:
    names = ("prompt_ids", "chosen_ids", "rejected_ids")
    arrays = [wire_array(wire[name], WIRE_INT32, prefix + name) for name in names]
    return Preference(
        wire["id"],
        wire["producer"],
        *arrays,
        wire.get("ref_chosen_logp"),
        wire.get("ref_rejected_logp"),
        wire["created_at"],
        _optional(wire, "meta", {}),
    )


def _weights_to_map(weights: Weights) -> dict[str, Any]:
    tensors = [{"name": spec.name, "dtype": spec.dtype, "shape": spec.shape} for spec in weights.tensors]
    return {
        "kind": "weights",
        "v": SCHEMA_VERSION,
        "version": weights.version,
        "tensors": tensors,
        "buckets": weights.buckets,
        "bucket_bytes": weights.bucket_bytes,
        "checksum": weights.checksum,
        "group": weights.group,
        "created_at": weights.created_at,
    }


def _weights_from_map(wire: dict[str, Any], prefix: str) -> Weights:
    specs = wire["tensors"]
    if type(specs) is not list:
        raise MessageError(prefix + "tensors", f"must be an array of tensor specs (got {kind_of(specs)})")
    tensors = []
    for i, spec in enumerate(specs):
        where = f"{prefix}tensors[{i}]"
        spec = _submap(spec, where)
        try:
            tensors.append(TensorSpec(spec["name"], spec["dtype"], spec["shape"]))
        except KeyError as exc:
            raise missing_field(exc, where + ".") from None
    return Weights(
        wire["version"],
        tensors,
        wire["buckets"],
        wire["bucket_bytes"],
        wire["checksum"],
        wire["group"],
        wire["created_at"],
    )


def _node_event_to_map(event: NodeEvent) -> dict[str, Any]:
    wire = {
        "kind": KINDS[type(event)],
        "v": SCHEMA_VERSION,
        "node_id": event.node_id,
        "role": event.role,
        "version": event.version,
        "created_at": event.created_at,
        "meta": event.meta,
    }
    if type(event) is Join:
        wire["address"] = event.address
    return wire


def _node_event_from_map(cls: type[NodeEvent], wire: dict[str, Any], prefix: str) -> NodeEvent:
    extra = (wire.get("address"),) if cls is Join else ()
    version = _optional(wire, "version", 0)  # optional, as docs/wire-protocol.md says: an agent serves no policy
    return cls(wire["node_id"], wire["role"], version, wire["created_at"], _optional(wire, "meta", {}), *extra)


def _decode_checked(
    from_map: Callable[[dict[str, Any], str], Any],
    check: Callable[[Any, Limits, str, int | None], None],
    wire: dict[str, Any],
    limits: Limits,
    encoded_size: int,
) -> Any:
    """A top-level message of `wire`: built, then checked."""
    msg = from_map(wire, "")
    check(msg, limits, "", encoded_size)
    return msg


@dataclass(frozen=True, slots=True)
class WireCodec:
    """How one message kind goes to its wire map, comes back from it (checked), and is checked."""

    to_map: Callable[[Any], dict[str, Any]]
    decode: Callable[[dict[str, Any], Limits, int], Any]  # (wire, limits, encoded size) -> valid message
    check: Callable[[Any, Limits, str, int | None], None]


def _codec_from_map(
    to_map: Callable[[Any], dict[str, Any]],
    from_map: Callable[[dict[str, Any], str], Any],
    check: Callable[[Any, Limits, str, int | None], None],
) -> WireCodec:
    """The codec of a kind whose decoding is from_map, then check."""
    return WireCodec(to_map, partial(_decode_checked, from_map, check), check)


CODECS: dict[type, WireCodec] = {
    Task: _codec_from_map(_task_to_map, _task_from_map, check_task),
    Trajectory: WireCodec(_trajectory_to_map, _decode_trajectory, check_trajectory),
    Group: WireCodec(_group_to_map, _decode_group, check_group),
    Preference: _codec_from_map(_preference_to_map, _preference_from_map, check_preference),
    Weights: _codec_from_map(_weights_to_map, _weights_from_map, check_weights),
    **{
        cls: _codec_from_map(_node_event_to_map, partial(_node_event_from_map, cls), check_node_event)
        for cls in (Join, Leave, Heartbeat)
    },
}
CODECS_BY_KIND: dict[str, WireCodec] = {KINDS[cls]: codec for cls, codec in CODECS.items()}
