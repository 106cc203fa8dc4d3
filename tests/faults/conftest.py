"""Harness of the fault tests: a whole Slipstream run as real processes on a real Redis, and SIGKILL to break it.

    cluster.learner()                      # `python -m slipstream learner --config <this test's TOML>`
    cluster.rollout("rollout-0")           # `python -m slipstream rollout ... --rollout.node_id rollout-0`
    cluster.wait("step 3", lambda: max(cluster.steps(learner), default=0) >= 3, learner)
    learner.kill()                         # SIGKILL: no goodbye, no final checkpoint
    cluster.audit()                        # every published trajectory: trained once, dropped, or still in flight

Every node logs JSON lines to `<tmp>/logs/<name>.log` (parsed by `Node.events`), serves /metrics on a port of its
own, and reaches the learner's weight broadcast on one fixed port, so a restarted learner is found where the old
one was. Before any node starts, the harness adds a consumer group `audit` to the trajectories stream that never
reads: the consumers' trimming keeps every entry any group still needs, so every copy ever published stays readable
for the audit. Timeouts are small (lease, broadcast, claims) so each fault plays out in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from bus.codec import decode
from bus.config import BusConfig
from bus.embedded import free_port
from bus.schema import Group, MessageError, Weights
from bus.settings import deep_merge
from bus.transport import setup_transport
from slipstream.demo_model import build_demo_model
from weight_broadcast.rendezvous import Board, connect_store

WAIT_S = 90.0  # bound of every wait here: on two busy shared cores a node process took up to 35 s to start
AUDIT_GROUP = "audit"
T = TypeVar("T")
Event = dict[str, Any]

# Small and fast: 2 groups of 4 samples per step, 3 tokens per answer, tiny timeouts. Tests override what they need.
BASE_SETTINGS: dict[str, dict[str, Any]] = {
    "run": {"name": "faults", "seed": 0},
    "bus": {"block_ms": 100, "lease_ms": 2000, "claim_interval_s": 0.3, "stats_interval_s": 1.0},
    "task": {
        "source": "arithmetic",
        "eval_fraction": 0.2,
        "arithmetic": {"ops": ["+"], "max_operand": 9},
        "format": {"chat_template": "off"},
        # A reward the random model earns about every third answer (a digit in it), so every step has advantages
        # and changes the weights: each policy version differs from the last.
        "rewards": [{"function": "format", "pattern": "[^0-9]*[0-9]"}],
    },
    "learner": {
        "max_steps": 8,
        "groups_per_step": 2,
        "num_generations": 4,
        "max_new_tokens": 3,
        "max_staleness": 1,
        "lr": 3e-3,
        "eval_at_start": False,
        "eval_every": 0,
        "eval_limit": 4,
        "export_hf": False,
        "poll_ms": 50,
        "group_timeout_s": 1.0,
        "data_timeout_s": 45.0,
        "checkpoint_every": 2,
        "keep_checkpoints": 100,
    },
    "broadcast": {"timeout_s": 3.0, "join_poll_s": 0.1},
    "weights": {"timeout_s": 3.0},
    "rollout": {"tasks_per_call": 2, "heartbeat_interval_s": 0.5, "min_version_wait_s": 5.0},
    "telemetry": {"log_format": "json"},
}


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """`sections` as TOML: scalars and lists of scalars as JSON literals, dicts as sub-tables, lists of dicts as
    arrays of tables."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any], header: str = "[{}]") -> None:
        lines.append(header.format(name))
        nested = {k: v for k, v in values.items() if isinstance(v, dict) or _is_tables(v)}
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items() if k not in nested)
        for key, value in nested.items():
            for item in value if isinstance(value, list) else [value]:
                table(f"{name}.{key}", item, "[[{}]]" if isinstance(value, list) else "[{}]")

    for name, values in sections.items():
        table(name, values)
    return "\n".join(lines) + "\n"


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def log_time(event: Event) -> float:
    """A log line's timestamp (ISO, UTC) as unix seconds."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


class Node:
    """One node process; its stderr (JSON log lines) goes to a file that `events` parses."""

    def __init__(self, name: str, argv: list[str], log_path: Path, telemetry_port: int) -> None:
        self.name, self.log_path, self.telemetry_port = name, log_path, telemetry_port
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env.pop("SLIPSTREAM_LOG_FORMAT", None)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def events(self, name: str | None = None) -> list[Event]:
        """The structlog events this process logged so far, or those named `name`."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    out.append(event)
        return out

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of the samples `name` (matching `labels`) on the node's /metrics; None when it does not answer."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.telemetry_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
        return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, nothing flushed."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: frozen as it is (a hung process, a VM paused), sockets open."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout_s: float = WAIT_S) -> int:
        """SIGTERM and wait for the exit status."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def finish(self, timeout_s: float = WAIT_S) -> int:
        """Wait for the node to end by itself (the learner at max_steps)."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not end within {timeout_s}s:\n{self.tail()}") from None


@dataclass
class Audit:
    """Every trajectory the trajectories stream ever held, and where each ended.

    copies: trajectory id -> how many published copies (group entries) hold it. trained: ids the learner marked
    trained (its dedup set). dropped: ids in the learner's dead letters. in_flight: ids in entries the learner group
    has not settled (not delivered yet, or delivered and not acked). accounting: the `<prefix>accounting` hash.
    """

    copies: Counter[str] = field(default_factory=Counter)
    trained: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)
    accounting: dict[str, int] = field(default_factory=dict)

    @property
    def unaccounted(self) -> set[str]:
        """Published ids that are neither trained, dropped nor in flight: lost."""
        return set(self.copies) - self.trained - self.dropped - self.in_flight

    @property
    def dropped_total(self) -> int:
        return sum(v for k, v in self.accounting.items() if k.startswith("dropped:"))

    def in_flight_copies(self) -> int:
        return sum(self.copies[i] for i in self.in_flight)


class Cluster:
    """A run's processes on one Redis, with the test's view of the bus (see the module docstring)."""

    def __init__(self, root: Path, redis_url: str, model: Path, settings: dict[str, Any] | None = None) -> None:
        self.root, self.redis_url = root, redis_url
        self.broadcast_port = free_port()
        self.settings = deep_merge(BASE_SETTINGS, settings or {})
        self.settings = deep_merge(
            self.settings,
            {
                "run": {"output_dir": str(root / "run")},
                "model": {"path": str(model)},
                "bus": {"url": redis_url},
                "broadcast": {"master_port": self.broadcast_port},
                "weights": {"master_port": self.broadcast_port},
            },
        )
        self.config_path = root / "faults.toml"
        self.config_path.write_text(toml_text(self.settings))
        (root / "logs").mkdir(exist_ok=True)
        self.bus = BusConfig(url=redis_url)
        self.transport = setup_transport(self.bus)
        self.client = self.transport.client
        self.trajectories = self.bus.stream("trajectories")
        self.transport.ensure_group(self.trajectories, AUDIT_GROUP)
        self.nodes: list[Node] = []

    # --- processes -----------------------------------------------------------------------------------------------
    def learner(self, *args: str) -> Node:
        """Start the learner (`--resume` and dotted overrides may be given)."""
        return self._start("learner", "learner", list(args))

    def rollout(self, node_id: str, *args: str) -> Node:
        """Start rollout node `node_id` (the same id as a killed node's: it re-reads that node's pending tasks)."""
        return self._start(node_id, "rollout", ["--rollout.node_id", node_id, *args])

    def _start(self, name: str, command: str, args: list[str]) -> Node:
        port = free_port()
        argv = [sys.executable, "-m", "slipstream", command, "--config", str(self.config_path)]
        argv += ["--telemetry.port", str(port), *args]
        incarnation = sum(1 for n in self.nodes if n.name == name)  # a restarted node logs to a file of its own
        log_path = self.root / "logs" / (f"{name}.log" if not incarnation else f"{name}.{incarnation}.log")
        node = Node(name, argv, log_path, port)
        self.nodes.append(node)
        return node

    def wait(self, what: str, done: Callable[[], T], *watch: Node, timeout_s: float = WAIT_S) -> T:
        """Poll `done()` until it returns something truthy (returned); fail after `timeout_s` or when a `watch`ed
        node exits, with the logs of the nodes in `watch`."""
        deadline = time.monotonic() + timeout_s
        while not (result := done()):
            dead = [n for n in watch if not n.alive]
            if dead or time.monotonic() > deadline:
                why = f"{dead[0].name} exited with {dead[0].process.returncode}" if dead else f"{timeout_s}s passed"
                logs = "\n".join(f"--- {n.name}\n{n.tail()}" for n in watch)
                raise AssertionError(f"waiting for {what}: {why}\n{logs}")
            time.sleep(0.05)
        return result

    def close(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.kill()
        self.transport.close()

    # --- what the learner did ------------------------------------------------------------------------------------
    @staticmethod
    def steps(learner: Node) -> list[int]:
        """Steps the learner logged as trained ("train_step"), in order."""
        return [int(e["step"]) for e in learner.events("train_step")]

    def latest_checkpoint(self) -> int | None:
        """Step of the newest complete checkpoint (the `latest` pointer), or None."""
        pointer = self.root / "run" / "checkpoints" / "latest"
        return int(pointer.read_text().strip().removeprefix("step-")) if pointer.exists() else None

    def checkpoint_weights(self, step: int) -> dict[str, Any]:
        """The policy's tensors in checkpoint `step` ({HF parameter name: tensor}), read without a process group."""
        import torch
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        folder = self.root / "run" / "checkpoints" / f"step-{step:08d}"
        target = self.root / f"weights-{step}.pt"
        dcp_to_torch_save(folder / "dcp", target)
        state = torch.load(target, weights_only=False)["model"]
        return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}

    def board(self) -> Board:
        """A client of the learner's rendezvous store, as an engine is one: to watch its weight announcements."""
        return Board(connect_store("127.0.0.1", self.broadcast_port, WAIT_S))

    # --- the bus -------------------------------------------------------------------------------------------------
    def accounting(self) -> dict[str, int]:
        raw = self.client.hgetall(f"{self.bus.prefix}accounting")
        return {k.decode(): int(v) for k, v in raw.items()}

    def groups(self) -> list[tuple[str, Group]]:
        """(entry id, group) of every group entry the trajectories stream holds, oldest first."""
        out = []
        for entry_id, fields in self.client.xrange(self.trajectories, "-", "+"):
            with contextlib.suppress(MessageError):
                message = decode(fields[b"data"])
                if isinstance(message, Group):
                    out.append((entry_id.decode(), message))
        return out

    def announced(self) -> dict[int, Weights]:
        """The `Weights` announced on the control stream, by version (the last announcement of each)."""
        entries = self.client.xrange(self.bus.stream("control"), "-", "+")
        messages = [decode(fields[b"data"]) for _, fields in entries]
        return {m.version: m for m in messages if isinstance(m, Weights)}

    def audit(self) -> Audit:
        """Where every trajectory ever published ended (see `Audit`)."""
        audit = Audit(accounting=self.accounting())
        groups = self.groups()
        for _, group in groups:
            audit.copies.update(t.id for t in group.trajectories)
        ids = list(audit.copies)
        if ids:
            scores = self.client.zmscore(f"{self.bus.prefix}dedup:learner", ids)
            audit.trained = {i for i, score in zip(ids, scores, strict=True) if score is not None}
        for _, fields in self.client.xrange(self.bus.dead, "-", "+"):
            if fields.get(b"stream") == self.trajectories.encode():
                with contextlib.suppress(MessageError):
                    message = decode(fields[b"data"])
                    members = message.trajectories if isinstance(message, Group) else [message]
                    audit.dropped.update(getattr(t, "id", "") for t in members)
        learner_group = {g["name"].decode(): g for g in self.client.xinfo_groups(self.trajectories)}.get("learner")
        if learner_group is not None:
            last = _entry_key(learner_group["last-delivered-id"].decode())
            pending = {
                row["message_id"].decode()
                for row in self.client.xpending_range(self.trajectories, "learner", "-", "+", 100_000)
            }
            for entry_id, group in groups:
                if entry_id in pending or _entry_key(entry_id) > last:
                    audit.in_flight.update(t.id for t in group.trajectories)
        else:  # the learner never read: everything is in flight
            audit.in_flight = set(audit.copies)
        return audit

    def pending_tasks(self, consumer: str | None = None) -> dict[str, int]:
        """Tasks delivered to the rollout group (to `consumer` only, if given) and not acked: entry id -> ms since
        their last delivery."""
        stream = self.bus.stream("tasks")
        kwargs = {"consumername": consumer} if consumer else {}
        try:
            rows = self.client.xpending_range(stream, "rollout", "-", "+", 10_000, **kwargs)
        except redis.ResponseError:  # no group yet
            return {}
        return {row["message_id"].decode(): int(row["time_since_delivered"]) for row in rows}

    def tasks_idle(self) -> bool:
        """Whether every task on the stream was delivered to the rollout group and none is held (pending)."""
        stream = self.bus.stream("tasks")
        newest = self.client.xrevrange(stream, count=1)
        groups = {g["name"].decode(): g for g in self.client.xinfo_groups(stream)}
        delivered = groups["rollout"]["last-delivered-id"].decode() if "rollout" in groups else "0-0"
        return not self.pending_tasks() and (not newest or newest[0][0].decode() == delivered)

    def task_ids(self, entry_ids: Iterable[str]) -> list[str]:
        """The task ids of task entries."""
        stream = self.bus.stream("tasks")
        out = []
        for entry_id in entry_ids:
            [(_, fields)] = self.client.xrange(stream, entry_id, entry_id)
            out.append(decode(fields[b"data"]).id)
        return out


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


@pytest.fixture(scope="session")
def fault_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model, built once per session."""
    return build_demo_model(tmp_path_factory.mktemp("fault-model"))


@pytest.fixture
def redis_everysec(redis_server: Any) -> Any:
    """This test's `redis_server` restarted with appendfsync everysec (the embedded Redis's setting) instead of
    always: acknowledged writes reach the file within about a second, so a kill may lose some of them."""
    redis_server.appendfsync = "everysec"
    redis_server.restart()
    return redis_server


@pytest.fixture
def make_cluster(tmp_path: Path, redis_server: Any, fault_model: Path) -> Iterator[Callable[..., Cluster]]:
    """`make_cluster(settings)`: a `Cluster` on this test's Redis with `settings` over `BASE_SETTINGS`; every node
    is killed at the end."""
    made: list[Cluster] = []

    def make(settings: dict[str, Any] | None = None) -> Cluster:
        made.append(Cluster(tmp_path, redis_server.url, fault_model, settings))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()
