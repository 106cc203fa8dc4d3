"""`/metrics` and `/healthz` of a node, served by `telemetry.http.serve_in_thread` (uvicorn, as every node's HTTP).

    with TelemetryServer("127.0.0.1", 0, readiness=lambda: (bus.connected, {"policy_version": v})) as server:
        print(server.url)   # http://127.0.0.1:<free port>

- `GET /metrics`: `telemetry.metrics.REGISTRY` in the Prometheus text format (OpenMetrics if the scraper asks).
- `GET /healthz`: readiness. 200 `{"status": "ok", "ready": true, ...details}` or 503 `{"status": "unavailable",
  "ready": false, ...}` when the readiness callable says not ready, raises, or does not answer in time.
- `GET /healthz?probe=live`: liveness only (the process serves HTTP); never calls the readiness callable.

Anything else is refused with a 4xx: 404 unknown path, 405 other methods, 400 a bad query or a request uvicorn's
HTTP parser refuses (a malformed request line or header, no Host in HTTP/1.1, a head over 16 KiB arriving in
parts), 414 a long target, 431 many or large headers, 505 an HTTP version other than 1.0 and 1.1. A request head
must arrive within `request_timeout_s`, so a slow or silent client cannot hold a connection.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from concurrent.futures import Future
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs

import structlog
from prometheus_client.exposition import choose_encoder
from starlette.types import Receive, Scope, Send

from telemetry.http import ServerHandle, serve_in_thread
from telemetry.logs import redact
from telemetry.metrics import REGISTRY

log = structlog.get_logger(__name__)

Readiness = Callable[[], tuple[bool, dict[str, Any]]]
Probe = Literal["live", "ready"]

MAX_TARGET_CHARS = 2048  # the longest path + query we answer; ours are a few dozen characters
MAX_HEADER_BYTES = 8192  # sum of header names and values; a head over h11's 16 KiB is refused (400) before this
MAX_HEADERS = 100  # the stdlib HTTP server's limit; a scraper or probe sends a handful
MAX_QUERY_FIELDS = 8


class TelemetryServer:
    """HTTP server for /metrics and /healthz on `host:port` (port 0 picks a free port, see `.port` after start)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        readiness: Readiness | None = None,
        readiness_timeout_s: float = 2.0,
        request_timeout_s: float = 5.0,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port}: must be in 0..65535 (0 picks a free port)")
        if readiness_timeout_s <= 0 or request_timeout_s <= 0:
            raise ValueError("readiness_timeout_s and request_timeout_s: must be > 0 seconds")
        self.host = host
        self._requested_port = port
        self._readiness = readiness
        self.readiness_timeout_s = readiness_timeout_s
        self.request_timeout_s = request_timeout_s
        self._handle: ServerHandle | None = None
        self._check_lock = threading.Lock()
        self._check: Future[tuple[bool, dict[str, Any]]] | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the real one when 0 was asked for), else the requested one."""
        return self._handle.port if self._handle is not None else self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> TelemetryServer:
        """Bind and serve in a daemon thread; raises OSError naming host:port when the address cannot be bound."""
        if self._handle is not None:
            raise RuntimeError(f"telemetry server on {self.url} is already started")
        try:
            self._handle = serve_in_thread(
                self._app, self.host, self._requested_port, head_timeout_s=self.request_timeout_s
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"telemetry server cannot listen on {self.host}:{self._requested_port}: {exc.strerror}"
            ) from exc
        log.info("telemetry server started", url=self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (open requests get a few seconds to finish)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.stop(timeout_s=5.0)

    def __enter__(self) -> TelemetryServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def health(self, probe: Probe) -> tuple[HTTPStatus, dict[str, Any]]:
        """The /healthz answer: status code and JSON body. Readiness failures and timeouts are 503, never raised."""
        if probe == "live":
            return HTTPStatus.OK, {"status": "ok"}
        if self._readiness is None:
            return HTTPStatus.OK, {"status": "ok", "ready": True}
        try:
            # Awaited on the event loop: the check's own thread is the only one a probe costs. shield: a probe that
            # times out leaves the shared check running for the next probe instead of cancelling it.
            check = asyncio.wrap_future(self._readiness_check())
            ready, details = await asyncio.wait_for(asyncio.shield(check), self.readiness_timeout_s)
            extra = {k: v for k, v in details.items() if k not in ("status", "ready")}
        except TimeoutError:
            ready, extra = False, {"error": f"readiness check did not answer within {self.readiness_timeout_s}s"}
        except Exception as exc:  # the check's own failure is the answer: not ready
            ready, extra = False, {"error": f"readiness check failed: {exc!r}"}
        status = {"status": "ok", "ready": True} if ready else {"status": "unavailable", "ready": False}
        # Redacted like a log line: the port is often public, and errors quote URLs such as redis://:pw@host.
        return (HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE), redact({**status, **extra})

    def _readiness_check(self) -> Future[tuple[bool, dict[str, Any]]]:
        """The running check, or a new one. Concurrent probes share one call, and a check that hangs holds one
        daemon thread, not one per probe (probes keep coming every few seconds)."""
        with self._check_lock:
            if self._check is None or self._check.done():
                self._check = Future()
                threading.Thread(
                    target=self._run_check, args=(self._check,), name="telemetry-readiness", daemon=True
                ).start()
            return self._check

    def _run_check(self, result: Future[tuple[bool, dict[str, Any]]]) -> None:
        assert self._readiness is not None  # only started by health() when a readiness callable exists
        try:
            ready, details = self._readiness()
            result.set_result((bool(ready), dict(details)))
        except BaseException as exc:  # handed to the waiting request, which answers 503
            result.set_exception(exc)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app: routes GET /metrics and GET /healthz, refuses the rest (see the module docstring)."""
        if scope["type"] != "http":
            return
        status, body, content_type, headers = await self._answer(scope)
        await send(
            {
                "type": "http.response.start",
                "status": int(status),
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                    *((name.encode(), value.encode()) for name, value in headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: Scope) -> tuple[HTTPStatus, bytes, str, dict[str, str]]:
        """(status, body, content type, extra headers) for one request."""
        if scope["http_version"] not in ("1.0", "1.1"):  # h11 parses any HTTP/x.y; we speak these two
            return _refusal(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.0 and HTTP/1.1 are served")
        path, query_bytes = scope["path"], scope["query_string"]
        if len(scope["raw_path"]) + len(query_bytes) + 1 > MAX_TARGET_CHARS:
            return _refusal(HTTPStatus.REQUEST_URI_TOO_LONG, f"request target longer than {MAX_TARGET_CHARS}")
        headers = scope["headers"]
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            detail = f"more than {MAX_HEADERS} headers or {MAX_HEADER_BYTES} bytes of them"
            return _refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, detail)
        if scope["method"] != "GET":
            return HTTPStatus.METHOD_NOT_ALLOWED, b"405 only GET is served\n", "text/plain", {"Allow": "GET"}
        try:
            query = parse_qs(query_bytes.decode("latin-1"), keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            return _refusal(HTTPStatus.BAD_REQUEST, f"query with more than {MAX_QUERY_FIELDS} fields")
        if path == "/metrics":
            accept = next((v.decode("latin-1") for k, v in headers if k == b"accept"), "")
            try:
                encode, content_type = choose_encoder(accept)
                return HTTPStatus.OK, encode(REGISTRY), content_type, {}
            except Exception:  # a broken collector must not take the endpoint down silently
                log.exception("metrics exposition failed")
                return _refusal(HTTPStatus.INTERNAL_SERVER_ERROR, "metrics exposition failed")
        if path == "/healthz":
            probe = query.get("probe", ["ready"])
            if len(probe) != 1 or probe[0] not in ("live", "ready"):
                return _refusal(HTTPStatus.BAD_REQUEST, "probe: expected live or ready")
            code, body = await self.health(probe[0])
            return code, json.dumps(body, default=str).encode(), "application/json", {}
        return _refusal(HTTPStatus.NOT_FOUND, "unknown path: /metrics and /healthz are served")


def _refusal(status: HTTPStatus, message: str) -> tuple[HTTPStatus, bytes, str, dict[str, str]]:
    return status, f"{int(status)} {message}\n".encode(), "text/plain; charset=utf-8", {}
