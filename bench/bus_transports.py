"""Transport throughput: Slipstream's Redis and ZeroMQ transports against raw redis-py and raw pyzmq.

Each measurement is one producer PROCESS -> one consumer PROCESS moving `n` copies of one encoded 1024-token
trajectory (~8 KB, made once: this measures the transport, not the codec). Both processes connect first, then
start together; throughput = n / (time the consumer holds the last message - common start).

- redis: Slipstream `publish` batches (pipelined XADD + XLEN) + `consume` + `ack`, vs plain redis-py pipelined
  XADD + XREADGROUP/XACK with the same batch size.
- zmq: Slipstream `publish` ([stream, data] frames, HWM backpressure) + `consume`, vs plain PUSH/PULL
  send_multipart/recv_multipart of the same two frames (plain single-frame send/recv is reported alongside).

Ratios are Slipstream / raw, best of `--repeat` runs each (runs alternate so that noise hits both alike).

    slipstream bench bus_transports --n 20000 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np
import redis
import zmq

from bus.codec import encode
from bus.config import BusConfig
from bus.embedded import EmbeddedRedis, free_port
from bus.schema import Trajectory
from bus.transport import setup_transport

STREAM, GROUP = "bench:trajectories", "bench"
PROMPT_TOKENS = 64
# Children are forked: they start in milliseconds and inherit the imports; nothing here runs threads before forking.
_CTX = mp.get_context("fork")


def trajectory_payload(tokens: int = 1024) -> bytes:
    """One encoded trajectory: prompt int32 [64], response int32 [tokens], logprobs float32 [tokens]."""
    rng = np.random.default_rng(0)
    traj = Trajectory(
        id="bench",
        group_id="bench",
        producer="bench",
        prompt_ids=rng.integers(0, 32_000, PROMPT_TOKENS, dtype=np.int32),
        response_ids=rng.integers(0, 32_000, tokens, dtype=np.int32),
        behavior_logprobs=-rng.random(tokens, dtype=np.float32),
        reward=1.0,
    )
    return encode(traj)


# --- the four pairs of (producer, consumer) bodies: each gets its setup done, then waits for `start` -------------
def _raw_redis_producer(url: str, n: int, payload: bytes, batch: int, ready: Event, start: Event) -> None:
    client = redis.Redis.from_url(url)
    ready.set()
    start.wait()
    for first in range(0, n, batch):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, n - first)):
            pipe.xadd(STREAM, {"data": payload})
        pipe.execute()


def _raw_redis_consumer(url: str, n: int, batch: int, ready: Event, start: Event) -> None:
    client = redis.Redis.from_url(url)
    ready.set()
    start.wait()
    got = 0
    while got < n:
        response = client.xreadgroup(GROUP, "c", {STREAM: ">"}, count=batch, block=1000)
        ids = [entry_id for entry_id, _ in response[0][1]] if response else []
        if ids:
            client.xack(STREAM, GROUP, *ids)
            got += len(ids)


def _slipstream_producer(config: BusConfig, n: int, payload: bytes, batch: int, ready: Event, start: Event) -> None:
    transport = setup_transport(config)
    payloads = [payload] * batch
    ready.set()
    start.wait()
    for first in range(0, n, batch):
        transport.publish(STREAM, payloads[: min(batch, n - first)])
    transport.close()


def _slipstream_consumer(config: BusConfig, n: int, batch: int, ready: Event, start: Event) -> None:
    transport = setup_transport(config)
    transport.ensure_group(STREAM, GROUP)
    ready.set()
    start.wait()
    got = 0
    while got < n:
        deliveries = transport.consume(STREAM, GROUP, "c", batch, 1000)
        transport.ack(STREAM, GROUP, [d.entry_id for d in deliveries])
        got += len(deliveries)
    transport.close()


def _raw_zmq_producer(
    endpoint: str, n: int, payload: bytes, batch: int, ready: Event, start: Event, frames: int = 2
) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    topic = STREAM.encode()
    ready.set()
    start.wait()
    if frames == 2:  # the same [stream, data] framing as Slipstream's transport
        for _ in range(n):
            sock.send_multipart((topic, payload))
    else:
        for _ in range(n):
            sock.send(payload)
    sock.close(linger=-1)
    ctx.term()


def _raw_zmq_consumer(endpoint: str, n: int, batch: int, ready: Event, start: Event, frames: int = 2) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    ready.set()
    start.wait()
    receive = sock.recv_multipart if frames == 2 else sock.recv
    for _ in range(n):
        receive()
    sock.close(0)
    ctx.term()


def _single_frame_producer(*args: Any) -> None:
    _raw_zmq_producer(*args, frames=1)


def _single_frame_consumer(*args: Any) -> None:
    _raw_zmq_consumer(*args, frames=1)


def _consumer_main(body: Callable[..., None], args: tuple[Any, ...], done: Any) -> None:
    body(*args)
    done.put(time.monotonic())  # CLOCK_MONOTONIC: one clock for every process of the machine


def _run_pair(
    producer: Callable[..., None], consumer: Callable[..., None], target: Any, n: int, payload: bytes, batch: int
) -> float:
    """Seconds from the common start until the consumer holds all `n` messages."""
    ready_p, ready_c, start = _CTX.Event(), _CTX.Event(), _CTX.Event()
    done = _CTX.Queue()
    c = _CTX.Process(target=_consumer_main, args=(consumer, (target, n, batch, ready_c, start), done), daemon=True)
    p = _CTX.Process(target=producer, args=(target, n, payload, batch, ready_p, start), daemon=True)
    c.start()
    if not ready_c.wait(30):  # the consumer binds / creates its group before the producer exists
        raise RuntimeError("bench consumer did not get ready in 30 s")
    p.start()
    try:
        if not ready_p.wait(30):
            raise RuntimeError("bench producer did not get ready in 30 s")
        began = time.monotonic()
        start.set()
        finished = done.get(timeout=300)
        return finished - began
    finally:
        for proc in (p, c):
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def _summary(name: str, n: int, size: int, raw_s: float, ours_s: float) -> dict[str, float]:
    mb = n * size / 1e6
    return {
        f"{name}_raw_msgs_per_s": n / raw_s,
        f"{name}_raw_mb_per_s": mb / raw_s,
        f"{name}_slipstream_msgs_per_s": n / ours_s,
        f"{name}_slipstream_mb_per_s": mb / ours_s,
        f"{name}_ratio": raw_s / ours_s,
    }


def measure_redis(url: str, n: int = 20_000, tokens: int = 1024, batch: int = 256, repeat: int = 3) -> dict[str, float]:
    """Slipstream Redis transport vs raw redis-py on the Redis at `url` (its bench:* keys are overwritten)."""
    payload = trajectory_payload(tokens)
    client = redis.Redis.from_url(url)
    config = BusConfig(url=url, max_stream_length=max(100_000, 2 * n), publish_batch=batch, consume_batch=batch)
    raw, ours = [], []
    for _ in range(repeat):
        client.delete(STREAM)
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        raw.append(_run_pair(_raw_redis_producer, _raw_redis_consumer, url, n, payload, batch))
        client.delete(STREAM)
        ours.append(_run_pair(_slipstream_producer, _slipstream_consumer, config, n, payload, batch))
    client.delete(STREAM)
    client.close()
    return {"payload_bytes": len(payload), "redis_n": n, **_summary("redis", n, len(payload), min(raw), min(ours))}


def measure_zmq(n: int = 50_000, tokens: int = 1024, batch: int = 256, repeat: int = 3) -> dict[str, float]:
    """Slipstream ZeroMQ transport vs raw pyzmq PUSH/PULL over localhost TCP, both with [stream, data] frames
    (the ratio); raw single-frame send/recv is reported too, for orientation."""
    payload = trajectory_payload(tokens)
    raw, ours, single = [], [], []
    for _ in range(repeat):

        def endpoint() -> str:
            return f"tcp://127.0.0.1:{free_port()}"

        raw.append(_run_pair(_raw_zmq_producer, _raw_zmq_consumer, endpoint(), n, payload, batch))
        config = BusConfig(type="zmq", zmq_endpoint=endpoint())
        ours.append(_run_pair(_slipstream_producer, _slipstream_consumer, config, n, payload, batch))
        single.append(_run_pair(_single_frame_producer, _single_frame_consumer, endpoint(), n, payload, batch))
    return {
        "payload_bytes": len(payload),
        "zmq_n": n,
        **_summary("zmq", n, len(payload), min(raw), min(ours)),
        "zmq_raw_single_frame_msgs_per_s": n / min(single),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slipstream bench bus_transports", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="messages per Redis run (ZeroMQ runs move 2.5x more)")
    parser.add_argument("--tokens", type=int, default=1024, help="response tokens per trajectory")
    parser.add_argument("--batch", type=int, default=256, help="messages per publish / consume batch")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the best of each is kept")
    parser.add_argument("--url", default=None, help="Redis to use (default: a private embedded one)")
    parser.add_argument("--only", choices=["redis", "zmq"], default=None, help="measure one transport only")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    for name in ("n", "tokens", "batch", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1")
    results: dict[str, float] = {}
    # Logs (embedded Redis starting, ...) go to stderr: with --json, stdout carries the JSON object only.
    with contextlib.redirect_stdout(sys.stderr):
        if args.only in (None, "redis"):
            if args.url:
                results |= measure_redis(args.url, args.n, args.tokens, args.batch, args.repeat)
            else:
                with EmbeddedRedis() as server:
                    results |= measure_redis(server.url, args.n, args.tokens, args.batch, args.repeat)
        if args.only in (None, "zmq"):
            results |= measure_zmq(int(args.n * 2.5), args.tokens, args.batch, args.repeat)
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:34s} {value:12,.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
