"""`slipstream up` with `[up.agent]` (configs/agent-tools.toml with a stand-in agent command) against the test's
redis-server: how each way the agent or the cluster ends ends the run. Real processes throughout: the launcher, a
learner, a rollout node with its agent proxy, and the agent (a small Python program) with a worker of its own.

- the agent exits non-zero: the run fails (exit 1) at once, naming the agent's code;
- the agent exits 0 while the learner is far from max_steps: the run has finished (exit 0), the learner stopped;
- the cluster stops while the agent runs (up.timeout_s): the agent and the worker it started are stopped too;
- SIGTERM while rollout-0's proxy is still starting: the run stops at once (130), not after up.agent.ready_timeout_s.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.embedded import free_port

REPO = Path(__file__).resolve().parents[3]
RUN_TIMEOUT_S = 150  # a cluster start on a loaded 2-core machine takes ~10-40 s; no test may come near this
# Starts a worker (a second process, as agents with tool sandboxes or pools have) and records both pids, then waits.
AGENT_WITH_WORKER = (
    "import subprocess, sys, time\n"
    "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "open(sys.argv[1], 'w').write(f'{__import__(\"os\").getpid()} {worker.pid}')\n"
    "time.sleep(600)\n"
)


def up_command(redis_url: str, tmp_path: Path, agent: list[str], *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "slipstream", "up", "--config", "configs/agent-tools.toml",
        "--bus.url", redis_url,
        "--telemetry.port", str(free_port(2)),  # the learner's and rollout-0's
        "--run.output_dir", str(tmp_path / "run"),
        "--model.path", str(tmp_path / "model"),
        "--up.agent.command", json.dumps(agent),
        *extra,
    ]  # fmt: skip


def run_up(redis_url: str, tmp_path: Path, agent: list[str], *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    out = subprocess.run(
        up_command(redis_url, tmp_path, agent, *extra), cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    return out, time.monotonic() - started


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_agent_that_fails_fails_the_run_at_once(redis_server, tmp_path: Path) -> None:
    out, elapsed = run_up(redis_server.url, tmp_path, ["python", "-c", "import sys; sys.exit(3)"])
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "agent exited with 3; see " in out.stdout and "agent.log" in out.stdout
    assert "done: exit=1 steps=0 " in out.stdout
    assert elapsed < RUN_TIMEOUT_S - 30  # not the 900 s up.timeout_s of the config


@pytest.mark.slow  # a cluster run per exit path: the three others stay in the default suite
def test_an_agent_that_finishes_before_the_learner_ends_the_run_with_success(redis_server, tmp_path: Path) -> None:
    # The learner would run to max_steps 200; nothing is published, so it is still waiting for data when stopped.
    out, _ = run_up(redis_server.url, tmp_path, ["python", "-c", "print('all episodes run')"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "the agent finished: stopping the cluster" in out.stdout
    assert "done: exit=0 steps=0 " in out.stdout
    assert (tmp_path / "run" / "logs" / "agent.log").read_text() == "all episodes run\n"


def test_when_the_cluster_stops_the_agent_and_its_worker_are_stopped(redis_server, tmp_path: Path) -> None:
    pids = tmp_path / "agent.pids"
    out, _ = run_up(redis_server.url, tmp_path, ["python", "-c", AGENT_WITH_WORKER, str(pids)], "--up.timeout_s", "10")
    assert out.returncode == 124, out.stdout[-2000:] + out.stderr[-2000:]
    assert "timeout after 10s" in out.stdout
    agent, worker = (int(pid) for pid in pids.read_text().split())
    deadline = time.monotonic() + 5  # init reaps the orphaned worker shortly after its SIGTERM
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(agent) and not alive(worker)


def test_sigterm_while_the_proxy_starts_stops_the_run_at_once(redis_server, tmp_path: Path) -> None:
    command = up_command(redis_server.url, tmp_path, ["python", "-c", "raise SystemExit('never started')"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env) as up:
        assert up.stdout is not None
        for line in up.stdout:  # the model is built just before the nodes start: the proxy answers seconds later
            if line.startswith("built the demo model"):
                break
        signalled = time.monotonic()
        up.send_signal(signal.SIGTERM)
        rest = up.stdout.read()
        code = up.wait(timeout=RUN_TIMEOUT_S)
    assert code == 130, rest
    assert time.monotonic() - signalled < 60  # the nodes' own SIGTERM handling, not up.agent.ready_timeout_s (300)
    assert "agent started" not in rest and not (tmp_path / "run" / "logs" / "agent.log").exists()
