"""msgpack codec of the bus messages: `encode`, `decode`, `validate` and `peek_id`.

A message travels as a msgpack map with string keys: `kind`, `v` (schema version) and the dataclass fields of
`bus.schema` under the same names. Arrays travel as bin holding little-endian int32 token ids, float32
log-probabilities or uint8 masks, and decode zero-copy (read-only numpy views of the received bytes); plain
msgpack arrays of numbers are accepted too, so that any language can produce. docs/wire-protocol.md is the contract.

Decoding any bytes yields a valid message or a `MessageError` naming the field and the rule, never another
exception: msgpack runs with size limits derived from `Limits`, string map keys only and no ext types.
Validation is shared by both directions (`validate`, `encode(validate=True)`, `decode`) and kept cheap: per array
one numpy argmin/argmax call, no per-token Python loops. A trajectory, the hot message, first gets a fast test that
its fields are "plain" (the common valid form, see `_scalars_are_plain`); only what fails it goes rule by rule.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import msgpack
import numpy as np

from bus.schema import (
    DTYPE_SIZES,
    KINDS,
    LOGPROB_TOLERANCE,
    SCHEMA_VERSION,
    Group,
    Heartbeat,
    Join,
    Leave,
    Message,
    MessageError,
    NodeEvent,
    Preference,
    Sampling,
    Task,
    TensorSpec,
    Trajectory,
    Weights,
)

# Little-endian wire dtypes; on a little-endian host these are numpy's native singletons, so `is` compares them.
_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")
_U8 = np.dtype("u1")
_U32 = np.dtype("<u4")
# float32 bits read as int32: 0xff7fffff (-3.4028235e38), the greatest pattern of a negative finite float.
_NEGATIVE_FINITE_BITS = -0x00800001
_INF = math.inf
_frombuffer, _ndarray = np.frombuffer, np.ndarray  # module globals: one look-up less per use on hot paths
# Which numpy dtype kinds may be converted to each wire dtype without changing meaning (range checked separately).
_CONVERTIBLE_KINDS = {_I32: "iu", _F32: "fiu", _U8: "biu"}
_SAMPLING_FIELDS = tuple(f.name for f in fields(Sampling))

MAX_NAME_CHARS = 256  # ids, producer, node_id, role, ...: they become Redis keys and log fields
_INT64_MAX = 2**63 - 1


def _reject_ext(code: int, data: bytes) -> Any:
    raise MessageError("data", f"msgpack ext type {code} is not allowed")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a message must respect; decode also derives msgpack's own size limits from them.

    max_tokens bounds each token/logprob array; vocab_size, when set, bounds every token id (ids must be < it).
    unpack_options and small_message_bytes are derived: msgpack's options, and the input size up to which msgpack's
    own default limits are the tighter ones.
    """

    max_message_bytes: int = 16 * 1024 * 1024
    max_tokens: int = 131072
    max_group_size: int = 1024
    max_meta_bytes: int = 65536
    vocab_size: int | None = None
    # msgpack.unpackb options derived from the above, computed once: decode is a hot path.
    unpack_options: dict[str, Any] = field(init=False, repr=False, compare=False)
    small_message_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_tokens", "max_group_size", "max_meta_bytes", "vocab_size"):
            value = getattr(self, name)
            if value is None and name == "vocab_size":
                continue
            if type(value) is not int or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1 (got {value!r})")
        largest = self.max_message_bytes
        options = {
            "raw": False,
            "strict_map_key": True,  # map keys are strings (bytes pass msgpack's check; fields then reject them)
            "ext_hook": _reject_ext,
            "max_ext_len": 0,  # timestamps (ext -1) bypass ext_hook; this refuses them too
            "max_str_len": largest,
            "max_bin_len": min(largest, max(4 * self.max_tokens, self.max_meta_bytes)),
            "max_array_len": min(largest, max(self.max_tokens, self.max_group_size)),
            "max_map_len": min(largest, self.max_meta_bytes),  # every map entry takes at least 2 bytes
        }
        object.__setattr__(self, "unpack_options", options)  # frozen: the one write, at construction
        # msgpack.unpackb limits every length to the input's (maps to half of it) when given no limit: for inputs up
        # to this size those are at least as strict as `options`, which then need not be parsed on every call.
        lengths = (options["max_str_len"], options["max_bin_len"], options["max_array_len"], 2 * options["max_map_len"])
        object.__setattr__(self, "small_message_bytes", min(lengths))


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------------------------------- scalar checks


def _show(value: Any) -> str:
    """A short repr for error messages (a hostile message must not make a huge error text)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind_of(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _name(value: Any, field: str) -> str:
    """A non-empty string of at most MAX_NAME_CHARS characters (ids, producer, role, ...)."""
    if type(value) is not str:
        raise MessageError(field, f"must be a string (got {_kind_of(value)})")
    if not value:
        raise MessageError(field, "must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise MessageError(field, f"{len(value)} characters > {MAX_NAME_CHARS}")
    return value


def _integer(value: Any, field: str, low: int = 0, high: int = _INT64_MAX) -> int:
    """An integer in [low, high]; numpy integers are accepted, bool is not."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise MessageError(field, f"must be an integer (got {_kind_of(value)})")
        value = int(value)
    if value < low:
        raise MessageError(field, f"must be >= {low} (got {value})")
    if value > high:
        raise MessageError(field, f"must be <= {high} (got {value})")
    return value


def _real(value: Any, field: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number in [low, high]; ints and numpy numbers are accepted, bool is not."""
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise MessageError(field, f"must be a number (got {_kind_of(value)})")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
    if not math.isfinite(value):
        raise MessageError(field, f"must be finite (got {value})")
    if value < low:
        raise MessageError(field, f"must be >= {low} (got {value})")
    if value > high:
        raise MessageError(field, f"must be <= {high} (got {value})")
    return value


def _check_meta(meta: Any, field: str, limits: Limits, encoded_size: int | None) -> None:
    """A map of msgpack-able plain data (string keys, no ext types) of at most max_meta_bytes encoded.

    encoded_size: size of the encoding the message was decoded from, if it was; meta cannot be larger, so it
    need not be re-encoded to be measured when that already fits.
    """
    if type(meta) is not dict:
        raise MessageError(field, f"must be a map (got {_kind_of(meta)})")
    if not meta or (encoded_size is not None and encoded_size <= limits.max_meta_bytes):
        return
    try:
        packed = msgpack.packb(meta)
        msgpack.unpackb(packed, raw=False, strict_map_key=True, ext_hook=_reject_ext, max_ext_len=0)  # decodable?
    except Exception as exc:
        rule = f"must be msgpack-able plain data with string keys and no ext types ({_error_text(exc)})"
        raise MessageError(field, rule) from exc
    if len(packed) > limits.max_meta_bytes:
        raise MessageError(field, f"{len(packed)} bytes > max_meta_bytes {limits.max_meta_bytes}")


def _check_rewards(rewards: Any, field: str) -> None:
    """Named reward components: {non-empty string: finite number}."""
    if type(rewards) is not dict:
        raise MessageError(field, f"must be a map (got {_kind_of(rewards)})")
    for name, value in rewards.items():
        if type(name) is not str or not name:
            raise MessageError(field, f"names must be non-empty strings (got {_show(name)})")
        if type(value) is not float or not -_INF < value < _INF:  # the common case builds no field path
            _real(value, f"{field}.{name}")


# ----------------------------------------------------------------------------------------------------- array checks


def _array(value: Any, dtype: np.dtype, field: str) -> np.ndarray:
    """`value` as a 1-D array of `dtype`: itself when it already is one, else converted if no value changes."""
    if type(value) is np.ndarray and value.dtype is dtype and value.ndim == 1:
        return value
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise MessageError(field, f"must be a 1-D array of numbers ({exc})") from exc
    if array.ndim != 1:
        raise MessageError(field, f"must be a 1-D array (got shape {list(array.shape)})")
    if array.size == 0:
        return np.empty(0, dtype)  # `[]` arrives as float64
    if array.dtype.kind not in _CONVERTIBLE_KINDS[dtype]:
        raise MessageError(field, f"must hold {dtype.name} values (got {array.dtype.name})")
    if dtype.kind in "iu" and array.dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise MessageError(field, f"value {low if low < info.min else high} out of {dtype.name} range")
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf, which the logprob check then names
        return array.astype(dtype)


def _wire_array(value: Any, dtype: np.dtype, field: str) -> np.ndarray:
    """An array field as received: bin (zero-copy, read-only view) or a msgpack array of numbers."""
    if type(value) is bytes:
        if len(value) % dtype.itemsize:
            raise MessageError(field, f"bin length {len(value)} is not a multiple of {dtype.itemsize} ({dtype.name})")
        return np.frombuffer(value, dtype)
    if type(value) is list:
        return _array(value, dtype, field)
    raise MessageError(field, f"must be bin or an array of numbers (got {_kind_of(value)})")


def _bin(value: Any, dtype: np.dtype) -> bytes:
    """The wire bytes of an array field (little-endian `dtype`)."""
    if type(value) is np.ndarray and value.dtype is dtype:
        return value.tobytes()  # cheaper than handing msgpack a memoryview, which saves a 4 KB copy but costs more
    return np.asarray(value, dtype).tobytes()


def _ids_in_range(ids: np.ndarray, vocab_size: int | None, wire_bytes: bytes | None = None) -> bool:
    """Whether int32 token ids [N >= 1] are all >= 0 (and < vocab_size when set), with one numpy reduction.

    wire_bytes: the little-endian bytes `ids` is a view of, if it is. The sign test then reads them directly:
    numpy would copy a read-only array to reduce it, which costs more than the test.
    """
    if vocab_size is None:
        if wire_bytes is not None:  # the last byte of each int32 holds the sign bit: all < 0x80 means all >= 0
            return wire_bytes[3::4].isascii()
        return ids.item(ids.argmin()) >= 0
    as_unsigned = ids.view(_U32)  # negative int32 read as uint32 are >= 2**31, beyond any vocabulary
    return as_unsigned.item(as_unsigned.argmax()) < vocab_size


def _all_negative_finite(logprobs: np.ndarray) -> bool:
    """Whether float32 logprobs [N >= 1] are all finite and < 0 (or -0.0), with ONE numpy reduction.

    Read as int32, those float32 bit patterns are exactly the ones <= _NEGATIVE_FINITE_BITS (sign bit set, exponent
    not all ones); NaN, -inf and every value >= +0.0 are greater. False does not mean invalid: 0.0 and positive
    values up to LOGPROB_TOLERANCE are valid and are left to the exact check.
    """
    bits = logprobs.view(_I32)
    return bits.item(bits.argmax()) <= _NEGATIVE_FINITE_BITS


def _tokens(value: Any, field: str, limits: Limits) -> np.ndarray:
    """Non-empty int32 token ids, at most max_tokens, each in [0, vocab_size). Returns them as int32 [N]."""
    ids = _array(value, _I32, field)
    count = len(ids)
    if count == 0:
        raise MessageError(field, "must not be empty")
    if count > limits.max_tokens:
        raise MessageError(field, f"{count} tokens > max_tokens {limits.max_tokens}")
    if _ids_in_range(ids, limits.vocab_size):
        return ids
    lowest = ids.argmin()
    if ids[lowest] < 0:
        raise MessageError(field, f"token id {ids[lowest]} < 0 (at position {lowest})")
    vocab_size = limits.vocab_size
    if vocab_size is not None:
        highest = ids.argmax()
        if ids[highest] >= vocab_size:
            raise MessageError(field, f"token id {ids[highest]} >= vocab_size {vocab_size} (at position {highest})")
    return ids


def _check_logprobs(value: Any, field: str, length: int, length_field: str) -> None:
    """float32 [length] log-probabilities: finite and <= 0 (+ LOGPROB_TOLERANCE)."""
    logprobs = _array(value, _F32, field)
    if len(logprobs) != length:
        raise MessageError(length_field, f"length {length} != {field.rpartition('.')[2]} length {len(logprobs)}")
    if _all_negative_finite(logprobs):
        return
    # argmax/argmin return the first NaN if there is one, so these two cheap calls catch nan, +-inf and > tolerance.
    if logprobs[logprobs.argmax()] <= LOGPROB_TOLERANCE and logprobs[logprobs.argmin()] > -math.inf:
        return
    finite = np.isfinite(logprobs)
    if not finite.all():
        position = int(finite.argmin())
        raise MessageError(field, f"must be finite (got {logprobs[position]} at position {position})")
    position = int(logprobs.argmax())
    raise MessageError(field, f"log-probability {logprobs[position]} > 0 at position {position} (impossible)")


def _check_mask(value: Any, field: str, length: int, length_field: str) -> None:
    """uint8 [length] loss mask of 0/1 values."""
    mask = _array(value, _U8, field)
    if len(mask) != length:
        raise MessageError(length_field, f"length {length} != loss_mask length {len(mask)}")
    highest = mask.argmax()  # length >= 1: the response was checked non-empty first
    if mask[highest] > 1:
        raise MessageError(field, f"values must be 0 or 1 (got {mask[highest]} at position {highest})")


def _check_version_ranges(ranges: Any, field: str, length: int) -> None:
    """(start, end, version) triples, contiguous from 0 and covering [0, length)."""
    if type(ranges) is not list or not ranges:
        raise MessageError(field, "must be a non-empty array of [start, end, version]")
    covered = 0
    for i, triple in enumerate(ranges):
        where = f"{field}[{i}]"
        if type(triple) not in (tuple, list) or len(triple) != 3:
            raise MessageError(where, f"must be [start, end, version] (got {_show(triple)})")
        start = _integer(triple[0], where + ".start")
        end = _integer(triple[1], where + ".end")
        _integer(triple[2], where + ".version")
        if start != covered:
            raise MessageError(where, f"start {start} != previous end {covered} (ranges must be contiguous from 0)")
        if end <= start:
            raise MessageError(where, f"end {end} <= start {start}")
        covered = end
    if covered != length:
        raise MessageError(field, f"ranges end at {covered} != response length {length} (must cover every token)")


# ------------------------------------------------------------------------------------------------- per-kind checks
# check(msg, limits, prefix, encoded_size): prefix is the path of the message inside its parent ("" at the top).


def _check_task(task: Task, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    _name(task.id, prefix + "id")
    if type(task.prompt) is str:
        if not task.prompt:
            raise MessageError(prefix + "prompt", "must not be empty")
    else:
        _tokens(task.prompt, prefix + "prompt", limits)
    _integer(task.n, prefix + "n", 1, limits.max_group_size)
    _check_sampling(task.sampling, prefix + "sampling", limits)
    _check_meta(task.meta, prefix + "meta", limits, encoded_size)
    _integer(task.min_version, prefix + "min_version")
    _real(task.created_at, prefix + "created_at", 0.0)


def _check_sampling(sampling: Any, field: str, limits: Limits) -> None:
    if type(sampling) is not Sampling:
        raise MessageError(field, f"must be a Sampling (got {_kind_of(sampling)})")
    _real(sampling.temperature, field + ".temperature", 0.0)
    if not 0.0 < _real(sampling.top_p, field + ".top_p") <= 1.0:
        raise MessageError(field + ".top_p", f"must be in (0, 1] (got {sampling.top_p})")
    if _integer(sampling.top_k, field + ".top_k", -1) == 0:
        raise MessageError(field + ".top_k", "must be -1 (no top-k) or >= 1 (got 0)")
    _integer(sampling.max_new_tokens, field + ".max_new_tokens", 1, limits.max_tokens)
    if type(sampling.stop) is not list:
        raise MessageError(field + ".stop", f"must be an array of strings (got {_kind_of(sampling.stop)})")
    for i, text in enumerate(sampling.stop):
        if type(text) is not str or not text:
            raise MessageError(f"{field}.stop[{i}]", f"must be a non-empty string (got {_show(text)})")
    if type(sampling.stop_token_ids) is not list:
        raise MessageError(field + ".stop_token_ids", f"must be an array (got {_kind_of(sampling.stop_token_ids)})")
    highest_id = np.iinfo(_I32).max if limits.vocab_size is None else limits.vocab_size - 1
    for i, token in enumerate(sampling.stop_token_ids):
        _integer(token, f"{field}.stop_token_ids[{i}]", 0, highest_id)
    if sampling.seed is not None:
        _integer(sampling.seed, field + ".seed")


def _check_trajectory(
    traj: Trajectory, limits: Limits, prefix: str, encoded_size: int | None, core_checked: bool = False
) -> None:
    """core_checked: the required fields are known valid (`_plain_trajectory_from_map` built it)."""
    if not (core_checked or _trajectory_core_is_plain(traj, limits)):
        _check_trajectory_rules(traj, limits, prefix, encoded_size)  # one rule after the other, naming the broken one
        return
    # The optional fields, in the order of _check_trajectory_rules (so the first broken rule is the one it names).
    length = len(traj.response_ids)
    if traj.loss_mask is not None:
        _check_mask(traj.loss_mask, prefix + "loss_mask", length, prefix + "response_ids")
    if traj.rewards or type(traj.rewards) is not dict:
        _check_rewards(traj.rewards, prefix + "rewards")
    if traj.version_ranges is not None:
        _check_version_ranges(traj.version_ranges, prefix + "version_ranges", length)
    if traj.meta or type(traj.meta) is not dict:
        _check_meta(traj.meta, prefix + "meta", limits, encoded_size)


# The fast path. A trajectory's required fields are "plain" when they certainly pass their rules in their most common
# form: str names, float reward and created_at, int policy_version, int32/float32 1-D arrays whose ids are in range
# and whose logprobs are all < 0. That is one boolean expression and three numpy reductions instead of a dozen
# checks; whatever is not plain (an int reward, a 0.0 logprob, ids given as a list, ...) may still be valid and takes
# the rule-by-rule path, which also names what is wrong.


def _scalars_are_plain(
    id_: Any, group_id: Any, producer: Any, finish_reason: Any, reward: Any, created_at: Any, version: Any
) -> bool:
    """Whether a trajectory's names and numbers certainly pass _name, _real and _integer."""
    return (
        type(id_) is str and 0 < len(id_) <= MAX_NAME_CHARS
        and type(group_id) is str and 0 < len(group_id) <= MAX_NAME_CHARS
        and type(producer) is str and 0 < len(producer) <= MAX_NAME_CHARS
        and type(finish_reason) is str and 0 < len(finish_reason) <= MAX_NAME_CHARS
        and type(reward) is float and -_INF < reward < _INF
        and type(created_at) is float and 0.0 <= created_at < _INF
        and type(version) is int and 0 <= version <= _INT64_MAX
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
        and type(prompt) is _ndarray and prompt.dtype is _I32 and prompt.ndim == 1
        and type(response) is _ndarray and response.dtype is _I32 and response.ndim == 1
        and type(logprobs) is _ndarray and logprobs.dtype is _F32 and logprobs.ndim == 1
        and 0 < len(prompt) <= max_tokens and 0 < len(response) <= max_tokens and len(logprobs) == len(response)
        and _ids_in_range(prompt, limits.vocab_size) and _ids_in_range(response, limits.vocab_size)
        and _all_negative_finite(logprobs)
    )  # fmt: skip


def _plain_trajectory_from_map(wire: dict[str, Any], limits: Limits, prefix: str) -> Trajectory | None:
    """The trajectory of a received map whose required fields are plain (see above), built zero-copy as
    `_trajectory_from_map` builds it; None when they are not. The ids are checked on the received bins, the
    optional fields are left to `_check_trajectory(..., core_checked=True)`.
    """
    try:
        prompt, response, logprobs = wire["prompt_ids"], wire["response_ids"], wire["behavior_logprobs"]
        id_, group_id, producer, finish_reason = wire["id"], wire["group_id"], wire["producer"], wire["finish_reason"]
        reward, created_at, version = wire["reward"], wire["created_at"], wire["policy_version"]
    except KeyError:
        return None  # _trajectory_from_map names the missing field
    max_bytes = 4 * limits.max_tokens
    if not (
        _scalars_are_plain(id_, group_id, producer, finish_reason, reward, created_at, version)
        and type(prompt) is bytes and type(response) is bytes and type(logprobs) is bytes
        and 0 < len(prompt) <= max_bytes and 0 < len(response) <= max_bytes and len(logprobs) == len(response)
        and not (len(prompt) | len(response)) & 3
    ):  # fmt: skip
        return None
    prompt_ids, response_ids = _frombuffer(prompt, _I32), _frombuffer(response, _I32)
    behavior_logprobs = _frombuffer(logprobs, _F32)
    if not (
        _ids_in_range(prompt_ids, limits.vocab_size, prompt)
        and _ids_in_range(response_ids, limits.vocab_size, response)
        and _all_negative_finite(behavior_logprobs)
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
        None if mask is None else _wire_array(mask, _U8, prefix + "loss_mask"),
        reward,
        {} if rewards is None else rewards,
        version,
        None if ranges is None else _version_ranges_from_wire(ranges),
        finish_reason,
        created_at,
        {} if meta is None else meta,
    )


def _check_trajectory_rules(traj: Trajectory, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    _name(traj.id, prefix + "id")
    _name(traj.group_id, prefix + "group_id")
    _name(traj.producer, prefix + "producer")
    _tokens(traj.prompt_ids, prefix + "prompt_ids", limits)
    length = len(_tokens(traj.response_ids, prefix + "response_ids", limits))
    _check_logprobs(traj.behavior_logprobs, prefix + "behavior_logprobs", length, prefix + "response_ids")
    if traj.loss_mask is not None:
        _check_mask(traj.loss_mask, prefix + "loss_mask", length, prefix + "response_ids")
    _real(traj.reward, prefix + "reward")
    _check_rewards(traj.rewards, prefix + "rewards")
    _integer(traj.policy_version, prefix + "policy_version")
    if traj.version_ranges is not None:
        _check_version_ranges(traj.version_ranges, prefix + "version_ranges", length)
    _name(traj.finish_reason, prefix + "finish_reason")
    _real(traj.created_at, prefix + "created_at", 0.0)
    _check_meta(traj.meta, prefix + "meta", limits, encoded_size)


def _check_group(
    group: Group, limits: Limits, prefix: str, encoded_size: int | None, cores_checked: Sequence[bool] = ()
) -> None:
    """cores_checked[i]: member i's required fields are known valid (see `_check_trajectory`)."""
    _name(group.id, prefix + "id")
    _name(group.producer, prefix + "producer")
    members = group.trajectories
    if type(members) is not list or not members:
        raise MessageError(prefix + "trajectories", "must be a non-empty array of trajectories")
    if len(members) > limits.max_group_size:
        raise MessageError(prefix + "trajectories", f"{len(members)} members > max_group_size {limits.max_group_size}")
    seen_ids: set[str] = set()
    for i, traj in enumerate(members):
        where = f"{prefix}trajectories[{i}]"
        if type(traj) is not Trajectory:
            raise MessageError(where, f"must be a Trajectory (got {_kind_of(traj)})")
        _check_trajectory(traj, limits, where + ".", encoded_size, i < len(cores_checked) and cores_checked[i])
        if traj.group_id != group.id:
            raise MessageError(where + ".group_id", f"{_show(traj.group_id)} != group id {_show(group.id)}")
        if traj.id in seen_ids:
            raise MessageError(where + ".id", f"duplicate trajectory id {_show(traj.id)} in the group")
        seen_ids.add(traj.id)
    if group.task_id is not None:
        _name(group.task_id, prefix + "task_id")
    _real(group.created_at, prefix + "created_at", 0.0)
    _check_meta(group.meta, prefix + "meta", limits, encoded_size)


def _check_preference(pref: Preference, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    _name(pref.id, prefix + "id")
    _name(pref.producer, prefix + "producer")
    _tokens(pref.prompt_ids, prefix + "prompt_ids", limits)
    _tokens(pref.chosen_ids, prefix + "chosen_ids", limits)
    _tokens(pref.rejected_ids, prefix + "rejected_ids", limits)
    if (pref.ref_chosen_logp is None) != (pref.ref_rejected_logp is None):
        missing = "ref_chosen_logp" if pref.ref_chosen_logp is None else "ref_rejected_logp"
        raise MessageError(prefix + missing, "must be given when the other reference log-probability is")
    for name in ("ref_chosen_logp", "ref_rejected_logp"):
        if getattr(pref, name) is not None:
            _real(getattr(pref, name), prefix + name, high=LOGPROB_TOLERANCE)
    _real(pref.created_at, prefix + "created_at", 0.0)
    _check_meta(pref.meta, prefix + "meta", limits, encoded_size)


def _check_weights(weights: Weights, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    _integer(weights.version, prefix + "version")
    _name(weights.group, prefix + "group")
    if type(weights.checksum) is not str:
        raise MessageError(prefix + "checksum", f"must be a string (got {_kind_of(weights.checksum)})")
    _real(weights.created_at, prefix + "created_at", 0.0)
    tensors = weights.tensors
    if type(tensors) is not list or not tensors:
        raise MessageError(prefix + "tensors", "must be a non-empty array of tensor specs")
    names: set[str] = set()
    for i, spec in enumerate(tensors):
        where = f"{prefix}tensors[{i}]"
        if type(spec) is not TensorSpec:
            raise MessageError(where, f"must be a TensorSpec (got {_kind_of(spec)})")
        if _name(spec.name, where + ".name") in names:
            raise MessageError(where + ".name", f"duplicate tensor name {_show(spec.name)}")
        names.add(spec.name)
        if type(spec.dtype) is not str or spec.dtype not in DTYPE_SIZES:
            raise MessageError(where + ".dtype", f"unknown dtype {_show(spec.dtype)}; one of {sorted(DTYPE_SIZES)}")
        if type(spec.shape) is not list:
            raise MessageError(where + ".shape", f"must be an array of dimensions (got {_kind_of(spec.shape)})")
        for j, dim in enumerate(spec.shape):
            _integer(dim, f"{where}.shape[{j}]")
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
            index = _integer(index, where, 0, len(tensors) - 1)
            if placed[index]:
                raise MessageError(where, f"tensor {index} is already in a bucket")
            placed[index] = True
            dtypes.add(tensors[index].dtype)
            total += tensors[index].nbytes
        if len(dtypes) > 1:
            raise MessageError(where, f"mixes dtypes {sorted(dtypes)} (one dtype per bucket)")
        if _integer(sizes[b], f"{prefix}bucket_bytes[{b}]") != total:
            raise MessageError(f"{prefix}bucket_bytes[{b}]", f"{sizes[b]} != {total} bytes of the bucket's tensors")
    if not all(placed):
        raise MessageError(prefix + "buckets", f"tensor {placed.index(False)} is in no bucket")


def _check_node_event(event: NodeEvent, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    _name(event.node_id, prefix + "node_id")
    _name(event.role, prefix + "role")
    _integer(event.version, prefix + "version")
    _real(event.created_at, prefix + "created_at", 0.0)
    _check_meta(event.meta, prefix + "meta", limits, encoded_size)
    if type(event) is Join and event.address is not None:
        _name(event.address, prefix + "address")


# --------------------------------------------------------------------------------------------- to and from the map
# from_map(wire, prefix) converts arrays and nested maps and leaves scalar checks to the kind's check. A missing
# required key raises KeyError, which the nearest caller that knows the path turns into "required field missing".


def _missing(exc: KeyError, prefix: str) -> MessageError:
    return MessageError(prefix + str(exc.args[0]), "required field missing")


def _submap(value: Any, field: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise MessageError(field, f"must be a map (got {_kind_of(value)})")
    return value


def _optional(wire: dict[str, Any], key: str, default: Any) -> Any:
    """An optional field: absent and nil both mean `default`."""
    value = wire.get(key)
    return default if value is None else value


def _task_to_map(task: Task) -> dict[str, Any]:
    prompt = task.prompt if type(task.prompt) is str else _bin(task.prompt, _I32)
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
        prompt = _wire_array(prompt, _I32, prefix + "prompt")
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
        "prompt_ids": _bin(traj.prompt_ids, _I32),
        "response_ids": _bin(traj.response_ids, _I32),
        "behavior_logprobs": _bin(traj.behavior_logprobs, _F32),
        "reward": traj.reward,
        "policy_version": traj.policy_version,
        "finish_reason": traj.finish_reason,
        "created_at": traj.created_at,
    }
    # Optional fields go on the wire only when set (absent means the default): the most frequent message is shorter
    # to pack and to unpack. An invalid value (validate=False) is written, so that decode names it.
    if traj.loss_mask is not None:
        wire["loss_mask"] = _bin(traj.loss_mask, _U8)
    if traj.rewards or type(traj.rewards) is not dict:
        wire["rewards"] = traj.rewards
    if traj.version_ranges is not None:
        wire["version_ranges"] = traj.version_ranges
    if traj.meta or type(traj.meta) is not dict:
        wire["meta"] = traj.meta
    return wire


def _version_ranges_from_wire(ranges: Any) -> Any:
    """msgpack gives [start, end, version] lists; the schema holds tuples (anything else is left for the check)."""
    if type(ranges) is list:
        return [tuple(triple) if type(triple) is list else triple for triple in ranges]
    return ranges


def _trajectory_from_map(wire: dict[str, Any], prefix: str) -> Trajectory:
    mask = wire.get("loss_mask")
    return Trajectory(
        wire["id"],
        wire["group_id"],
        wire["producer"],
        _wire_array(wire["prompt_ids"], _I32, prefix + "prompt_ids"),
        _wire_array(wire["response_ids"], _I32, prefix + "response_ids"),
        _wire_array(wire["behavior_logprobs"], _F32, prefix + "behavior_logprobs"),
        None if mask is None else _wire_array(mask, _U8, prefix + "loss_mask"),
        wire["reward"],
        _optional(wire, "rewards", {}),
        wire["policy_version"],
        _version_ranges_from_wire(wire.get("version_ranges")),
        wire["finish_reason"],
        wire["created_at"],
        _optional(wire, "meta", {}),
    )


def _decode_trajectory(wire: dict[str, Any], limits: Limits, encoded_size: int) -> Trajectory:
    traj = _plain_trajectory_from_map(wire, limits, "")
    if traj is None:
        traj = _trajectory_from_map(wire, "")
        _check_trajectory(traj, limits, "", encoded_size)
    else:
        _check_trajectory(traj, limits, "", encoded_size, core_checked=True)
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
        raise MessageError("trajectories", f"must be an array of trajectories (got {_kind_of(members)})")
    built = [_member_from_map(member, f"trajectories[{i}].", limits) for i, member in enumerate(members)]
    trajectories = [traj for traj, _ in built]
    group = Group(
        wire["id"], wire["producer"], trajectories, wire.get("task_id"), wire["created_at"], _optional(wire, "meta", {})
    )
    _check_group(group, limits, "", encoded_size, [core_checked for _, core_checked in built])
    return group


def _member_from_map(member: Any, prefix: str, limits: Limits) -> tuple[Trajectory, bool]:
    """A group member (a trajectory map whose kind and v, optional here, must be right when present), and whether
    its required fields were found valid on the way (see `_plain_trajectory_from_map`)."""
    member = _submap(member, prefix[:-1])
    kind = _optional(member, "kind", "trajectory")
    if kind != "trajectory":
        raise MessageError(prefix + "kind", f"must be 'trajectory' (got {_show(kind)})")
    version = _optional(member, "v", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:
        raise MessageError(prefix + "v", f"unsupported schema version {_show(version)}")
    try:
        traj = _plain_trajectory_from_map(member, limits, prefix)
        return (traj, True) if traj is not None else (_trajectory_from_map(member, prefix), False)
    except KeyError as exc:
        raise _missing(exc, prefix) from None


def _preference_to_map(pref: Preference) -> dict[str, Any]:
    return {
        "kind": "preference",
        "v": SCHEMA_VERSION,
        "id": pref.id,
        "producer": pref.producer,
        "prompt_ids": _bin(pref.prompt_ids, _I32),
        "chosen_ids": _bin(pref.chosen_ids, _I32),
        "rejected_ids": _bin(pref.rejected_ids, _I32),
        "ref_chosen_logp": pref.ref_chosen_logp,
        "ref_rejected_logp": pref.ref_rejected_logp,
        "created_at": pref.created_at,
        "meta": pref.meta,
    }


def _preference_from_map(wire: dict[str, Any], prefix: str) -> Preference:
    arrays = [_wire_array(wire[name], _I32, prefix + name) for name in ("prompt_ids", "chosen_ids", "rejected_ids")]
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
        raise MessageError(prefix + "tensors", f"must be an array of tensor specs (got {_kind_of(specs)})")
    tensors = []
    for i, spec in enumerate(specs):
        where = f"{prefix}tensors[{i}]"
        spec = _submap(spec, where)
        try:
            tensors.append(TensorSpec(spec["name"], spec["dtype"], spec["shape"]))
        except KeyError as exc:
            raise _missing(exc, where + ".") from None
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
    return cls(wire["node_id"], wire["role"], wire["version"], wire["created_at"], _optional(wire, "meta", {}), *extra)


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
class _Codec:
    to_map: Callable[[Any], dict[str, Any]]
    decode: Callable[[dict[str, Any], Limits, int], Any]  # (wire, limits, encoded size) -> valid message
    check: Callable[[Any, Limits, str, int | None], None]


def _codec_from_map(
    to_map: Callable[[Any], dict[str, Any]],
    from_map: Callable[[dict[str, Any], str], Any],
    check: Callable[[Any, Limits, str, int | None], None],
) -> _Codec:
    """The codec of a kind whose decoding is from_map, then check."""
    return _Codec(to_map, partial(_decode_checked, from_map, check), check)


_CODECS: dict[type, _Codec] = {
    Task: _codec_from_map(_task_to_map, _task_from_map, _check_task),
    Trajectory: _Codec(_trajectory_to_map, _decode_trajectory, _check_trajectory),
    Group: _Codec(_group_to_map, _decode_group, _check_group),
    Preference: _codec_from_map(_preference_to_map, _preference_from_map, _check_preference),
    Weights: _codec_from_map(_weights_to_map, _weights_from_map, _check_weights),
    **{
        cls: _codec_from_map(_node_event_to_map, partial(_node_event_from_map, cls), _check_node_event)
        for cls in (Join, Leave, Heartbeat)
    },
}
_CODECS_BY_KIND: dict[str, _Codec] = {KINDS[cls]: codec for cls, codec in _CODECS.items()}


# ------------------------------------------------------------------------------------------------------ public API


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _plain(value: Any) -> Any:
    """msgpack's hook for what it cannot pack itself: numpy scalars (np.float32 rewards, np.int64 versions...)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _packer() -> msgpack.Packer:
    """This thread's msgpack Packer: packb would build (and allocate a buffer for) a new one per message, and one
    Packer must not serve two threads at once (the `default` hook can let another thread in mid-message)."""
    try:
        return _thread_state.packer
    except AttributeError:
        _thread_state.packer = msgpack.Packer(default=_plain)
        return _thread_state.packer


_thread_state = threading.local()


def _codec_of(msg: Any) -> _Codec:
    codec = _CODECS.get(type(msg))
    if codec is None:
        raise MessageError("kind", f"not a message type: {type(msg).__name__}")
    return codec


def validate(msg: Message, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise MessageError naming the first field that breaks a rule of docs/wire-protocol.md; else return."""
    _codec_of(msg).check(msg, limits, "", None)


def encode(msg: Message, *, validate: bool = True, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The wire bytes of `msg` (validated first unless validate=False). Raises MessageError only."""
    codec = _codec_of(msg)
    if validate:
        codec.check(msg, limits, "", None)
    try:
        data = _packer().pack(codec.to_map(msg))
    except Exception as exc:  # only reachable with validate=False: what a check would have named
        raise MessageError("data", f"cannot encode ({_error_text(exc)})") from exc
    if len(data) > limits.max_message_bytes:
        raise MessageError("data", f"{len(data)} bytes > max_message_bytes {limits.max_message_bytes}")
    return data


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    """The valid message encoded in `data`; raises MessageError (and nothing else) for any other bytes.

    Arrays of the returned message are read-only views of `data` when they travelled as bin.
    """
    if type(data) is bytes:
        size = len(data)
    elif isinstance(data, bytearray | memoryview):
        size = memoryview(data).nbytes
    else:
        raise MessageError("data", f"must be bytes (got {_kind_of(data)})")
    if size > limits.max_message_bytes:
        raise MessageError("data", f"{size} bytes > max_message_bytes {limits.max_message_bytes}")
    try:
        if size <= limits.small_message_bytes:
            try:  # msgpack's own limits (the input's length) are the tighter ones: skip parsing ours
                wire = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext, max_ext_len=0)
            except Exception:  # ... and on any failure, fail as the configured limits say (the same exception)
                wire = msgpack.unpackb(data, **limits.unpack_options)
        else:
            wire = msgpack.unpackb(data, **limits.unpack_options)
    except MessageError:
        raise
    except msgpack.ExtraData:
        raise MessageError("data", "trailing bytes after the message") from None
    except Exception as exc:  # msgpack raises ValueError, StackError (deep nesting), TypeError, ... on bad input
        # max_ext_len=0 refuses ext types (timestamps included) with an obscure text; say what it means.
        ext = "max_ext_len" in str(exc)
        raise MessageError(
            "data", "msgpack ext types are not allowed" if ext else f"not valid msgpack ({_error_text(exc)})"
        ) from None
    if type(wire) is not dict:
        raise MessageError("data", f"must be a msgpack map (got {_kind_of(wire)})")
    kind = wire.get("kind")
    codec = _CODECS_BY_KIND.get(kind) if type(kind) is str else None
    if codec is None:
        raise MessageError("kind", f"unknown message kind {_show(kind)}; expected one of {sorted(_CODECS_BY_KIND)}")
    version = wire.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise MessageError("v", f"unsupported schema version {_show(version)} (this build reads {SCHEMA_VERSION})")
    try:
        msg = codec.decode(wire, limits, size)
    except MessageError:
        raise
    except KeyError as exc:
        raise _missing(exc, "") from None
    except Exception as exc:  # a bug, not the sender's fault; still never let a bad message crash a consumer
        raise MessageError("data", f"internal decoder error ({_error_text(exc)})") from exc
    return msg


def peek(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Best effort: the top-level string/int fields kind, v, id, producer, group_id, node_id that can be read from
    the start of `data`, even if it is truncated or invalid further on. Never raises; {} when nothing is readable.
    """
    found: dict[str, Any] = {}
    try:
        unpacker = msgpack.Unpacker(max_buffer_size=DEFAULT_LIMITS.max_message_bytes, **DEFAULT_LIMITS.unpack_options)
        unpacker.feed(data)
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in _PEEKED_FIELDS:
                value = unpacker.unpack()
                if type(value) in (str, int):
                    found[key] = value
            else:
                unpacker.skip()
    except Exception:  # truncated or invalid further on: keep what was read
        pass
    return found


_PEEKED_FIELDS = frozenset({"kind", "v", "id", "producer", "group_id", "node_id"})


def peek_id(data: bytes | bytearray | memoryview) -> str | None:
    """Best effort id of a message for dead-lettering (its `id`, else its `node_id`); never raises."""
    found = peek(data)
    for key in ("id", "node_id"):
        if type(found.get(key)) is str:
            return found[key]
    return None
