"""Consumer layer: decoded, validated, deduplicated messages out of a transport's consumer group.

    consumer = MessageConsumer(transport, config.stream("trajectories"), "learner", "learner-0",
                               kinds=(Group, Trajectory), dedup=RedisDedup(transport, "slipstream:dedup:learner"))
    for received in consumer.poll():
        train_on(received.message)
    consumer.ack(batch)          # after the step that used them: marks them processed, then acks

Whatever cannot be used (undecodable bytes, invalid fields, an unexpected kind) goes to the dead stream with the
codec's "field: rule" text as reason, and polling goes on. Duplicates (a redelivered or republished message whose
id is already processed) are acked without being handed out. Every `claim_interval_s` a poll also takes over
entries whose lease expired on a dead consumer; every `stats_interval_s` it trims acked entries and refreshes the
length and pending gauges.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from bus.codec import Limits, decode, peek
from bus.dedup import Dedup
from bus.schema import KINDS, Message, MessageError
from bus.transport.base import Delivery, Transport
from telemetry.metrics import BUS_MESSAGES, BUS_PENDING, BUS_STREAM_LENGTH

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Received:
    """One decoded message handed to the application; `data` is its wire bytes (kept for nack and requeue)."""

    entry_id: str
    message: Message
    deliveries: int
    data: bytes

    @property
    def id(self) -> str | None:
        """The message's idempotency id (None for weights and node events, which have none)."""
        return getattr(self.message, "id", None)


class MessageConsumer:
    """One consumer of a consumer group on one stream. One thread polls; any thread may settle what it handed out
    (ack, nack, requeue, forget) meanwhile."""

    def __init__(
        self,
        transport: Transport,
        stream: str,
        group: str,
        consumer: str,
        limits: Limits | None = None,
        kinds: tuple[type, ...] | None = None,
        dedup: Dedup | None = None,
    ) -> None:
        self.transport, self.stream, self.group, self.consumer = transport, stream, group, consumer
        cfg = transport.config
        self.limits, self.kinds, self.dedup = limits or cfg.limits(), kinds, dedup
        self.lease_ms, self.claim_interval_s = cfg.lease_ms, cfg.claim_interval_s
        self.stats_interval_s = cfg.stats_interval_s
        # Message id -> entry id of the messages handed out and not yet acked, nacked or requeued: a re-read of
        # the same entry is not handed out twice, and another entry with the same id is a duplicate.
        self._in_flight: dict[str, str] = {}
        self._in_flight_lock = threading.Lock()  # one thread polls while others ack, nack, requeue or forget
        self._next_claim = self._next_stats = time.monotonic()
        transport.ensure_group(stream, group)

    def poll(self, count: int | None = None, block_ms: int | None = None) -> list[Received]:
        """Up to `count` (default `consume_batch`) usable messages, waiting up to `block_ms` (default `block_ms`)
        for new ones; may return fewer, or none, when entries were dead-lettered or duplicates."""
        cfg = self.transport.config
        count = cfg.consume_batch if count is None else count
        block_ms = cfg.block_ms if block_ms is None else block_ms
        now = time.monotonic()
        claim_due = now >= self._next_claim
        # Read before claiming: a consumer's first read re-reads its own pending entries, and re-reading entries it
        # had just claimed would count their deliveries twice (and could call them poison too early).
        wait_ms = 0 if claim_due else block_ms  # claimed entries are not left waiting for new ones
        deliveries = self.transport.consume(self.stream, self.group, self.consumer, count, wait_ms)
        if claim_due:
            self._next_claim = now + self.claim_interval_s
            if len(deliveries) < count:
                stale = self.transport.claim_stale(
                    self.stream, self.group, self.consumer, self.lease_ms, count - len(deliveries)
                )
                deliveries += stale
        if now >= self._next_stats:
            self._next_stats = now + self.stats_interval_s
            self.refresh_stats()
        return self._admit(deliveries)

    def ack(self, received: Received | Sequence[Received]) -> None:
        """Processed: mark the ids in the dedup store first, then ack (a crash in between only means a
        redelivery that dedup recognises)."""
        items = [received] if isinstance(received, Received) else list(received)
        ids = [r.id for r in items if r.id is not None]
        if self.dedup is not None and ids:
            self.dedup.mark(ids)
        self.transport.ack(self.stream, self.group, [r.entry_id for r in items])
        self._release(items)

    def nack(self, received: Received | Sequence[Received], reason: str) -> None:
        """Unusable after all (e.g. too stale to train on): move it to the dead stream with `reason`; several
        entries go in one `dead_letter_many` call (one round trip on Redis), however many there are."""
        items = [received] if isinstance(received, Received) else list(received)
        rejected = [
            (
                Delivery(self.stream, r.entry_id, r.data, r.deliveries),
                reason,
                getattr(r.message, "producer", None) or "",
            )
            for r in items
        ]
        self.transport.dead_letter_many(self.stream, self.group, rejected)
        self._release(items)

    def requeue(self, received: Received) -> str | None:
        """Give it back for any consumer of the group (e.g. this node is shutting down); returns the new entry id, or
        None when another consumer claimed it meanwhile (its lease expired here): it is that consumer's then."""
        delivery = Delivery(self.stream, received.entry_id, received.data, received.deliveries)
        entry_id = self.transport.requeue(self.stream, self.group, delivery, self.consumer)
        self._release([received])
        return entry_id

    def forget(self, received: Received) -> None:
        """Stop holding `received` without settling it here: it was settled by other means (e.g. acked with its
        result by `Transport.publish_and_ack`), or another consumer claimed it."""
        self._release([received])

    def refresh_stats(self) -> None:
        """Trim entries every group has acked, then publish the stream length and this group's pending count."""
        BUS_STREAM_LENGTH.labels(self.stream).set(self.transport.trim(self.stream))
        BUS_PENDING.labels(self.stream, self.group).set(self.transport.pending(self.stream, self.group))

    def _release(self, items: Sequence[Received]) -> None:
        with self._in_flight_lock:
            for r in items:
                if r.id is not None and self._in_flight.get(r.id) == r.entry_id:
                    del self._in_flight[r.id]

    def _admit(self, deliveries: list[Delivery]) -> list[Received]:
        """Decode, validate and dedup; dead-letter what is unusable and ack duplicates."""
        decoded: list[tuple[Delivery, Message]] = []
        rejected: list[tuple[Delivery, str, str]] = []  # dead-lettered together: one round trip per poll
        for d in deliveries:
            try:
                message = decode(d.data, self.limits)
            except MessageError as exc:
                producer = str(peek(d.data).get("producer", ""))  # best effort: who to blame
                rejected.append((d, str(exc), producer))
                continue
            if self.kinds is not None and not isinstance(message, self.kinds):
                expected = sorted(KINDS[k] for k in self.kinds)
                reason = f"kind: expected one of {expected} on {self.stream}, got {KINDS[type(message)]!r}"
                rejected.append((d, reason, getattr(message, "producer", "")))
                continue
            decoded.append((d, message))
        self.transport.dead_letter_many(self.stream, self.group, rejected)
        ids = [getattr(m, "id", None) for _, m in decoded]
        with self._in_flight_lock:
            fresh = [i for i in ids if i is not None and i not in self._in_flight]
        marked = dict(zip(fresh, self.dedup.seen(fresh), strict=True)) if self.dedup is not None and fresh else {}
        out: list[Received] = []
        duplicates: list[str] = []
        with self._in_flight_lock:
            for (d, message), mid in zip(decoded, ids, strict=True):
                if mid is not None:
                    held = self._in_flight.get(mid)
                    if held == d.entry_id:
                        continue  # re-read of an entry the application still holds
                    if held is not None or marked.get(mid):
                        duplicates.append(d.entry_id)
                        continue
                    self._in_flight[mid] = d.entry_id
                out.append(Received(d.entry_id, message, d.deliveries, d.data))
        if duplicates:
            BUS_MESSAGES.labels(self.stream, "duplicate").inc(len(duplicates))
            log.info("duplicates acked", stream=self.stream, count=len(duplicates))
            self.transport.ack(self.stream, self.group, duplicates)
        return out
