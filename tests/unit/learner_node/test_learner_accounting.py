"""Accounting on a real Redis: settle (acks + dedup marks + counts in one MULTI), drops counted from the dead stream,
invalid messages counted too, retried transactions counted once, and published = trained + dropped + in flight."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from prometheus_client import generate_latest

from bus.codec import encode
from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.dedup import RedisDedup
from bus.producer import Producer
from bus.schema import Group, Preference, Task, Trajectory
from bus.transport import setup_transport
from learner_node.accounting import DROP_REASONS, FILTERED, Ledger, dead_reason, trajectory_count
from learner_node.groups import GroupAssembler, Unit
from telemetry import metrics


@pytest.fixture
def bus(redis_server: Any) -> Any:
    config = BusConfig(url=redis_server.url, block_ms=50, reconnect_min_s=0.01)
    transport = setup_transport(config)
    yield config, transport
    transport.close()


def make_ledger(config: BusConfig, transport: Any) -> tuple[Ledger, MessageConsumer]:
    dedup = RedisDedup(transport, f"{config.prefix}dedup:learner")
    consumer = MessageConsumer(
        transport,
        config.stream("trajectories"),
        "learner",
        "learner-0",
        kinds=(Group, Trajectory, Preference),
        dedup=dedup,
    )
    return Ledger(transport, consumer, dedup), consumer


def publish_group(producer: Producer, client: redis.Redis, size: int, version: int = 0) -> Group:
    members = [
        producer.trajectory(
            prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-0.5, -0.5], reward=1.0, policy_version=version
        )
        for _ in range(size)
    ]
    group = producer.group(members)
    producer.send(group)
    client.hincrby("slipstream:accounting", "published", size)  # what a rollout node does after each publish
    return group


def take_units(consumer: MessageConsumer) -> tuple[list[Unit], list[Unit]]:
    assembler = GroupAssembler(group_size=2, min_group_size=2, timeout_s=0.0)
    assembler.add(consumer.poll(count=100))
    return assembler.take()


def test_every_published_trajectory_ends_trained_or_dropped(bus: Any) -> None:
    config, transport = bus
    ledger, consumer = make_ledger(config, transport)
    client = transport.client
    producer = Producer(transport, config.stream("trajectories"), "agent")
    trained_group = publish_group(producer, client, 3)
    publish_group(producer, client, 2)
    solo = producer.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-1.0], reward=0.0)
    producer.send(solo)
    client.xadd(config.stream("trajectories"), {"data": b"\xc1 not msgpack"})  # a producer that sends garbage
    client.hincrby("slipstream:accounting", "published", 2)

    ready, incomplete = take_units(consumer)  # the garbage is dead-lettered by the consumer while polling
    assert [u.key for u in ready] == [trained_group.id, ready[1].key] and [u.key for u in incomplete] == [solo.group_id]
    assert ledger.settle([ready[0]]) == {"trained": 3}
    ledger.drop([ready[1]], "stale", "policy version lag 5 > max_staleness 2")
    ledger.drop(incomplete, "incomplete_group", "1 member < min_group_size 2")

    assert ledger.scan_dead() == {"dropped:stale": 2, "dropped:incomplete_group": 1, "dropped:invalid": 1}
    assert ledger.totals() == {
        "published": 7, "trained": 3, "dropped:stale": 2, "dropped:incomplete_group": 1, "dropped:invalid": 1,
    }  # fmt: skip
    assert ledger.in_flight() == 0
    assert transport.pending(config.stream("trajectories"), "learner") == 0
    # Trained ids are remembered: the group and each member.
    dedup = RedisDedup(transport, f"{config.prefix}dedup:learner")
    assert dedup.seen([trained_group.id, *(t.id for t in trained_group.trajectories)]) == [True] * 4
    # A second scan (or a restarted learner's scan) finds nothing new: the cursor moved with the counts.
    assert make_ledger(config, transport)[0].scan_dead() == {}

    publish_group(producer, client, 4)
    assert ledger.in_flight() == 4  # published, not delivered yet
    consumer.poll(count=10)
    assert ledger.in_flight() == 4  # delivered, not acked yet


def test_a_settle_retried_after_a_lost_reply_counts_once(bus: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config, transport = bus
    ledger, consumer = make_ledger(config, transport)
    publish_group(Producer(transport, config.stream("trajectories"), "agent"), transport.client, 2)
    [unit], _ = take_units(consumer)
    real_pipeline = transport.client.pipeline
    lost = []

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        execute = pipe.execute

        def execute_then_lose_the_reply(*a: Any, **k: Any) -> Any:
            result = execute(*a, **k)
            if not lost:
                lost.append(True)
                raise redis.ConnectionError("reply lost")
            return result

        pipe.execute = execute_then_lose_the_reply
        return pipe

    monkeypatch.setattr(transport.client, "pipeline", pipeline)
    ledger.settle([unit])
    assert lost and ledger.totals() == {"published": 2, "trained": 2}


class ReplyLosingProxy:
    """A TCP proxy in front of a real Redis. Armed, it passes on the next client write that holds an EXEC and then
    closes that connection instead of passing back the server's answer: the transaction ran, its reply was lost.
    Other connections (the client's reconnection) pass through untouched."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}"
        self.armed = threading.Event()
        self.lost = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.redis_port))
            exec_sent = threading.Event()
            threading.Thread(target=self._upstream, args=(client, server, exec_sent), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, exec_sent), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, exec_sent: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.armed.is_set() and b"EXEC" in data:
                    self.armed.clear()
                    exec_sent.set()
                server.sendall(data)

    def _downstream(self, server: socket.socket, client: socket.socket, exec_sent: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if exec_sent.is_set():  # the server answered the transaction: it ran
                    self.lost.set()
                    break
                client.sendall(data)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def lossy_bus(redis_server: Any) -> Iterator[tuple[BusConfig, Any, ReplyLosingProxy]]:
    """A transport that talks to a real Redis through a `ReplyLosingProxy`."""
    proxy = ReplyLosingProxy(redis_server.port)
    config = BusConfig(url=proxy.url, block_ms=50, reconnect_min_s=0.01)
    transport = setup_transport(config)
    yield config, transport, proxy
    transport.close()
    proxy.close()


def test_tasks_retried_after_a_lost_reply_are_published_once(lossy_bus: Any, redis_server: Any) -> None:
    config, transport, proxy = lossy_bus
    consumer = MessageConsumer(transport, config.stream("trajectories"), "learner", "learner-0")
    ledger = Ledger(transport, consumer, None, admission_key="slipstream:admission:run")
    tasks = [Task(id=f"run:abc:0:{i}", prompt=f"{i}+1=", n=2) for i in range(3)]
    state = {"nonce": "abc", "epoch": 0, "index": 3, "seed": 0, "size": 9, "published": 3, "trained": 0, "dropped": 0}
    proxy.armed.set()
    ledger.publish_tasks(config.stream("tasks"), tasks, state)
    assert proxy.lost.is_set(), "the transaction's reply was not lost: nothing was retried"
    direct = redis.Redis.from_url(redis_server.url)
    assert direct.xlen(config.stream("tasks")) == 3  # not 6: the retry found the batch's token and stopped
    assert ledger.admission_state() == {k: str(v) for k, v in state.items()}

    ledger.publish_tasks(config.stream("tasks"), tasks[:1], {**state, "index": 4, "published": 4})  # the next batch
    assert direct.xlen(config.stream("tasks")) == 4


def test_a_drop_dead_letters_all_its_entries_in_one_transaction(bus: Any) -> None:
    config, transport = bus
    ledger, consumer = make_ledger(config, transport)
    producer = Producer(transport, config.stream("trajectories"), "agent")
    for _ in range(3):
        publish_group(producer, transport.client, 2)
    ready, _ = take_units(consumer)
    transport.client.config_resetstat()
    ledger.drop(ready, "stale", "lag 3 > 2")
    stats = transport.client.info("commandstats")
    assert (stats["cmdstat_exec"]["calls"], stats["cmdstat_xadd"]["calls"]) == (1, 3)
    assert transport.length(config.dead) == 3 and transport.pending(config.stream("trajectories"), "learner") == 0


def test_duplicate_members_are_counted_with_the_trained_ones(bus: Any) -> None:
    config, transport = bus
    ledger, consumer = make_ledger(config, transport)
    publish_group(Producer(transport, config.stream("trajectories"), "agent"), transport.client, 3)
    [unit], _ = take_units(consumer)
    unit.samples, unit.duplicates = unit.samples[:1], 2
    assert ledger.settle([unit]) == {"trained": 1, "dropped:duplicate": 2}


def test_dead_letter_helpers() -> None:
    assert [dead_reason(r) for r in ("stale: lag 3", "incomplete_group: 1", "deliveries: 6 > 5", "x.y: bad")] == [
        "stale", "incomplete_group", "poison", "invalid",
    ]  # fmt: skip
    assert trajectory_count(b"\xc1") == 1
    assert trajectory_count(msgpack.packb({"kind": "group", "trajectories": [{}, {}, {}]})) == 3
    one = Trajectory("t", "g", "p", np.array([1], np.int32), np.array([2], np.int32), np.array([-1.0], np.float32))
    assert trajectory_count(encode(one)) == 1


def test_every_drop_reason_is_declared_and_its_series_exists_before_the_first_drop() -> None:
    dead_letters = (
        "stale: lag 3", "future_version: 9 > 2", "incomplete_group: 1 < 2", "nonfinite_gradient: nan",
        "deliveries: 6 > 5", "bad x",
    )  # fmt: skip
    # Duplicates and zero-variance groups are settled, not dead-lettered: every other reason comes from a dead letter.
    assert {dead_reason(r) for r in dead_letters} | {"duplicate", FILTERED} == set(DROP_REASONS)
    assert set(metrics.DROP_REASONS) == set(DROP_REASONS)
    exposed = generate_latest(metrics.REGISTRY).decode()
    for reason in DROP_REASONS:
        assert f'slipstream_learner_dropped_samples_total{{reason="{reason}"}} ' in exposed, reason


def test_admission_state_goes_with_its_tasks_and_counts_their_groups(bus: Any) -> None:
    config, transport = bus
    dedup = RedisDedup(transport, f"{config.prefix}dedup:learner")
    consumer = MessageConsumer(transport, config.stream("trajectories"), "learner", "learner-0", dedup=dedup)
    ledger = Ledger(transport, consumer, dedup, admission_key="slipstream:admission:run")
    assert ledger.admission_state() is None
    tasks = [Task(id=f"run:abc:0:{i}", prompt=f"{i}+1=", n=2) for i in range(2)]
    state = {"nonce": "abc", "epoch": 0, "index": 2, "seed": 0, "size": 5, "published": 2, "trained": 0, "dropped": 0}
    ledger.publish_tasks(config.stream("tasks"), tasks, state)
    assert transport.length(config.stream("tasks")) == 2
    assert ledger.admission_state() == {k: str(v) for k, v in state.items()}

    producer = Producer(transport, config.stream("trajectories"), "rollout")
    for task in tasks:
        members = [producer.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-1.0], reward=0.0) for _ in range(2)]
        producer.send(producer.group(members, task_id=task.id))
    first, second = take_units(consumer)[0]
    ledger.settle([first], tasks=1)
    ledger.drop([second], "stale", "lag 9 > 2")
    ledger.scan_dead(task_prefix="run:abc:")
    assert (ledger.admission_state()["trained"], ledger.admission_state()["dropped"]) == ("1", "1")
    ledger.reset_admission()
    assert ledger.admission_state() is None
