"""The rules of single message fields, shared by every message kind (`bus.validation`) and the codec (`bus.codec`).

`Limits` bounds a message; `check_*` raise `MessageError` naming the field and the rule, and return the value in its
checked form. Array checks are kept cheap: per array one numpy argmin/argmax call, no per-token Python loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import numpy as np

from bus.schema import LOGPROB_FLOOR, LOGPROB_TOLERANCE, MAX_ABS_REWARD, MessageError

# Little-endian wire dtypes; on a little-endian host these are numpy's native singletons, so `is` compares them.
WIRE_INT32 = np.dtype("<i4")  # token ids
WIRE_FLOAT32 = np.dtype("<f4")  # log-probabilities
WIRE_UINT8 = np.dtype("u1")  # loss masks
_U32 = np.dtype("<u4")
# float32 bits read as int32: those of LOGPROB_FLOOR, the greatest pattern of a negative float >= the floor.
_LOGPROB_FLOOR_BITS = int(np.array([LOGPROB_FLOOR], "<f4").view("<i4")[0])
# Which numpy dtype kinds may be converted to each wire dtype without changing meaning (range checked separately).
_CONVERTIBLE_KINDS = {WIRE_INT32: "iu", WIRE_FLOAT32: "fiu", WIRE_UINT8: "biu"}

MAX_NAME_CHARS = 256  # ids, producer, node_id, role, ...: they become Redis keys and log fields
INT64_MAX = 2**63 - 1
_Number = TypeVar("_Number", int, float)


def reject_ext(code: int, data: bytes) -> Any:
    """msgpack's ext_hook: ext types are not part of the wire protocol."""
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
            "ext_hook": reject_ext,
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


def show(value: Any) -> str:
    """A short repr for error messages (a hostile message must not make a huge error text)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def kind_of(value: Any) -> str:
    """The msgpack-ish name of a value's type, for error messages."""
    return "nil" if value is None else type(value).__name__


def check_name(value: Any, field: str) -> str:
    """A non-empty string of at most MAX_NAME_CHARS characters (ids, producer, role, ...)."""
    if type(value) is not str:
        raise MessageError(field, f"must be a string (got {kind_of(value)})")
    if not value:
        raise MessageError(field, "must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise MessageError(field, f"{len(value)} characters > {MAX_NAME_CHARS}")
    return value


def check_integer(value: Any, field: str, low: int = 0, high: int = INT64_MAX) -> int:
    """An integer in [low, high]; numpy integers are accepted, bool is not."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise MessageError(field, f"must be an integer (got {kind_of(value)})")
        value = int(value)
    return _within(value, field, low, high)


def check_real(value: Any, field: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number in [low, high]; ints and numpy numbers are accepted, bool is not."""
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise MessageError(field, f"must be a number (got {kind_of(value)})")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
    if not math.isfinite(value):
        raise MessageError(field, f"must be finite (got {value})")
    return _within(value, field, low, high)


def check_reward(value: Any, field: str) -> float:
    """A finite reward within +-MAX_ABS_REWARD."""
    return check_real(value, field, low=-MAX_ABS_REWARD, high=MAX_ABS_REWARD)


def _within(value: _Number, field: str, low: float, high: float) -> _Number:
    """`value` if low <= value <= high; else the MessageError naming the bound it breaks."""
    if value < low:
        raise MessageError(field, f"must be >= {low} (got {value})")
    if value > high:
        raise MessageError(field, f"must be <= {high} (got {value})")
    return value


def check_meta(meta: Any, field: str, limits: Limits, encoded_size: int | None) -> None:
    """A map of msgpack-able plain data (string keys, no ext types) of at most max_meta_bytes encoded.

    encoded_size: size of the encoding the message was decoded from, if it was; meta cannot be larger, so it
    need not be re-encoded to be measured when that already fits.
    """
    if type(meta) is not dict:
        raise MessageError(field, f"must be a map (got {kind_of(meta)})")
    if not meta or (encoded_size is not None and encoded_size <= limits.max_meta_bytes):
        return
    rule = "must be msgpack-able plain data with string keys and no ext types"
    try:
        packed = msgpack.packb(meta)
    except Exception as exc:
        raise MessageError(field, f"{rule} ({error_text(exc)})") from exc
    if len(packed) > limits.max_meta_bytes:  # before decoding it: what it decodes to is bounded by its size then
        raise MessageError(field, f"{len(packed)} bytes > max_meta_bytes {limits.max_meta_bytes}")
    try:
        msgpack.unpackb(packed, raw=False, strict_map_key=True, ext_hook=reject_ext, max_ext_len=0)  # decodable?
    except Exception as exc:
        raise MessageError(field, f"{rule} ({error_text(exc)})") from exc


def check_rewards(rewards: Any, field: str) -> None:
    """Named reward components: {non-empty string: finite number}."""
    if type(rewards) is not dict:
        raise MessageError(field, f"must be a map (got {kind_of(rewards)})")
    for name, value in rewards.items():
        if type(name) is not str or not name:
            raise MessageError(field, f"names must be non-empty strings (got {show(name)})")
        if type(value) is not float or not -MAX_ABS_REWARD <= value <= MAX_ABS_REWARD:  # no field path built
            check_reward(value, f"{field}.{name}")


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


def wire_array(value: Any, dtype: np.dtype, field: str) -> np.ndarray:
    """An array field as received: bin (zero-copy, read-only view) or a msgpack array of numbers."""
    if type(value) is bytes:
        if len(value) % dtype.itemsize:
            raise MessageError(field, f"bin length {len(value)} is not a multiple of {dtype.itemsize} ({dtype.name})")
        return np.frombuffer(value, dtype)
    if type(value) is list:
        return _array(value, dtype, field)
    raise MessageError(field, f"must be bin or an array of numbers (got {kind_of(value)})")


def ids_in_range(ids: np.ndarray, vocab_size: int | None, wire_bytes: bytes | None = None) -> bool:
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


def all_negative_above_floor(logprobs: np.ndarray) -> bool:
    """Whether float32 logprobs [N >= 1] are all in [LOGPROB_FLOOR, -0.0], with ONE numpy reduction.

    Read as int32, those float32 bit patterns are exactly the ones <= _LOGPROB_FLOOR_BITS (sign bit set, magnitude
    at most the floor's); NaN, -inf, values below the floor and every value >= +0.0 are greater. False does not mean
    invalid: 0.0 and positive values up to LOGPROB_TOLERANCE are valid and are left to the exact check.
    """
    bits = logprobs.view(WIRE_INT32)
    return bits.item(bits.argmax()) <= _LOGPROB_FLOOR_BITS


def check_tokens(value: Any, field: str, limits: Limits) -> np.ndarray:
    """Non-empty int32 token ids, at most max_tokens, each in [0, vocab_size). Returns them as int32 [N]."""
    ids = _array(value, WIRE_INT32, field)
    count = len(ids)
    if count == 0:
        raise MessageError(field, "must not be empty")
    if count > limits.max_tokens:
        raise MessageError(field, f"{count} tokens > max_tokens {limits.max_tokens}")
    if ids_in_range(ids, limits.vocab_size):
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


def check_logprobs(value: Any, field: str, length: int, length_field: str) -> None:
    """float32 [length] log-probabilities: finite, >= LOGPROB_FLOOR and <= 0 (+ LOGPROB_TOLERANCE)."""
    logprobs = _array(value, WIRE_FLOAT32, field)
    if len(logprobs) != length:
        raise MessageError(length_field, f"length {length} != {field.rpartition('.')[2]} length {len(logprobs)}")
    if all_negative_above_floor(logprobs):
        return
    # argmax/argmin return the first NaN if there is one, so these two cheap calls catch nan, +-inf and > tolerance.
    if logprobs[logprobs.argmax()] <= LOGPROB_TOLERANCE and logprobs[logprobs.argmin()] >= LOGPROB_FLOOR:
        return
    finite = np.isfinite(logprobs)
    if not finite.all():
        position = int(finite.argmin())
        raise MessageError(field, f"must be finite (got {logprobs[position]} at position {position})")
    position = int(logprobs.argmin())
    if logprobs[position] < LOGPROB_FLOOR:
        raise MessageError(field, f"log-probability {logprobs[position]} < {LOGPROB_FLOOR} at position {position}")
    position = int(logprobs.argmax())
    raise MessageError(field, f"log-probability {logprobs[position]} > 0 at position {position} (impossible)")


def check_mask(value: Any, field: str, length: int, length_field: str) -> None:
    """uint8 [length] loss mask of 0/1 values."""
    mask = _array(value, WIRE_UINT8, field)
    if len(mask) != length:
        raise MessageError(length_field, f"length {length} != loss_mask length {len(mask)}")
    highest = mask.argmax()  # length >= 1: the response was checked non-empty first
    if mask[highest] > 1:
        raise MessageError(field, f"values must be 0 or 1 (got {mask[highest]} at position {highest})")


def check_version_ranges(ranges: Any, field: str, length: int) -> None:
    """(start, end, version) triples, contiguous from 0 and covering [0, length)."""
    if type(ranges) is not list or not ranges:
        raise MessageError(field, "must be a non-empty array of [start, end, version]")
    covered = 0
    for i, triple in enumerate(ranges):
        where = f"{field}[{i}]"
        if type(triple) not in (tuple, list) or len(triple) != 3:
            raise MessageError(where, f"must be [start, end, version] (got {show(triple)})")
        start = check_integer(triple[0], where + ".start")
        end = check_integer(triple[1], where + ".end")
        check_integer(triple[2], where + ".version")
        if start != covered:
            raise MessageError(where, f"start {start} != previous end {covered} (ranges must be contiguous from 0)")
        if end <= start:
            raise MessageError(where, f"end {end} <= start {start}")
        covered = end
    if covered != length:
        raise MessageError(field, f"ranges end at {covered} != response length {length} (must cover every token)")


def version_ranges_from_wire(ranges: Any) -> Any:
    """msgpack gives [start, end, version] lists; the schema holds tuples (anything else is left for the check)."""
    if type(ranges) is list:
        return [tuple(triple) if type(triple) is list else triple for triple in ranges]
    return ranges


def error_text(exc: BaseException) -> str:
    """`Type: message` of an exception, for the rule of a MessageError."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
