"""The transport contract: streams of opaque byte payloads, consumer groups, acks, leases and a dead stream.

Transports move BYTES; decoding and validation live a floor above (`bus.consumer`). Semantics follow Redis Streams:

- `publish` appends payloads to a stream and waits (backpressure) while the stream is full.
- A consumer group delivers each entry to one consumer of the group; the entry stays *pending* until acked.
- `consume` first re-reads the caller's own pending entries (after a restart or reconnect), then new ones.
- `claim_stale` takes over entries whose lease expired (their consumer died); an entry delivered more than
  `max_deliveries` times is moved to the dead stream instead (a poison message must not loop forever).
- `dead_letter` copies an entry to the dead stream with a reason and acks it.
"""

from __future__ import annotations

import hashlib
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Protocol, TypeVar

import structlog
from prometheus_client import Counter

from bus.codec import member_count
from bus.config import MAX_REASON_CHARS, BusConfig
from bus.settings import ConfigError
from telemetry.metrics import BUS_BACKPRESSURE_WAIT, BUS_MESSAGES

log = structlog.get_logger(__name__)

# How often a producer waiting for room on a full stream polls it (jittered +-50%): every waiter at the same pace.
ROOM_POLL_S = 0.02
T = TypeVar("T")


class BusError(RuntimeError):
    """Base of transport errors."""


class BackpressureTimeout(BusError):
    """A publish waited `backpressure_timeout_s` for a full stream to drain and gave up."""

    def __init__(
        self, stream: str, length: int, limit: int, waited_s: float, limit_name: str = "max_stream_length"
    ) -> None:
        super().__init__(
            f"stream {stream!r} still holds {length} entries ({limit_name}={limit}) after waiting "
            f"{waited_s:.1f}s: its consumers are not keeping up (or no consumer group reads it)"
        )
        self.stream, self.length, self.limit, self.waited_s = stream, length, limit, waited_s


class BusUnavailable(BusError):
    """The bus stayed unreachable for `reconnect_timeout_s`."""


class BusPermissionDenied(BusError):
    """The bus user may not run this command on this key (Redis ACL NOPERM); see docs/security.md."""


@dataclass(frozen=True)
class Guarantees:
    """What a transport promises. Nodes ask for these (`Transport.guarantees`, `Transport.ledger()`), never for a
    transport class; docs/wire-protocol.md has the table.

    acks: a delivered entry stays pending until acked; `ack`, `nack` (to the dead stream) and `requeue` are real.
    redelivery: the pending entries of a consumer that stopped are claimed by another after their lease
    (`claim_stale`), so a dead rollout node's tasks are done by the others.
    persistence: entries outlive every process that handled them (a broker; with its AOF also its restart).
    shared_groups: several consumer processes read one consumer group, each entry delivered to one of them
    (learner ranks, rollout nodes on one task stream).
    ledger: a store shared by every node, where accounting counts and trained-once marks are kept exactly once
    (`ledger()`); without it each process counts what it saw, and dedup is per process.
    """

    acks: bool
    redelivery: bool
    persistence: bool
    shared_groups: bool
    ledger: bool

    def require(self, transport: str, needs: dict[str, str]) -> None:
        """Raise ConfigError naming `bus.type` when a guarantee in `needs` (name -> what needs it) is missing."""
        missing = [f"{name} (for {why})" for name, why in needs.items() if not getattr(self, name)]
        if missing:
            raise ConfigError(
                f'bus.type: {transport} does not guarantee {", ".join(missing)}; use bus.type = "redis" '
                '(docs/wire-protocol.md, "What each transport guarantees")'
            )


class LedgerStore(Protocol):
    """The shared store of `Guarantees.ledger`: a redis-py client on the bus's Redis and the transport's reconnecting
    call wrapper."""

    client: Any

    def retrying(self, op: Callable[[], T]) -> T: ...


@dataclass(slots=True)
class Delivery:
    """One entry handed to a consumer. `deliveries` counts how often it was delivered (1 = first time)."""

    stream: str
    entry_id: str
    data: bytes
    deliveries: int = 1


@dataclass(slots=True)
class DeadLetter:
    """One entry of the dead stream: the rejected payload and why, where from, by whom, when (unix seconds).

    data: the payload, or its first `bus.dead_payload_bytes` when it was larger; size and sha256 (hex) are the
    whole payload's. members: the trajectories it stands for (a group's members, else 1), read from the whole
    payload, for the accounting."""

    entry_id: str
    data: bytes
    reason: str
    stream: str
    group: str
    source_entry_id: str
    producer: str
    deliveries: int
    time: float
    size: int = 0
    sha256: str = ""
    members: int = 1

    @property
    def truncated(self) -> bool:
        """Whether `data` is only a prefix of the payload."""
        return self.size > len(self.data)


class Transport(ABC):
    """A connection to the bus. Thread-safe: one instance may serve a producer thread and a consumer thread.

    The public methods here count metrics, apply backpressure and screen poison entries once for every transport;
    a transport implements the `_`-prefixed primitives.
    """

    name: str = "transport"
    guarantees: ClassVar[Guarantees]

    def ledger(self) -> LedgerStore | None:
        """The shared store for exactly-once accounting and dedup, when `guarantees.ledger` (else None)."""
        return None

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        # Last observed length per stream: a publish only polls the server while this says "full".
        self._lengths: dict[str, int] = {}
        self._taking_turns: set[str] = set()  # streams this producer found nearly full: see `_wait_for_room`
        # BUS_MESSAGES children by (stream, event): labels() takes a lock and builds a key on every call.
        self._counters: dict[tuple[str, str], Counter] = {}

    def publish(self, stream: str, payloads: Sequence[bytes], *, retain: int | None = None) -> list[str]:
        """Append `payloads` in one round trip and return their entry ids.

        Without `retain`, first waits while the stream holds `max_stream_length` entries or more (trimming acked
        entries while it waits), raising `BackpressureTimeout` after `backpressure_timeout_s`; a stream may
        overshoot the limit by at most one batch per concurrent producer. With `retain`, never waits: the stream
        is capped at about `retain` entries by dropping the oldest (broadcast streams such as control).
        """
        if not payloads:
            return []
        if retain is None:
            self._make_room(stream)
        ids, self._lengths[stream] = self._publish(stream, payloads, retain)
        self._count(stream, "published", len(ids))
        return ids

    def publish_and_ack(
        self,
        stream: str,
        payloads: Sequence[bytes],
        source: Delivery,
        group: str,
        consumer: str,
        counter: tuple[str, str, int] | None = None,
    ) -> list[str] | None:
        """Publish `payloads` to `stream` as the result of `source` (an entry `consumer` holds in `group`) and ack
        `source`; returns the entry ids, or None when nothing was published because `consumer` no longer holds
        `source` (its lease expired and another consumer claimed it, or it was settled already).

        Redis does it as one transaction after checking that `consumer` still holds `source`, with `counter`
        (hash key, field, amount) incremented in it: a crash leaves the result published and the entry acked, or
        neither, so a redelivered entry never yields a second copy of a result already out. Other transports
        publish, then ack, and ignore `counter`. Waits for room like `publish`."""
        ids = self.publish(stream, payloads)
        self.ack(source.stream, group, [source.entry_id])
        return ids

    def consume(self, stream: str, group: str, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` entries for `consumer`: its own pending ones first (once per (re)connection), then new
        ones, waiting up to `block_ms` for new ones. Poison entries (delivered more than `max_deliveries` times)
        are dead-lettered, not returned."""
        return self._screen(stream, group, self._consume(stream, group, consumer, count, block_ms))

    def claim_stale(self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """Take over up to `count` entries pending on OTHER consumers for `min_idle_ms` or more (presumed dead).
        Entries delivered more than `max_deliveries` times go to the dead stream instead."""
        return self._screen(stream, group, self._claim_stale(stream, group, consumer, min_idle_ms, count))

    def ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        """Mark entries processed (one round trip); acking an unknown or already acked id is a no-op."""
        if entry_ids:
            self._ack(stream, group, entry_ids)
            self._count(stream, "acked", len(entry_ids))

    def dead_letter(
        self, stream: str, group: str, delivery: Delivery, reason: str, producer: str | None = None
    ) -> None:
        """Copy `delivery` to the dead stream with `reason` and ack it, atomically where the transport allows."""
        self.dead_letter_many(stream, group, [(delivery, reason, producer or "")])

    def dead_letter_many(self, stream: str, group: str, rejected: Sequence[tuple[Delivery, str, str]]) -> None:
        """`dead_letter` for several entries, each given as (delivery, reason, producer), in one round trip where
        the transport allows. Logged as one line naming the first: a flood of bad messages must cost neither a
        round trip nor a log line per message (the dead stream holds every one with its reason)."""
        if not rejected:
            return
        cap, now = self.config.dead_payload_bytes, time.time()
        letters = [
            DeadLetter(
                entry_id="",  # the dead stream's, given by the transport
                data=delivery.data[:cap],
                reason=reason[:MAX_REASON_CHARS],
                stream=stream,
                group=group,
                source_entry_id=delivery.entry_id,
                producer=producer,
                deliveries=delivery.deliveries,
                time=now,
                size=len(delivery.data),
                sha256=hashlib.sha256(delivery.data).hexdigest(),
                members=member_count(delivery.data) or 1,  # walked, never decoded: the payload may be hostile
            )
            for delivery, reason, producer in rejected
        ]
        self._dead_letter_many(stream, group, letters)
        self._count(stream, "dead_lettered", len(rejected))
        delivery, reason, _ = rejected[0]
        log.warning(
            "dead-lettered", stream=stream, group=group, count=len(rejected), entry_id=delivery.entry_id, reason=reason
        )

    @abstractmethod
    def requeue(self, stream: str, group: str, delivery: Delivery, consumer: str | None = None) -> str | None:
        """Give an entry back to any consumer of the group: re-append its payload (new entry id, returned) and
        ack the old one, atomically where the transport allows. Never waits for backpressure (not new load). With
        `consumer`, only while that consumer still holds the entry (where the transport tracks it): an entry whose
        lease expired and that another consumer claimed is that one's now, and re-appending it would run it twice;
        None then."""

    @abstractmethod
    def ensure_group(self, stream: str, group: str) -> None:
        """Create the consumer group (and the stream) if missing; a new group starts at the stream's first entry."""

    @abstractmethod
    def read(self, stream: str, after: str, count: int, block_ms: int) -> list[Delivery]:
        """Broadcast read without a group: up to `count` entries after entry id `after` ("0" = from the start),
        waiting up to `block_ms`. Nothing is pending or acked."""

    @abstractmethod
    def length(self, stream: str) -> int:
        """Entries in the stream (acked ones included until trimmed)."""

    @abstractmethod
    def pending(self, stream: str, group: str) -> int:
        """Entries delivered to the group and not acked yet."""

    @abstractmethod
    def trim(self, stream: str) -> int:
        """Drop the entries that every group of the stream has been delivered AND has acked, and return the length
        afterwards. A stream without any group is left whole (nobody has read it yet)."""

    @abstractmethod
    def dead_letters(self, count: int = 100, before: str | None = None) -> list[DeadLetter]:
        """The newest `count` dead letters (older than entry id `before`, when given: the next page back), oldest
        first."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and sockets; the transport cannot be used afterwards."""

    @abstractmethod
    def _publish(self, stream: str, payloads: Sequence[bytes], retain: int | None) -> tuple[list[str], int]:
        """Append without waiting; return (entry ids, stream length afterwards)."""

    @abstractmethod
    def _consume(self, stream: str, group: str, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """`consume` before poison screening."""

    @abstractmethod
    def _claim_stale(self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """`claim_stale` before poison screening; each returned delivery counts this claim."""

    @abstractmethod
    def _ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        """`ack` without metrics."""

    @abstractmethod
    def _dead_letter_many(self, stream: str, group: str, letters: Sequence[DeadLetter]) -> None:
        """Append `letters` to the dead stream (each gets its entry id there) and ack their source entries, in one
        round trip and atomically where the transport allows; no metrics, no logs."""

    def _screen(self, stream: str, group: str, deliveries: list[Delivery]) -> list[Delivery]:
        """Dead-letter poison entries, count the rest as consumed (and redelivered), return the rest."""
        limit = self.config.max_deliveries
        redelivered, poison = 0, []
        for d in deliveries:  # one cheap pass: almost every entry is a first delivery
            if d.deliveries > 1:
                redelivered += 1
                if d.deliveries > limit:
                    poison.append(d)
        self.dead_letter_many(
            stream, group, [(d, f"deliveries: {d.deliveries} > max_deliveries ({limit})", "") for d in poison]
        )
        kept = [d for d in deliveries if d.deliveries <= limit] if poison else deliveries
        if kept:
            self._count(stream, "consumed", len(kept))
            if redelivered > len(poison):
                self._count(stream, "redelivered", redelivered - len(poison))
        return kept

    def _count(self, stream: str, event: str, n: int) -> None:
        """BUS_MESSAGES{stream, event} += n."""
        counter = self._counters.get((stream, event))
        if counter is None:
            counter = self._counters[(stream, event)] = BUS_MESSAGES.labels(stream, event)
        counter.inc(n)

    def _make_room(self, stream: str) -> None:
        """Backpressure before appending: wait while `stream` was full when last seen, or while this producer is
        taking turns with others for room on it (see `_wait_for_room`)."""
        if stream in self._taking_turns or self._lengths.get(stream, 0) >= self.config.max_stream_length:
            self._wait_for_room(stream)

    def _wait_for_room(self, stream: str) -> None:
        """Poll (trimming acked entries) until the stream is below `max_stream_length`, fairly among producers.

        Every waiting producer polls at the same jittered interval (a backoff that grows would favour whoever began
        waiting last), and one that found room takes turns: one batch per poll interval while the stream stays over
        half full, instead of filling all the room it found before the others poll again."""
        limit, timeout = self.config.max_stream_length, self.config.backpressure_timeout_s
        started = time.monotonic()
        turn = stream in self._taking_turns  # it published at its last poll: the others poll first
        try:
            while True:
                if turn:
                    left = timeout - (time.monotonic() - started)
                    time.sleep(max(0.0, min(ROOM_POLL_S * random.uniform(0.5, 1.5), left)))
                turn = True
                length = self._lengths[stream] = self.trim(stream)
                if length < limit:
                    break
                waited = time.monotonic() - started
                if waited >= timeout:
                    raise BackpressureTimeout(stream, length, limit, waited)
            if length > limit // 2:
                self._taking_turns.add(stream)
            else:
                self._taking_turns.discard(stream)
        finally:
            BUS_BACKPRESSURE_WAIT.labels(stream).inc(time.monotonic() - started)

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Backoff:
    """Exponential backoff between `low` and `high` seconds: `next()` sleeps and doubles the wait.

    Used for reconnection and for polling a full stream; `elapsed` says how long since the first wait began.
    """

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.delay = low
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def sleep(self, limit_s: float | None = None) -> float:
        """Sleep the current delay (never past `limit_s` seconds since the start) and return how long it slept."""
        delay = self.delay
        if limit_s is not None:
            delay = max(0.0, min(delay, limit_s - self.elapsed))
        time.sleep(delay)
        self.delay = min(self.delay * 2, self.high)
        return delay
