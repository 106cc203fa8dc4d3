"""msgpack codec of the bus messages: `encode`, `decode`, `validate`, `peek`, `peek_id` and `member_count`.

A message travels as a msgpack map with string keys: `kind`, the fields of its `bus.schema` Struct under the same
names, and `v` (schema version). Arrays travel as bin holding little-endian int32 token ids, float32
log-probabilities or uint8 masks, and decode without per-element work (numpy views of each bin's one copy); plain
msgpack arrays of numbers are accepted too, so that any language can produce. docs/wire-protocol.md is the contract.

Decoding any bytes yields a valid message or a `MessageError` naming the field and the rule, never another
exception. msgspec decodes into the wire types of `bus.schema` (Meta constraints checked in C), then `check`
applies the rules they cannot say. What msgspec refuses is read again the slow way, with msgpack (size limits
derived from `Limits`, string map keys only, no ext types) into maps, built with `from_map` and checked rule by rule,
which names the field and the rule (or accepts a valid form the wire types do not take). A message over
`Limits.small_message_bytes` is first unpacked by msgpack within `bus.decode_budget` (what it may build: 16x its size).
"""

from __future__ import annotations

import threading
from typing import Any, Union

import msgpack
import msgspec
import numpy as np

from bus import decode_budget
from bus.schema import (
    DEFAULT_LIMITS,
    KINDS,
    LAYOUTS,
    MAX_NAME_CHARS,
    SCHEMA_VERSION,
    WIRE_TYPES,
    Limits,
    Message,
    MessageError,
    check,
    error_text,
    from_map,
    from_wire,
    kind_of,
    reject_ext,
    show,
    to_wire,
)

__all__ = [
    "DEFAULT_LIMITS", "MAX_NAME_CHARS", "Limits", "decode", "encode", "member_count", "peek", "peek_id", "validate"
]  # fmt: skip

_CLASSES = {kind: cls for cls, kind in KINDS.items()}
_CLASS_OF_WIRE_TYPE = {wire: cls for cls, wire in WIRE_TYPES.items()}
_DECODER = msgspec.msgpack.Decoder(Union[tuple(WIRE_TYPES.values())])  # noqa: UP007 (a runtime tuple of types)


def _plain(value: Any) -> Any:
    """msgspec's hook for what it cannot encode itself: numpy scalars (np.float32 rewards, np.int64 versions...)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _encoder() -> msgspec.msgpack.Encoder:
    """This thread's Encoder (the `enc_hook` can let another thread in mid-message)."""
    try:
        return _thread_state.encoder
    except AttributeError:
        _thread_state.encoder = msgspec.msgpack.Encoder(enc_hook=_plain)
        return _thread_state.encoder


_thread_state = threading.local()


def validate(msg: Message, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise MessageError naming the first field that breaks a rule of docs/wire-protocol.md; else return."""
    check(msg, limits)


def encode(msg: Message, *, validate: bool = True, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The wire bytes of `msg` (validated first unless validate=False). Raises MessageError only."""
    if type(msg) not in KINDS:
        raise MessageError("kind", f"not a message type: {type(msg).__name__}")
    if validate:
        check(msg, limits)
    try:
        data = _encoder().encode(to_wire(msg))
    except Exception as exc:  # only reachable with validate=False: what a check would have named
        raise MessageError("data", f"cannot encode ({error_text(exc)})") from exc
    if len(data) > limits.max_message_bytes:
        raise MessageError("data", f"{len(data)} bytes > max_message_bytes {limits.max_message_bytes}")
    return data


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    """The valid message encoded in `data`; raises MessageError (and nothing else) for any other bytes.

    Arrays of the returned message are writable views of their bins, which msgspec copied out of `data` into
    bytearrays of their own (a read-only view would make every argmin/argmax of the checks about twice as slow).
    """
    if type(data) is bytes:
        size = len(data)
    elif isinstance(data, bytearray | memoryview):
        size = memoryview(data).nbytes
    else:
        raise MessageError("data", f"must be bytes (got {kind_of(data)})")
    if size > limits.max_message_bytes:
        raise MessageError("data", f"{size} bytes > max_message_bytes {limits.max_message_bytes}")
    if size > limits.small_message_bytes:  # large enough for what it decodes to to matter: bounded first
        _unpack(data, limits, size)
    try:
        wire = _DECODER.decode(data)
        typed = type(wire.v) is int and wire.v == SCHEMA_VERSION  # else named by the slow path below
        if typed:
            msg = from_wire(wire, _CLASS_OF_WIRE_TYPE[type(wire)], "")
    except Exception:  # refused by the wire types (or by msgpack, reading meta): the slow path names why
        typed = False
    try:
        if not typed:
            msg = _decode_slowly(data, limits, size)
        check(msg, limits, "", size, typed=typed)
    except MessageError:
        raise
    except Exception as exc:  # a bug, not the sender's fault; still never let a bad message crash a consumer
        raise MessageError("data", f"internal decoder error ({error_text(exc)})") from exc
    return msg


def _decode_slowly(data: bytes | bytearray | memoryview, limits: Limits, size: int) -> Message:
    """The message msgspec refused, read as msgpack maps and built with `from_map` (for `check` to name the first
    broken rule, or to accept it when it is valid in a form the wire types do not take)."""
    wire = _unpack(data, limits, size)
    if type(wire) is not dict:
        raise MessageError("data", f"must be a msgpack map (got {kind_of(wire)})")
    kind = wire.get("kind")
    cls = _CLASSES.get(kind) if type(kind) is str else None
    if cls is None:
        raise MessageError("kind", f"unknown message kind {show(kind)}; expected one of {sorted(_CLASSES)}")
    version = wire.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise MessageError("v", f"unsupported schema version {show(version)} (this build reads {SCHEMA_VERSION})")
    return from_map(wire, cls, "")


def _unpack(data: bytes | bytearray | memoryview, limits: Limits, size: int) -> Any:
    """`data` as msgpack reads it within the limits (and over small_message_bytes, the decode budget); any failure
    is the MessageError naming where it is."""
    try:
        if size <= limits.small_message_bytes:
            try:  # msgpack's own limits (the input's length) are the tighter ones: skip parsing ours
                return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=reject_ext, max_ext_len=0)
            except Exception:  # ... and on any failure, fail as the configured limits say (the same exception)
                return msgpack.unpackb(data, **limits.unpack_options)
        list_hook, object_hook = decode_budget.hooks(size)
        return msgpack.unpackb(data, list_hook=list_hook, object_hook=object_hook, **limits.unpack_options)
    except decode_budget.OverBudget:
        raise  # the whole message's (and reading it again to find a field would cost as much again)
    except MessageError as exc:  # an ext type: name the field it is in
        raise MessageError(_failing_path(data, limits, size), exc.rule) from None
    except msgpack.ExtraData:
        raise MessageError("data", "trailing bytes after the message") from None
    except Exception as exc:  # msgpack raises ValueError, StackError (deep nesting), TypeError, ... on bad input
        # max_ext_len=0 refuses ext types (timestamps included) with an obscure text; say what it means.
        ext = "max_ext_len" in str(exc)
        raise MessageError(
            _failing_path(data, limits, size),
            "msgpack ext types are not allowed" if ext else f"not valid msgpack ({error_text(exc)})",
        ) from None


def _failing_path(data: bytes | bytearray | memoryview, limits: Limits, size: int) -> str:
    """Where msgpack fails in `data`, read again value by value (within the decode budget): the top-level field or
    group member field (`meta`, `trajectories[3].response_ids`) whose value cannot be read, or `data` when the
    message itself cannot (not a map, a key, nesting, trailing bytes)."""
    list_hook, object_hook = decode_budget.hooks(size)
    unpacker = msgpack.Unpacker(
        max_buffer_size=size, list_hook=list_hook, object_hook=object_hook, **limits.unpack_options
    )
    unpacker.feed(data)
    path = "data"
    try:
        for _ in range(unpacker.read_map_header()):
            path = "data"
            key = unpacker.unpack()
            path = key if key in _FIELD_NAMES else "data"  # a hostile key is not a field to name (nor to echo)
            members = _array_header(unpacker) if key == "trajectories" else None
            if members is None:
                unpacker.unpack()
                continue
            for i in range(members):
                path = f"trajectories[{i}]"
                for _ in range(unpacker.read_map_header()):
                    path = f"trajectories[{i}]"
                    member_key = unpacker.unpack()
                    path = f"{path}.{member_key}" if member_key in _FIELD_NAMES else path
                    unpacker.unpack()
    except Exception:
        return path
    return "data"


# Every field name of every kind: what `_failing_path` may name.
_FIELD_NAMES = frozenset({"kind", "v"} | {spec.name for layout in LAYOUTS.values() for spec in layout.fields})


def _array_header(unpacker: msgpack.Unpacker) -> int | None:
    """The length of the array next in `unpacker` (its header read), or None when the next value is no array."""
    try:
        return unpacker.read_array_header()
    except ValueError as exc:
        if "Unexpected type header" in str(exc):
            return None
        raise


def peek(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Best effort: the top-level string/int fields kind, v, id, producer, group_id, node_id that can be read from
    the start of `data`, even if it is truncated or invalid further on. Never raises; {} when nothing is readable.
    """
    found: dict[str, Any] = {}
    try:
        unpacker = _unpacker(data)
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in _PEEKED_FIELDS:
                value = unpacker.unpack()
                if type(value) in (str, int):
                    found[key] = value
            else:
                unpacker.skip()  # walked, not built
    except Exception:  # truncated or invalid further on: keep what was read
        pass
    return found


def member_count(data: bytes | bytearray | memoryview) -> int | None:
    """The length of the top-level `trajectories` array (a group's members) when `data` is one well-formed msgpack
    map that has one, else None. Walked, not built (a dead letter may be hostile: this must cost no memory); never
    raises. Other rules (limits, ext types, key types) are not checked: a group refused for them still counts."""
    members = None
    try:
        size = memoryview(data).nbytes
        unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=False, max_buffer_size=size, list_hook=_refuse_container,
            object_hook=_refuse_container,
        )  # fmt: skip
        unpacker.feed(data)
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() != "trajectories":
                unpacker.skip()
                continue
            members = unpacker.read_array_header()
            for _ in range(members):
                unpacker.skip()
        return members if unpacker.tell() == size else None
    except Exception:
        return None


def _unpacker(data: bytes | bytearray | memoryview) -> msgpack.Unpacker:
    """An Unpacker over `data` for reading a few top-level fields: one that builds no array or map (a peeked value
    is a str or an int; anything else is refused as soon as its innermost container is complete)."""
    unpacker = msgpack.Unpacker(
        max_buffer_size=DEFAULT_LIMITS.max_message_bytes,
        list_hook=_refuse_container,
        object_hook=_refuse_container,
        **DEFAULT_LIMITS.unpack_options,
    )
    unpacker.feed(data)
    return unpacker


def _refuse_container(value: Any) -> Any:
    raise ValueError("not a scalar")


_PEEKED_FIELDS = frozenset({"kind", "v", "id", "producer", "group_id", "node_id"})


def peek_id(data: bytes | bytearray | memoryview) -> str | None:
    """Best effort id of a message for dead-lettering (its `id`, else its `node_id`); never raises."""
    found = peek(data)
    for key in ("id", "node_id"):
        if type(found.get(key)) is str:
            return found[key]
    return None
