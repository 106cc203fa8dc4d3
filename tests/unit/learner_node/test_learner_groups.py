"""Group assembly: whole groups at once, single trajectories by group_id with a timeout, trained-id checks."""

from __future__ import annotations

import numpy as np

from bus.consumer import Received
from bus.schema import Group, Preference, Trajectory
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
