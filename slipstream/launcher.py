"""`slipstream up`: a whole cluster on one machine, as separate processes that meet only on the bus.

    embedded redis-server (unless bus.url is set)
    learner   = python -m slipstream learner --config C [learner overrides]      (telemetry port P)
    rollout i = python -m slipstream rollout --config C [rollout overrides]      (telemetry port P + 1 + i)
    agent     = up.agent.command, once rollout-0's agent proxy answers          (only with [up.agent])

Every child reads the same TOML; the launcher hands each only the CLI overrides of sections it has, the addresses
it made up (bus URL, broadcast port) through SLIPSTREAM_* environment variables, and last on its command line what
must differ per child (telemetry port, node id). It renders the learner's progress events (JSON log lines on its
stderr; `slipstream.progress`): a live table when stdout is a terminal, a line per step and evaluation otherwise. It
ends with a summary whose last line holds `eval_accuracy=<value>` and the elapsed seconds. Children are stopped
(SIGTERM, then SIGKILL) when the learner ends, when one fails, or on Ctrl-C; the embedded Redis goes with them.

An agent (`[up.agent]`) is an external process that trains the policy through the agent proxy, as any agent would
on a cluster: the launcher gives rollout-0 a free `rollout.proxy_port`, starts the command once the proxy answers,
with the proxy's URL in SLIPSTREAM_PROXY_URL, and logs it to agent.log. It is not restarted: an agent that exits 0 has
finished (the cluster stops, the learner with its summary), one that fails fails the run. The agent runs in its own
process group, and stopping signals the whole group: processes an agent started (workers, a shell's children) go
with it, also when the agent itself has already exited.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import structlog
from pydantic import Field

from bus.config import BusConfig
from bus.settings import ModelConfig, NodeSettings, RunConfig, Section, parse_overrides
from slipstream.demo_model import DemoModelSpec
from slipstream.progress import Progress, View, follow, make_view
from telemetry.config import TelemetryConfig

log = structlog.get_logger(__name__)

STOP_GRACE_S = 20.0  # SIGTERM lets a rollout node finish or release its tasks; then SIGKILL
AGENT = "agent"  # the agent child's name (and log file)


class AgentCommand(Section):
    """The `[up.agent]` section: an agent process run against rollout-0's agent proxy."""

    command: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="the agent's command line, run in the current directory ([] = no agent); a first word 'python' "
        "is the interpreter running `slipstream up`. It finds the proxy in SLIPSTREAM_PROXY_URL",
    )
    ready_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="how long rollout-0's proxy may take to answer before the run fails"
    )


class UpConfig(Section):
    """The `[up]` section: what `slipstream up` starts on this machine."""

    rollout_nodes: int = Field(1, ge=1, le=64, description="rollout node processes to start")
    build_demo_model: bool = Field(
        False,
        description="write the tiny demo model to model.path first when that folder holds no config.json (the demo "
        "configs set it); off, a model.path that is no local folder is a Hub id the nodes load",
    )
    demo_model: DemoModelSpec = Field(
        default_factory=DemoModelSpec, description="shape and seed of the demo model built when model.path has none"
    )
    timeout_s: float = Field(3600.0, gt=0, le=7 * 86400, description="stop everything after this long")
    log_dir: str | None = Field(None, description="children's logs go here (None: <run.output_dir>/logs)")
    agent: AgentCommand = Field(
        default_factory=AgentCommand, description="an agent process trained through rollout-0's agent proxy"
    )


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
        self.view: View | None = None  # made when the learner starts: a live table on a terminal, lines otherwise
        self._follower: threading.Thread | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = Path(settings.up.log_dir or Path(settings.run.output_dir) / "logs")
        self._redis: Any = None
        self._stopping = threading.Event()

    # --- start -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        from bus.embedded import free_port

        self._check_telemetry_ports()
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
        self._spawn("learner", "learner", env, ["--telemetry.port", str(base_port)], pipe=True)
        proxy_port = free_port() if self.settings.up.agent.command else None
        for i in range(self.settings.up.rollout_nodes):
            own = ["--telemetry.port", str(base_port + 1 + i), "--rollout.node_id", f"rollout-{i}"]
            if i == 0 and proxy_port is not None:
                own += ["--rollout.proxy_port", str(proxy_port), "--rollout.proxy_host", "127.0.0.1"]
            self._spawn(f"rollout-{i}", "rollout", env, own, pipe=False)
        if proxy_port is not None:
            self._start_agent(f"http://127.0.0.1:{proxy_port}", env)

    def _check_telemetry_ports(self) -> None:
        """Refuse at once, naming the port and its node, when a node's telemetry port is taken: the node would fail
        to start only after the others had (learner P, rollout i P + 1 + i)."""
        from bus.embedded import port_is_free

        host, base = self.settings.telemetry.host, self.settings.telemetry.port
        names = ["learner", *(f"rollout-{i}" for i in range(self.settings.up.rollout_nodes))]
        for offset, name in enumerate(names):
            if not port_is_free(host, base + offset):
                whose = f"{name}'s, telemetry.port + {offset}" if offset else f"{name}'s"
                raise SystemExit(
                    f"telemetry.port: port {base + offset} ({whose}) is in use on {host}; give a --telemetry.port P "
                    f"with P .. P + {len(names) - 1} free"
                )

    def _start_agent(self, proxy_url: str, env: dict[str, str]) -> None:
        """Wait until rollout-0's proxy answers GET /v1/models, then start the agent command against it."""
        import httpx

        agent = self.settings.up.agent
        deadline = time.monotonic() + agent.ready_timeout_s
        while True:
            if self._stopping.is_set():  # SIGTERM while the proxy starts: wait() answers 130 at once
                return
            for name, proc in self.children.items():  # the learner too: a run without it would never end well
                if proc.poll() is not None:
                    raise SystemExit(self._exited(name, proc.returncode, " before the agent proxy answered"))
            try:
                if httpx.get(f"{proxy_url}/v1/models", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"rollout-0's agent proxy did not answer within {agent.ready_timeout_s:.0f}s "
                                 "(up.agent.ready_timeout_s)")  # fmt: skip
            time.sleep(0.5)
        argv = [sys.executable, *agent.command[1:]] if agent.command[0] == "python" else list(agent.command)
        log_file = open(self.log_dir / f"{AGENT}.log", "wb")  # noqa: SIM115 - lives as long as the child
        agent_env = dict(env, SLIPSTREAM_PROXY_URL=proxy_url)
        self.children[AGENT] = subprocess.Popen(
            argv, env=agent_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._say(f"agent started against {proxy_url}: {' '.join(agent.command)}")

    def _prepare_model(self) -> None:
        """Build the demo model where asked; a path that is no local folder is left to the nodes as a Hub id."""
        path = Path(self.settings.model.path)
        if (path / "config.json").exists():
            return
        if not self.settings.up.build_demo_model:
            if path.exists():
                raise SystemExit(f"model.path {path}: a folder without config.json (and up.build_demo_model is false)")
            print(f"model.path {path}: no local folder, loaded as a Hugging Face Hub id", file=self.out)
            return
        from slipstream.demo_model import build_demo_model

        build_demo_model(path, **self.settings.up.demo_model.model_dump(exclude_unset=True))
        print(f"built the demo model in {path}", file=self.out)

    def _spawn(self, name: str, command: str, env: dict[str, str], own: list[str], *, pipe: bool) -> None:
        """Start one child. `own` (its telemetry port, node id) goes last on its command line, so it wins over the
        user's overrides of the same fields: two nodes never share a port or an id."""
        from learner_node.config import LearnerSettings
        from rollout_node.config import RolloutSettings

        settings_cls = LearnerSettings if command == "learner" else RolloutSettings
        argv = [sys.executable, "-m", "slipstream", command, "--config", self.config_path]
        argv += overrides_for(settings_cls, self.overrides) + own
        log_file = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
        stderr = subprocess.PIPE if pipe else log_file
        self.children[name] = proc = subprocess.Popen(argv, env=env, stdout=log_file, stderr=stderr)
        if pipe:  # the learner: its log goes to its file, its progress to the view
            self.view = make_view(self.out, self.progress)
            kwargs = {"copy_to": log_file}
            self._follower = threading.Thread(target=follow, args=(proc.stderr, self.view), kwargs=kwargs, daemon=True)
            self._follower.start()

    def _exited(self, name: str, code: int | None, when: str = "") -> str:
        """`<name> exited with <code><when>: <the last error its log names>; see <log>` (no error part without one)."""
        log_path = self.log_dir / f"{name}.log"
        error = last_error(log_path)
        return f"{name} exited with {code}{when}{': ' + error if error else ''}; see {log_path}"

    def _say(self, text: str) -> None:
        """A line for the person: above the live table while there is one."""
        if self.view is not None:
            self.view.note(text)
        else:
            print(text, file=self.out, flush=True)

    # --- run and stop -----------------------------------------------------------------------------------------
    def wait(self) -> int:
        """Until the learner ends (its exit code), a rollout node or the agent fails (1), the agent finishes (0) or
        the timeout passes (124)."""
        deadline = time.monotonic() + self.settings.up.timeout_s
        learner = self.children["learner"]
        while not self._stopping.is_set():
            code = learner.poll()
            if code is not None:
                if code != 0:
                    self._say(self._exited("learner", code))
                return code
            for name, proc in self.children.items():
                if name == AGENT and proc.poll() == 0:
                    self._say("the agent finished: stopping the cluster")
                    return 0
                if name != "learner" and proc.poll() is not None:
                    self._say(self._exited(name, proc.returncode))
                    return 1
            if time.monotonic() > deadline:
                self._say(f"timeout after {self.settings.up.timeout_s:.0f}s")
                return 124
            time.sleep(0.2)
        return 130

    def stop(self) -> None:
        """SIGTERM every child (the agent's whole process group), SIGKILL what is left after STOP_GRACE_S."""
        self._stopping.set()
        for name, proc in self.children.items():
            if name == AGENT:
                _signal_group(proc, signal.SIGTERM)  # its leader may have exited and left workers behind
            elif proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, proc in self.children.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if name == AGENT:
                while _signal_group(proc, 0) and time.monotonic() < deadline:  # workers finishing, within the grace
                    time.sleep(0.1)
                _signal_group(proc, signal.SIGKILL)
        if self._redis is not None:
            self._redis.stop()

    def report(self, code: int) -> None:
        """Plain lines under the view (a live table stays as it was last drawn): accounting, then `done: ...`."""
        if self._follower is not None:  # the learner has ended: its last lines (the summary) are on their way
            self._follower.join(timeout=STOP_GRACE_S)
        if self.view is not None:
            self.view.close()
        accounting = (self.progress.summary or {}).get("accounting")
        if accounting:
            print("accounting: " + " ".join(f"{k}={v}" for k, v in sorted(accounting.items())), file=self.out)
        print(self.progress.done_line(code), file=self.out, flush=True)


# The line a Python traceback ends with (`OSError: [Errno 98] ...`), as torchrun prefixes it (`[rank0]: `).
_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)(?::.*)?)$")
_LOG_TAIL_BYTES = 65536


def last_error(log_path: Path) -> str | None:
    """The last error in the last 64 KiB of a child's log, cut to 300 characters: a traceback's last line
    (`OSError: ...`), or in a JSON log line the last line of its `exception`; None when there is none (or no log)."""
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(max(0, log_file.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            lines = log_file.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        found = _error_in(line.strip())
        if found:
            return found[:300]
    return None


def _error_in(line: str) -> str | None:
    if line.startswith("{"):  # a structlog JSON event (SLIPSTREAM_LOG_FORMAT=json, as `up` runs its nodes)
        try:
            event = json.loads(line)
        except ValueError:
            return None
        exception = event.get("exception") if isinstance(event, dict) else None
        return exception.strip().splitlines()[-1] if isinstance(exception, str) and exception.strip() else None
    match = _ERROR_LINE.match(line)
    return match.group(1) if match else None


def _signal_group(leader: subprocess.Popen[bytes], signum: int) -> bool:
    """Send `signum` to the process group `leader` started (start_new_session: the group's id is its pid); signal 0
    only asks. Returns whether the group still had a member."""
    try:
        os.killpg(leader.pid, signum)
    except ProcessLookupError:
        return False
    return True


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
