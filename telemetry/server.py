"""`/metrics` and `/healthz` of a node, served from daemon threads by the stdlib HTTP server.

    with TelemetryServer("127.0.0.1", 0, readiness=lambda: (bus.connected, {"policy_version": v})) as server:
        print(server.url)   # http://127.0.0.1:<free port>

- `GET /metrics`: `telemetry.metrics.REGISTRY` in the Prometheus text format (OpenMetrics if the scraper asks).
- `GET /healthz`: readiness. 200 `{"status": "ok", "ready": true, ...details}` or 503 `{"status": "unavailable",
  "ready": false, ...}` when the readiness callable says not ready, raises, or does not answer in time.
- `GET /healthz?probe=live`: liveness only (the process serves HTTP); never calls the readiness callable.

Anything else is refused with a 4xx: 404 unknown path, 405 other methods, 400 bad query or request line, 414 long
target, 431 large headers. One request per connection, and every socket read has a timeout, so a slow or silent
client cannot hold the server.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client.exposition import choose_encoder

from telemetry.logs import redact
from telemetry.metrics import REGISTRY

log = structlog.get_logger(__name__)

Readiness = Callable[[], tuple[bool, dict[str, Any]]]
Probe = Literal["live", "ready"]

MAX_TARGET_CHARS = 2048  # the longest path + query we answer; ours are a few dozen characters
MAX_HEADER_BYTES = 16384  # sum of header names and values (the stdlib already caps 100 headers of 64 KiB each)
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
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._check_lock = threading.Lock()
        self._check: Future[tuple[bool, dict[str, Any]]] | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the real one when 0 was asked for), else the requested one."""
        return self._httpd.server_address[1] if self._httpd is not None else self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> TelemetryServer:
        """Bind and serve in a daemon thread; raises OSError naming host:port when the address cannot be bound."""
        if self._httpd is not None:
            raise RuntimeError(f"telemetry server on {self.url} is already started")
        try:
            self._httpd = _HttpServer((self.host, self._requested_port), self)
        except OSError as exc:
            raise OSError(
                exc.errno, f"telemetry server cannot listen on {self.host}:{self._requested_port}: {exc.strerror}"
            ) from exc
        # A short poll interval keeps stop() quick; the loop only checks a flag when idle.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="telemetry-http", daemon=True
        )
        self._thread.start()
        log.info("telemetry server started", url=self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; in-flight requests finish on their own daemon threads."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5.0)
        self._httpd = self._thread = None

    def __enter__(self) -> TelemetryServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def health(self, probe: Probe) -> tuple[HTTPStatus, dict[str, Any]]:
        """The /healthz answer: status code and JSON body. Readiness failures and timeouts are 503, never raised."""
        if probe == "live":
            return HTTPStatus.OK, {"status": "ok"}
        if self._readiness is None:
            return HTTPStatus.OK, {"status": "ok", "ready": True}
        try:
            ready, details = self._readiness_check().result(timeout=self.readiness_timeout_s)
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


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], telemetry: TelemetryServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.telemetry = telemetry
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN (reverse DNS, which can stall for seconds in a container
        # without DNS) for a name only CGI uses; bind without it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("telemetry request failed", client=client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive socket holds a thread
    default_request_version = "HTTP/1.0"  # answers to garbage get a status line, not the bare HTTP/0.9 body
    server_version = "slipstream-telemetry"
    sys_version = ""
    error_message_format = "%(code)d %(message)s\n"
    error_content_type = "text/plain; charset=utf-8"

    def setup(self) -> None:
        self.timeout = self.server.telemetry.request_timeout_s  # applied to the socket by StreamRequestHandler
        super().setup()

    def do_GET(self) -> None:
        if len(self.path) > MAX_TARGET_CHARS:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, f"request target longer than {MAX_TARGET_CHARS}")
            return
        if sum(len(k) + len(v) for k, v in self.headers.items()) > MAX_HEADER_BYTES:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"headers larger than {MAX_HEADER_BYTES} bytes")
            return
        target = urlsplit(self.path)
        try:
            query = parse_qs(target.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            self.send_error(HTTPStatus.BAD_REQUEST, f"query with more than {MAX_QUERY_FIELDS} fields")
            return
        if target.path == "/metrics":
            self._metrics()
        elif target.path == "/healthz":
            probe = query.get("probe", ["ready"])
            if len(probe) != 1 or probe[0] not in ("live", "ready"):
                self.send_error(HTTPStatus.BAD_REQUEST, "probe: expected live or ready")
                return
            code, body = self.server.telemetry.health(probe[0])  # type: ignore[arg-type]  # checked just above
            self._reply(code, json.dumps(body, default=str).encode(), "application/json")
        else:
            self.send_error(HTTPStatus.NOT_FOUND, "unknown path: /metrics and /healthz are served")

    def _metrics(self) -> None:
        try:
            encode, content_type = choose_encoder(self.headers.get("Accept", ""))
            body = encode(REGISTRY)
        except Exception:  # a broken collector must not take the endpoint down silently
            log.exception("metrics exposition failed")
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, "metrics exposition failed")
            return
        self._reply(HTTPStatus.OK, body, content_type)

    def _method_not_allowed(self) -> None:
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, b"405 only GET is served\n", "text/plain", {"Allow": "GET"})

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler dispatches method X to do_X and answers 501 when it is missing; every method other
        # than GET gets 405 instead.
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _reply(self, code: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("telemetry request", client=self.client_address[0], line=format % args)
