"""`slipstream up` when a node cannot start: the run fails naming the node, the error its log ends with, and the log.
Real processes: the launcher, a learner under torchrun and a rollout node, against the test's redis-server."""

import socket
import subprocess
import sys
from pathlib import Path

from bus.embedded import free_port

REPO = Path(__file__).resolve().parents[3]


def test_a_learner_that_cannot_start_fails_the_run_with_its_error(redis_server, tmp_path: Path) -> None:  # noqa: ANN001
    port = free_port()
    with socket.socket() as taken:  # the learner's telemetry port, held by someone else
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = subprocess.run(
            [
                sys.executable, "-m", "slipstream", "up", "--config", "configs/demo.toml",
                "--bus.url", redis_server.url, "--telemetry.port", str(port),
                "--run.output_dir", str(tmp_path / "run"), "--model.path", str(tmp_path / "model"),
            ],  # fmt: skip
            cwd=REPO, capture_output=True, text=True, timeout=150,
        )  # fmt: skip
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    log = tmp_path / "run" / "logs" / "learner.log"
    error = f"OSError: [Errno 98] telemetry server cannot listen on 127.0.0.1:{port}: Address already in use"
    assert f"learner exited with 1: {error}" in out.stdout
    assert f"; see {log}" in out.stdout
