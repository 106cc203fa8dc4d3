"""The `[bus]` config section: which transport, where it is, stream names, flow control, leases and codec limits.

Torch-free and import-light: every node's settings class embeds `BusConfig` as its `bus` section.

    [bus]
    type = "redis"
    url = "redis://redis:6379/0"   # omit for the embedded Redis that `slipstream up` starts
    max_stream_length = 100000
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from bus.settings import ENV_NAME_PATTERN, Section, read_secret

if TYPE_CHECKING:
    from bus.codec import Limits

StreamName = Literal["tasks", "trajectories", "control", "dead"]
# A dead letter's fields besides its payload: the reason (cut to MAX_REASON_CHARS), stream, group, ids, producer,
# counts, time and digest, with Redis's per-entry overhead: what `dead_max_bytes` reserves for each entry.
DEAD_RECORD_BYTES = 2048
MAX_REASON_CHARS = 1024


class BusConfig(Section):
    """Everything a transport needs. Stream keys are `prefix + <name>_stream`, e.g. `slipstream:tasks`."""

    type: Literal["redis", "zmq", "inproc"] = Field(
        "redis", description="transport: redis (Redis Streams), zmq (ZeroMQ PUSH/PULL), inproc (in-memory, one process)"
    )
    url: str | None = Field(
        None,
        max_length=2048,
        description="redis://host:port/db or rediss:// (TLS) for redis; inproc://name for inproc; "
        "None means the embedded Redis that the node launcher starts",
    )
    username: str | None = Field(None, max_length=256, description="Redis ACL user name (None: the default user)")
    password_file: str | None = Field(
        None, max_length=4096, description="file holding the Redis password (first line); takes precedence over env"
    )
    password_env: str = Field(
        "SLIPSTREAM_BUS_PASSWORD",
        min_length=1,
        max_length=256,
        pattern=ENV_NAME_PATTERN,
        description="environment variable read for the Redis password when no password_file is set",
    )
    tls_ca_file: str | None = Field(None, max_length=4096, description="CA bundle to verify a rediss:// server")

    prefix: str = Field("slipstream:", max_length=128, description="prefix of every stream key")
    tasks_stream: str = Field("tasks", min_length=1, max_length=128, description="prompt tasks, learner -> rollout")
    trajectories_stream: str = Field(
        "trajectories", min_length=1, max_length=128, description="trajectory groups, rollout/agents -> learner"
    )
    control_stream: str = Field(
        "control", min_length=1, max_length=128, description="weight versions, joins, leaves, heartbeats (broadcast)"
    )
    dead_stream: str = Field("dead", min_length=1, max_length=128, description="rejected messages with their reason")

    max_stream_length: int = Field(
        100_000, ge=1, le=100_000_000, description="publish waits while a stream holds this many entries (backpressure)"
    )
    backpressure_timeout_s: float = Field(
        60.0, gt=0, le=86_400, description="a publish waiting on a full stream raises BackpressureTimeout after this"
    )
    control_retain: int = Field(
        10_000, ge=1, le=10_000_000, description="entries kept on the control stream (older ones are dropped by design)"
    )
    dead_retain: int = Field(
        100_000, ge=1, le=100_000_000, description="entries kept on the dead stream (older ones are dropped by design)"
    )
    dead_payload_bytes: int = Field(
        16_384,
        ge=256,
        le=2**31 - 1,
        description="a dead letter keeps at most this prefix of its payload (with the full size and SHA-256)",
    )
    dead_max_bytes: int = Field(
        2**30,
        ge=2**20,
        le=2**40,
        description="the dead stream's bound in bytes: it keeps at most dead_max_bytes // ((dead_payload_bytes + "
        "2 KiB) x 1.25) entries (a dead letter's fields take under 2 KiB; the allocator rounds up), if < dead_retain",
    )
    block_ms: int = Field(1000, ge=0, le=60_000, description="how long a consumer poll waits for new entries")
    lease_ms: int = Field(
        60_000,
        ge=10,
        le=86_400_000,
        description="an entry delivered but not acked for this long is reclaimed by another consumer",
    )
    claim_interval_s: float = Field(
        5.0, gt=0, le=3600, description="how often a consumer looks for entries whose lease expired"
    )
    max_deliveries: int = Field(
        5, ge=1, le=1000, description="an entry delivered more often than this is a poison message: dead-lettered"
    )
    publish_batch: int = Field(256, ge=1, le=100_000, description="messages per pipelined publish round trip")
    consume_batch: int = Field(256, ge=1, le=100_000, description="entries per consumer poll")
    stats_interval_s: float = Field(
        5.0, gt=0, le=3600, description="how often consumers refresh length/pending gauges and trim acked entries"
    )
    reconnect_min_s: float = Field(0.05, gt=0, le=60, description="first wait before reconnecting to a lost bus")
    reconnect_max_s: float = Field(5.0, gt=0, le=600, description="longest wait between reconnection attempts")
    reconnect_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="give up (BusUnavailable) when the bus stays unreachable this long"
    )
    socket_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="a Redis reply slower than this (beyond a poll's block time) is a dead peer"
    )

    zmq_endpoint: str = Field(
        "tcp://127.0.0.1:5555",
        min_length=1,
        max_length=2048,
        description="ZeroMQ endpoint: the consumer binds it (PULL), producers connect to it (PUSH)",
    )
    zmq_sndhwm: int = Field(1000, ge=1, le=10_000_000, description="messages a producer queues before send blocks")
    zmq_rcvhwm: int = Field(1000, ge=1, le=10_000_000, description="messages a consumer queues per producer")
    zmq_linger_ms: int = Field(
        1000, ge=0, le=600_000, description="how long close() keeps trying to deliver queued messages"
    )
    zmq_curve_secret_key_file: str | None = Field(
        None,
        max_length=4096,
        description="this side's CURVE certificate with its secret key (zmq.auth format); setting it enables CURVE",
    )
    zmq_curve_server_key_file: str | None = Field(
        None, max_length=4096, description="producer side: the consumer's public CURVE certificate"
    )
    zmq_curve_allowed_keys_dir: str | None = Field(
        None, max_length=4096, description="consumer side: directory of the public certificates of allowed producers"
    )

    max_message_bytes: int = Field(
        16 * 2**20, ge=1024, le=2**31 - 1, description="a message larger than this (bytes) is rejected by the codec"
    )
    max_tokens: int = Field(131_072, ge=1, le=2**31 - 1, description="most tokens in one sequence of a message")
    max_group_size: int = Field(1024, ge=1, le=1_000_000, description="most trajectories in a group (and task n)")
    max_meta_bytes: int = Field(65_536, ge=1, le=2**31 - 1, description="largest encoded `meta` map of a message")
    vocab_size: int | None = Field(
        None, ge=1, le=2**31 - 1, description="token ids must be below this (None: not checked)"
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> BusConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s: must be <= reconnect_max_s ({self.reconnect_min_s} > {self.reconnect_max_s})"
            )
        if self.block_ms / 1000 >= self.socket_timeout_s:
            raise ValueError(
                f"block_ms: a poll's block time ({self.block_ms} ms) must be shorter than socket_timeout_s "
                f"({self.socket_timeout_s} s) or every idle poll would look like a dead server"
            )
        curve_keys = self.zmq_curve_server_key_file or self.zmq_curve_allowed_keys_dir
        if self.zmq_curve_secret_key_file is None and curve_keys:
            raise ValueError("zmq_curve_secret_key_file: required when a CURVE server key or allow-list is set")
        names = [self.tasks_stream, self.trajectories_stream, self.control_stream, self.dead_stream]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks_stream/trajectories_stream/control_stream/dead_stream: must differ, got {names}")
        return self

    def stream(self, name: StreamName) -> str:
        """The full stream key of a named stream, e.g. `stream("tasks") == "slipstream:tasks"`."""
        return self.prefix + getattr(self, f"{name}_stream")

    @property
    def dead(self) -> str:
        """Full key of the dead-letter stream."""
        return self.stream("dead")

    @property
    def dead_entries(self) -> int:
        """Entries the dead stream keeps: `dead_retain`, fewer where `dead_max_bytes` bounds them (each takes at most
        `dead_entry_bytes`)."""
        return max(1, min(self.dead_retain, self.dead_max_bytes // self.dead_entry_bytes))

    @property
    def dead_entry_bytes(self) -> int:
        """The most Redis memory one dead letter takes: its payload prefix and fields, rounded up as the allocator's
        size classes do (by up to a quarter)."""
        return (self.dead_payload_bytes + DEAD_RECORD_BYTES) * 5 // 4

    def limits(self) -> Limits:
        """The codec limits these settings describe."""
        from bus.codec import Limits  # here, not at the top: the codec pulls numpy, config stays import-light

        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_tokens=self.max_tokens,
            max_group_size=self.max_group_size,
            max_meta_bytes=self.max_meta_bytes,
            vocab_size=self.vocab_size,
        )

    def password(self) -> str | None:
        """The Redis password: first line of `password_file`, else `$password_env`, else None (never from argv)."""
        return read_secret(self.password_file, self.password_env, "password_file", "password")
