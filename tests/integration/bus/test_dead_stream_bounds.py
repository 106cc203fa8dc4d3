"""The dead stream is bounded in bytes as well as entries, on a real Redis: a dead letter keeps a prefix of a large
payload (with its size, SHA-256 and member count), and the stream keeps what `bus.dead_max_bytes` allows."""

from __future__ import annotations

import hashlib
from typing import Any

from bus.config import DEAD_RECORD_BYTES, BusConfig
from bus.transport import setup_transport


def test_a_large_payload_leaves_a_prefix_with_its_size_digest_and_members(redis_server: Any) -> None:
    config = BusConfig(url=redis_server.url, dead_payload_bytes=4096)
    transport = setup_transport(config)
    stream = config.stream("trajectories")
    transport.ensure_group(stream, "learner")
    payload = b"\x82\xa4kind\xa5group\xactrajectories\x93" + b"\x80\x80\x80" + b"x" * 10_000_000  # trailing bytes
    group = b"\x82\xa4kind\xa5group\xactrajectories\x93" + b"\x81\xa1a\xc6" + (9_000_000).to_bytes(4, "big")
    group += b"y" * 9_000_000 + b"\x80\x80"  # a 3-member group of 9 MB, one member's bin first
    for data in (payload, group):
        transport.publish(stream, [data])
    deliveries = transport.consume(stream, "learner", "learner-0", 10, 0)
    transport.dead_letter_many(stream, "learner", [(d, "data: too large", "agent") for d in deliveries])
    letters = transport.dead_letters(10)
    sizes = [(len(d.data), d.size, d.truncated) for d in letters]
    assert sizes == [(4096, len(payload), True), (4096, len(group), True)]
    assert [d.sha256 for d in letters] == [hashlib.sha256(payload).hexdigest(), hashlib.sha256(group).hexdigest()]
    assert [d.data for d in letters] == [payload[:4096], group[:4096]]
    assert [d.members for d in letters] == [1, 3]  # trailing bytes: not a message, one published entry
    assert transport.client.memory_usage(config.dead) < 64 * 1024  # not the 19 MB the copies would take
    transport.close()


def test_the_dead_stream_keeps_what_dead_max_bytes_allows(redis_server: Any) -> None:
    config = BusConfig(url=redis_server.url, dead_payload_bytes=16_384, dead_max_bytes=2**20)
    assert config.dead_entries == 2**20 // ((16_384 + DEAD_RECORD_BYTES) * 5 // 4) < config.dead_retain
    transport = setup_transport(config)
    stream = config.stream("trajectories")
    transport.ensure_group(stream, "learner")
    transport.publish(stream, [bytes([i % 256]) * 20_000 for i in range(200)])
    deliveries = transport.consume(stream, "learner", "learner-0", 200, 0)
    for start in range(0, 200, 50):
        batch = deliveries[start : start + 50]
        transport.dead_letter_many(stream, "learner", [(d, "data: not valid msgpack", "") for d in batch])
    assert transport.length(config.dead) == config.dead_entries  # exact: the newest ones
    assert transport.client.memory_usage(config.dead) <= config.dead_max_bytes
    newest = transport.dead_letters(config.dead_entries)
    assert [d.source_entry_id for d in newest] == [d.entry_id for d in deliveries[-config.dead_entries :]]
    page = transport.dead_letters(5, before=newest[5].entry_id)  # paging back from an entry
    assert [d.entry_id for d in page] == [d.entry_id for d in newest[:5]]
    transport.close()
