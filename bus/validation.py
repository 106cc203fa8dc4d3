"""The rules of each message kind (docs/wire-protocol.md) and the fast acceptance path of trajectories.

Every kind has a `check_<kind>(msg, limits, prefix, encoded_size)` that raises `MessageError` naming the first
field that breaks a rule; `bus.codec` runs them on `validate`, `encode(validate=True)` and `decode`. A trajectory,
the hot message, first gets a fast test that its fields are "plain" (the common valid form, see
`_scalars_are_plain`); only what fails it goes rule by rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bus.field_rules import (
    INT64_MAX,
    MAX_NAME_CHARS,
    WIRE_FLOAT32,
    WIRE_INT32,
    WIRE_UINT8,
    Limits,
    all_negative_above_floor,
    check_integer,
    check_logprobs,
    check_mask,
    check_meta,
    check_name,
    check_real,
    check_reward,
    check_rewards,
    check_tokens,
    check_version_ranges,
    ids_in_range,
    kind_of,
    show,
    version_ranges_from_wire,
    wire_array,
)
from bus.schema import (
    DTYPE_SIZES,
    LOGPROB_TOLERANCE,
    MAX_ABS_REWARD,
    Group,
    Join,
    MessageError,
    NodeEvent,
    Preference,
    Sampling,
    Task,
    TensorSpec,
    Trajectory,
    Weights,
)

_INF = math.inf
_frombuffer, _ndarray = np.frombuffer, np.ndarray  # module globals: one look-up less per use on hot paths


# ------------------------------------------------------------------------------------------------- per-kind checks
# check(msg, limits, prefix, encoded_size): prefix is the path of the message inside its parent ("" at the top).


def check_task(task: Task, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    check_name(task.id, prefix + "id")
    if type(task.prompt) is str:
        if not task.prompt:
            raise MessageError(prefix + "prompt", "must not be empty")
    else:
        check_tokens(task.prompt, prefix + "prompt", limits)
    check_integer(task.n, prefix + "n", 1, limits.max_group_size)
    _check_sampling(task.sampling, prefix + "sampling", limits)
    check_meta(task.meta, prefix + "meta", limits, encoded_size)
    check_integer(task.min_version, prefix + "min_version")
    check_real(task.created_at, prefix + "created_at", 0.0)


def _check_sampling(sampling: Any, field: str, limits: Limits) -> None:
    if type(sampling) is not Sampling:
        raise MessageError(field, f"must be a Sampling (got {kind_of(sampling)})")
    check_real(sampling.temperature, field + ".temperature", 0.0)
    if not 0.0 < check_real(sampling.top_p, field + ".top_p") <= 1.0:
        raise MessageError(field + ".top_p", f"must be in (0, 1] (got {sampling.top_p})")
    if check_integer(sampling.top_k, field + ".top_k", -1) == 0:
        raise MessageError(field + ".top_k", "must be -1 (no top-k) or >= 1 (got 0)")
    check_integer(sampling.max_new_tokens, field + ".max_new_tokens", 1, limits.max_tokens)
    if type(sampling.stop) is not list:
        raise MessageError(field + ".stop", f"must be an array of strings (got {kind_of(sampling.stop)})")
    for i, text in enumerate(sampling.stop):
        if type(text) is not str or not text:
            raise MessageError(f"{field}.stop[{i}]", f"must be a non-empty string (got {show(text)})")
    if type(sampling.stop_token_ids) is not list:
        raise MessageError(field + ".stop_token_ids", f"must be an array (got {kind_of(sampling.stop_token_ids)})")
    highest_id = np.iinfo(WIRE_INT32).max if limits.vocab_size is None else limits.vocab_size - 1
    for i, token in enumerate(sampling.stop_token_ids):
        check_integer(token, f"{field}.stop_token_ids[{i}]", 0, highest_id)
    if sampling.seed is not None:
        check_integer(sampling.seed, field + ".seed")


def check_trajectory(
    traj: Trajectory, limits: Limits, prefix: str, encoded_size: int | None, core_checked: bool = False
) -> None:
    """core_checked: the required fields are known valid (`plain_trajectory_from_map` built it)."""
    if not (core_checked or _trajectory_core_is_plain(traj, limits)):
        _check_trajectory_rules(traj, limits, prefix, encoded_size)  # one rule after the other, naming the broken one
        return
    # The optional fields, in the order of _check_trajectory_rules (so the first broken rule is the one it names).
    length = len(traj.response_ids)
    if traj.loss_mask is not None:
        check_mask(traj.loss_mask, prefix + "loss_mask", length, prefix + "response_ids")
    if traj.rewards or type(traj.rewards) is not dict:
        check_rewards(traj.rewards, prefix + "rewards")
    if traj.version_ranges is not None:
        check_version_ranges(traj.version_ranges, prefix + "version_ranges", length)
    if traj.meta or type(traj.meta) is not dict:
        check_meta(traj.meta, prefix + "meta", limits, encoded_size)


# The fast path. A trajectory's required fields are "plain" when they certainly pass their rules in their most common
# form: str names, float reward and created_at, int policy_version, int32/float32 1-D arrays whose ids are in range
# and whose logprobs are all < 0. That is one boolean expression and three numpy reductions instead of a dozen
# checks; whatever is not plain (an int reward, a 0.0 logprob, ids given as a list, ...) may still be valid and takes
# the rule-by-rule path, which also names what is wrong.


def _scalars_are_plain(
    id_: Any, group_id: Any, producer: Any, finish_reason: Any, reward: Any, created_at: Any, version: Any
) -> bool:
    """Whether a trajectory's names and numbers certainly pass check_name, check_real and check_integer."""
    return (
        type(id_) is str and 0 < len(id_) <= MAX_NAME_CHARS
        and type(group_id) is str and 0 < len(group_id) <= MAX_NAME_CHARS
        and type(producer) is str and 0 < len(producer) <= MAX_NAME_CHARS
        and type(finish_reason) is str and 0 < len(finish_reason) <= MAX_NAME_CHARS
        and type(reward) is float and -MAX_ABS_REWARD <= reward <= MAX_ABS_REWARD
        and type(created_at) is float and 0.0 <= created_at < _INF
        and type(version) is int and 0 <= version <= INT64_MAX
    )  # fmt: skip


def _trajectory_core_is_plain(traj: Trajectory, limits: Limits) -> bool:
    """Whether every field of `traj` but loss_mask, rewards, version_ranges and meta is plain (see above)."""
    prompt, response, logprobs = traj.prompt_ids, traj.response_ids, traj.behavior_logprobs
    max_tokens = limits.max_tokens
    return (
        _scalars_are_plain(
            traj.id, traj.group_id, traj.producer, traj.finish_reason, traj.reward, traj.created_at,
            traj.policy_version,
        )
        and type(prompt) is _ndarray and prompt.dtype is WIRE_INT32 and prompt.ndim == 1
        and type(response) is _ndarray and response.dtype is WIRE_INT32 and response.ndim == 1
        and type(logprobs) is _ndarray and logprobs.dtype is WIRE_FLOAT32 and logprobs.ndim == 1
        and 0 < len(prompt) <= max_tokens and 0 < len(response) <= max_tokens and len(logprobs) == len(response)
        and ids_in_range(prompt, limits.vocab_size) and ids_in_range(response, limits.vocab_size)
        and all_negative_above_floor(logprobs)
    )  # fmt: skip


def plain_trajectory_from_map(wire: dict[str, Any], limits: Limits, prefix: str) -> Trajectory | None:
    """The trajectory of a received map whose required fields are plain (see above), built zero-copy as
    `bus.codec` builds any other; None when they are not. The ids are checked on the received bins, the
    optional fields are left to `check_trajectory(..., core_checked=True)`.
    """
    try:
        prompt, response, logprobs = wire["prompt_ids"], wire["response_ids"], wire["behavior_logprobs"]
        id_, group_id, producer, finish_reason = wire["id"], wire["group_id"], wire["producer"], wire["finish_reason"]
        reward, created_at, version = wire["reward"], wire["created_at"], wire["policy_version"]
    except KeyError:
        return None  # bus.codec's rule-by-rule path names the missing field
    max_bytes = 4 * limits.max_tokens
    if not (
        _scalars_are_plain(id_, group_id, producer, finish_reason, reward, created_at, version)
        and type(prompt) is bytes and type(response) is bytes and type(logprobs) is bytes
        and 0 < len(prompt) <= max_bytes and 0 < len(response) <= max_bytes and len(logprobs) == len(response)
        and not (len(prompt) | len(response)) & 3
    ):  # fmt: skip
        return None
    prompt_ids, response_ids = _frombuffer(prompt, WIRE_INT32), _frombuffer(response, WIRE_INT32)
    behavior_logprobs = _frombuffer(logprobs, WIRE_FLOAT32)
    if not (
        ids_in_range(prompt_ids, limits.vocab_size, prompt)
        and ids_in_range(response_ids, limits.vocab_size, response)
        and all_negative_above_floor(behavior_logprobs)
    ):
        return None
    mask, rewards, meta = wire.get("loss_mask"), wire.get("rewards"), wire.get("meta")
    ranges = wire.get("version_ranges")
    return Trajectory(
        id_,
        group_id,
        producer,
        prompt_ids,
        response_ids,
        behavior_logprobs,
        None if mask is None else wire_array(mask, WIRE_UINT8, prefix + "loss_mask"),
        reward,
        {} if rewards is None else rewards,
        version,
        None if ranges is None else version_ranges_from_wire(ranges),
        finish_reason,
        created_at,
        {} if meta is None else meta,
    )


def _check_trajectory_rules(traj: Trajectory, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    check_name(traj.id, prefix + "id")
    check_name(traj.group_id, prefix + "group_id")
    check_name(traj.producer, prefix + "producer")
    check_tokens(traj.prompt_ids, prefix + "prompt_ids", limits)
    length = len(check_tokens(traj.response_ids, prefix + "response_ids", limits))
    check_logprobs(traj.behavior_logprobs, prefix + "behavior_logprobs", length, prefix + "response_ids")
    if traj.loss_mask is not None:
        check_mask(traj.loss_mask, prefix + "loss_mask", length, prefix + "response_ids")
    check_reward(traj.reward, prefix + "reward")
    check_rewards(traj.rewards, prefix + "rewards")
    check_integer(traj.policy_version, prefix + "policy_version")
    if traj.version_ranges is not None:
        check_version_ranges(traj.version_ranges, prefix + "version_ranges", length)
    check_name(traj.finish_reason, prefix + "finish_reason")
    check_real(traj.created_at, prefix + "created_at", 0.0)
    check_meta(traj.meta, prefix + "meta", limits, encoded_size)


def check_group(
    group: Group, limits: Limits, prefix: str, encoded_size: int | None, cores_checked: Sequence[bool] = ()
) -> None:
    """cores_checked[i]: member i's required fields are known valid (see `check_trajectory`)."""
    check_name(group.id, prefix + "id")
    check_name(group.producer, prefix + "producer")
    members = group.trajectories
    if type(members) is not list or not members:
        raise MessageError(prefix + "trajectories", "must be a non-empty array of trajectories")
    if len(members) > limits.max_group_size:
        raise MessageError(prefix + "trajectories", f"{len(members)} members > max_group_size {limits.max_group_size}")
    seen_ids: set[str] = set()
    for i, traj in enumerate(members):
        where = f"{prefix}trajectories[{i}]"
        if type(traj) is not Trajectory:
            raise MessageError(where, f"must be a Trajectory (got {kind_of(traj)})")
        check_trajectory(traj, limits, where + ".", encoded_size, i < len(cores_checked) and cores_checked[i])
        if traj.group_id != group.id:
            raise MessageError(where + ".group_id", f"{show(traj.group_id)} != group id {show(group.id)}")
        if traj.id in seen_ids:
            raise MessageError(where + ".id", f"duplicate trajectory id {show(traj.id)} in the group")
        seen_ids.add(traj.id)
    if group.task_id is not None:
        check_name(group.task_id, prefix + "task_id")
    check_real(group.created_at, prefix + "created_at", 0.0)
    check_meta(group.meta, prefix + "meta", limits, encoded_size)


def check_preference(pref: Preference, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    check_name(pref.id, prefix + "id")
    check_name(pref.producer, prefix + "producer")
    check_tokens(pref.prompt_ids, prefix + "prompt_ids", limits)
    check_tokens(pref.chosen_ids, prefix + "chosen_ids", limits)
    check_tokens(pref.rejected_ids, prefix + "rejected_ids", limits)
    if (pref.ref_chosen_logp is None) != (pref.ref_rejected_logp is None):
        missing = "ref_chosen_logp" if pref.ref_chosen_logp is None else "ref_rejected_logp"
        raise MessageError(prefix + missing, "must be given when the other reference log-probability is")
    for name in ("ref_chosen_logp", "ref_rejected_logp"):
        if getattr(pref, name) is not None:
            check_real(getattr(pref, name), prefix + name, high=LOGPROB_TOLERANCE)
    check_real(pref.created_at, prefix + "created_at", 0.0)
    check_meta(pref.meta, prefix + "meta", limits, encoded_size)


def check_weights(weights: Weights, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    check_integer(weights.version, prefix + "version")
    check_name(weights.group, prefix + "group")
    if type(weights.checksum) is not str:
        raise MessageError(prefix + "checksum", f"must be a string (got {kind_of(weights.checksum)})")
    check_real(weights.created_at, prefix + "created_at", 0.0)
    tensors = weights.tensors
    if type(tensors) is not list or not tensors:
        raise MessageError(prefix + "tensors", "must be a non-empty array of tensor specs")
    names: set[str] = set()
    for i, spec in enumerate(tensors):
        where = f"{prefix}tensors[{i}]"
        if type(spec) is not TensorSpec:
            raise MessageError(where, f"must be a TensorSpec (got {kind_of(spec)})")
        if check_name(spec.name, where + ".name") in names:
            raise MessageError(where + ".name", f"duplicate tensor name {show(spec.name)}")
        names.add(spec.name)
        if type(spec.dtype) is not str or spec.dtype not in DTYPE_SIZES:
            raise MessageError(where + ".dtype", f"unknown dtype {show(spec.dtype)}; one of {sorted(DTYPE_SIZES)}")
        if type(spec.shape) is not list:
            raise MessageError(where + ".shape", f"must be an array of dimensions (got {kind_of(spec.shape)})")
        for j, dim in enumerate(spec.shape):
            check_integer(dim, f"{where}.shape[{j}]")
    _check_buckets(weights, prefix)


def _check_buckets(weights: Weights, prefix: str) -> None:
    """Every tensor in exactly one bucket, one dtype per bucket, bucket_bytes[b] == the bucket's size."""
    buckets, sizes, tensors = weights.buckets, weights.bucket_bytes, weights.tensors
    if type(buckets) is not list or not buckets:
        raise MessageError(prefix + "buckets", "must be a non-empty array of arrays of tensor indices")
    if type(sizes) is not list or len(sizes) != len(buckets):
        raise MessageError(prefix + "bucket_bytes", f"must be an array of {len(buckets)} sizes (one per bucket)")
    placed = [False] * len(tensors)
    for b, bucket in enumerate(buckets):
        where = f"{prefix}buckets[{b}]"
        if type(bucket) is not list or not bucket:
            raise MessageError(where, "must be a non-empty array of tensor indices")
        dtypes = set()
        total = 0
        for index in bucket:
            index = check_integer(index, where, 0, len(tensors) - 1)
            if placed[index]:
                raise MessageError(where, f"tensor {index} is already in a bucket")
            placed[index] = True
            dtypes.add(tensors[index].dtype)
            total += tensors[index].nbytes
        if len(dtypes) > 1:
            raise MessageError(where, f"mixes dtypes {sorted(dtypes)} (one dtype per bucket)")
        if check_integer(sizes[b], f"{prefix}bucket_bytes[{b}]") != total:
            raise MessageError(f"{prefix}bucket_bytes[{b}]", f"{sizes[b]} != {total} bytes of the bucket's tensors")
    if not all(placed):
        raise MessageError(prefix + "buckets", f"tensor {placed.index(False)} is in no bucket")


def check_node_event(event: NodeEvent, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    check_name(event.node_id, prefix + "node_id")
    check_name(event.role, prefix + "role")
    check_integer(event.version, prefix + "version")
    check_real(event.created_at, prefix + "created_at", 0.0)
    check_meta(event.meta, prefix + "meta", limits, encoded_size)
    if type(event) is Join and event.address is not None:
        check_name(event.address, prefix + "address")
