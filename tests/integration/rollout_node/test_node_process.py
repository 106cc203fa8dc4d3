"""`slipstream rollout` as a real process on a real Redis: tasks in, one valid Group per task out (acked after the
publish), Join/Heartbeat/Leave on the control stream, SIGTERM finishing or releasing the tasks in hand, SIGKILL
leaving them to another node after their lease, and weights from a real `WeightSender` reaching the groups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.codec import decode, encode
from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.embedded import free_port
from bus.schema import Group, Heartbeat, Join, Leave, NodeEvent, Sampling, Task, new_id
from bus.transport import setup_transport
from envs import TaskConfig, render_prompt
from slipstream.demo_model import build_demo_model

WAIT_S = 120.0  # generous bound for anything a node process does on two shared cores


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Peaked random weights (init_std 0.3): greedy answers are printable characters, not a run of one token.
    return build_demo_model(tmp_path_factory.mktemp("demo"), init_std=0.3, seed=1)


def wait_until(what: str, done: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := done()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)
    return result


class Bus:
    """The test's own view of the bus: publish tasks, read groups and control events, look at pending tasks."""

    def __init__(self, url: str) -> None:
        self.config = BusConfig(url=url)
        self.transport = setup_transport(self.config)
        self.client = self.transport.client
        self.tasks = self.config.stream("tasks")
        self.transport.ensure_group(self.tasks, "rollout")  # as the first node would: from the stream's start

    def publish(self, tasks: list[Task]) -> None:
        self.transport.publish(self.tasks, [encode(t) for t in tasks])

    def groups(self) -> dict[str, Group]:
        entries = self.transport.read(self.config.stream("trajectories"), "0", 10_000, 0)
        return {g.id: g for g in (decode(e.data) for e in entries) if isinstance(g, Group)}

    def events(self, node_id: str) -> list[NodeEvent]:
        entries = self.transport.read(self.config.stream("control"), "0", 10_000, 0)
        return [m for m in (decode(e.data) for e in entries) if isinstance(m, NodeEvent) and m.node_id == node_id]

    def held_by(self, consumer: str) -> list[str]:
        """Task ids pending (delivered, not acked) on `consumer`."""
        rows = self.client.xpending_range(self.tasks, "rollout", "-", "+", 1000, consumername=consumer)
        ids = [r["message_id"] for r in rows]
        return [decode(self.client.xrange(self.tasks, i, i)[0][1][b"data"]).id for i in ids]

    def pending(self) -> int:
        return self.transport.pending(self.tasks, "rollout")


@pytest.fixture
def bus(redis_server: Any) -> Iterator[Bus]:
    view = Bus(redis_server.url)
    yield view
    view.transport.close()


class Node:
    """A `slipstream rollout` process; its log (JSON lines on stderr) goes to a file shown when a test fails."""

    def __init__(self, tmp_path: Path, url: str, model: Path, node_id: str, *overrides: str) -> None:
        self.node_id, self.port = node_id, free_port()
        self.log_path = tmp_path / f"{node_id}.log"
        settings = {
            "bus.url": url,
            "bus.lease_ms": 1500,
            "bus.claim_interval_s": 0.3,
            "bus.block_ms": 100,
            "model.path": model,
            "telemetry.port": self.port,
            "telemetry.log_format": "json",
            "rollout.node_id": node_id,
            "rollout.receive_weights": "false",
            "rollout.heartbeat_interval_s": 0.3,
        }
        argv = [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "slipstream", "rollout", *argv, *overrides],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def metric(self, name: str) -> float:
        """A sample's value from the node's /metrics (0 when absent or the server is not up yet)."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return 0.0
        values = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
        return sum(values)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=WAIT_S)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def logs(self) -> str:
        return self.log_path.read_text()[-4000:]


@pytest.fixture
def nodes(tmp_path: Path, redis_server: Any, model_path: Path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def start(node_id: str, *overrides: str) -> Node:
        started.append(Node(tmp_path, redis_server.url, model_path, node_id, *overrides))
        return started[-1]

    yield start
    for node in started:
        node.close()


def task(prompt: str, truth: str, n: int, max_new_tokens: int, temperature: float = 1.0) -> Task:
    sampling = Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
    return Task(id=new_id(), prompt=prompt, n=n, sampling=sampling, meta={"ground_truth": truth})


def long_tasks(count: int, n: int, tokens: int) -> list[Task]:
    """Tasks that take a while: the node runs with eos_token_ids [] so every sample runs `tokens` long."""
    return [task(f"{i}+{i}=", str(2 * i), n, tokens) for i in range(count)]


NO_EOS = ("--rollout.torch.eos_token_ids", "[]")


def test_tasks_become_valid_groups_and_sigterm_leaves_cleanly(
    bus: Bus, nodes: Callable[..., Node], model_path: Path
) -> None:
    from rollout_node.engines.base import TorchEngineConfig
    from rollout_node.engines.torch_engine import TorchEngine

    engine = TorchEngine.from_config(TorchEngineConfig(model_path=str(model_path)))
    tokenizer = engine.tokenizer

    def prompt_ids(prompt: str) -> list[int]:
        return tokenizer.encode(render_prompt(prompt, TaskConfig().format, tokenizer), add_special_tokens=False)

    # Greedy samples are known in advance: one task whose ground truth is the greedy answer, one that it is not.
    [[greedy]] = engine.generate([prompt_ids("3+4=")], Sampling(temperature=0.0, max_new_tokens=4))
    assert greedy.text.strip(), "the greedy answer must be a non-empty ground truth"
    right = task("3+4=", greedy.text.strip(), n=2, max_new_tokens=4, temperature=0.0)
    wrong = task("3+4=", "not the answer", n=2, max_new_tokens=4, temperature=0.0)
    sampled = [task(f"{a}+{a}=", str(2 * a), n=3, max_new_tokens=6) for a in range(3)]
    tasks = [right, wrong, *sampled]
    bus.publish(tasks)

    node = nodes("node-a")
    groups = wait_until("a group per task", lambda: len(g := bus.groups()) == len(tasks) and g)
    wait_until("every task acked", lambda: bus.pending() == 0)
    for t in tasks:
        group = groups[t.id]
        assert group.task_id == t.id and group.producer == "node-a" and len(group.trajectories) == t.n
        assert [tr.id for tr in group.trajectories] == [f"{t.id}:{i}" for i in range(t.n)]
        for tr in group.trajectories:
            assert tr.group_id == t.id and tr.prompt_ids.tolist() == prompt_ids(t.prompt)
            assert len(tr.behavior_logprobs) == len(tr.response_ids) > 0 and tr.behavior_logprobs.max() <= 0
            assert tr.policy_version == 0 and tr.version_ranges is None and tr.loss_mask is None
            text = tokenizer.decode(tr.response_ids.tolist(), skip_special_tokens=True)
            expected = 1.0 if " ".join(text.split()) == t.meta["ground_truth"] else 0.0
            assert tr.reward == expected and tr.rewards == {"exact_match": expected}
    assert {tr.reward for tr in groups[right.id].trajectories} == {1.0}
    assert {tr.reward for tr in groups[wrong.id].trajectories} == {0.0}
    samples = sum(t.n for t in tasks)
    assert int(bus.client.hget("slipstream:accounting", "published")) == samples
    assert node.metric("slipstream_rollout_tasks_consumed_total") == len(tasks)
    assert node.metric("slipstream_rollout_samples_generated_total") == samples
    assert node.metric("slipstream_rollout_reward_count") == samples

    # The work can be done before the first heartbeat is due (0.3 s): wait for one, the node is alive until stopped.
    wait_until("a heartbeat", lambda: any(isinstance(e, Heartbeat) for e in bus.events("node-a")))
    assert node.stop(signal.SIGTERM) == 0, node.logs()
    events = bus.events("node-a")
    join = events[0]
    assert isinstance(join, Join) and join.role == "rollout" and join.address is None
    assert join.meta == {"engine": "torch", "n_ranks": 1}
    assert isinstance(events[-1], Leave)


def test_sigterm_releases_tasks_that_cannot_finish_in_time(bus: Bus, nodes: Callable[..., Node]) -> None:
    # A call (2 tasks x 64 samples x 500 tokens) long enough that the signal lands mid-call even on a fast machine,
    # and no grace time: the call in flight is aborted, so its tasks must come back for the next node.
    tasks = long_tasks(count=4, n=64, tokens=500)
    bus.publish(tasks)
    node = nodes("node-b", *NO_EOS, "--rollout.tasks_per_call", "2", "--rollout.shutdown_timeout_s", "0")
    held = wait_until("the node to hold tasks", lambda: bus.held_by("node-b"))
    assert node.stop(signal.SIGTERM) == 0, node.logs()
    assert bus.pending() == 0  # nothing left pending on the stopped node
    # Every task is either published or back on the stream for the next node, the held ones first among them.
    checker = MessageConsumer(bus.transport, bus.tasks, "rollout", "checker")
    waiting = {r.message.id for r in checker.poll(count=100, block_ms=0)}
    published = set(bus.groups())
    assert waiting | published == {t.id for t in tasks} and not waiting & published
    assert set(held) - published <= waiting and set(held) - published
    assert isinstance(bus.events("node-b")[-1], Leave)


def test_sigkilled_node_tasks_are_finished_by_another_after_the_lease(bus: Bus, nodes: Callable[..., Node]) -> None:
    tasks = long_tasks(count=3, n=3, tokens=120)
    bus.publish(tasks)
    doomed = nodes("node-c", *NO_EOS, "--rollout.tasks_per_call", "4")
    wait_until("node-c to hold every task", lambda: len(bus.held_by("node-c")) == len(tasks))
    doomed.stop(signal.SIGKILL)
    assert not bus.groups()

    nodes("node-d", *NO_EOS)
    groups = wait_until("node-d to finish node-c's tasks", lambda: len(g := bus.groups()) == len(tasks) and g)
    assert {g.producer for g in groups.values()} == {"node-d"}
    wait_until("every task acked", lambda: bus.pending() == 0)
    assert not any(isinstance(e, Leave) for e in bus.events("node-c"))  # it died: no goodbye


def test_weight_update_reaches_generation_in_flight_and_later_groups(
    bus: Bus, nodes: Callable[..., Node], model_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from weight_broadcast.config import BroadcastConfig
    from weight_broadcast.sender import WeightSender

    sender = WeightSender(BroadcastConfig(master_port=0, timeout_s=10, join_poll_s=0.05)).start()
    try:
        node = nodes(
            "node-w",
            *NO_EOS,
            "--rollout.receive_weights",
            "true",
            "--weights.master_port",
            str(sender.port),
            "--weights.timeout_s",
            "10",
        )
        [in_flight] = long_tasks(count=1, n=16, tokens=480)
        bus.publish([in_flight])
        wait_until("the node to generate", lambda: bus.held_by("node-w"))
        model = AutoModelForCausalLM.from_pretrained(model_path)
        with torch.no_grad():
            new_weights = {name: t + 0.01 for name, t in model.state_dict().items()}
        sender.update(new_weights, version=1)
        wait_until("the node to load version 1", lambda: node.metric("slipstream_rollout_policy_version") == 1)
        later = long_tasks(count=2, n=2, tokens=8)
        bus.publish(later)
        groups = wait_until("every group", lambda: len(g := bus.groups()) == 3 and g)
    finally:
        sender.close()

    switched = groups[in_flight.id].trajectories
    assert {(tr.min_policy_version, tr.max_policy_version) for tr in switched} == {(0, 1)}
    for tr in switched:  # one switch, recorded at the same step for every sample of the call
        assert tr.version_ranges == switched[0].version_ranges
        (s0, e0, v0), (s1, e1, v1) = tr.version_ranges
        assert (s0, v0, e0, v1, e1) == (0, 0, s1, 1, len(tr.response_ids))
    for t in later:
        assert {tr.policy_version for tr in groups[t.id].trajectories} == {1}
    assert node.stop(signal.SIGTERM) == 0, node.logs()
