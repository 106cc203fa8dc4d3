"""The same sender driving an engine over SGLang's HTTP routes (`HttpLink` -> `weight_routes`): pause, bucketed
update, continue; a crashed engine is probed again and gets the current weights when it is back; tensor-parallel
engines take one rank per worker."""

from __future__ import annotations

from typing import Any

from weight_broadcast.links import HttpLink
from weight_broadcast.rendezvous import GroupSpec

Cluster = Any  # the `cluster` fixture of this folder's conftest.py


def test_an_http_engine_is_updated_between_pause_and_continue_and_probed_back_after_a_crash(
    cluster: Cluster, http_port: int
) -> None:
    url = cluster.start_http_engine("sgl", http_port)
    cluster.sender.add_engine(HttpLink("sgl", url))
    v1 = cluster.tiny_model(seed=1).state_dict()
    report = cluster.sender.update(v1, version=1)
    assert report.delivered == ["sgl"] and not report.failed
    assert cluster.wait_loaded({"sgl"}, 1)["sgl"] == cluster.tensor_bytes(v1)
    cluster.wait_for(lambda seen: [e["event"] for e in seen] == ["paused", "loaded", "continued"])

    cluster.kill("sgl")
    v2 = cluster.tiny_model(seed=2).state_dict()
    report = cluster.sender.update(v2, version=2)
    assert "sgl" in report.failed and not report.delivered
    # Back on the same address: the sender's probe (rejoin_after_s) readmits it and re-sends the current version.
    cluster.start_http_engine("sgl", http_port)
    assert cluster.wait_loaded({"sgl"}, 2)["sgl"] == cluster.tensor_bytes(v2)
    assert cluster.sender.members == ["sgl"]


def test_two_tensor_parallel_engines_join_at_one_rank_per_worker_and_every_worker_loads_the_update(
    cluster: Cluster, http_port: int
) -> None:
    """As SGLang builds the group: learner rank 0, then each engine's tp workers at rank_offset + tp_rank
    (world_size = 1 + the sum of the tp sizes); every worker receives the same broadcast."""
    joins: list[tuple[str, int, int]] = []

    class Recorded(HttpLink):
        def join(self, spec: GroupSpec, master_addr: str, master_port: int, deadline: float) -> None:
            member = spec.member(self.name)
            assert member is not None
            joins.append((self.name, spec.world_size, member.rank_offset))
            super().join(spec, master_addr, master_port, deadline)

    for i, name in enumerate(("sgl-a", "sgl-b")):
        url = cluster.start_http_engine(name, http_port + i, tp_size=2)
        cluster.sender.add_engine(Recorded(name, url, n_ranks=2))
    weights = cluster.tiny_model(seed=3).state_dict()
    report = cluster.sender.update(weights, version=1)
    assert sorted(report.delivered) == ["sgl-a", "sgl-b"] and not report.failed
    workers = {"sgl-a/tp0", "sgl-a/tp1", "sgl-b/tp0", "sgl-b/tp1"}
    loaded = cluster.wait_loaded(workers, 1)
    assert all(loaded[w] == cluster.tensor_bytes(weights) for w in workers)
    assert {world for _, world, _ in joins} == {5}
    assert sorted(offset for _, _, offset in joins) == [1, 3]
