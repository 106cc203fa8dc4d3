"""Duplicate detection by message id: at-least-once delivery + dedup = each message processed once.

A consumer asks `seen(ids)` before handing messages out and calls `mark(ids)` once they are processed. Redelivered
entries (a consumer died before acking) and republished payloads (a producer retried after a lost reply) carry the
same message id, so they are recognised and acked without being processed again.

The one window left is a crash after processing and before `mark`: make the effect and the mark one transaction
where it matters (`RedisDedup.mark(ids, pipeline=...)` queues the mark in the caller's MULTI).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence

from redis.client import Pipeline

from bus.transport.base import LedgerStore


class Dedup(ABC):
    """Remembers processed message ids (boundedly: the oldest are forgotten first)."""

    @abstractmethod
    def seen(self, ids: Sequence[str]) -> list[bool]:
        """For each id, whether it was marked processed."""

    @abstractmethod
    def mark(self, ids: Sequence[str]) -> None:
        """Remember `ids` as processed."""


class MemoryDedup(Dedup):
    """In-process and bounded to the newest `max_size` ids; forgotten when the process ends. Thread-safe."""

    def __init__(self, max_size: int = 1_000_000) -> None:
        if max_size < 1:
            raise ValueError(f"max_size: must be >= 1, got {max_size}")
        self.max_size = max_size
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, ids: Sequence[str]) -> list[bool]:
        with self._lock:
            return [i in self._ids for i in ids]

    def mark(self, ids: Sequence[str]) -> None:
        with self._lock:
            for i in ids:
                self._ids[i] = None
                self._ids.move_to_end(i)
            while len(self._ids) > self.max_size:
                self._ids.popitem(last=False)


class RedisDedup(Dedup):
    """Persistent across consumer restarts: a sorted set `key` of id -> time marked (unix ms), holding at most
    `max_size` ids and none older than `ttl_s`. One round trip per `seen` (ZMSCORE) and per `mark`. Lives on the
    transport's Redis and shares its reconnection (a Redis restart is waited out, not raised)."""

    def __init__(self, transport: LedgerStore, key: str, max_size: int = 1_000_000, ttl_s: float = 7 * 86_400):
        if max_size < 1:
            raise ValueError(f"max_size: must be >= 1, got {max_size}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be > 0, got {ttl_s}")
        self.transport, self.key, self.max_size, self.ttl_s = transport, key, max_size, ttl_s

    def seen(self, ids: Sequence[str]) -> list[bool]:
        if not ids:
            return []
        scores = self.transport.retrying(lambda: self.transport.client.zmscore(self.key, list(ids)))
        return [score is not None for score in scores]

    def mark(self, ids: Sequence[str], pipeline: Pipeline | None = None) -> None:
        """Remember `ids`; with `pipeline` (from `transport.client.pipeline()`), only queue the commands there: the
        caller executes it, e.g. in the same MULTI as the effect of processing, so both land or neither does."""
        if not ids:
            return
        now_ms = int(time.time() * 1000)

        def queue(pipe: Pipeline) -> None:
            pipe.zadd(self.key, dict.fromkeys(ids, now_ms))
            pipe.zremrangebyscore(self.key, "-inf", now_ms - int(self.ttl_s * 1000))
            pipe.zremrangebyrank(self.key, 0, -self.max_size - 1)  # keep the newest max_size

        if pipeline is not None:
            queue(pipeline)
            return

        def op() -> None:
            pipe = self.transport.client.pipeline(transaction=True)
            queue(pipe)
            pipe.execute()

        self.transport.retrying(op)
