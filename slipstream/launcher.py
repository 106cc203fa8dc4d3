"""`slipstream up`: a whole cluster on one machine, as separate processes that meet only on the bus.

    embedded redis-server (unless bus.url is set)
    learner   = python -m slipstream learner --config C [learner overrides]      (telemetry port P)
    rollout i = python -m slipstream rollout --config C [rollout overrides]      (telemetry port P + 1 + i)

Every child reads the same TOML; the launcher hands each only the CLI overrides of sections it has, and the
addresses it made up (bus URL, broadcast port, telemetry ports) through SLIPSTREAM_* environment variables. It
renders the learner's progress events (JSON log lines on its stderr) and ends with a summary whose last line holds
`eval_accuracy=<value>` and the elapsed seconds. Children are stopped (SIGTERM, then SIGKILL) when the learner
ends, when one fails, or on Ctrl-C; the embedded Redis goes with them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog
from pydantic import Field

from bus.config import BusConfig
from bus.settings import ModelConfig, NodeSettings, RunConfig, Section, parse_overrides
from telemetry.config import TelemetryConfig

log = structlog.get_logger(__name__)

STOP_GRACE_S = 20.0  # SIGTERM lets a rollout node finish or release its tasks; then SIGKILL


class UpConfig(Section):
    """The `[up]` section: what `slipstream up` starts on this machine."""

    rollout_nodes: int = Field(1, ge=1, le=64, description="rollout node processes to start")
    build_demo_model: bool = Field(
        True, description="write the tiny demo model to model.path first when that folder holds no config.json"
    )
    demo_model: dict[str, Any] = Field(
        default_factory=dict, description="DemoModelSpec fields for the demo model (hidden_size, num_layers, seed, ...)"
    )
    timeout_s: float = Field(3600.0, gt=0, le=7 * 86400, description="stop everything after this long")
    log_dir: str | None = Field(None, description="children's logs go here (None: <run.output_dir>/logs)")


class UpSettings(NodeSettings):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    bus: BusConfig = BusConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    up: UpConfig = UpConfig()


def overrides_for(settings_cls: type[NodeSettings], overrides: list[str]) -> list[str]:
    """The overrides whose section `settings_cls` has (`--learner.lr 1e-6` goes to the learner only)."""
    kept: list[str] = []
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        takes_value = "=" not in arg and i + 1 < len(overrides) and not overrides[i + 1].startswith("--")
        group = overrides[i : i + 2] if takes_value else overrides[i : i + 1]
        section = next(iter(parse_overrides(group)))
        if section in settings_cls.model_fields:
            kept.extend(group)
        i += len(group)
    return kept


@dataclass
class Progress:
    """What the launcher knows of the run, from the learner's events."""

    target_accuracy: float | None = None
    started: float = field(default_factory=time.monotonic)
    reached_target_s: float | None = None  # elapsed seconds at the first eval at or above target_accuracy
    step: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    eval_accuracy: float | None = None
    first_eval_accuracy: float | None = None
    summary: dict[str, Any] | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def take(self, event: dict[str, Any]) -> str | None:
        """Fold one learner log event in; return the progress line to show, if any."""
        name = event.get("event")
        if name == "train_step":
            self.step = int(event.get("step", self.step))
            self.last = event
            return (
                f"step {self.step:>5}  v{event.get('version', '?'):<4} reward {_num(event.get('reward_mean'))}  "
                f"loss {_num(event.get('loss'))}  staleness {_num(event.get('staleness_mean'))}"
                f"/{event.get('staleness_max', '?')}  tok/s {_num(event.get('tokens_per_s'), 0)}  "
                f"eval {_num(self.eval_accuracy)}  {self.elapsed():6.1f}s"
            )
        if name == "eval":
            self.eval_accuracy = float(event["eval_accuracy"])
            if self.first_eval_accuracy is None:
                self.first_eval_accuracy = self.eval_accuracy
            target = self.target_accuracy
            if target is not None and self.reached_target_s is None and self.eval_accuracy >= target:
                self.reached_target_s = self.elapsed()
            return f"eval  step {event.get('step', self.step):>5}  eval_accuracy={self.eval_accuracy:.3f}"
        if name == "summary":
            self.summary = event
            if event.get("eval_accuracy") is not None:
                self.eval_accuracy = float(event["eval_accuracy"])
        return None


def _num(value: Any, digits: int = 3) -> str:
    return "   -  " if value is None else f"{float(value):6.{digits}f}"


class Cluster:
    """The child processes of one `slipstream up` and the embedded Redis they share."""

    def __init__(
        self, settings: UpSettings, config_path: str, overrides: list[str], out: IO[str], progress: Progress
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides
        self.out = out
        self.progress = progress
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = Path(settings.up.log_dir or Path(settings.run.output_dir) / "logs")
        self._redis: Any = None
        self._stopping = threading.Event()

    # --- start -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        from bus.embedded import free_port

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_model()
        env = dict(os.environ, SLIPSTREAM_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
        if self.settings.bus.type == "redis" and not self.settings.bus.url:
            from bus.embedded import EmbeddedRedis

            self._redis = EmbeddedRedis(data_dir=str(Path(self.settings.run.output_dir) / "redis")).start()
            env["SLIPSTREAM_BUS__URL"] = self._redis.url
            print(f"embedded Redis at {self._redis.url}", file=self.out)
        broadcast_port = str(free_port())
        env["SLIPSTREAM_BROADCAST__MASTER_PORT"] = env["SLIPSTREAM_WEIGHTS__MASTER_PORT"] = broadcast_port
        base_port = self.settings.telemetry.port
        self._spawn("learner", "learner", env | {"SLIPSTREAM_TELEMETRY__PORT": str(base_port)}, pipe=True)
        for i in range(self.settings.up.rollout_nodes):
            port = str(base_port + 1 + i)
            node_env = env | {"SLIPSTREAM_TELEMETRY__PORT": port, "SLIPSTREAM_ROLLOUT__NODE_ID": f"rollout-{i}"}
            self._spawn(f"rollout-{i}", "rollout", node_env, pipe=False)

    def _prepare_model(self) -> None:
        path = Path(self.settings.model.path)
        if (path / "config.json").exists():
            return
        if not self.settings.up.build_demo_model:
            raise SystemExit(f"model.path {path}: no config.json there and up.build_demo_model is false")
        from slipstream.demo_model import build_demo_model

        build_demo_model(path, **self.settings.up.demo_model)
        print(f"built the demo model in {path}", file=self.out)

    def _spawn(self, name: str, command: str, env: dict[str, str], *, pipe: bool) -> None:
        from learner_node.config import LearnerSettings
        from rollout_node.config import RolloutSettings

        settings_cls = LearnerSettings if command == "learner" else RolloutSettings
        argv = [sys.executable, "-m", "slipstream", command, "--config", self.config_path]
        # Each child's own telemetry port comes last: a user's --telemetry.port must not give two nodes one port.
        argv += overrides_for(settings_cls, self.overrides) + ["--telemetry.port", env["SLIPSTREAM_TELEMETRY__PORT"]]
        log_file = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
        stderr = subprocess.PIPE if pipe else log_file
        self.children[name] = proc = subprocess.Popen(argv, env=env, stdout=log_file, stderr=stderr)
        if pipe:
            threading.Thread(target=self._follow, args=(proc, log_file), daemon=True, name=f"follow-{name}").start()

    def _follow(self, proc: subprocess.Popen[bytes], log_file: IO[bytes]) -> None:
        """Copy the learner's log to its file and show its progress events."""
        assert proc.stderr is not None
        for raw in proc.stderr:
            log_file.write(raw)
            log_file.flush()
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            line = self.progress.take(event)
            if line:
                print(line, file=self.out, flush=True)
            elif event.get("level") in ("error", "critical"):
                print(f"learner {event.get('level')}: {event.get('event')}", file=self.out, flush=True)

    # --- run and stop -----------------------------------------------------------------------------------------
    def wait(self) -> int:
        """Until the learner ends (its exit code), a rollout node fails (1) or the timeout passes (124)."""
        deadline = time.monotonic() + self.settings.up.timeout_s
        learner = self.children["learner"]
        while not self._stopping.is_set():
            code = learner.poll()
            if code is not None:
                return code
            for name, proc in self.children.items():
                if name != "learner" and proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; see {self.log_dir / (name + '.log')}", file=self.out)
                    return 1
            if time.monotonic() > deadline:
                print(f"timeout after {self.settings.up.timeout_s:.0f}s", file=self.out)
                return 124
            time.sleep(0.2)
        return 130

    def stop(self) -> None:
        self._stopping.set()
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.children.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._redis is not None:
            self._redis.stop()

    def report(self, code: int) -> None:
        p = self.progress
        summary = p.summary or {}
        accounting = summary.get("accounting")
        if accounting:
            print("accounting: " + " ".join(f"{k}={v}" for k, v in sorted(accounting.items())), file=self.out)
        start = "-" if p.first_eval_accuracy is None else f"{p.first_eval_accuracy:.3f}"
        accuracy = "nan" if p.eval_accuracy is None else f"{p.eval_accuracy:.3f}"
        print(
            f"done: exit={code} steps={summary.get('steps', p.step)} eval_accuracy_start={start} "
            f"eval_accuracy={accuracy} elapsed_s={p.elapsed():.1f}",
            file=self.out,
            flush=True,
        )


def run_cluster(
    settings: UpSettings,
    config_path: str,
    overrides: list[str],
    out: IO[str] = sys.stdout,
    progress: Progress | None = None,
) -> int:
    """Start the cluster, wait for the learner to end, stop everything; returns the learner's exit code.
    `progress` (optional) receives the learner's events, e.g. for a benchmark's time-to-accuracy."""
    cluster = Cluster(settings, config_path, overrides, out, progress or Progress())
    previous = signal.signal(signal.SIGTERM, lambda *_: cluster._stopping.set())
    code = 1
    try:
        cluster.start()
        code = cluster.wait()
    except KeyboardInterrupt:
        code = 130
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
        cluster.report(code)
    return code
