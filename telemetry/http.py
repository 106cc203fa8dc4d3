"""Serve an ASGI app with uvicorn in a daemon thread: the one HTTP server stack of every node (the engine server,
the agent proxy, the telemetry server).

    server = serve_in_thread(app, "127.0.0.1", 0)      # returns once it accepts connections; .port, .url, .stop()

Hardened for ports that are often public: a connection must send a complete request head within `head_timeout_s`
(`HeadTimeoutH11`), no access log, logging through structlog.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import h11
import structlog
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

log = structlog.get_logger(__name__)


class HeadTimeoutH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, where a request head (request line and headers) must arrive within
    `timeout_keep_alive` of the connection opening or of the previous response. uvicorn's own timer only covers an
    idle keep-alive connection and stops at the first byte, so a client that connects and sends nothing, or dribbles
    half a request line (slowloris), would hold its connection forever. Pass as `uvicorn.Config(http=...)`."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        # Still no complete head: there is no request to answer (h11 sends no response before one), only close.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request head", client=self.client)
            self.transport.close()


class ServerHandle:
    """A uvicorn server running in a daemon thread: `.port`, `.url`, `.stop()`."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int) -> None:
        self.server = server
        self.thread = thread
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """Where a local client reaches it (a wildcard bind address is reached on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving: open requests get `timeout_s` to finish, then the server exits regardless."""
        self.server.should_exit = True
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout_s)


def serve_in_thread(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 30.0,
    *,
    lifespan: bool = False,
    head_timeout_s: float = 5.0,
) -> ServerHandle:
    """Serve `app` with uvicorn in a daemon thread; returns once it accepts connections (port 0: a free one).

    Logging goes through structlog (`log_config=None`, no access log); the calling thread keeps its signal handlers.
    A connection that sends no complete request head within `head_timeout_s` is closed (`HeadTimeoutH11`).
    lifespan: run the app's startup/shutdown (e.g. a background task it starts).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=HeadTimeoutH11,
        interface="asgi3",  # every app here is ASGI 3; uvicorn would take a bound method for ASGI 2
        log_config=None,
        access_log=False,
        timeout_keep_alive=head_timeout_s,  # HeadTimeoutH11's bound on a request head too
        timeout_graceful_shutdown=5,
        lifespan="on" if lifespan else "off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"http-{bound_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"HTTP server on {host}:{bound_port} did not start within {startup_timeout_s}s")
        time.sleep(0.01)
    log.info("http server listening", host=host, port=bound_port)
    return ServerHandle(server, thread, host, bound_port)
