"""The same sender driving an engine over SGLang's HTTP routes (`HttpLink` -> `weight_routes`): pause, bucketed
update, continue; a crashed engine is probed again and gets the current weights when it is back."""

from __future__ import annotations

from typing import Any

from weight_broadcast.links import HttpLink

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
