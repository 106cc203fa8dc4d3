"""Crashes on a real redis-server: a consumer PROCESS killed with SIGKILL mid-batch, and Redis itself killed and
restarted (AOF) under a running producer and consumer. Messages are counted: none lost, none processed twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import redis

from bus.codec import encode
from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.dedup import RedisDedup
from bus.producer import Producer
from bus.schema import Trajectory, new_id
from bus.transport import setup_transport
from telemetry.metrics import BUS_RECONNECTS

S, G = "slipstream:trajectories", "learners"
PROCESSED = "test:processed"

# A learner-like worker: its effect (RPUSH of the id) and the dedup mark commit in ONE transaction per message;
# the batch is acked only at the end, so a kill mid-batch leaves processed-but-unacked and unprocessed entries.
WORKER = """
import sys, time
from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.dedup import RedisDedup
from bus.transport import setup_transport
url, stream, group, processed, name, delay = sys.argv[1:6] + [float(sys.argv[6])]
transport = setup_transport(BusConfig(url=url, lease_ms=500, claim_interval_s=0.1, block_ms=100))
dedup = RedisDedup(transport, "test:dedup")
consumer = MessageConsumer(transport, stream, group, name, dedup=dedup)
while True:
    batch = consumer.poll(10)
    for received in batch:
        time.sleep(delay)
        pipe = transport.client.pipeline(transaction=True)
        pipe.rpush(processed, received.id)
        dedup.mark([received.id], pipeline=pipe)
        pipe.execute()
    consumer.ack(batch)
"""


def trajectory() -> Trajectory:
    traj_id = new_id()
    return Trajectory(
        id=traj_id,
        group_id=traj_id,
        producer="test",
        prompt_ids=np.array([1, 2], np.int32),
        response_ids=np.array([3], np.int32),
        behavior_logprobs=np.array([-0.1], np.float32),
    )


def start_worker(url: str, name: str, delay: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, S, G, PROCESSED, name, str(delay)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_consumer_process_killed_mid_batch_loses_nothing_and_repeats_nothing(redis_server) -> None:  # noqa: ANN001
    r = redis.Redis.from_url(redis_server.url)
    transport = setup_transport(BusConfig(url=redis_server.url))
    transport.ensure_group(S, G)
    sent = [trajectory() for _ in range(120)]
    payloads = [encode(m) for m in sent]
    transport.publish(S, payloads + payloads[:15])  # plus 15 republished copies (a producer's retries)

    doomed = start_worker(redis_server.url, "doomed", 0.02)
    try:
        wait_for(lambda: r.llen(PROCESSED) >= 25, 30, "the first worker to process some messages")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        pending_of_doomed = r.xpending_range(S, G, "-", "+", 100, consumername="doomed")
        assert pending_of_doomed, "the worker should have died holding a batch"

        survivor = start_worker(redis_server.url, "survivor", 0.0)
        try:
            wait_for(lambda: r.llen(PROCESSED) >= len(sent) and transport.pending(S, G) == 0, 30, "the survivor")
            time.sleep(0.3)  # anything processed twice would show up now
        finally:
            survivor.kill()
            survivor.wait(10)
    finally:
        doomed.kill()
        doomed.wait(10)
    processed = [x.decode() for x in r.lrange(PROCESSED, 0, -1)]
    assert len(processed) == len(sent)  # none twice
    assert set(processed) == {m.id for m in sent}  # none lost
    assert not transport.dead_letters()
    transport.close()


def test_redis_killed_and_restarted_mid_stream_producer_and_consumer_carry_on(redis_server) -> None:  # noqa: ANN001
    config = BusConfig(url=redis_server.url, reconnect_min_s=0.02, reconnect_max_s=0.2, reconnect_timeout_s=30)
    producer = Producer(setup_transport(config), S, "test-producer")
    consumer_transport = setup_transport(config)
    consumer = MessageConsumer(consumer_transport, S, G, "c0", dedup=RedisDedup(consumer_transport, "test:dedup"))
    sent = [trajectory() for _ in range(400)]
    processed: list[str] = []
    published: list[str] = []
    errors: list[BaseException] = []
    reconnects_before = BUS_RECONNECTS.labels("redis")._value.get()

    def produce() -> None:
        try:
            for start in range(0, len(sent), 20):
                producer.send_many(sent[start : start + 20])
                published.extend(m.id for m in sent[start : start + 20])
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def consume() -> None:
        try:
            deadline = time.monotonic() + 60
            while len(processed) < len(sent) and time.monotonic() < deadline:
                batch = consumer.poll(25, 100)
                processed.extend(r.id for r in batch)
                consumer.ack(batch)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(processed) >= 100 or errors, 30, "traffic before the crash")
    redis_server.kill()
    assert len(published) < len(sent)  # the crash is mid-stream for the producer too
    time.sleep(0.5)  # both sides hit the dead server and back off
    redis_server.restart()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert sorted(processed) == sorted(m.id for m in sent)  # every message once, none lost
    assert BUS_RECONNECTS.labels("redis")._value.get() >= reconnects_before + 2  # producer and consumer
    producer.transport.close()
    consumer_transport.close()
