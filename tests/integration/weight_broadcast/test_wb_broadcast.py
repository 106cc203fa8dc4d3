"""The weight broadcast end to end: learner rank 0 in this process, engines in spawned processes, real gloo groups
over a real TCPStore, an engine killed with SIGKILL."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from weight_broadcast.layout import parse_checksum

Cluster = Any  # the `cluster` fixture of this folder's conftest.py


def test_two_engines_get_every_tensor_bit_exactly_at_their_rank_offsets(cluster: Cluster) -> None:
    cluster.start_engine("a")
    cluster.start_engine("b")
    v1 = cluster.tiny_model(seed=1).state_dict()
    cluster.sender.update(v1, version=1)  # the engines may still be starting: they get v1 when they join
    assert all(got == cluster.tensor_bytes(v1) for got in cluster.wait_loaded({"a", "b"}, 1).values())

    v2 = cluster.tiny_model(seed=2).state_dict()
    report = cluster.sender.update(v2, version=2)
    assert sorted(report.delivered) == ["a", "b"] and not report.failed
    loaded = cluster.wait_loaded({"a", "b"}, 2)
    assert loaded["a"] == loaded["b"] == cluster.tensor_bytes(v2)  # float32, bfloat16 and the int64 buffer, bit for bit

    joins = {e["name"]: (e["group"], e["rank"]) for e in cluster.seen if e["event"] == "joined"}  # latest of each
    assert joins["a"][0] == joins["b"][0] == report.group
    assert sorted(rank for _, rank in joins.values()) == [1, 2]

    announcement = cluster.announced[-1]
    assert (announcement.version, announcement.group) == (2, report.group)
    assert [t.name for t in announcement.tensors] == list(v2)
    assert all(len({announcement.tensors[i].dtype for i in bucket}) == 1 for bucket in announcement.buckets)
    assert len(announcement.buckets) >= 3  # int64, bfloat16 and float32 never share a bucket
    algorithm, digests = parse_checksum(announcement.checksum, len(announcement.buckets))
    assert algorithm == "sum64" and all(digests)


def test_a_corrupted_bucket_is_refused_and_the_version_not_switched(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.start_engine("a")
    v1 = cluster.tiny_model(seed=1).state_dict()
    cluster.sender.update(v1, version=1)
    cluster.wait_loaded({"a"}, 1)

    real_broadcast = dist.broadcast
    corrupt = [True]

    def corrupting_broadcast(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if corrupt and kwargs.get("src", args[0] if args else None) == 0:
            corrupt.clear()  # the first bucket sent after this point arrives with one flipped bit
            tensor = tensor.clone()
            tensor[0] ^= 1
        return real_broadcast(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "broadcast", corrupting_broadcast)
    v2 = cluster.tiny_model(seed=2).state_dict()
    report = cluster.sender.update(v2, version=2)
    assert "bucket 0 sum64" in report.failed["a"] and not report.delivered
    cluster.wait_for(lambda seen: any(e["event"] == "refused" and "version 2" in e["error"] for e in seen))
    # The sender re-sends the current version to the refused engine, intact this time.
    assert cluster.wait_loaded({"a"}, 2)["a"] == cluster.tensor_bytes(v2)
    assert [e["version"] for e in cluster.seen if e["event"] == "loaded"] == [1, 2]  # nothing corrupt was loaded


def test_a_killed_engine_is_timed_out_and_rejoins_with_the_current_weights(cluster: Cluster) -> None:
    cluster.start_engine("a")
    cluster.start_engine("b")
    cluster.sender.update(cluster.tiny_model(seed=1).state_dict(), version=1)
    cluster.wait_loaded({"a", "b"}, 1)

    cluster.kill("b")
    v2 = cluster.tiny_model(seed=2).state_dict()
    report = cluster.sender.update(v2, version=2)
    assert "b" in report.failed and "b" not in report.delivered
    # Liveness, not speed: the dead engine costs at most its timeout (plus the ack wait), never a hang.
    assert report.seconds < 4 * cluster.timeout_s
    assert cluster.wait_loaded({"a"}, 2)["a"] == cluster.tensor_bytes(v2)  # the live engine carries on
    assert "b" not in cluster.sender.members

    cluster.start_engine("b")  # restarted: asks to rejoin and gets v2 without another update
    assert cluster.wait_loaded({"b"}, 2)["b"] == cluster.tensor_bytes(v2)
    v3 = cluster.tiny_model(seed=3).state_dict()
    report = cluster.sender.update(v3, version=3)
    assert sorted(report.delivered) == ["a", "b"]
    assert all(got == cluster.tensor_bytes(v3) for got in cluster.wait_loaded({"a", "b"}, 3).values())


def test_a_late_joiner_gets_the_current_weights(cluster: Cluster) -> None:
    v1 = cluster.tiny_model(seed=1).state_dict()
    report = cluster.sender.update(v1, version=1)
    assert report.delivered == [] and report.group == ""  # nobody there yet: the weights wait in staging
    cluster.start_engine("late")
    assert cluster.wait_loaded({"late"}, 1)["late"] == cluster.tensor_bytes(v1)


def test_engines_follow_a_restarted_learner_and_get_its_weights(cluster: Cluster) -> None:
    cluster.start_engine("a")
    cluster.sender.update(cluster.tiny_model(seed=1).state_dict(), version=1)
    cluster.wait_loaded({"a"}, 1)

    cluster.restart_sender()  # the engine's store connection breaks: it reconnects and asks to join the new learner
    v2 = cluster.tiny_model(seed=2).state_dict()
    cluster.sender.update(v2, version=2)
    assert cluster.wait_loaded({"a"}, 2)["a"] == cluster.tensor_bytes(v2)


def test_a_staged_snapshot_is_sent_as_staged_and_a_newer_one_replaces_it(cluster: Cluster) -> None:
    cluster.start_engine("a")
    v1 = cluster.tiny_model(seed=1).state_dict()
    cluster.sender.update(v1, version=1)
    cluster.wait_loaded({"a"}, 1)
    assert cluster.sender.send_staged() is None  # nothing staged since

    live = {name: tensor.clone() for name, tensor in cluster.tiny_model(seed=2).state_dict().items()}
    cluster.sender.stage(live, version=2)
    expected_v3 = cluster.tensor_bytes(live)
    cluster.sender.stage(live, version=3)  # replaces v2 before it was sent: engines only want the newest
    for tensor in live.values():  # training goes on: the snapshot must not follow
        tensor.add_(1) if tensor.is_floating_point() else tensor.sub_(1)
    report = cluster.sender.send_staged()
    assert report is not None and report.version == 3 and report.delivered == ["a"]
    assert cluster.wait_loaded({"a"}, 3)["a"] == expected_v3
    assert cluster.sender.send_staged() is None
