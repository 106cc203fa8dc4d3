"""A learner process (`slipstream learner`) on a real Redis, fed by a fake rollout node made with the Producer SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bus.codec import encode
from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.producer import Producer
from bus.schema import Task
from bus.transport import setup_transport
from bus.transport.base import Delivery
from slipstream.demo_model import build_demo_model

Event = dict[str, Any]


class FakeRollout:
    """Answers every task with a group of random completions (Producer SDK), like a rollout node: group id = task
    id, trajectory ids `<task id>:<i>`, policy version = the task's min_version, the group, its published count and
    the task's ack in one transaction. `extra(producer, redis_client, version)` is called once, after `extra_after`
    tasks were answered, with the min_version of the last task (a version the learner is at, or close to)."""

    def __init__(
        self, url: str, extra: Callable[[Producer, Any, int], None] | None = None, extra_after: int = 0
    ) -> None:
        self.config = BusConfig(url=url, block_ms=100)
        self.transport = setup_transport(self.config)
        self.extra, self.extra_after = extra, extra_after
        self.answered = 0
        self.stop = threading.Event()
        self.published = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeRollout:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.transport.close()

    def _run(self) -> None:
        tasks = MessageConsumer(self.transport, self.config.stream("tasks"), "rollout", "fake-0", kinds=(Task,))
        producer = Producer(self.transport, self.config.stream("trajectories"), "fake-rollout")
        client = self.transport.client
        rng = np.random.default_rng(0)
        version = 0
        while not self.stop.is_set():
            if self.extra is not None and self.answered >= self.extra_after:
                self.extra(producer, client, version)
                self.extra = None
            for received in tasks.poll(count=8):
                task = received.message
                version = task.min_version
                members = []
                for i in range(task.n):
                    response = rng.integers(4, 90, rng.integers(1, 4)).tolist()
                    member = producer.trajectory(
                        prompt_ids=[9, 10, 11],
                        response_ids=response,
                        logprobs=[-4.6] * len(response),
                        reward=float(rng.integers(0, 2)),
                        policy_version=task.min_version,
                    )
                    member.id = f"{task.id}:{i}"
                    members.append(member)
                group = producer.group(members, task_id=task.id)
                group.id = task.id
                for member in members:
                    member.group_id = task.id
                # As a rollout node publishes: the group, its count and the task's ack in one transaction.
                source = Delivery(tasks.stream, received.entry_id, received.data, received.deliveries)
                counter = (self.config.prefix + "accounting", "published", len(members))
                payload = encode(group, limits=self.config.limits())
                self.transport.publish_and_ack(producer.stream, [payload], source, "rollout", "fake-0", counter)
                tasks.forget(received)
                self.published += len(members)
                self.answered += 1


class LearnerProcess:
    """`python -m slipstream learner` with JSON logs; its structlog events are collected as they come."""

    def __init__(self, config: Path, *args: str) -> None:
        env = dict(os.environ, SLIPSTREAM_LOG_FORMAT="json", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "slipstream", "learner", "--config", str(config), *args]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, env=env)
        self.events: list[Event] = []
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.append(event)

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.get("event") == name]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, "learner exited early:\n" + "".join(self.lines[-30:])
            assert time.monotonic() < deadline, "timed out; last lines:\n" + "".join(self.lines[-30:])
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture
def learner_config(tmp_path: Path, redis_server: Any, demo_model: Path) -> Iterator[Callable[..., Path]]:
    """Writes a learner TOML for this test's Redis: `learner_config(max_steps=6, ...)` -> its path."""

    def write(**learner: Any) -> Path:
        values = {
            "max_steps": 6, "groups_per_step": 2, "num_generations": 3, "max_new_tokens": 3, "max_staleness": 1,
            "eval_at_start": False, "eval_every": 0, "eval_limit": 4, "export_hf": False, "poll_ms": 50,
            "lr": 1e-3, "data_timeout_s": 60.0, **learner,
        }  # fmt: skip
        lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
        path = tmp_path / "learner.toml"
        path.write_text(
            f'[run]\noutput_dir = "{tmp_path / "run"}"\n[model]\npath = "{demo_model}"\n'
            f'[bus]\nurl = "{redis_server.url}"\nblock_ms = 100\n[broadcast]\nmaster_port = 0\n'
            f'[telemetry]\nport = 0\n[task]\nformat = {{ chat_template = "off" }}\n[learner]\n{lines}\n'
        )
        return path

    yield write
