"""ZeroMQ transport over real sockets: fan-in from several producer PROCESSES, CURVE allow-list, backpressure."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.embedded import free_port
from bus.transport import BackpressureTimeout, Delivery, Transport, setup_transport

S = "slipstream:trajectories"

PRODUCER = """
import sys
from bus import Producer
endpoint, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Producer.connect(endpoint, producer_name=name) as producer:
    trajectories = [
        producer.trajectory(prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-0.1, -0.2], reward=1.0, meta={"seq": i})
        for i in range(count)
    ]
    for start in range(0, count, 50):
        producer.send_many(trajectories[start : start + 50])
"""


def zmq_transport(endpoint: str, **overrides: object) -> Transport:
    return setup_transport(BusConfig(type="zmq", zmq_endpoint=endpoint, **overrides))


def drain(transport: Transport, want: int, timeout: float = 20.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += transport.consume(S, "g", "c", want - len(got), 100)
    return got


def test_fan_in_from_several_producer_processes() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    consumer_transport = zmq_transport(endpoint)
    consumer = MessageConsumer(consumer_transport, S, "learners", "c0")  # binds the endpoint
    producers = [
        subprocess.Popen([sys.executable, "-c", PRODUCER, endpoint, f"agent-{i}", "200"], stdout=subprocess.DEVNULL)
        for i in range(3)
    ]
    try:
        received = []
        deadline = time.monotonic() + 60
        while len(received) < 600 and time.monotonic() < deadline:
            received += consumer.poll(100, 100)
        assert [p.wait(30) for p in producers] == [0, 0, 0]
    finally:
        for p in producers:
            p.kill()
            p.wait(10)
        consumer_transport.close()
    by_producer: dict[str, list[int]] = {}
    for r in received:
        by_producer.setdefault(r.message.producer, []).append(r.message.meta["seq"])
    assert by_producer == {f"agent-{i}": list(range(200)) for i in range(3)}  # all of them, each in order
    assert len({r.id for r in received}) == 600


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """CURVE certificates: the consumer's, an allowed producer's and an unknown producer's; `allowed` dir."""
    out: dict[str, Path] = {}
    for name in ("server", "allowed_client", "unknown_client"):
        public, secret = zmq.auth.create_certificates(tmp_path, name)
        out[name], out[name + "_public"] = Path(secret), Path(public)
    out["allowed"] = tmp_path / "allowed"
    out["allowed"].mkdir()
    shutil.copy(out["allowed_client_public"], out["allowed"])
    return out


def test_curve_lets_an_allowed_key_in_and_nothing_from_an_unknown_key(keys: dict[str, Path]) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = zmq_transport(
        endpoint, zmq_curve_secret_key_file=str(keys["server"]), zmq_curve_allowed_keys_dir=str(keys["allowed"])
    )
    server.ensure_group(S, "g")
    unknown = zmq_transport(
        endpoint,
        zmq_curve_secret_key_file=str(keys["unknown_client"]),
        zmq_curve_server_key_file=str(keys["server_public"]),
        zmq_linger_ms=0,
    )
    plain = zmq_transport(endpoint, zmq_linger_ms=0)  # no CURVE at all
    allowed = zmq_transport(
        endpoint,
        zmq_curve_secret_key_file=str(keys["allowed_client"]),
        zmq_curve_server_key_file=str(keys["server_public"]),
    )
    try:
        unknown.publish(S, [b"intruder"] * 5)
        plain.publish(S, [b"plain"] * 5)
        assert drain(server, 1, timeout=1.5) == []
        allowed.publish(S, [b"friend"] * 5)
        assert [d.data for d in drain(server, 5)] == [b"friend"] * 5
        assert drain(server, 1, timeout=0.5) == []  # the rejected ones never trickle in later
    finally:
        for t in (unknown, plain, allowed, server):
            t.close()


def test_producer_blocks_at_the_high_water_mark_then_times_out_then_resumes() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    producer = zmq_transport(endpoint, zmq_sndhwm=5, backpressure_timeout_s=0.3, zmq_linger_ms=0)
    try:
        with pytest.raises(BackpressureTimeout, match=r"still holds 5 entries \(zmq_sndhwm=5\)"):
            producer.publish(S, [b"x"] * 50)  # nobody is reading: the queue fills at 5
        consumer = zmq_transport(endpoint)
        try:
            consumer.ensure_group(S, "g")
            got = drain(consumer, 5)
            producer.publish(S, [b"y"] * 3)
            got += drain(consumer, 3)
            assert [d.data for d in got] == [b"x"] * 5 + [b"y"] * 3
        finally:
            consumer.close()
    finally:
        producer.close()


def test_a_frame_that_is_not_stream_plus_data_is_dead_lettered_and_consuming_goes_on() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    consumer = zmq_transport(endpoint)
    consumer.ensure_group(S, "g")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUSH)
    raw.connect(endpoint)
    try:
        raw.send(b"one frame only")
        raw.send_multipart([S.encode(), b"fine"])
        assert [d.data for d in drain(consumer, 1)] == [b"fine"]
        [dead] = consumer.dead_letters()
        assert (dead.reason, dead.data) == ("frames: expected 2 [stream, data], got 1", b"one frame only")
    finally:
        raw.close(0)
        ctx.term()
        consumer.close()
