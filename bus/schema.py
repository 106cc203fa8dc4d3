"""The messages that travel on the bus, as plain dataclasses (numpy only, no torch).

The wire form of each message (a msgpack map) and every validation rule live in `bus.codec` and in
docs/wire-protocol.md; this module only says what a message holds. Array fields hold 1-D numpy arrays:
token ids int32, log-probabilities float32, masks uint8 (`bus.codec.validate` also accepts lists and other
integer/float dtypes and converts them when encoding). Times are seconds since the Unix epoch.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

# A log-probability cannot be positive; this much above 0 is tolerated as floating-point noise.
LOGPROB_TOLERANCE = 1e-4
# No sampler draws a token of probability e^-1000 (it underflows every float): a lower log-probability is a producer's
# bug, and one of -3.4e38 would turn importance weights and KL metrics into infinities.
LOGPROB_FLOOR = -1000.0
# Rewards are bounded so group advantages (r - mean, divided by a std of squares) stay finite and exact in float64.
MAX_ABS_REWARD = 1e9

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


@dataclass(slots=True)
class Sampling:
    """Sampling parameters of a task (SGLang/vLLM names). top_k -1 means no top-k; seed None means random."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None


@dataclass(slots=True)
class Task:
    """A prompt to sample `n` completions of; it yields one `Group`.

    prompt: text, or token ids int32 [P]. meta: msgpack-able data for the reward (ground truth, task name, ...).
    min_version: the lowest policy version allowed to serve it.
    """

    id: str
    prompt: str | np.ndarray
    n: int = 1
    sampling: Sampling = field(default_factory=Sampling)
    meta: dict[str, Any] = field(default_factory=dict)
    min_version: int = 0
    created_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class Trajectory:
    """One sampled completion with what the learner needs to train on it off-policy.

    prompt_ids: int32 [P]; response_ids: int32 [T]; behavior_logprobs: float32 [T], the sampling policy's
    log-probability of each response token; loss_mask: uint8 [T] (1 = train on the token, 0 = tool or environment
    token) or None (all 1). version_ranges: (start, end, version) triples over response positions, contiguous and
    covering [0, T), when the weights changed during generation; None means all T tokens came from policy_version.
    id is the idempotency key: a trajectory id is trained at most once.
    """

    id: str
    group_id: str
    producer: str
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    behavior_logprobs: np.ndarray
    loss_mask: np.ndarray | None = None
    reward: float = 0.0
    rewards: dict[str, float] = field(default_factory=dict)
    policy_version: int = 0
    version_ranges: list[tuple[int, int, int]] | None = None
    finish_reason: str = "stop"
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)

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


@dataclass(slots=True)
class Group:
    """The completions of one prompt (GRPO needs whole groups); every member's group_id equals `id`."""

    id: str
    producer: str
    trajectories: list[Trajectory]
    task_id: str | None = None
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Preference:
    """A DPO pair: prompt_ids int32 [P], chosen_ids int32 [C], rejected_ids int32 [R].

    ref_chosen_logp / ref_rejected_logp: the reference model's summed log-probability of each response, or None
    (the learner then computes them).
    """

    id: str
    producer: str
    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class TensorSpec:
    """One named tensor of a weights update: dtype is a `DTYPE_SIZES` key, shape its dimensions."""

    name: str
    dtype: str
    shape: list[int]

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


@dataclass(slots=True)
class Weights:
    """Announcement of weights update `version` on broadcast group `group`.

    buckets[b]: indices into `tensors` sent flattened together as bucket b (one dtype per bucket, buckets in send
    order, tensors in bucket order); bucket_bytes[b] == sum of their nbytes. checksum: how the receiver verifies
    the buckets, "<algorithm>:<digest of bucket 0>,<digest of bucket 1>,..." by convention (see
    docs/wire-protocol.md); the empty string means unverified.
    """

    version: int
    tensors: list[TensorSpec]
    buckets: list[list[int]]
    bucket_bytes: list[int]
    checksum: str
    group: str
    created_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class NodeEvent:
    """Control-stream news about a node: role is "learner", "rollout", "agent", ...; version its policy version."""

    node_id: str
    role: str
    version: int = 0
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Join(NodeEvent):
    """A node joined; address (e.g. "host:port" of its engine or weight receiver) if others must reach it."""

    address: str | None = None


@dataclass(slots=True)
class Leave(NodeEvent):
    """A node is leaving on purpose (a node that dies just stops sending heartbeats)."""


@dataclass(slots=True)
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
