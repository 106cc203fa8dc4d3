"""`slipstream up` when a node cannot start: the run fails naming the node, the error its log ends with, and the log;
a telemetry port that is taken is refused before anything starts. Real processes: the launcher, a learner under
torchrun and a rollout node, against the test's redis-server."""

import socket
import subprocess
import sys
import time
from pathlib import Path

from bus.embedded import free_port

REPO = Path(__file__).resolve().parents[3]


def up(redis_url: str, tmp_path: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "slipstream", "up", "--config", "configs/demo.toml", "--bus.url", redis_url,
        "--telemetry.port", str(port), "--run.output_dir", str(tmp_path / "run"),
        "--model.path", str(tmp_path / "model"), *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=150)


def test_a_learner_that_cannot_start_fails_the_run_with_its_error(redis_server, tmp_path: Path) -> None:  # noqa: ANN001
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json\n')  # only the learner reads the dataset
    out = up(redis_server.url, tmp_path, free_port(2), "--task.source", "jsonl", "--task.path", str(rows))
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    error = f"ValueError: {rows} line 2: invalid JSON"
    assert f"learner exited with 1: {error}" in out.stdout, out.stdout[-2000:]
    assert f"; see {tmp_path / 'run' / 'logs' / 'learner.log'}" in out.stdout


def test_a_telemetry_port_in_use_is_refused_before_anything_starts(redis_server, tmp_path: Path) -> None:  # noqa: ANN001
    port = free_port(2)
    with socket.socket() as taken:  # rollout-0's port (telemetry.port + 1), held by someone else
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        started = time.monotonic()
        out = up(redis_server.url, tmp_path, port, "--telemetry.host", "127.0.0.1")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"telemetry.port: port {port + 1} (rollout-0's, telemetry.port + 1) is in use on 127.0.0.1" in out.stderr
    assert not (tmp_path / "run" / "logs").exists() and time.monotonic() - started < 60
