"""`slipstream status` against a real Redis: streams, nodes, accounting and dead letters as an operator sees them."""

import json
import subprocess
import sys

from bus.codec import encode
from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.producer import Producer
from bus.schema import Heartbeat, Join, Leave
from bus.transport import setup_transport


def test_status_shows_the_cluster(redis_server) -> None:
    config = BusConfig(url=redis_server.url)
    with Producer.connect(redis_server.url, producer_name="agent-7") as producer:
        producer.send(producer.trajectory(prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-0.1, -0.2], reward=1.0))
    transport = setup_transport(config)
    control = config.stream("control")
    events = [
        Join(node_id="rollout-0", role="rollout", version=0),
        Heartbeat(node_id="rollout-0", role="rollout", version=3),
        Join(node_id="rollout-1", role="rollout", version=0),
        Leave(node_id="rollout-1", role="rollout", version=2),
    ]
    transport.publish(control, [encode(e) for e in events], retain=100)
    transport.publish(config.stream("trajectories"), [b"\xc1 not msgpack"])
    transport.ensure_group(config.stream("trajectories"), "learner")
    consumer = MessageConsumer(transport, config.stream("trajectories"), "learner", "learner-0")
    assert len(consumer.poll(block_ms=100)) == 1  # the valid one; the invalid one went to the dead stream
    transport.client.hincrby(f"{config.prefix}accounting", "published", 1)
    transport.close()

    out = subprocess.run(
        [sys.executable, "-m", "slipstream", "status", "--json", "--bus.url", redis_server.url],
        capture_output=True,
        text=True,
        check=True,
    )
    status = json.loads(out.stdout)
    assert status["streams"]["trajectories"]["length"] == 2
    assert status["streams"]["trajectories"]["groups"]["learner"]["pending"] == 1
    assert status["nodes"]["rollout-0"] == {**status["nodes"]["rollout-0"], "state": "up", "version": 3}
    assert status["nodes"]["rollout-1"]["state"] == "left"
    assert status["accounting"] == {"published": 1}
    assert len(status["dead_letters"]) == 1 and status["dead_letters"][0]["reason"].startswith("data:")
    assert "@" not in status["url"]
