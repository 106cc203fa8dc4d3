"""The bus messages as msgspec Structs, their bounds and every rule of docs/wire-protocol.md (numpy only, no torch).

Each message kind is one Struct below, with its field bounds as `msgspec.Meta` constraints on the annotations and
`WIRE_REQUIRED`, the fields a received message must carry (their Python defaults serve construction only). Array
fields hold 1-D numpy arrays: token ids int32, log-probabilities float32, masks uint8 (`check` also accepts lists
and other integer/float dtypes, which encoding converts). Times are seconds since the Unix epoch. Construct
messages with keywords (the required fields of the wire come first, so the order differs from the docs' tables).

`WIRE_TYPES` derives from each Struct the one `bus.codec` decodes with msgspec (in C, Meta constraints checked):
the same fields, the required ones without defaults, optional ones nil-able, arrays as bin (or lists), `meta` raw.
`from_wire` / `to_wire` convert between the two; `from_map` builds a message from what msgpack reads, for the
messages msgspec refuses. `check` applies the rules annotations cannot say (lengths agree, version ranges ordered,
masks 0/1, finite logprobs, token ids in range, group membership, limits) and, for what was not decoded by a wire
type, the field bounds too; each rule broken is a `MessageError` naming the field path and the rule.
"""

from __future__ import annotations

import base64
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeVar

import msgpack
import msgspec
import numpy as np

SCHEMA_VERSION = 1

# A log-probability cannot be positive; this much above 0 is tolerated as floating-point noise.
LOGPROB_TOLERANCE = 1e-4
# No sampler draws a token of probability e^-1000 (it underflows every float): a lower log-probability is a producer's
# bug, and one of -3.4e38 would turn importance weights and KL metrics into infinities.
LOGPROB_FLOOR = -1000.0
# Rewards are bounded so group advantages (r - mean, divided by a std of squares) stay finite and exact in float64.
MAX_ABS_REWARD = 1e9
MAX_NAME_CHARS = 256  # ids, producer, node_id, role, ...: they become Redis keys and log fields
INT64_MAX = 2**63 - 1

# Bytes per element of every tensor dtype a `Weights` layout may name (torch dtype names without "torch.").
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

# Little-endian wire dtypes; on a little-endian host these are numpy's native singletons, so `is` compares them.
WIRE_INT32 = np.dtype("<i4")  # token ids
WIRE_FLOAT32 = np.dtype("<f4")  # log-probabilities
WIRE_UINT8 = np.dtype("u1")  # loss masks
# Which numpy dtype kinds may be converted to each wire dtype without changing meaning (range checked separately).
_CONVERTIBLE_KINDS = {WIRE_INT32: "iu", WIRE_FLOAT32: "fiu", WIRE_UINT8: "biu"}

# ---------------------------------------------------------------------------------------------- field annotations
# The bounds msgspec checks when decoding (le=float max refuses inf, and NaN fails every comparison).

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]  # versions, sizes, dimensions, seeds
Time = Annotated[float, msgspec.Meta(ge=0.0, le=sys.float_info.max)]
Reward = Annotated[float, msgspec.Meta(ge=-MAX_ABS_REWARD, le=MAX_ABS_REWARD)]
TokenIds = Annotated[np.ndarray, WIRE_INT32]  # the metadata names the wire dtype of the array
Logprobs = Annotated[np.ndarray, WIRE_FLOAT32]
LossMask = Annotated[np.ndarray, WIRE_UINT8]
MetaMap = dict[str, Any]  # msgpack-able plain data with string keys, at most Limits.max_meta_bytes encoded


class MessageError(ValueError):
    """A message that cannot be used: `field` is the dotted path inside the message, `rule` what it broke.

    `str(error) == f"{field}: {rule}"`, e.g. `trajectories[3].response_ids: token id -1 < 0`.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule

    def __reduce__(self) -> tuple[type[MessageError], tuple[str, str]]:
        # Default pickling would call MessageError(str) and lose the split; errors cross process boundaries.
        return (type(self), (self.field, self.rule))


def new_id() -> str:
    """A unique, URL-safe id of 26 characters [0-9a-v] that sorts by creation time (to the microsecond).

    64 bits of microseconds since the epoch, then 64 random bits, in base32hex (which keeps byte order).
    """
    raw = (time.time_ns() // 1000).to_bytes(8, "big") + os.urandom(8)
    return base64.b32hexencode(raw).decode("ascii").rstrip("=").lower()


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

# -------------------------------------------------------------------------------------------------------- messages


class Sampling(msgspec.Struct):
    """Sampling parameters of a task (SGLang/vLLM names). top_k -1 means no top-k; seed None means random."""

    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=sys.float_info.max)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=INT64_MAX)] = -1  # 0 is refused by `check`
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)] = 64
    stop: list[Annotated[str, msgspec.Meta(min_length=1)]] = []
    stop_token_ids: list[Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]] = []
    seed: Count | None = None
    WIRE_REQUIRED: ClassVar[tuple[str, ...]] = ()


class Task(msgspec.Struct):
    """A prompt to sample `n` completions of; it yields one `Group`.

    prompt: text, or token ids int32 [P]. meta: msgpack-able data for the reward (ground truth, task name, ...).
    min_version: the lowest policy version allowed to serve it.
    """

    id: Name
    prompt: str | TokenIds
    created_at: Time = msgspec.field(default_factory=time.time)
    n: Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)] = 1
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    meta: MetaMap = {}
    min_version: Count = 0
    WIRE_REQUIRED: ClassVar[tuple[str, ...]] = ("id", "prompt", "created_at")


class Trajectory(msgspec.Struct):
    """One sampled completion with what the learner needs to train on it off-policy.

    prompt_ids: int32 [P]; response_ids: int32 [T]; behavior_logprobs: float32 [T], the sampling policy's
    log-probability of each response token; loss_mask: uint8 [T] (1 = train on the token, 0 = tool or environment
    token) or None (all 1). version_ranges: (start, end, version) triples over response positions, contiguous and
    covering [0, T), when the weights changed during generation; None means all T tokens came from policy_version.
    id is the idempotency key: a trajectory id is trained at most once.
    """

    id: Name
    group_id: Name
    producer: Name
    prompt_ids: TokenIds
    response_ids: TokenIds
    behavior_logprobs: Logprobs
    reward: Reward = 0.0
    policy_version: Count = 0
    finish_reason: Name = "stop"
    created_at: Time = msgspec.field(default_factory=time.time)
    loss_mask: LossMask | None = None
    rewards: dict[Name, Reward] = {}
    version_ranges: list[tuple[Count, Count, Count]] | None = None
    meta: MetaMap = {}
    WIRE_REQUIRED: ClassVar[tuple[str, ...]] = (
        "id", "group_id", "producer", "prompt_ids", "response_ids", "behavior_logprobs", "reward", "policy_version",
        "finish_reason", "created_at",
    )  # fmt: skip

    @property
    def min_policy_version(self) -> int:
        """The oldest policy version that produced a response token."""
        if self.version_ranges:
            return min(version for _, _, version in self.version_ranges)
        return self.policy_version

    @property
    def max_policy_version(self) -> int:
        """The newest policy version that produced a response token."""
        if self.version_ranges:
            return max(version for _, _, version in self.version_ranges)
        return self.policy_version


class Group(msgspec.Struct):
    """The completions of one prompt (GRPO needs whole groups); every member's group_id equals `id`."""

    id: Name
    producer: Name
    trajectories: list[Trajectory]
    created_at: Time = msgspec.field(default_factory=time.time)
    task_id: Name | None = None
    meta: MetaMap = {}
    WIRE_REQUIRED: ClassVar[tuple[str, ...]] = ("id", "producer", "trajectories", "created_at")


class Preference(msgspec.Struct):
    """A DPO pair: prompt_ids int32 [P], chosen_ids int32 [C], rejected_ids int32 [R].

    ref_chosen_logp / ref_rejected_logp: the reference model's summed log-probability of each response, or None
    (the learner then computes them).
    """

    id: Name
    producer: Name
    prompt_ids: TokenIds
    chosen_ids: TokenIds
    rejected_ids: TokenIds
    created_at: Time = msgspec.field(default_factory=time.time)
    ref_chosen_logp: Annotated[float, msgspec.Meta(le=LOGPROB_TOLERANCE)] | None = None
    ref_rejected_logp: Annotated[float, msgspec.Meta(le=LOGPROB_TOLERANCE)] | None = None
    meta: MetaMap = {}
    WIRE_REQUIRED: ClassVar[tuple[str, ...]] = (
        "id", "producer", "prompt_ids", "chosen_ids", "rejected_ids", "created_at"
    )  # fmt: skip


class TensorSpec(msgspec.Struct):
    """One named tensor of a weights update: dtype is a `DTYPE_SIZES` key, shape its dimensions."""

    name: Name
    dtype: str
    shape: list[Count]
    WIRE_REQUIRED: ClassVar[tuple[str, ...]] = ("name", "dtype", "shape")

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar, shape [])."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        """Size in bytes when flattened into a bucket."""
        return self.numel * DTYPE_SIZES[self.dtype]


class Weights(msgspec.Struct):
    """Announcement of weights update `version` on broadcast group `group`.

    buckets[b]: indices into `tensors` sent flattened together as bucket b (one dtype per bucket, buckets in send
    order, tensors in bucket order); bucket_bytes[b] == sum of their nbytes. checksum: how the receiver verifies
    the buckets, "<algorithm>:<digest of bucket 0>,<digest of bucket 1>,..." by convention (see
    docs/wire-protocol.md); the empty string means unverified.
    """

    version: Count
    tensors: list[TensorSpec]
    buckets: list[list[Count]]
    bucket_bytes: list[Count]
    checksum: str
    group: Name
    created_at: Time = msgspec.field(default_factory=time.time)
    WIRE_REQUIRED: ClassVar[tuple[str, ...]] = (
        "version", "tensors", "buckets", "bucket_bytes", "checksum", "group", "created_at"
    )  # fmt: skip


class NodeEvent(msgspec.Struct):
    """Control-stream news about a node: role is "learner", "rollout", "agent", ...; version its policy version."""

    node_id: Name
    role: Name
    version: Count = 0
    created_at: Time = msgspec.field(default_factory=time.time)
    meta: MetaMap = {}
    WIRE_REQUIRED: ClassVar[tuple[str, ...]] = ("node_id", "role", "created_at")


class Join(NodeEvent):
    """A node joined; address (e.g. "host:port" of its engine or weight receiver) if others must reach it."""

    address: Name | None = None


class Leave(NodeEvent):
    """A node is leaving on purpose (a node that dies just stops sending heartbeats)."""


class Heartbeat(NodeEvent):
    """A node is alive and serving `version`."""


Message = Task | Trajectory | Group | Preference | Weights | Join | Leave | Heartbeat

# The wire `kind` of each message class.
KINDS: dict[type, str] = {
    Task: "task",
    Trajectory: "trajectory",
    Group: "group",
    Preference: "preference",
    Weights: "weights",
    Join: "join",
    Leave: "leave",
    Heartbeat: "heartbeat",
}

# ------------------------------------------------------------------------------------------------ the wire types
# Derived from the Structs above, so that a field is declared once.

_WIRE_ARRAYS: dict[Any, Any] = {
    TokenIds: bytearray | list[int],  # bytearray, not bytes: numpy reduces a writable view ~2x faster (argmin, argmax)
    Logprobs: bytearray | list[float],
    LossMask: bytearray | list[int | bool],
}
_ARRAY_DTYPES = {TokenIds: WIRE_INT32, Logprobs: WIRE_FLOAT32, LossMask: WIRE_UINT8}
_NOUNS = {Trajectory: "trajectories", TensorSpec: "tensor specs"}  # for "must be an array of ..."


@dataclass(frozen=True, slots=True)
class _Field:
    """How one field travels: `dtype` for arrays (text instead when `text`: Task.prompt), `nested` for the Struct
    of a map (of each map of an array when `many`), `default` a factory when `factory`."""

    name: str
    index: int
    required: bool
    default: Any
    factory: bool
    dtype: np.dtype | None
    nested: type | None
    many: bool
    text: bool

    def make_default(self) -> Any:
        return self.default() if self.factory else self.default


def _field(cls: type, index: int, info: msgspec.structs.FieldInfo) -> _Field:
    annotation = info.type
    args = [arg for arg in getattr(annotation, "__args__", ()) if arg is not type(None)]
    dtype = next((_ARRAY_DTYPES[arg] for arg in (annotation, *args) if arg in _ARRAY_DTYPES), None)
    listed = args[0] if getattr(annotation, "__origin__", None) is list else None
    nested = next((t for t in (annotation, listed) if isinstance(t, type) and issubclass(t, msgspec.Struct)), None)
    factory = info.default_factory is not msgspec.NODEFAULT
    default = info.default_factory if factory else info.default
    required = info.name in cls.WIRE_REQUIRED
    many = nested is not None and nested is listed
    return _Field(info.name, index, required, default, factory, dtype, nested, many, str in args)


@dataclass(frozen=True, slots=True)
class _Layout:
    """The fields of a Struct grouped by what converting them to and from the wire needs (precomputed: hot path)."""

    fields: tuple[_Field, ...]
    required: tuple[_Field, ...]  # in the order a missing one is named: arrays and nested maps first
    arrays: tuple[_Field, ...]
    nested: tuple[_Field, ...]
    defaulted: tuple[_Field, ...]  # optional on the wire with a default other than None: nil means the default
    metas: tuple[int, ...]  # indices of meta maps, raw on the wire type
    omitted: tuple[int, ...]  # optional fields left off the wire when unset (trajectories only)


def _layout(cls: type) -> _Layout:
    fields = tuple(_field(cls, i, info) for i, info in enumerate(msgspec.structs.fields(cls)))
    optional = [f for f in fields if not f.required]
    required = sorted((f for f in fields if f.required), key=lambda f: f.dtype is None and f.nested is None)
    return _Layout(
        fields,
        tuple(required),
        tuple(f for f in fields if f.dtype is not None),
        tuple(f for f in fields if f.nested is not None),
        tuple(f for f in optional if f.factory or f.default is not None),
        tuple(f.index for f in fields if f.name == "meta"),
        tuple(f.index for f in optional) if cls is Trajectory else (),
    )


def _wire_annotation(annotation: Any) -> Any:
    if annotation in _WIRE_ARRAYS:
        return _WIRE_ARRAYS[annotation]
    if annotation == MetaMap:
        return msgspec.Raw  # read by msgpack (which refuses ext types), and only when present
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return _WIRE_TYPES[annotation]
    args = getattr(annotation, "__args__", None)
    if args and getattr(annotation, "__origin__", None) is list:
        return list[_wire_annotation(args[0])]  # type: ignore[misc]
    if args and type(annotation).__name__ in ("UnionType", "_UnionGenericAlias"):
        if str in args and any(arg in _WIRE_ARRAYS for arg in args):
            return Any  # text or ids (Task.prompt): msgspec cannot tell a str from a bin in a union
        wire_args = [_wire_annotation(arg) for arg in args]
        union = wire_args[0]
        for arg in wire_args[1:]:
            union = union | arg
        return union
    return annotation


def _derive_wire_type(cls: type, kind: str | None) -> type:
    """The Struct `bus.codec` decodes a `cls` from, in the same field order: tagged by `kind` at the top level,
    with `v` last; a group member (kind None) carries its own optional `kind` and `v`; Sampling and TensorSpec
    maps carry neither. Trajectories leave unset optional fields off the wire."""
    fields: list[tuple[Any, ...]] = []
    for info in msgspec.structs.fields(cls):
        wire = _wire_annotation(info.type)
        if info.name in cls.WIRE_REQUIRED:
            fields.append((info.name, wire))
        else:  # absent means nil; msgspec.Raw takes nil as it takes any value
            fields.append((info.name, wire if wire is msgspec.Raw else wire | None, None))
    if kind is not None or cls is Trajectory:
        fields.extend([("v", Any, None)] if kind else [("kind", Any, None), ("v", Any, None)])
    options = {"tag_field": "kind", "tag": kind} if kind else {}
    return msgspec.defstruct(
        f"{cls.__name__}Wire" if kind else f"{cls.__name__}Map", fields, kw_only=not _required_first(cls),
        omit_defaults=cls is Trajectory, **options,
    )  # fmt: skip


def _required_first(cls: type) -> bool:
    """Whether the wire's required fields of `cls` come first (its wire type is then built positionally)."""
    names = [info.name for info in msgspec.structs.fields(cls)]
    return set(names[: len(cls.WIRE_REQUIRED)]) == set(cls.WIRE_REQUIRED)


_WIRE_TYPES: dict[type, type] = {}  # nested Structs -> their untagged map type, filled in dependency order
for _nested in (Sampling, TensorSpec, Trajectory):
    _WIRE_TYPES[_nested] = _derive_wire_type(_nested, None)
WIRE_TYPES: dict[type, type] = {cls: _derive_wire_type(cls, kind) for cls, kind in KINDS.items()}
LAYOUTS: dict[type, _Layout] = {cls: _layout(cls) for cls in (*KINDS, Sampling, TensorSpec)}
# The field names of the wire types built by keyword (those whose required fields do not come first: node events).
_KEYWORDS = {
    wire: tuple(info.name for info in msgspec.structs.fields(wire))
    for cls, wire in [*WIRE_TYPES.items(), *_WIRE_TYPES.items()]
    if not _required_first(cls)
}
_frombuffer = np.frombuffer  # a module global: one attribute look-up less per array on the hot path
_META_OPTIONS = {"raw": False, "strict_map_key": True, "ext_hook": reject_ext, "max_ext_len": 0}


def from_wire(wire: Any, cls: type, prefix: str) -> Any:
    """The message (or nested Struct) `cls` of a decoded wire Struct: nil optional fields get their defaults, bins
    become int32/float32/uint8 views of the bytearrays msgspec copied them into, meta maps are read (by msgpack: no
    ext types)."""
    layout = LAYOUTS[cls]
    values = list(msgspec.structs.astuple(wire))
    for spec in layout.arrays:
        value = values[spec.index]
        if type(value) is bytearray and not len(value) % spec.dtype.itemsize:  # type: ignore[union-attr]
            values[spec.index] = _frombuffer(value, spec.dtype)  # the common case, without building a field path
        elif value is not None and not (spec.text and type(value) is str):
            values[spec.index] = wire_array(value, spec.dtype, prefix + spec.name)  # type: ignore[arg-type]
    for index in layout.metas:
        if values[index] is not None:
            values[index] = msgpack.unpackb(values[index], **_META_OPTIONS)
    for spec in layout.defaulted:
        if values[spec.index] is None:
            values[spec.index] = spec.make_default()
    for spec in layout.nested:
        value = values[spec.index]
        if spec.many:
            values[spec.index] = [
                from_wire(item, spec.nested, f"{prefix}{spec.name}[{i}].") for i, item in enumerate(value)
            ]
        elif value is not None:
            values[spec.index] = from_wire(value, spec.nested, prefix + spec.name + ".")  # type: ignore[arg-type]
    if cls is Trajectory and prefix:  # a group member
        _check_envelope(values[-2], values[-1], prefix)
    return cls(*values[: len(layout.fields)])


def to_wire(msg: Any, member: bool = False) -> Any:
    """The wire Struct of a message (a group member's when `member`): arrays as bin, unset optional trajectory fields
    left off. Values are not checked: an invalid one is written as it is, so that decode names it."""
    cls = type(msg)
    layout = LAYOUTS[cls]
    values = list(msgspec.structs.astuple(msg))
    for spec in layout.arrays:
        value = values[spec.index]
        if value is not None and not (spec.text and type(value) is str):
            values[spec.index] = _bin(value, spec.dtype)  # type: ignore[arg-type]
    for spec in layout.nested:
        value = values[spec.index]
        values[spec.index] = [to_wire(item, True) for item in value] if spec.many else to_wire(value, True)
    for index in layout.omitted:
        if type(values[index]) is dict and not values[index]:
            values[index] = None  # the default: omit_defaults leaves it off
    if member or cls not in WIRE_TYPES:
        wire_type = _WIRE_TYPES[cls]
        values += ["trajectory", SCHEMA_VERSION] if cls is Trajectory else []
    else:
        wire_type = WIRE_TYPES[cls]
        values.append(SCHEMA_VERSION)
    names = _KEYWORDS.get(wire_type)
    return wire_type(*values) if names is None else wire_type(**dict(zip(names, values, strict=True)))


def _bin(value: Any, dtype: np.dtype) -> bytes:
    """The wire bytes of an array field (little-endian `dtype`)."""
    if type(value) is np.ndarray and value.dtype is dtype:
        return value.tobytes()
    return np.asarray(value, dtype).tobytes()


def from_map(wire: Any, cls: type, prefix: str) -> Any:
    """The message (or nested Struct) `cls` of a map as msgpack reads it, nothing checked but its structure: a
    required field missing, a nested map or array that is not one. Arrays are converted, naming what is wrong."""
    if type(wire) is not dict:
        raise MessageError(prefix[:-1], f"must be a map (got {kind_of(wire)})")
    if cls is Trajectory and prefix:  # a group member
        _check_envelope(wire.get("kind"), wire.get("v"), prefix)
    layout = LAYOUTS[cls]
    for spec in layout.required:
        if spec.name not in wire:
            raise MessageError(prefix + spec.name, "required field missing")
    built = []
    for spec in layout.fields:
        where = prefix + spec.name
        value = wire.get(spec.name)
        if value is None and not spec.required:
            value = spec.make_default()
        elif spec.dtype is not None and not (spec.text and type(value) is str):
            value = wire_array(value, spec.dtype, where)
        elif spec.nested is not None and spec.many:
            if type(value) is not list:
                raise MessageError(where, f"must be an array of {_NOUNS[spec.nested]} (got {kind_of(value)})")
            value = [from_map(item, spec.nested, f"{where}[{i}].") for i, item in enumerate(value)]
        elif spec.nested is not None:
            value = from_map(value, spec.nested, where + ".")
        elif spec.name == "version_ranges" and type(value) is list:  # msgpack gives lists; the schema holds tuples
            value = [tuple(triple) if type(triple) is list else triple for triple in value]
        built.append(value)
    return cls(*built)


def _check_envelope(kind: Any, version: Any, prefix: str) -> None:
    """A group member's own kind and v, optional, must be right when present."""
    if kind is not None and kind != "trajectory":
        raise MessageError(prefix + "kind", f"must be 'trajectory' (got {show(kind)})")
    if version is not None and (type(version) is not int or version != SCHEMA_VERSION):
        raise MessageError(prefix + "v", f"unsupported schema version {show(version)}")


# ---------------------------------------------------------------------------------------------------- field rules
_Number = TypeVar("_Number", int, float)
_U32 = np.dtype("<u4")
# float32 bits read as int32: those of LOGPROB_FLOOR, the greatest pattern of a negative float >= the floor.
_LOGPROB_FLOOR_BITS = int(np.array([LOGPROB_FLOOR], "<f4").view("<i4")[0])


def show(value: Any) -> str:
    """A short repr for error messages (a hostile message must not make a huge error text)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def kind_of(value: Any) -> str:
    """The msgpack-ish name of a value's type, for error messages."""
    return "nil" if value is None else type(value).__name__


def error_text(exc: BaseException) -> str:
    """`Type: message` of an exception, for the rule of a MessageError."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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


def _within(value: _Number, field: str, low: float, high: float) -> _Number:
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
    """Named reward components: {non-empty string: finite number within +-MAX_ABS_REWARD}."""
    if type(rewards) is not dict:
        raise MessageError(field, f"must be a map (got {kind_of(rewards)})")
    for name, value in rewards.items():
        if type(name) is not str or not name:
            raise MessageError(field, f"names must be non-empty strings (got {show(name)})")
        if type(value) is not float or not -MAX_ABS_REWARD <= value <= MAX_ABS_REWARD:  # no field path built
            check_real(value, f"{field}.{name}", -MAX_ABS_REWARD, MAX_ABS_REWARD)


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
    """An array field as received: bin (a view of its bytes or bytearray) or a msgpack array of numbers."""
    if type(value) is bytes or type(value) is bytearray:
        if len(value) % dtype.itemsize:
            raise MessageError(field, f"bin length {len(value)} is not a multiple of {dtype.itemsize} ({dtype.name})")
        return np.frombuffer(value, dtype)
    if type(value) is list:
        return _array(value, dtype, field)
    raise MessageError(field, f"must be bin or an array of numbers (got {kind_of(value)})")


def ids_in_range(ids: np.ndarray, vocab_size: int | None) -> bool:
    """Whether int32 token ids [N >= 1] are all >= 0 (and < vocab_size when set), with one numpy reduction."""
    if vocab_size is None:
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
    highest = ids.argmax()
    raise MessageError(field, f"token id {ids[highest]} >= vocab_size {limits.vocab_size} (at position {highest})")


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


# ------------------------------------------------------------------------------------------------- message rules


def check(msg: Any, limits: Limits, prefix: str = "", encoded_size: int | None = None, typed: bool = False) -> None:
    """Raise MessageError naming the first field of `msg` that breaks a rule; else return.

    encoded_size: the size of the bytes it was decoded from (bounds meta). typed: it was decoded by its wire type,
    so its scalar fields already meet their Meta constraints (a trajectory then skips those checks).
    """
    checker = _CHECKS.get(type(msg))
    if checker is None:
        raise MessageError("kind", f"not a message type: {type(msg).__name__}")
    checker(msg, limits, prefix, encoded_size, typed)


def _check_task(task: Task, limits: Limits, prefix: str, encoded_size: int | None, typed: bool) -> None:
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


# A trajectory is "plain" when its required fields certainly pass their rules in their most common form: str names,
# float reward and created_at, int policy_version (all certain once decoded by the wire type), int32/float32 1-D
# arrays whose ids are in range and whose logprobs are all < 0. That is a few comparisons and three numpy
# reductions instead of a dozen checks; whatever is not plain (an int reward, a 0.0 logprob, ids given as a list,
# ...) may still be valid and takes the rule-by-rule path, which also names what is wrong.


def _scalars_are_plain(traj: Trajectory) -> bool:
    """Whether a trajectory's names and numbers certainly pass check_name, check_real and check_integer."""
    id_, group_id, producer, finish_reason = traj.id, traj.group_id, traj.producer, traj.finish_reason
    reward, created_at, version = traj.reward, traj.created_at, traj.policy_version
    return (
        type(id_) is str and 0 < len(id_) <= MAX_NAME_CHARS
        and type(group_id) is str and 0 < len(group_id) <= MAX_NAME_CHARS
        and type(producer) is str and 0 < len(producer) <= MAX_NAME_CHARS
        and type(finish_reason) is str and 0 < len(finish_reason) <= MAX_NAME_CHARS
        and type(reward) is float and -MAX_ABS_REWARD <= reward <= MAX_ABS_REWARD
        and type(created_at) is float and 0.0 <= created_at < math.inf
        and type(version) is int and 0 <= version <= INT64_MAX
    )  # fmt: skip


def _arrays_are_plain(traj: Trajectory, limits: Limits) -> bool:
    prompt, response, logprobs = traj.prompt_ids, traj.response_ids, traj.behavior_logprobs
    max_tokens = limits.max_tokens
    return (
        type(prompt) is np.ndarray and prompt.dtype is WIRE_INT32 and prompt.ndim == 1
        and type(response) is np.ndarray and response.dtype is WIRE_INT32 and response.ndim == 1
        and type(logprobs) is np.ndarray and logprobs.dtype is WIRE_FLOAT32 and logprobs.ndim == 1
        and 0 < len(prompt) <= max_tokens and 0 < len(response) <= max_tokens and len(logprobs) == len(response)
        and ids_in_range(prompt, limits.vocab_size) and ids_in_range(response, limits.vocab_size)
        and all_negative_above_floor(logprobs)
    )  # fmt: skip


def _check_trajectory(traj: Trajectory, limits: Limits, prefix: str, encoded_size: int | None, typed: bool) -> None:
    if not ((typed or _scalars_are_plain(traj)) and _arrays_are_plain(traj, limits)):
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


def _check_trajectory_rules(traj: Trajectory, limits: Limits, prefix: str, encoded_size: int | None) -> None:
    check_name(traj.id, prefix + "id")
    check_name(traj.group_id, prefix + "group_id")
    check_name(traj.producer, prefix + "producer")
    check_tokens(traj.prompt_ids, prefix + "prompt_ids", limits)
    length = len(check_tokens(traj.response_ids, prefix + "response_ids", limits))
    check_logprobs(traj.behavior_logprobs, prefix + "behavior_logprobs", length, prefix + "response_ids")
    if traj.loss_mask is not None:
        check_mask(traj.loss_mask, prefix + "loss_mask", length, prefix + "response_ids")
    check_real(traj.reward, prefix + "reward", -MAX_ABS_REWARD, MAX_ABS_REWARD)
    check_rewards(traj.rewards, prefix + "rewards")
    check_integer(traj.policy_version, prefix + "policy_version")
    if traj.version_ranges is not None:
        check_version_ranges(traj.version_ranges, prefix + "version_ranges", length)
    check_name(traj.finish_reason, prefix + "finish_reason")
    check_real(traj.created_at, prefix + "created_at", 0.0)
    check_meta(traj.meta, prefix + "meta", limits, encoded_size)


def _check_group(group: Group, limits: Limits, prefix: str, encoded_size: int | None, typed: bool) -> None:
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
        _check_trajectory(traj, limits, where + ".", encoded_size, typed)
        if traj.group_id != group.id:
            raise MessageError(where + ".group_id", f"{show(traj.group_id)} != group id {show(group.id)}")
        if traj.id in seen_ids:
            raise MessageError(where + ".id", f"duplicate trajectory id {show(traj.id)} in the group")
        seen_ids.add(traj.id)
    if group.task_id is not None:
        check_name(group.task_id, prefix + "task_id")
    check_real(group.created_at, prefix + "created_at", 0.0)
    check_meta(group.meta, prefix + "meta", limits, encoded_size)


def _check_preference(pref: Preference, limits: Limits, prefix: str, encoded_size: int | None, typed: bool) -> None:
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


def _check_weights(weights: Weights, limits: Limits, prefix: str, encoded_size: int | None, typed: bool) -> None:
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


def _check_node_event(event: NodeEvent, limits: Limits, prefix: str, encoded_size: int | None, typed: bool) -> None:
    check_name(event.node_id, prefix + "node_id")
    check_name(event.role, prefix + "role")
    check_integer(event.version, prefix + "version")
    check_real(event.created_at, prefix + "created_at", 0.0)
    check_meta(event.meta, prefix + "meta", limits, encoded_size)
    if type(event) is Join and event.address is not None:
        check_name(event.address, prefix + "address")


_CHECKS: dict[type, Any] = {
    Task: _check_task,
    Trajectory: _check_trajectory,
    Group: _check_group,
    Preference: _check_preference,
    Weights: _check_weights,
    Join: _check_node_event,
    Leave: _check_node_event,
    Heartbeat: _check_node_event,
}
