"""The consumer layer on a real redis-server and on the in-process transport: decoding, dead letters, kinds,
dedup, nack/requeue - and at-least-once delivery + dedup = every message processed exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from bus.codec import encode
from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.dedup import Dedup, MemoryDedup, RedisDedup
from bus.schema import Group, Heartbeat, Trajectory, new_id
from bus.transport import Transport, setup_transport
from telemetry.metrics import REGISTRY

S, G = "slipstream:trajectories", "learners"
MakeTransport = Callable[..., Transport]


@pytest.fixture(params=["redis", "inproc"])
def make(request: pytest.FixtureRequest) -> Iterator[MakeTransport]:
    """`make(**config)` -> a new transport handle on one shared bus (like another process)."""
    inproc = f"inproc://{request.node.name}"
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else inproc
    opened: list[Transport] = []

    def factory(**overrides: object) -> Transport:
        opened.append(setup_transport(BusConfig(type=request.param, url=url, **overrides)))
        return opened[-1]

    yield factory
    for transport in opened:
        transport.close()


def trajectory(token: int = 5, producer: str = "agent") -> Trajectory:
    traj_id = new_id()
    return Trajectory(
        id=traj_id,
        group_id=traj_id,
        producer=producer,
        prompt_ids=np.array([1, 2, 3], np.int32),
        response_ids=np.array([token, token], np.int32),
        behavior_logprobs=np.array([-0.5, -1.0], np.float32),
        reward=1.0,
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def dedup_for(transport: Transport) -> Dedup:
    """Persistent dedup on Redis, in-memory otherwise."""
    return RedisDedup(transport, "slipstream:dedup:learners") if transport.name == "redis" else MemoryDedup()


def test_messages_come_out_decoded_and_equal_to_what_was_sent(make: MakeTransport) -> None:
    t = make()
    consumer = MessageConsumer(t, S, G, "c0")
    sent = [trajectory(token=i) for i in range(5)]
    t.publish(S, [encode(m) for m in sent])
    got = consumer.poll(10, 0)
    assert [r.id for r in got] == [m.id for m in sent]
    assert [r.message.response_ids.tolist() for r in got] == [[i, i] for i in range(5)]
    assert all(r.deliveries == 1 for r in got)
    consumer.refresh_stats()
    assert sample("slipstream_bus_pending_messages", stream=S, group=G) == 5
    assert sample("slipstream_bus_stream_length", stream=S) == 5
    consumer.ack(got)
    assert t.pending(S, G) == 0
    consumer.refresh_stats()  # acked by the only group: trimmed away
    assert sample("slipstream_bus_pending_messages", stream=S, group=G) == 0
    assert sample("slipstream_bus_stream_length", stream=S) == 0


def test_malformed_messages_go_to_the_dead_stream_with_reason_and_polling_goes_on(make: MakeTransport) -> None:
    t = make()
    consumer = MessageConsumer(t, S, G, "c0", kinds=(Trajectory, Group))
    good = trajectory()
    invalid = trajectory(token=-1, producer="bad-agent")
    rng = np.random.default_rng(0)
    t.publish(
        S,
        [
            rng.bytes(64),  # random bytes
            encode(invalid, validate=False),  # a trajectory that breaks a rule
            encode(Heartbeat(node_id="n1", role="rollout")),  # valid, but not a kind this stream carries
            encode(good),
        ],
    )
    got = consumer.poll(10, 0)
    assert [r.id for r in got] == [good.id]
    dead = t.dead_letters()
    assert [d.stream for d in dead] == [S] * 3
    assert dead[0].reason.startswith("data: ")
    assert dead[1].reason == "response_ids: token id -1 < 0 (at position 0)"
    assert dead[1].producer == "bad-agent"
    assert dead[2].reason == f"kind: expected one of ['group', 'trajectory'] on {S}, got 'heartbeat'"
    assert t.pending(S, G) == 1  # only the good one, still to be acked


def test_a_republished_message_is_handed_out_once(make: MakeTransport) -> None:
    t = make()
    consumer = MessageConsumer(t, S, G, "c0", dedup=dedup_for(t))
    duplicates_before = sample("slipstream_bus_messages_total", stream=S, event="duplicate")
    msg = trajectory()
    t.publish(S, [encode(msg), encode(msg)])  # same message twice in one batch (a producer retry)
    got = consumer.poll(10, 0)
    assert [r.id for r in got] == [msg.id]
    consumer.ack(got)
    t.publish(S, [encode(msg)])  # and once more after it was processed
    assert consumer.poll(10, 0) == []
    assert t.pending(S, G) == 0  # duplicates are acked, not left pending
    assert sample("slipstream_bus_messages_total", stream=S, event="duplicate") == duplicates_before + 2


def test_at_least_once_plus_dedup_processes_each_message_exactly_once(make: MakeTransport) -> None:
    """A consumer dies with part of a batch processed and nothing acked; another takes over its entries after the
    lease. Together they process every message once: none lost, none twice."""
    t = make(lease_ms=50, claim_interval_s=0.01)
    sent = [trajectory() for _ in range(20)]
    t.publish(S, [encode(m) for m in sent])
    processed: list[str] = []

    dedup = dedup_for(t)  # what both share: the Redis store, or (in-process) this process's memory
    first = MessageConsumer(t, S, G, "dies", dedup=dedup)
    batch = first.poll(8, 0)
    for r in batch[:5]:
        processed.append(r.id)  # the effect...
        dedup.mark([r.id])  # ...committed with the mark; then the consumer dies before acking the batch
    time.sleep(0.1)  # lease over

    survivor = MessageConsumer(make(lease_ms=50, claim_interval_s=0.01), S, G, "survives", dedup=dedup)
    redelivered = 0
    deadline = time.monotonic() + 10
    while len(processed) < len(sent) and time.monotonic() < deadline:
        got = survivor.poll(4, 50)
        redelivered += sum(r.deliveries > 1 for r in got)
        processed += [r.id for r in got]
        survivor.ack(got)
    assert sorted(processed) == sorted(m.id for m in sent)
    assert redelivered == 3  # the 3 taken but unprocessed; the 5 processed ones were recognised and acked
    assert t.pending(S, G) == 0


def test_nack_dead_letters_and_requeue_gives_back(make: MakeTransport) -> None:
    t = make()
    consumer = MessageConsumer(t, S, G, "c0", dedup=dedup_for(t))
    stale, leaving = trajectory(), trajectory()
    t.publish(S, [encode(stale), encode(leaving)])
    a, b = consumer.poll(2, 0)
    consumer.nack(a, "policy_version: 3 versions behind > max_staleness 2")
    [dead] = t.dead_letters()
    assert (dead.reason, dead.producer) == ("policy_version: 3 versions behind > max_staleness 2", "agent")
    consumer.requeue(b)
    [again] = MessageConsumer(t, S, G, "c1").poll(2, 0)
    assert again.id == leaving.id and again.entry_id != b.entry_id


def test_redis_dedup_survives_a_restart_and_stays_bounded(redis_server) -> None:  # noqa: ANN001
    transport = setup_transport(BusConfig(url=redis_server.url))
    RedisDedup(transport, "d", max_size=3).mark(["a", "b"])
    RedisDedup(transport, "d", max_size=3).mark(["c", "d"])
    redis_server.restart()  # AOF replay: marks persist
    fresh = RedisDedup(transport, "d", max_size=3)
    assert fresh.seen(["a", "b", "c", "d", "e"]) == [False, True, True, True, False]  # oldest one forgotten
    transport.close()


def test_memory_dedup_is_bounded() -> None:
    dedup = MemoryDedup(max_size=2)
    dedup.mark(["a", "b", "c"])
    assert dedup.seen(["a", "b", "c"]) == [False, True, True]
    with pytest.raises(ValueError, match="max_size: must be >= 1"):
        MemoryDedup(max_size=0)


def test_entries_claimed_in_a_first_poll_count_one_delivery(make: MakeTransport) -> None:
    """A consumer's first read re-reads its own pending entries; entries it claims in the same poll must not be
    re-read (that would count a second delivery and, with a low max_deliveries, call them poison)."""
    producer, dead_consumer, heir = make(), make(max_deliveries=2), make(max_deliveries=2, lease_ms=10)
    producer.publish(S, [encode(trajectory(token)) for token in (1, 2)])
    taken = MessageConsumer(dead_consumer, S, G, "node-a")
    assert len(taken.poll(block_ms=100)) == 2  # delivery 1, never acked: node-a "dies"
    time.sleep(0.05)  # past the lease
    claimed = MessageConsumer(heir, S, G, "node-b").poll(block_ms=100)
    assert [r.deliveries for r in claimed] == [2, 2]
    assert heir.dead_letters() == []
