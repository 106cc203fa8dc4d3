"""In-process transport: Redis Streams semantics (groups, pending, acks, leases, poison, dead stream, trimming)
in memory, thread-safe, for single-process runs and fast tests (the idea of dramatiq's StubBroker).

Transports built with the same `inproc://NAME` URL share one `InProcBroker`; nothing survives the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from bus.config import BusConfig
from bus.transport.base import BusError, DeadLetter, Delivery, Guarantees, Transport

Fields = dict[str, bytes | str | int | float]


@dataclass(slots=True)
class _Pending:
    consumer: str
    since: float  # time.monotonic() of the last delivery
    count: int  # deliveries so far


@dataclass(slots=True)
class _Group:
    last: int = 0  # sequence number of the last entry delivered to the group
    pending: dict[int, _Pending] = field(default_factory=dict)


@dataclass(slots=True)
class _Stream:
    # Entry seq -> fields. Sequence numbers are 1, 2, 3... per stream and only the oldest are ever removed, so the
    # entries present are exactly the range [first, next_seq).
    entries: dict[int, Fields] = field(default_factory=dict)
    first: int = 1
    next_seq: int = 1
    groups: dict[str, _Group] = field(default_factory=dict)

    def append(self, fields: Fields, retain: int | None) -> int:
        seq = self.next_seq
        self.entries[seq] = fields
        self.next_seq += 1
        if retain is not None:
            self.drop_below(self.next_seq - retain)
        return seq

    def drop_below(self, floor: int) -> None:
        while self.first < min(floor, self.next_seq):
            self.entries.pop(self.first, None)
            self.first += 1


def _entry_id(seq: int) -> str:
    return f"{seq}-0"


def _seq(entry_id: str) -> int:
    try:
        return int(entry_id.split("-", 1)[0])
    except ValueError:
        raise BusError(f"entry_id: {entry_id!r} is not an in-process entry id like '12-0'") from None


class InProcBroker:
    """The shared in-memory state of one `inproc://NAME` bus. All access holds `cond`'s lock."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.streams: dict[str, _Stream] = {}

    def stream(self, name: str) -> _Stream:
        return self.streams.setdefault(name, _Stream())


_BROKERS: dict[str, InProcBroker] = {}
_BROKERS_LOCK = threading.Lock()


def broker(name: str) -> InProcBroker:
    """The broker of `inproc://name`, created on first use."""
    with _BROKERS_LOCK:
        return _BROKERS.setdefault(name, InProcBroker())


class InProcTransport(Transport):
    """A handle on an `InProcBroker`; each handle keeps its own consumers' re-read cursors, like a connection."""

    name = "inproc"
    # Redis Streams' semantics in one process: nothing outlives it, and no store is shared with other processes.
    guarantees = Guarantees(acks=True, redelivery=True, persistence=False, shared_groups=True, ledger=False)

    def __init__(self, config: BusConfig, url: str | None = None) -> None:
        super().__init__(config)
        url = url or config.url or "inproc://default"
        if not url.startswith("inproc://"):
            raise BusError(f"url: the inproc transport needs inproc://NAME, got {url!r}")
        self._broker = broker(url.removeprefix("inproc://") or "default")
        self._history: dict[tuple[str, str, str], int | None] = {}

    def _publish(self, stream: str, payloads: Sequence[bytes], retain: int | None) -> tuple[list[str], int]:
        with self._broker.cond:
            s = self._broker.stream(stream)
            ids = [_entry_id(s.append({"data": bytes(p)}, retain)) for p in payloads]
            self._broker.cond.notify_all()
            return ids, len(s.entries)

    def ensure_group(self, stream: str, group: str) -> None:
        with self._broker.cond:
            s = self._broker.stream(stream)
            s.groups.setdefault(group, _Group(last=s.first - 1))

    def _group(self, stream: str, group: str) -> tuple[_Stream, _Group]:
        s = self._broker.streams.get(stream)
        if s is None or group not in s.groups:
            raise BusError(f"group: no consumer group {group!r} on stream {stream!r} (call ensure_group first)")
        return s, s.groups[group]

    def _consume(self, stream: str, group: str, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        key = (stream, group, consumer)
        deadline = time.monotonic() + block_ms / 1000
        with self._broker.cond:
            s, g = self._group(stream, group)
            cursor = self._history.get(key, 0)
            if cursor is not None:
                mine = sorted(q for q, p in g.pending.items() if p.consumer == consumer and q > cursor)[:count]
                if mine:
                    self._history[key] = mine[-1]
                    return [self._deliver(stream, s, g, q, consumer) for q in mine]
                self._history[key] = None
            while True:
                start = max(g.last + 1, s.first)
                if start < s.next_seq:
                    seqs = range(start, min(start + count, s.next_seq))
                    g.last = seqs[-1]
                    return [self._deliver(stream, s, g, q, consumer) for q in seqs]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._broker.cond.wait(remaining)

    @staticmethod
    def _deliver(stream: str, s: _Stream, g: _Group, seq: int, consumer: str) -> Delivery:
        """Record one more delivery of `seq` to `consumer` (Redis counts re-reads and claims alike)."""
        p = g.pending.get(seq)
        if p is None:
            p = g.pending[seq] = _Pending(consumer, 0.0, 0)
        p.consumer, p.since, p.count = consumer, time.monotonic(), p.count + 1
        return Delivery(stream, _entry_id(seq), bytes(s.entries[seq]["data"]), p.count)

    def _ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        with self._broker.cond:
            _, g = self._group(stream, group)
            for entry_id in entry_ids:
                g.pending.pop(_seq(entry_id), None)

    def _dead_letter_many(self, stream: str, group: str, letters: Sequence[DeadLetter]) -> None:
        with self._broker.cond:
            for letter in letters:
                record: Fields = {k: v for k, v in asdict(letter).items() if k != "entry_id"}
                self._broker.stream(self.config.dead).append(record, self.config.dead_entries)
                self._group(stream, group)[1].pending.pop(_seq(letter.source_entry_id), None)
            self._broker.cond.notify_all()

    def requeue(self, stream: str, group: str, delivery: Delivery, consumer: str | None = None) -> str | None:
        with self._broker.cond:
            s, g = self._group(stream, group)
            held = g.pending.get(_seq(delivery.entry_id))
            if consumer is not None and (held is None or held.consumer != consumer):
                return None
            seq = s.append({"data": delivery.data}, None)
            g.pending.pop(_seq(delivery.entry_id), None)
            self._broker.cond.notify_all()
            return _entry_id(seq)

    def _claim_stale(self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        oldest = time.monotonic() - min_idle_ms / 1000
        with self._broker.cond:
            s, g = self._group(stream, group)
            stale = sorted(q for q, p in g.pending.items() if p.consumer != consumer and p.since <= oldest)[:count]
            return [self._deliver(stream, s, g, q, consumer) for q in stale]

    def read(self, stream: str, after: str, count: int, block_ms: int) -> list[Delivery]:
        deadline = time.monotonic() + block_ms / 1000
        with self._broker.cond:
            s = self._broker.stream(stream)
            start = max(_seq(after) + 1, s.first)
            while start >= s.next_seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._broker.cond.wait(remaining)
                start = max(start, s.first)
            return [
                Delivery(stream, _entry_id(q), bytes(s.entries[q]["data"]))
                for q in range(start, min(start + count, s.next_seq))
            ]

    def length(self, stream: str) -> int:
        with self._broker.cond:
            return len(self._broker.stream(stream).entries)

    def pending(self, stream: str, group: str) -> int:
        with self._broker.cond:
            s = self._broker.streams.get(stream)
            return len(s.groups[group].pending) if s and group in s.groups else 0

    def trim(self, stream: str) -> int:
        with self._broker.cond:
            s = self._broker.stream(stream)
            if s.groups:
                s.drop_below(min(min(g.pending, default=g.last + 1) for g in s.groups.values()))
            return len(s.entries)

    def dead_letters(self, count: int = 100, before: str | None = None) -> list[DeadLetter]:
        with self._broker.cond:
            s = self._broker.stream(self.config.dead)
            end = s.next_seq if before is None else min(s.next_seq, _seq(before))
            seqs = range(max(s.first, end - count), end)
            return [
                DeadLetter(entry_id=_entry_id(q), **s.entries[q])  # type: ignore[arg-type]
                for q in seqs
            ]

    def close(self) -> None:
        """Nothing to release: the broker lives as long as the process, like a server would."""
