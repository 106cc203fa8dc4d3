"""bench/bus_transports.py runs end to end (tiny sizes) and prints exactly one JSON object with its ratios."""

from __future__ import annotations

import json

import pytest

from bench import bus_transports


def test_json_output_carries_both_ratios(redis_server, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert bus_transports.main(["--n", "200", "--repeat", "1", "--url", redis_server.url, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # fails unless stdout is exactly one JSON document
    for key in ("redis_ratio", "zmq_ratio", "redis_slipstream_msgs_per_s", "zmq_raw_msgs_per_s"):
        assert result[key] > 0, key
    assert 8000 < result["payload_bytes"] < 9500  # a 1024-token trajectory, ~8 KB
