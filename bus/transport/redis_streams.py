"""Redis Streams transport (redis-py + hiredis).

Entry format (external producers rely on it): one field, `data`, holding the msgpack-encoded message bytes:
`XADD slipstream:trajectories * data <msgpack>`. Dead-stream entries carry `data, reason, stream, group,
entry_id, producer, deliveries, time`.

Every call goes through `retrying`: a lost connection (Redis restarting, network blip) is retried with bounded
exponential backoff until `reconnect_timeout_s`, counted in BUS_RECONNECTS, and afterwards every consumer first
re-reads its own pending entries. A publish retried after a lost reply may append the same payloads twice; the
consumer's dedup (by message id) absorbs that, which is why delivery is at-least-once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from bus.config import BusConfig
from bus.schema import show
from bus.transport.base import (
    Backoff,
    BusError,
    BusPermissionDenied,
    BusUnavailable,
    DeadLetter,
    Delivery,
    Guarantees,
    Transport,
)
from telemetry.metrics import BUS_RECONNECTS

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Atomically: the lowest entry id that some group still needs (its oldest pending entry, or the entry after its
# last-delivered id when nothing is pending), then XTRIM MINID to it. Running it as one script means no group can
# be created, or be delivered an entry, between computing that id and trimming. Returns XLEN afterwards.
_TRIM_ACKED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local min_ms, min_seq = nil, nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local ms, seq
  local summary = redis.call('XPENDING', KEYS[1], name)
  if summary[1] > 0 then
    ms, seq = parse(summary[2])
  else
    ms, seq = parse(last)
    seq = seq + 1
  end
  if min_ms == nil or ms < min_ms or (ms == min_ms and seq < min_seq) then min_ms, min_seq = ms, seq end
end
if min_ms ~= nil then
  redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', min_ms, min_seq))
end
return redis.call('XLEN', KEYS[1])
"""

_DATA = b"data"


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisTransport(Transport):
    """Redis Streams: consumer groups, leases (XPENDING IDLE + XCLAIM: XAUTOCLAIM's job, with delivery counts), an
    atomic trim of acked entries, reconnection."""

    name = "redis"
    guarantees = Guarantees(acks=True, redelivery=True, persistence=True, shared_groups=True, ledger=True)

    def ledger(self) -> RedisTransport:
        return self

    def __init__(self, config: BusConfig, url: str | None = None) -> None:
        super().__init__(config)
        url = url or config.url
        if url is None:
            raise BusError("url: not set; None means the embedded Redis, which the node launcher starts and sets")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise BusError(f"url: the redis transport needs a redis://, rediss:// or unix:// URL, got {url!r}")
        tls = {"ssl_ca_certs": config.tls_ca_file} if url.startswith("rediss://") and config.tls_ca_file else {}
        self.client = redis.Redis.from_url(
            url,
            username=config.username,
            password=config.password(),
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.socket_timeout_s,
            socket_keepalive=True,
            health_check_interval=30,
            # No hidden retries inside redis-py: `retrying` owns reconnection, its backoff, logs and metrics.
            retry=Retry(NoBackoff(), 0),
            **tls,
        )
        self._url = url
        self._trim_script = self.client.register_script(_TRIM_ACKED)
        self._append_only: set[str] = set()  # streams this user may append to but not trim
        # Per (stream, group, consumer): where the re-read of the consumer's own pending entries has got to;
        # absent = start from "0", None = done. Cleared on reconnect so pending entries are re-read.
        self._history: dict[tuple[str, str, str], str | None] = {}

    # --- primitives ----------------------------------------------------------------------------------------------
    def _publish(self, stream: str, payloads: Sequence[bytes], retain: int | None) -> tuple[list[str], int]:
        def op() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for payload in payloads:
                pipe.xadd(stream, {_DATA: payload}, maxlen=retain, approximate=True)
            pipe.xlen(stream)
            return pipe.execute()

        *ids, length = self.retrying(op)
        return [_str(i) for i in ids], int(length)

    def ensure_group(self, stream: str, group: str) -> None:
        def op() -> None:
            try:
                self.client.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        self.retrying(op)

    def _consume(self, stream: str, group: str, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        if block_ms / 1000 >= self.config.socket_timeout_s:
            limit = self.config.socket_timeout_s
            raise ValueError(f"block_ms: {block_ms} must be shorter than socket_timeout_s ({limit} s)")
        key = (stream, group, consumer)
        cursor = self._history.get(key, "0")
        if cursor is not None:
            history = self._read_group(stream, group, consumer, cursor, count, None)
            if history:
                self._history[key] = history[-1][0]
                return self._with_counts(stream, group, consumer, history)
            self._history[key] = None
        entries = self._read_group(stream, group, consumer, ">", count, block_ms or None)
        return self._deliveries(stream, group, entries, lambda _: 1)

    def _read_group(
        self, stream: str, group: str, consumer: str, cursor: str, count: int, block_ms: int | None
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        def op() -> list[Any]:
            try:
                return self.client.xreadgroup(group, consumer, {stream: cursor}, count=count, block=block_ms)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The group vanished (a Redis restarted without persistence): recreate it rather than crash.
                log.warning("consumer group missing, recreating it", stream=stream, group=group)
                self.client.xgroup_create(stream, group, id="0", mkstream=True)
                return []

        response = self.retrying(op)
        return [(_str(i), fields) for i, fields in response[0][1]] if response else []

    def _with_counts(
        self, stream: str, group: str, consumer: str, entries: list[tuple[str, dict[bytes, bytes]]]
    ) -> list[Delivery]:
        """Deliveries for re-read pending entries, with their delivery counts from XPENDING."""
        rows = self.retrying(
            lambda: self.client.xpending_range(
                stream, group, entries[0][0], entries[-1][0], len(entries), consumername=consumer
            )
        )
        counts = {_str(r["message_id"]): int(r["times_delivered"]) for r in rows}
        return self._deliveries(stream, group, entries, lambda entry_id: counts.get(entry_id, 1))

    def _deliveries(
        self,
        stream: str,
        group: str,
        entries: list[tuple[str, dict[bytes, bytes]]],
        deliveries: Callable[[str], int],
    ) -> list[Delivery]:
        out = []
        rejected: list[tuple[Delivery, str, str]] = []
        for entry_id, fields in entries:
            data = fields.get(_DATA) if fields else None
            if data is not None:
                out.append(Delivery(stream, entry_id, data, deliveries(entry_id)))
            elif not fields:
                # Deleted while pending (XDEL by an operator): nothing left to deliver, release it.
                log.warning("pending entry was deleted, acking it", stream=stream, entry_id=entry_id)
                self.ack(stream, group, [entry_id])
            else:
                names = show(sorted(_str(k) for k in fields))  # a hostile entry may have thousands of fields
                rejected.append((Delivery(stream, entry_id, b""), f"entry: no 'data' field, has {names}", ""))
        self.dead_letter_many(stream, group, rejected)
        return out

    def _ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        self.retrying(lambda: self.client.xack(stream, group, *entry_ids))

    def _dead_letter_many(self, stream: str, group: str, letters: Sequence[DeadLetter]) -> None:
        records = [
            {
                _DATA: letter.data,
                b"reason": letter.reason,
                b"stream": stream,
                b"group": group,
                b"entry_id": letter.source_entry_id,
                b"producer": letter.producer,
                b"deliveries": letter.deliveries,
                b"time": repr(letter.time),
                b"size": letter.size,
                b"sha256": letter.sha256,
                b"members": letter.members,
            }
            for letter in letters
        ]
        maxlen = self.config.dead_entries

        def op() -> None:
            pipe = self.client.pipeline(transaction=True)  # MULTI: the copies and the acks land together
            for record in records:
                pipe.xadd(self.config.dead, record, maxlen=maxlen, approximate=False)  # exact: a bound in bytes
            pipe.xack(stream, group, *(letter.source_entry_id for letter in letters))
            pipe.execute()

        self.retrying(op)

    def requeue(self, stream: str, group: str, delivery: Delivery, consumer: str | None = None) -> str | None:
        def op() -> list[Any] | None:
            if consumer is not None and not self._holds(stream, group, consumer, delivery.entry_id):
                return None
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(stream, {_DATA: delivery.data})
            pipe.xack(stream, group, delivery.entry_id)
            return pipe.execute()

        result = self.retrying(op)
        return None if result is None else _str(result[0])

    def _holds(self, stream: str, group: str, consumer: str, entry_id: str) -> bool:
        """Whether `consumer` holds `entry_id` (delivered to it, not acked). Checked before acting for a consumer,
        and again when a lost connection re-runs the action: an entry claimed by another consumer is that one's, an
        entry acked by an earlier run (whose reply was lost) is settled. WATCH cannot make the check and the action
        one transaction (claims and acks do not touch the stream key): a claim landing in the sub-millisecond between
        them still lets both act (the consumers' dedup keeps a copy from being processed twice)."""
        held = self.client.xpending_range(stream, group, entry_id, entry_id, 1)
        return bool(held) and _str(held[0]["consumer"]) == consumer

    def publish_and_ack(
        self,
        stream: str,
        payloads: Sequence[bytes],
        source: Delivery,
        group: str,
        consumer: str,
        counter: tuple[str, str, int] | None = None,
    ) -> list[str] | None:
        self._make_room(stream)

        def op() -> list[Any] | None:
            if not self._holds(source.stream, group, consumer, source.entry_id):
                return None
            pipe = self.client.pipeline(transaction=True)
            for payload in payloads:
                pipe.xadd(stream, {_DATA: payload})
            if counter is not None:
                pipe.hincrby(*counter)
            pipe.xack(source.stream, group, source.entry_id)
            pipe.xlen(stream)
            return pipe.execute()

        result = self.retrying(op)
        if result is None:
            return None
        ids = [_str(i) for i in result[: len(payloads)]]
        self._lengths[stream] = int(result[-1])
        self._count(stream, "published", len(ids))
        self._count(source.stream, "acked", 1)
        return ids

    def _claim_stale(self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        rows = self.retrying(lambda: self.client.xpending_range(stream, group, "-", "+", count, idle=min_idle_ms))
        # Our own pending entries are not stale: we re-read them ourselves after a restart or reconnect.
        times = {_str(r["message_id"]): int(r["times_delivered"]) for r in rows if _str(r["consumer"]) != consumer}
        if not times:
            return []
        # XCLAIM re-checks the idle time atomically, so of two consumers claiming the same entry only one gets it;
        # it also adds one to the entry's delivery count.
        claimed = self.retrying(lambda: self.client.xclaim(stream, group, consumer, min_idle_ms, list(times)))
        entries = [(_str(i), fields) for i, fields in claimed]
        log.info("claimed stale entries", stream=stream, group=group, consumer=consumer, count=len(entries))
        return self._deliveries(stream, group, entries, lambda entry_id: times[entry_id] + 1)

    def read(self, stream: str, after: str, count: int, block_ms: int) -> list[Delivery]:
        response = self.retrying(lambda: self.client.xread({stream: after}, count=count, block=block_ms or None))
        entries = response[0][1] if response else []
        return [Delivery(stream, _str(i), f.get(_DATA, b"")) for i, f in entries]

    def length(self, stream: str) -> int:
        return int(self.retrying(lambda: self.client.xlen(stream)))

    def pending(self, stream: str, group: str) -> int:
        def op() -> int:
            try:
                return int(self.client.xpending(stream, group)["pending"])
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc) or "no such key" in str(exc):
                    return 0
                raise

        return self.retrying(op)

    def trim(self, stream: str) -> int:
        # An append-only user (an agent's producer credential) may not trim: it waits for the consumers to trim.
        if stream not in self._append_only:
            try:
                return int(self.retrying(lambda: self._trim_script(keys=[stream])))
            except BusPermissionDenied:
                log.info("this Redis user may not trim the stream: waiting for its consumers to trim", stream=stream)
                self._append_only.add(stream)
        return self.length(stream)

    def dead_letters(self, count: int = 100, before: str | None = None) -> list[DeadLetter]:
        newest = "+" if before is None else f"({before}"
        entries = self.retrying(lambda: self.client.xrevrange(self.config.dead, max=newest, count=count))
        out = []
        for entry_id, f in reversed(entries):
            text = {_str(k): _str(v) for k, v in f.items() if k != _DATA}
            out.append(
                DeadLetter(
                    entry_id=_str(entry_id),
                    data=f.get(_DATA, b""),
                    reason=text.get("reason", ""),
                    stream=text.get("stream", ""),
                    group=text.get("group", ""),
                    source_entry_id=text.get("entry_id", ""),
                    producer=text.get("producer", ""),
                    deliveries=int(text.get("deliveries", 0)),
                    time=float(text.get("time", 0)),
                    size=int(text.get("size", len(f.get(_DATA, b"")))),
                    sha256=text.get("sha256", ""),
                    members=int(text.get("members", 1)),
                )
            )
        return out

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()

    # --- reconnection --------------------------------------------------------------------------------------------
    def retrying(self, op: Callable[[], T]) -> T:
        """Run `op`; on a lost connection wait for the server (bounded backoff) and run it again."""
        while True:
            try:
                return op()
            except redis.AuthenticationError as exc:
                raise BusError(f"username/password: Redis at {self._url} refused them: {exc}") from exc
            except redis.exceptions.NoPermissionError as exc:
                user = self.config.username or "default"
                raise BusPermissionDenied(
                    f"username: Redis user {user!r} may not do this ({exc}); see docs/security.md"
                ) from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._wait_for_server(exc)

    def _wait_for_server(self, error: Exception) -> None:
        cfg = self.config
        log.warning("bus connection lost, reconnecting", transport=self.name, error=str(error))
        # Idle pooled connections are dead too: drop them now instead of discovering each on its next use.
        self.client.connection_pool.disconnect(inuse_connections=False)
        backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        while True:
            backoff.sleep(cfg.reconnect_timeout_s)
            try:
                self.client.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if backoff.elapsed >= cfg.reconnect_timeout_s:
                    raise BusUnavailable(
                        f"Redis at {self._url} unreachable for {backoff.elapsed:.1f}s "
                        f"(reconnect_timeout_s={cfg.reconnect_timeout_s}): {exc}"
                    ) from exc
                log.debug("bus still unreachable", error=str(exc), waited_s=round(backoff.elapsed, 2))
        self._history.clear()  # every consumer re-reads its pending entries: replies may have been lost
        BUS_RECONNECTS.labels(self.name).inc()
        log.info("bus reconnected", transport=self.name, after_s=round(backoff.elapsed, 2))
