"""ZeroMQ consumer framing over real sockets: odd frame counts, several streams on one socket, receive timeouts.

The consumer reads frames one by one (not recv_multipart) and waits with a receive timeout (not poll): whatever
arrives, every [stream, data] message must come out whole, on its stream, in order, and nothing may hang.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from bus.config import BusConfig
from bus.embedded import free_port
from bus.transport import Delivery, Transport, setup_transport

S, OTHER = "slipstream:trajectories", "slipstream:control"


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def consumer(endpoint: str) -> Iterator[Transport]:
    transport = setup_transport(BusConfig(type="zmq", zmq_endpoint=endpoint))
    transport.ensure_group(S, "g")  # binds
    yield transport
    transport.close()


@pytest.fixture
def raw_push(endpoint: str) -> Iterator[zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    yield sock
    sock.close(0)
    ctx.term()


def drain(transport: Transport, stream: str, want: int, timeout: float = 20.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += transport.consume(stream, "g", "c", want - len(got), 100)
    return got


def test_messages_of_one_or_three_frames_are_dead_lettered_whole_between_good_ones(
    consumer: Transport, raw_push: zmq.Socket
) -> None:
    raw_push.send_multipart([S.encode(), b"first"])
    raw_push.send_multipart([S.encode(), b"data", b"stray"])
    raw_push.send(b"lonely")
    raw_push.send_multipart([S.encode(), b"last"])
    assert [d.data for d in drain(consumer, S, 2)] == [b"first", b"last"]
    dead = consumer.dead_letters()
    assert [(d.reason, d.data) for d in dead] == [
        ("frames: expected 2 [stream, data], got 3", S.encode() + b"data" + b"stray"),
        ("frames: expected 2 [stream, data], got 1", b"lonely"),
    ]


def test_messages_of_another_stream_wait_in_its_buffer_in_order(consumer: Transport, raw_push: zmq.Socket) -> None:
    for i in range(6):
        raw_push.send_multipart([(S if i % 2 else OTHER).encode(), b"%d" % i])
    assert [d.data for d in drain(consumer, S, 3)] == [b"1", b"3", b"5"]
    others = drain(consumer, OTHER, 3)
    assert [(d.stream, d.data) for d in others] == [(OTHER, b"0"), (OTHER, b"2"), (OTHER, b"4")]
    assert len({d.entry_id for d in others}) == 3


def test_receive_timeouts_change_from_call_to_call_and_never_hang(consumer: Transport, endpoint: str) -> None:
    assert consumer.consume(S, "g", "c", 10, 0) == []  # nothing queued: back at once
    assert consumer.consume(S, "g", "c", 10, 50) == []  # waits 50 ms, then gives up
    producer = setup_transport(BusConfig(type="zmq", zmq_endpoint=endpoint))
    try:
        producer.publish(S, [b"a", b"b"])
        got = consumer.consume(S, "g", "c", 10, 10_000)  # wakes on the first message, takes what is queued
        got += drain(consumer, S, 2 - len(got))
        assert [d.data for d in got] == [b"a", b"b"]
        assert consumer.consume(S, "g", "c", 10, 0) == []
    finally:
        producer.close()
