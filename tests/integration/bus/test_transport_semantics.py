"""Behaviour every group-capable transport shares, run against a real redis-server AND the in-process transport.

Byte payloads only: the codec is tested on its own; here what matters is who gets which entry, when, how often.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from bus.config import BusConfig
from bus.transport import BackpressureTimeout, Transport, setup_transport

S, G = "slipstream:test", "workers"
MakeTransport = Callable[..., Transport]


@pytest.fixture(params=["redis", "inproc"])
def make(request: pytest.FixtureRequest) -> Iterator[MakeTransport]:
    """`make(**config)` -> a new transport handle on one shared bus (each handle is like a separate process)."""
    opened: list[Transport] = []
    inproc = f"inproc://{request.node.name}"
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else inproc

    def factory(**overrides: object) -> Transport:
        transport = setup_transport(BusConfig(type=request.param, url=url, **overrides))
        opened.append(transport)
        return transport

    yield factory
    for transport in opened:
        transport.close()


def payloads(n: int, tag: str = "m") -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


def test_each_entry_goes_to_one_consumer_and_acked_entries_never_return(make: MakeTransport) -> None:
    t = make()
    t.ensure_group(S, G)
    t.ensure_group(S, G)  # idempotent
    ids = t.publish(S, payloads(6))
    assert len(set(ids)) == 6
    first = t.consume(S, G, "a", 4, 0)
    second = t.consume(S, G, "b", 4, 0)
    assert [d.data for d in first] == payloads(6)[:4]
    assert [d.data for d in second] == payloads(6)[4:]
    assert all(d.deliveries == 1 for d in first + second)
    assert t.pending(S, G) == 6
    t.ack(S, G, [d.entry_id for d in first + second])
    assert t.pending(S, G) == 0
    assert t.consume(S, G, "a", 10, 0) == []
    assert make().consume(S, G, "a", 10, 0) == []  # a restarted "a" has nothing pending either


def test_group_created_late_reads_entries_published_before_it(make: MakeTransport) -> None:
    t = make()
    t.publish(S, payloads(3))
    t.ensure_group(S, G)
    assert [d.data for d in t.consume(S, G, "a", 10, 0)] == payloads(3)


def test_restarted_consumer_first_rereads_its_own_pending_entries(make: MakeTransport) -> None:
    t = make()
    t.ensure_group(S, G)
    t.publish(S, payloads(5))
    taken = t.consume(S, G, "a", 3, 0)
    t.ack(S, G, [taken[0].entry_id])
    restarted = make()  # same consumer name, new connection: as after a crash
    again = restarted.consume(S, G, "a", 10, 0)
    assert [d.entry_id for d in again] == [d.entry_id for d in taken[1:]]
    assert [d.deliveries for d in again] == [2, 2]
    # then new entries; the re-read is not repeated
    assert [d.data for d in restarted.consume(S, G, "a", 10, 0)] == payloads(5)[3:]
    assert restarted.consume(S, G, "a", 10, 0) == []


def test_stale_entries_of_a_dead_consumer_are_claimed_after_the_lease(make: MakeTransport) -> None:
    t = make()
    t.ensure_group(S, G)
    t.publish(S, payloads(4))
    dead = t.consume(S, G, "dead", 4, 0)
    assert t.claim_stale(S, G, "alive", 60_000, 10) == []  # lease not over yet
    assert t.claim_stale(S, G, "dead", 0, 10) == []  # nobody claims its own entries
    time.sleep(0.05)
    claimed = t.claim_stale(S, G, "alive", 20, 10)
    assert [d.entry_id for d in claimed] == [d.entry_id for d in dead]
    assert [d.deliveries for d in claimed] == [2] * 4
    assert t.claim_stale(S, G, "third", 60_000, 10) == []  # claiming renewed the lease
    t.ack(S, G, [d.entry_id for d in claimed])
    assert t.pending(S, G) == 0


def test_poison_entry_goes_to_dead_stream_after_max_deliveries(make: MakeTransport) -> None:
    t = make(max_deliveries=2)
    t.ensure_group(S, G)
    t.publish(S, [b"poison"])
    assert [d.deliveries for d in t.consume(S, G, "a", 1, 0)] == [1]
    time.sleep(0.02)
    assert [d.deliveries for d in t.claim_stale(S, G, "b", 10, 10)] == [2]
    time.sleep(0.02)
    assert t.claim_stale(S, G, "c", 10, 10) == []  # third delivery: dead-lettered instead
    assert t.pending(S, G) == 0
    [dead] = t.dead_letters()
    assert (dead.data, dead.stream, dead.group, dead.deliveries) == (b"poison", S, G, 3)
    assert dead.reason == "deliveries: 3 > max_deliveries (2)"


def test_dead_letter_records_reason_and_source_and_acks(make: MakeTransport) -> None:
    t = make()
    t.ensure_group(S, G)
    t.publish(S, [b"bad", b"good"])
    bad, good = t.consume(S, G, "a", 2, 0)
    before = time.time()
    t.dead_letter(S, G, bad, "response_ids: token id -1 < 0", producer="agent-7")
    [dead] = t.dead_letters()
    assert (dead.data, dead.reason, dead.producer, dead.source_entry_id) == (
        b"bad",
        "response_ids: token id -1 < 0",
        "agent-7",
        bad.entry_id,
    )
    assert before - 1 <= dead.time <= time.time() + 1
    assert t.pending(S, G) == 1  # the dead-lettered one is acked, `good` is still pending
    t.ack(S, G, [good.entry_id])


def test_requeue_hands_the_payload_to_another_consumer(make: MakeTransport) -> None:
    t = make()
    t.ensure_group(S, G)
    t.publish(S, [b"x"])
    [d] = t.consume(S, G, "leaving", 1, 0)
    new_id = t.requeue(S, G, d)
    assert new_id != d.entry_id
    [again] = t.consume(S, G, "other", 1, 0)
    assert (again.entry_id, again.data) == (new_id, b"x")
    assert t.pending(S, G) == 1


def test_blocking_consume_wakes_up_on_publish(make: MakeTransport) -> None:
    t, producer = make(), make()
    t.ensure_group(S, G)
    timer = threading.Timer(0.2, lambda: producer.publish(S, [b"late"]))
    timer.start()
    try:
        got = t.consume(S, G, "a", 1, 5000)
    finally:
        timer.join()
    assert [d.data for d in got] == [b"late"]


def test_trim_never_removes_unacked_or_undelivered_entries(make: MakeTransport) -> None:
    t = make()
    t.publish(S, payloads(10))
    assert t.trim(S) == 10  # no group yet: nobody has read anything, nothing goes
    t.ensure_group(S, "fast")
    t.ensure_group(S, "slow")
    fast = t.consume(S, "fast", "f", 10, 0)
    t.ack(S, "fast", [d.entry_id for d in fast])
    slow = t.consume(S, "slow", "s", 6, 0)
    t.ack(S, "slow", [d.entry_id for d in slow[:2] + slow[3:]])  # slow[2] stays pending
    assert t.trim(S) == 8  # only the 2 entries acked by BOTH groups before the oldest pending one go
    time.sleep(0.02)
    [pending] = t.claim_stale(S, "slow", "s2", 10, 10)
    assert pending.data == slow[2].data  # still there to be redelivered
    t.ack(S, "slow", [pending.entry_id])
    rest = t.consume(S, "slow", "s", 10, 0)
    assert [d.data for d in rest] == payloads(10)[6:]  # the never-delivered ones were kept too
    assert t.trim(S) == 4
    t.ack(S, "slow", [d.entry_id for d in rest])
    assert t.trim(S) == 0


def test_backpressure_blocks_then_resumes_when_consumer_drains(make: MakeTransport) -> None:
    t = make(max_stream_length=5, backpressure_timeout_s=30)
    t.ensure_group(S, G)
    t.publish(S, payloads(5))
    done = threading.Event()
    thread = threading.Thread(target=lambda: (t.publish(S, [b"extra"]), done.set()), daemon=True)
    thread.start()
    assert not done.wait(0.3)  # the stream is full: the publish waits
    consumer = make()
    consumer.ack(S, G, [d.entry_id for d in consumer.consume(S, G, "c", 3, 0)])
    assert done.wait(10)  # acked entries were trimmed: room again
    thread.join(5)
    assert t.length(S) == 3  # 2 unacked + the extra one


def test_backpressure_times_out_with_a_clear_error(make: MakeTransport) -> None:
    t = make(max_stream_length=3, backpressure_timeout_s=0.3)
    t.ensure_group(S, G)
    t.publish(S, payloads(3))
    with pytest.raises(BackpressureTimeout, match=r"'slipstream:test' still holds 3 entries \(max_stream_length=3\)"):
        t.publish(S, [b"more"])
    assert t.length(S) == 3  # nothing was dropped to make room


def test_retain_caps_a_broadcast_stream_without_waiting(make: MakeTransport) -> None:
    t = make(max_stream_length=10)
    for _ in range(6):
        t.publish(S, payloads(100), retain=100)  # never waits although far over max_stream_length
    assert 100 <= t.length(S) < 600  # Redis trims whole nodes (~), the in-process one exactly


def test_broadcast_read_sees_every_entry_for_every_reader(make: MakeTransport) -> None:
    t = make()
    t.publish(S, payloads(3))
    for reader in (make(), make()):
        got = reader.read(S, "0", 10, 0)
        assert [d.data for d in got] == payloads(3)
        assert reader.read(S, got[-1].entry_id, 10, 0) == []
