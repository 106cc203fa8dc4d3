"""The control keys on a real TCPStore, and the SGLang rank layout."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from bus.schema import TensorSpec, Weights
from weight_broadcast.rendezvous import (
    ANNOUNCEMENTS_KEPT,
    Board,
    GroupSpec,
    JoinRequest,
    Member,
    connect_store,
    host_store,
)


@pytest.fixture
def stores() -> Iterator[tuple[Board, Board]]:
    """(the learner's board, an engine's board) over one real TCPStore on a free port."""
    master = host_store(0, timeout_s=5)
    client = connect_store("127.0.0.1", master.port, timeout_s=5)
    yield Board(master), Board(client)


def weights(version: int, group: str = "g") -> Weights:
    return Weights(version, [TensorSpec("w", "float32", [2])], [[0]], [8], "", group, created_at=float(version))


def test_engines_get_rank_offsets_after_the_ranks_of_earlier_engines() -> None:
    """SGLang's contract: learner rank 0 is rank 0, engine i starts at 1 + the GPUs of the engines before it."""
    spec = GroupSpec.assign("g", "nccl", [("tp2", 2), ("tp1", 1), ("tp4", 4)])
    assert spec.members == (Member("tp2", 1, 2), Member("tp1", 3, 1), Member("tp4", 4, 4))
    assert spec.world_size == 8
    assert spec.member("tp1") == Member("tp1", 3, 1) and spec.member("nobody") is None


def test_a_reader_gets_the_newest_announcement_and_skips_stale_ones(stores: tuple[Board, Board]) -> None:
    learner, engine = stores
    assert engine.next_announcement(0, timeout_s=0.05) is None
    learner.announce(weights(1))
    assert engine.next_announcement(0, timeout_s=1) == (1, weights(1))
    assert engine.next_announcement(1, timeout_s=0.05) is None
    for version in range(2, ANNOUNCEMENTS_KEPT + 5):
        learner.announce(weights(version))
    seq, latest = engine.next_announcement(1, timeout_s=1)
    assert (seq, latest) == (ANNOUNCEMENTS_KEPT + 4, weights(ANNOUNCEMENTS_KEPT + 4))
    assert not learner.store.check([f"announce/{seq - ANNOUNCEMENTS_KEPT}"])  # old ones are dropped


def test_join_requests_are_taken_once_in_order(stores: tuple[Board, Board]) -> None:
    learner, engine = stores
    engine.request_join(JoinRequest("a", 1, "x1"))
    engine.request_join(JoinRequest("b", 2, "y1"))
    assert learner.take_joins() == [JoinRequest("a", 1, "x1"), JoinRequest("b", 2, "y1")]
    assert learner.take_joins() == []
    engine.request_join(JoinRequest("a", 1, "x2"))
    assert learner.take_joins() == [JoinRequest("a", 1, "x2")]


def test_roll_call_spec_checksum_and_acks_round_trip(stores: tuple[Board, Board]) -> None:
    learner, engine = stores
    soon = time.monotonic() + 0.05
    assert not learner.wait_ready("g", "a", soon) and engine.wait_spec("g", soon) is None
    engine.set_ready("g", "a")
    assert learner.wait_ready("g", "a", time.monotonic() + 1)
    spec = GroupSpec.assign("g", "gloo", [("a", 1)])
    learner.publish_spec(spec)
    assert engine.wait_spec("g", time.monotonic() + 1) == spec
    learner.publish_checksum("g", 4, "sum64:00ff")
    assert engine.wait_checksum("g", 4, time.monotonic() + 1) == "sum64:00ff"
    assert learner.wait_ack("g", 4, "a", time.monotonic() + 0.05) is None
    engine.ack("g", 4, "a", "version 4 refused: bucket 0")
    assert learner.wait_ack("g", 4, "a", time.monotonic() + 1) == "version 4 refused: bucket 0"
    engine.ack("g", 5, "a")
    assert learner.wait_ack("g", 5, "a", time.monotonic() + 1) == ""
    learner.forget("g", ["a"], [4])
    assert not learner.store.check(["g/spec", "g/ready/a", "g/checksum/4"])


def test_an_unreachable_store_is_an_error_not_a_hang() -> None:
    with pytest.raises(dist.DistError, match="timed out"):
        connect_store("127.0.0.1", 1, timeout_s=0.5)
