"""The wire-protocol contract, end to end: examples/produce_without_slipstream.py (plain redis-py + msgpack, no
Slipstream code) publishes against a real redis-server and Slipstream's consumer receives valid trajectories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.schema import Group, Trajectory
from bus.transport import setup_transport

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "produce_without_slipstream.py"


def test_a_producer_without_slipstream_code_feeds_the_consumer(redis_server, require_service) -> None:  # noqa: ANN001
    require_service(EXAMPLE.exists(), f"{EXAMPLE} is missing (the codec part of the wire protocol)")
    config = BusConfig(url=redis_server.url)
    transport = setup_transport(config)
    consumer = MessageConsumer(transport, config.stream("trajectories"), "learners", "c0", kinds=(Trajectory, Group))
    stream = config.stream("trajectories")
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--url", redis_server.url, "--stream", stream],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    printed = json.loads(run.stdout.strip().splitlines()[-1])  # {"stream", "entry_id", "id"}
    received = consumer.poll(100, 1000)
    assert transport.dead_letters() == [], [d.reason for d in transport.dead_letters()]
    [got] = received
    assert (got.entry_id, got.id, printed["stream"]) == (printed["entry_id"], printed["id"], stream)
    assert isinstance(got.message, Trajectory)
    assert len(got.message.response_ids) == len(got.message.behavior_logprobs) > 0
    consumer.ack(received)
    transport.close()
