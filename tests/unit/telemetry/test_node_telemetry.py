"""start_node_telemetry: one call leaves a node scrapeable, identified in its metrics and in its log lines."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from telemetry.config import TelemetryConfig
from telemetry.node import start_node_telemetry


@pytest.mark.usefixtures("restore_logging")
def test_node_is_scrapeable_identified_and_logs_json(capsys: pytest.CaptureFixture[str]) -> None:
    config = TelemetryConfig(port=0, log_format="json")
    server = start_node_telemetry(config, role="rollout", node_id="rollout-7", readiness=lambda: (False, {}))
    url = server.url
    try:
        scrape = httpx.get(url + "/metrics", timeout=10).text
        health = httpx.get(url + "/healthz", timeout=10)
    finally:
        server.stop()
    info = {f.name: f for f in text_string_to_metric_families(scrape)}["slipstream_node_info"]  # exposed as a gauge
    assert info.samples[0].labels["node_id"] == "rollout-7"
    assert info.samples[0].labels["role"] == "rollout"
    assert health.status_code == 503
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]  # stderr: stdout stays clean
    started = next(line for line in lines if line["event"] == "telemetry server started")
    assert (started["node_id"], started["role"], started["url"]) == ("rollout-7", "rollout", url)
