"""Group assembly: whole groups at once, single trajectories by group_id with a timeout, trained-id checks, and
reading no more than the capacity from a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bus.config import BusConfig
from bus.consumer import MessageConsumer, Received
from bus.producer import Producer
from bus.schema import Group, Preference, Trajectory
from bus.transport import setup_transport
from learner_node.groups import GroupAssembler, Unit, drop_repeats, split_trained


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def traj(traj_id: str, group_id: str, version: int = 0) -> Trajectory:
    one = np.array([1], dtype=np.int32)
    return Trajectory(traj_id, group_id, "p", one, one, np.array([-0.1], np.float32), policy_version=version)


def received(message: object, entry: str) -> Received:
    return Received(entry_id=entry, message=message, deliveries=1, data=b"")  # type: ignore[arg-type]


def test_a_group_message_is_a_unit_at_once() -> None:
    assembler = GroupAssembler(group_size=4, min_group_size=2, timeout_s=5.0)
    group = Group("g1", "p", [traj("a", "g1", 3), traj("b", "g1", 1)], task_id="run:0:7")
    assembler.add([received(group, "1-0")])
    ready, incomplete = assembler.take()
    assert [u.key for u in ready] == ["g1"] and not incomplete
    assert (ready[0].message_ids, ready[0].task_id, ready[0].min_version, ready[0].size) == (["g1"], "run:0:7", 1, 2)
    assert assembler.take() == ([], [])  # handed out once


def test_single_trajectories_wait_for_their_group_or_the_timeout() -> None:
    clock = Clock()
    assembler = GroupAssembler(group_size=3, min_group_size=2, timeout_s=5.0, clock=clock)
    assembler.add(
        [received(traj("a1", "A"), "1-0"), received(traj("b1", "B"), "2-0"), received(traj("a2", "A"), "3-0")]
    )
    assert assembler.take() == ([], []) and assembler.buffered == 3
    assembler.add([received(traj("a3", "A"), "4-0")])  # group A is complete: ready before its timeout
    ready, _ = assembler.take()
    assert [(u.key, [s.id for s in u.samples]) for u in ready] == [("A", ["a1", "a2", "a3"])]
    clock.now += 1.0
    assembler.add([received(traj("c1", "C"), "5-0"), received(traj("c2", "C"), "6-0")])
    clock.now += 3.9
    assert assembler.take() == ([], [])
    clock.now += 0.1  # B waited 5 s: alone, it is incomplete; C (first seen 4 s ago) keeps waiting
    ready, incomplete = assembler.take()
    assert ready == [] and [(u.key, u.message_ids) for u in incomplete] == [("B", ["b1"])]
    clock.now += 1.0  # C timed out with 2 members >= min_group_size: it trains as a partial group
    ready, incomplete = assembler.take()
    assert [(u.key, len(u.samples)) for u in ready] == [("C", 2)] and incomplete == []
    assert assembler.buffered == 0


def test_small_group_messages_are_incomplete_and_pairs_are_units() -> None:
    assembler = GroupAssembler(group_size=4, min_group_size=2, timeout_s=5.0)
    ids = np.array([1, 2], np.int32)
    assembler.add(
        [received(Group("g", "p", [traj("a", "g")]), "1-0"), received(Preference("p1", "x", ids, ids, ids), "2-0")]
    )
    ready, incomplete = assembler.take()
    assert [u.key for u in incomplete] == ["g"]
    assert [(u.key, u.size, u.pair is not None) for u in ready] == [("p1", 1, True)]


def test_split_trained_releases_copies_and_counts_duplicate_members() -> None:
    trained = {"g-old", "b", "s2"}
    group_copy = Unit.of("g-old", [traj("x", "g-old")], [received(Group("g-old", "p", []), "1-0")])
    group_dup = Unit.of("g-new", [traj("a", "g-new"), traj("b", "g-new")], [received(Group("g-new", "p", []), "2-0")])
    singles = Unit.of(
        "S", [traj("s1", "S"), traj("s2", "S")], [received(traj("s1", "S"), "3-0"), received(traj("s2", "S"), "4-0")]
    )

    fresh, copies = split_trained([group_copy, group_dup, singles], lambda ids: [i in trained for i in ids])

    assert sorted(r.entry_id for r in copies) == ["1-0", "4-0"]
    assert [(u.key, [s.id for s in u.samples], u.duplicates, u.size) for u in fresh] == [
        ("g-new", ["a"], 1, 2),  # "b" was trained in another group: a duplicate, counted
        ("S", ["s1"], 0, 1),  # "s2" itself is a re-delivered copy: released, not counted
    ]


def test_drop_repeats_keeps_the_first_copy_of_each_message() -> None:
    first = Unit("g", [traj("a", "g")], ["g"])
    mine = Unit.of("g", [traj("a", "g")], [received(Group("g", "p", []), "9-0")])
    other = Unit("h", [traj("b", "h")], ["h"])
    kept, repeats = drop_repeats([first, other, mine])
    assert kept == [first, other] and [r.entry_id for r in repeats] == ["9-0"]


def test_drop_repeats_trains_a_trajectory_id_once_across_the_steps_groups() -> None:
    # Two different group messages in one step carrying the member "b": the second copy is removed and counted.
    g = Unit.of("g", [traj("a", "g"), traj("b", "g")], [received(Group("g", "p", []), "1-0")])
    h = Unit.of("h", [traj("b", "h"), traj("c", "h")], [received(Group("h", "p", []), "2-0")])
    only_b = Unit.of("k", [traj("b", "k")], [received(Group("k", "p", []), "3-0")])
    kept, repeats = drop_repeats([g, h, only_b])
    assert repeats == []  # distinct messages: every entry is settled (and its repeat counted), none released
    assert [(u.key, [s.id for s in u.samples], u.duplicates, u.size) for u in kept] == [
        ("g", ["a", "b"], 0, 2),
        ("h", ["c"], 1, 2),
        ("k", [], 1, 1),
    ]


@pytest.fixture
def trajectories(redis_server: Any) -> Iterator[tuple[Any, str, Producer, MessageConsumer]]:
    """(transport, trajectories stream, a producer, the learner's consumer) on a real Redis."""
    config = BusConfig(url=redis_server.url, block_ms=50, consume_batch=4)
    transport = setup_transport(config)
    stream = config.stream("trajectories")
    yield transport, stream, Producer(transport, stream, "agent"), MessageConsumer(transport, stream, "learner", "l-0")
    transport.close()


def member(producer: Producer, group_id: str = "") -> Trajectory:
    one = producer.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-1.0], reward=0.0)
    one.group_id = group_id or one.group_id
    return one


def test_a_flood_of_groups_waits_unread_on_the_stream_beyond_the_capacity(trajectories: Any) -> None:
    transport, stream, producer, consumer = trajectories
    groups = [producer.group([member(producer), member(producer)]) for _ in range(40)]
    producer.send_many(groups)
    assembler = GroupAssembler(group_size=2, min_group_size=2, timeout_s=30.0, capacity=6)
    held: list[Unit] = []
    for _ in range(5):  # a learner that cannot train as fast as groups arrive
        ready, incomplete = assembler.collect(consumer, len(held), block_ms=0)
        held += ready
        assert not incomplete
    # Polls of consume_batch (4) entries until 6 are held: 8, below capacity + consume_batch.
    assert [u.key for u in held] == [g.id for g in groups[:8]] and assembler.full(len(held))
    assert transport.pending(stream, "learner") == 8  # the other 32 were not delivered: no lease runs on them
    assert transport.length(stream) == 40 and transport.length(transport.config.dead) == 0  # and none dropped

    consumer.ack([r for u in held[:4] for r in u.received])  # a step trained four: room to read again
    held = held[4:] + assembler.collect(consumer, len(held) - 4, block_ms=0)[0]
    assert [u.key for u in held] == [g.id for g in groups[4:12]]
    assert transport.pending(stream, "learner") == 8


def test_buffered_single_trajectories_count_towards_the_capacity_a_group_at_a_time(trajectories: Any) -> None:
    transport, stream, producer, consumer = trajectories
    producer.send_many([member(producer, group) for group in ("A", "B", "C", "D", "A", "B")])
    assembler = GroupAssembler(group_size=2, min_group_size=2, timeout_s=30.0, capacity=2)
    for _ in range(3):
        assert assembler.collect(consumer, 0, block_ms=0) == ([], [])
    # Four singles of four groups are two groups' worth: full, and the second members of A and B wait unread.
    assert assembler.buffered == 4 and assembler.full(0)
    assert transport.pending(stream, "learner") == 4
