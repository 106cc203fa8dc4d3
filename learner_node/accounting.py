"""Accounting: every trajectory published on the trajectories stream ends trained, or dropped with a reason.

The Redis hash `<bus.prefix>accounting` (e.g. `slipstream:accounting`) holds integer fields:

    published                  a rollout node's answer to a task in the publish's own MULTI; other producers
                                 HINCRBY it right after each successful publish
    trained                    the learner, in ONE MULTI with the step's XACKs and dedup marks (`settle`)
    dropped:duplicate          same MULTI: members of a group whose trajectory id was trained already
    dropped:zero_variance      settled like trained ones (`settle(..., outcome=...)`): groups whose rewards were all
                                 equal, filtered by dynamic sampling before any step (they carry no GRPO signal)
    dropped:stale              the learner dead-letters the message (`drop`: XADD dead + XACK, atomic) and
    dropped:future_version       counts it from the dead stream (`scan_dead`): too old, newer than the learner,
    dropped:incomplete_group     fewer members than min_group_size, or in a step whose gradient was not finite
    dropped:nonfinite_gradient
    dropped:invalid            the consumer dead-lettered it (undecodable, invalid field, unexpected kind)
    dropped:poison             the consumer dead-lettered it after max_deliveries deliveries

`scan_dead` reads the dead stream after a cursor (`<prefix>accounting:dead_cursor`) and moves the cursor in the
same transaction as the HINCRBYs (WATCH/MULTI), so a learner killed at any point neither loses nor double-counts.
The settle MULTI's HINCRBYs run in a script guarded by a one-time token, so a MULTI retried after a lost reply
counts once. At quiescence: published == trained + sum(dropped:*); while running, the difference is `in_flight`
(entries not delivered or not acked yet). A producer killed between its XADD and its HINCRBY leaves trajectories
that count as trained or dropped but not as published: that window is the producer's, and tiny.

Entries re-delivered as copies of what was settled already are released without counting (they were published
once). Other transports than Redis have no hash: only the Prometheus counters count there.

The admission's state lives next to it, in the hash `<prefix>admission:<run>` (see admission.py): written with each
batch of tasks (`publish_tasks`, one MULTI with a one-time token of the batch, checked before a retry, so a batch
whose reply was lost is not published twice), its `trained` and `dropped` task counters moved by the same
transactions as the trajectory counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import structlog
from redis.exceptions import WatchError

from bus.codec import decode, encode, member_count
from bus.consumer import MessageConsumer, Received
from bus.dedup import Dedup, RedisDedup
from bus.schema import Group, MessageError, Task, new_id
from bus.transport.base import Transport
from learner_node.groups import Unit
from telemetry.metrics import BUS_MESSAGES, LEARNER_DROPPED_SAMPLES

log = structlog.get_logger(__name__)

# The reasons of the learner's own dead letters ("<reason>: detail").
LEARNER_REASONS = ("stale", "future_version", "incomplete_group", "nonfinite_gradient")
CONSUMER_REASONS = ("invalid", "poison")  # the consumer's dead letters: a broken message, or too many deliveries
# Every reason a trajectory is dropped for: the `dropped:<reason>` fields of the hash and the `reason` label values of
# slipstream_learner_dropped_samples_total (telemetry creates each series at 0, so rate() and alerts see a first drop).
FILTERED = "zero_variance"  # dynamic sampling's groups: settled (acked, marked, counted), not dead-lettered
DROP_REASONS = ("duplicate", FILTERED, *LEARNER_REASONS, *CONSUMER_REASONS)
TOKEN_TTL_S = 86_400  # one-time tokens (settles, batches of tasks) outlive any retry by far
# KEYS[1] a one-time token, KEYS[2..] hashes; ARGV[1] the token's ttl, then (hash index in KEYS, field, amount)
# triples. The HINCRBYs run once per token, however often the transaction holding the script is retried.
_GUARDED_HINCRBY = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  for i = 2, #ARGV, 3 do redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]) end
  return 1
end
return 0
"""


def trajectory_count(data: bytes) -> int:
    """Trajectories in a message's wire bytes: a group's members, else 1 (also for what cannot be read). Read from
    the `trajectories` array's header: a dead letter is never decoded whole again (it may be hostile)."""
    members = member_count(data)
    return members if members else 1


def dead_reason(reason: str) -> str:
    """The accounting reason of a dead letter's reason text."""
    head = reason.partition(":")[0].strip()
    if head in LEARNER_REASONS:
        return head
    return "poison" if head == "deliveries" else "invalid"


class Ledger:
    """Settles what a learner rank consumed (see the module docstring)."""

    def __init__(
        self, transport: Transport, consumer: MessageConsumer, dedup: Dedup | None, admission_key: str = ""
    ) -> None:
        self.transport, self.consumer, self.dedup = transport, consumer, dedup
        self.stream, self.group = consumer.stream, consumer.group
        prefix = transport.config.prefix
        self.key = f"{prefix}accounting"
        self.admission_key = admission_key or f"{prefix}admission"  # the admission's state and task counters
        self.cursor_key = f"{prefix}accounting:dead_cursor"
        self.publish_token_key = f"{self.admission_key}:publish_token"  # the last batch of tasks published
        self._token_prefix = f"{prefix}accounting:settled:"
        self.redis = transport.ledger()  # None: this process's own counts are the only record
        self.client: Any = self.redis.client if self.redis is not None else None
        self._guarded = self.client.register_script(_GUARDED_HINCRBY) if self.client is not None else None
        self._local: Counter[str] = Counter()  # what this process counted (the only record without Redis)

    def settle(self, units: Sequence[Unit], tasks: int = 0, *, outcome: str = "trained") -> dict[str, int]:
        """After the step that trained `units`: ack their entries, mark their ids settled and count them (and the
        admission's `tasks` among them), in one transaction. Returns the trajectory counts added
        ({"trained": n, "dropped:duplicate": d}). `outcome="dropped:zero_variance"` settles groups that dynamic
        sampling filtered out the same way, counted under that field (their tasks as the admission's `dropped`)."""
        if outcome not in ("trained", f"dropped:{FILTERED}"):
            raise ValueError(f"outcome: must be 'trained' or 'dropped:{FILTERED}', got {outcome!r}")
        received = [r for u in units for r in u.received]
        if not received:
            return {}
        duplicates = sum(u.duplicates for u in units)
        counts = {outcome: sum(u.size for u in units) - duplicates, "dropped:duplicate": duplicates}
        counts = {k: v for k, v in counts.items() if v}
        ids = [r.id for r in received if r.id] + [s.id for u in units for s in u.samples]
        if self.redis is not None:
            token = self._token_prefix + new_id()
            task_field = "trained" if outcome == "trained" else "dropped"
            amounts = [x for field, n in counts.items() for x in (2, field, n)] + (
                [3, task_field, tasks] if tasks else []
            )

            def op() -> None:
                pipe = self.client.pipeline(transaction=True)
                if isinstance(self.dedup, RedisDedup):
                    self.dedup.mark(ids, pipeline=pipe)
                pipe.xack(self.stream, self.group, *[r.entry_id for r in received])
                keys = [token, self.key, self.admission_key]
                self._guarded(keys=keys, args=[TOKEN_TTL_S, *amounts], client=pipe)
                pipe.execute()

            self.redis.retrying(op)
        elif self.dedup is not None:
            self.dedup.mark(ids)
        # Already acked and marked above; this releases the consumer's hold on the ids (and re-acks: a no-op).
        self.consumer.ack(received)
        self._local.update(counts)
        return counts

    def drop(self, units: Sequence[Unit], reason: str, detail: str) -> None:
        """Dead-letter every entry of `units` with "<reason>: <detail>" in one round trip (counted later by
        `scan_dead`): a burst of stale groups must not cost a round trip each."""
        if reason not in LEARNER_REASONS:
            raise ValueError(f"reason: must be one of {LEARNER_REASONS}, got {reason!r}")
        self.consumer.nack([r for unit in units for r in unit.received], f"{reason}: {detail}")
        if self.redis is None:
            size = sum(unit.size for unit in units)
            self._local[f"dropped:{reason}"] += size
            LEARNER_DROPPED_SAMPLES.labels(reason=reason).inc(size)

    def release(self, copies: Sequence[Received]) -> None:
        """Ack re-delivered copies of settled entries without counting them."""
        if copies:
            self.consumer.ack(list(copies))
            log.info("released re-delivered copies", count=len(copies))

    def scan_dead(self, task_prefix: str = "", batch: int = 1000) -> dict[str, int]:
        """Count the dead letters of this stream and group added since the last scan (learner rank 0 only);
        returns {"dropped:<reason>": trajectories} and adds them to the hash and the Prometheus counters. Dropped
        groups of tasks whose id starts with `task_prefix` are also counted in the admission's `dropped` field."""
        if self.redis is None:
            return {}
        total: Counter[str] = Counter()
        while True:
            counts, entries = self.redis.retrying(lambda: self._scan_once(batch, task_prefix))
            total.update(counts)
            if entries < batch:
                break
        total.pop("tasks", None)
        for field, n in total.items():
            LEARNER_DROPPED_SAMPLES.labels(reason=field.removeprefix("dropped:")).inc(n)
        self._local.update(total)
        return dict(total)

    def _scan_once(self, batch: int, task_prefix: str) -> tuple[Counter[str], int]:
        dead = self.transport.config.dead
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self.cursor_key)  # a concurrent scan moves the cursor: then this one starts over
                    cursor = pipe.get(self.cursor_key)
                    start = "(" + cursor.decode() if cursor else "-"
                    entries = pipe.xrange(dead, min=start, max="+", count=batch)
                    counts: Counter[str] = Counter()
                    mine = (self.stream.encode(), self.group.encode())
                    for _, fields in entries:
                        if (fields.get(b"stream"), fields.get(b"group")) == mine:
                            reason = dead_reason(fields.get(b"reason", b"").decode(errors="replace"))
                            data = fields.get(b"data", b"")
                            members = fields.get(b"members")  # counted on the whole payload (data may be cut)
                            counts[f"dropped:{reason}"] += int(members) if members else trajectory_count(data)
                            if task_prefix and reason in LEARNER_REASONS and _task_id(data).startswith(task_prefix):
                                counts["tasks"] += 1
                    pipe.multi()
                    for field, n in counts.items():
                        if field == "tasks":
                            pipe.hincrby(self.admission_key, "dropped", n)
                        else:
                            pipe.hincrby(self.key, field, n)
                    if entries:
                        pipe.set(self.cursor_key, entries[-1][0])
                    pipe.execute()
                    return counts, len(entries)
                except WatchError:
                    continue

    def publish_tasks(self, stream: str, tasks: Sequence[Task], state: dict[str, Any]) -> None:
        """Put `tasks` on `stream` and store the admission `state` after them in the admission hash, in one
        transaction (without Redis: publish only; nothing survives the process then).

        The transaction also stores a token of this batch under `publish_token_key`; a retry (the connection was
        lost, perhaps after the transaction ran and before its reply came) first checks that token, under WATCH, and
        publishes nothing when the batch is there already: no task is published twice. One writer (rank 0) per run.
        """
        payloads = [encode(t, limits=self.transport.config.limits()) for t in tasks]
        if self.redis is None:
            self.transport.publish(stream, payloads)
            return
        token = new_id()

        def op() -> None:
            with self.client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self.publish_token_key)  # the first attempt's EXEC landing late aborts this one
                        if pipe.get(self.publish_token_key) == token.encode():
                            return  # published by an attempt whose reply was lost
                        pipe.multi()
                        for payload in payloads:
                            pipe.xadd(stream, {b"data": payload})
                        pipe.hset(self.admission_key, mapping=state)
                        pipe.set(self.publish_token_key, token, ex=TOKEN_TTL_S)
                        pipe.execute()
                        return
                    except WatchError:
                        continue

        self.redis.retrying(op)
        BUS_MESSAGES.labels(stream, "published").inc(len(payloads))

    def admission_state(self) -> dict[str, str] | None:
        """The admission hash (a run's position and task counters), or None when there is none."""
        if self.redis is None:
            return None
        raw = self.redis.retrying(lambda: self.client.hgetall(self.admission_key))
        return {k.decode(): v.decode() for k, v in raw.items()} or None

    def reset_admission(self) -> None:
        """Forget the admission state (a run starting fresh)."""
        if self.redis is not None:
            self.redis.retrying(lambda: self.client.delete(self.admission_key))

    def totals(self) -> dict[str, int]:
        """The accounting hash (without Redis: what this process counted)."""
        if self.redis is None:
            return dict(self._local)
        raw = self.redis.retrying(lambda: self.client.hgetall(self.key))
        return {k.decode(): int(v) for k, v in raw.items()}

    def in_flight(self, limit: int = 100_000) -> int | None:
        """Trajectories in entries of the stream not delivered to the group yet or not acked yet (None beyond
        `limit` entries, or without Redis): the difference published - trained - dropped while running."""
        if self.redis is None:
            return None

        def op() -> int | None:
            groups = {g["name"].decode(): g for g in self.client.xinfo_groups(self.stream)}
            group = groups.get(self.group)
            if group is None:
                return None
            last = group["last-delivered-id"].decode()
            pending = {
                r["message_id"].decode() for r in self.client.xpending_range(self.stream, self.group, "-", "+", limit)
            }
            entries = self.client.xrange(self.stream, "-", "+", count=limit + 1)
            if len(entries) > limit:
                return None
            unsettled = [f for i, f in entries if i.decode() in pending or _after(i.decode(), last)]
            return sum(trajectory_count(f.get(b"data", b"")) for f in unsettled)

        return self.redis.retrying(op)

    def snapshot(self, attempts: int = 5) -> tuple[dict[str, int], int | None]:
        """(totals, in_flight) of one moment. A rollout node's publish, a settle and a drop each move their counts
        and their entries in one transaction, but the two are read apart: a publish between the reads would count
        its trajectories in flight and not yet published. Totals unchanged across the in-flight read mean no
        transaction landed in between; after `attempts` busy tries, the last pair (off by what landed meanwhile)."""
        totals = self.totals()
        for _ in range(attempts):
            in_flight = self.in_flight()
            after = self.totals()
            if after == totals:
                break
            totals = after
        return totals, in_flight


def _task_id(data: bytes) -> str:
    """The task id of a dead group's wire bytes ("" when it has none or cannot be decoded)."""
    try:
        message = decode(data)
    except MessageError:
        return ""
    return (message.task_id or "") if isinstance(message, Group) else ""


def _after(entry_id: str, last: str) -> bool:
    """Whether stream entry id `entry_id` sorts after `last` ("<ms>-<seq>")."""
    ms, _, seq = entry_id.partition("-")
    last_ms, _, last_seq = last.partition("-")
    return (int(ms), int(seq)) > (int(last_ms), int(last_seq))
