"""TelemetryServer over real HTTP: scrapes parse as Prometheus text, /healthz follows readiness, bad requests get
a 4xx, and no client (silent, slow, huge) or readiness check (raising, hanging) can hold it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from telemetry.metrics import LEARNER_DROPPED_SAMPLES, LEARNER_STEP, REGISTRY
from telemetry.server import MAX_HEADER_BYTES, MAX_TARGET_CHARS, TelemetryServer


class Readiness:
    """A readiness callable the tests steer: ready or not, raising, or blocking until released."""

    def __init__(self) -> None:
        self.ready = True
        self.error: Exception | None = None
        self.release = threading.Event()
        self.release.set()
        self.calls = 0

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        self.calls += 1
        self.release.wait(timeout=30)
        if self.error is not None:
            raise self.error
        return self.ready, {"policy_version": 7, "status": "details cannot override this"}


@pytest.fixture(scope="module")
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture(scope="module")
def server(readiness: Readiness) -> Iterator[TelemetryServer]:
    with TelemetryServer("127.0.0.1", 0, readiness=readiness, readiness_timeout_s=0.5, request_timeout_s=1) as srv:
        yield srv


@pytest.fixture(autouse=True)
def reset_readiness(readiness: Readiness) -> Iterator[None]:
    yield
    readiness.ready, readiness.error = True, None
    readiness.release.set()


def get(server: TelemetryServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(server.url + path, timeout=10, **kwargs)


def raw_request(server: TelemetryServer, data: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_port_zero_binds_a_free_port_and_url_names_it(server: TelemetryServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_metrics_scrape_parses_and_carries_current_values(server: TelemetryServer) -> None:
    LEARNER_STEP.set(41)
    before = REGISTRY.get_sample_value("slipstream_learner_dropped_samples_total", {"reason": "stale"}) or 0.0
    LEARNER_DROPPED_SAMPLES.labels(reason="stale").inc(3)

    response = get(server, "/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    parsed = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert parsed["slipstream_learner_step"].samples[0].value == 41
    dropped = parsed["slipstream_learner_dropped_samples"]  # the parser strips _total from counter families
    assert dropped.type == "counter"
    stale = [s for s in dropped.samples if s.name.endswith("_total") and s.labels == {"reason": "stale"}]
    assert stale[0].value == before + 3
    assert "slipstream_bus_messages" in parsed


def test_metrics_negotiates_openmetrics_when_asked(server: TelemetryServer) -> None:
    response = get(server, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_healthz_ready_then_not_ready_then_ready_again(server: TelemetryServer, readiness: Readiness) -> None:
    ok = get(server, "/healthz")
    assert ok.status_code == 200
    assert ok.json() == {"status": "ok", "ready": True, "policy_version": 7}

    readiness.ready = False
    down = get(server, "/healthz")
    assert down.status_code == 503
    assert down.json()["ready"] is False
    assert down.json()["status"] == "unavailable"

    readiness.ready = True
    assert get(server, "/healthz?probe=ready").status_code == 200


def test_liveness_does_not_consult_readiness(server: TelemetryServer, readiness: Readiness) -> None:
    readiness.ready = False
    calls = readiness.calls
    live = get(server, "/healthz?probe=live")
    assert live.status_code == 200
    assert live.json() == {"status": "ok"}
    assert readiness.calls == calls


def test_readiness_that_raises_is_503_with_the_error(server: TelemetryServer, readiness: Readiness) -> None:
    readiness.error = ConnectionError("redis unreachable at redis://:hunter2@redis:6379")
    response = get(server, "/healthz")
    assert response.status_code == 503
    assert "redis unreachable at redis://***@redis:6379" in response.json()["error"]  # no password on the wire


def test_readiness_that_hangs_is_503_and_shares_one_check(server: TelemetryServer, readiness: Readiness) -> None:
    readiness.release.clear()
    calls = readiness.calls
    first = get(server, "/healthz")
    threads = threading.active_count()
    with ThreadPoolExecutor(4) as pool:  # more probes while the check still hangs
        later = list(pool.map(lambda _: get(server, "/healthz"), range(4)))
        probing_threads = threading.active_count() - 4  # the pool's own
    assert [r.status_code for r in (first, *later)] == [503] * 5
    assert "did not answer" in first.json()["error"]
    assert readiness.calls == calls + 1  # every later probe waited on the same, still hanging, check
    assert probing_threads <= threads  # ... on the event loop: a probe holds no thread of its own
    assert get(server, "/healthz?probe=live").status_code == 200
    readiness.release.set()


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405),
        (b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /healthz?probe=maybe HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /healthz?probe=live&probe=ready HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /healthz?" + b"&".join(b"a=%d" % i for i in range(20)) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"complete nonsense\r\n\r\n", 400),
        (b"GET /metrics HTTP/9.9\r\nHost: x\r\n\r\n", 505),
        (b"GET /" + b"a" * (MAX_TARGET_CHARS + 1) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
    ],
    ids=lambda v: v.split(b"\r\n")[0][:40].decode(errors="replace") if isinstance(v, bytes) else str(v),
)
def test_bad_requests_get_4xx(server: TelemetryServer, request_bytes: bytes, expected: int) -> None:
    response = raw_request(server, request_bytes)
    assert status_of(response) == expected
    if expected == 405:
        assert b"\r\nAllow: GET\r\n" in response


def test_silent_client_is_timed_out_and_others_are_served_meanwhile(server: TelemetryServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        silent.sendall(b"GET /metrics HTTP/1.1\r\n")  # ... and never finishes its headers
        assert get(server, "/healthz?probe=live").status_code == 200
        assert silent.recv(65536) == b""  # closed by the server after request_timeout_s, not by us


def test_stop_frees_the_port_and_a_new_server_can_take_it(readiness: Readiness) -> None:
    first = TelemetryServer("127.0.0.1", 0).start()
    port = first.port
    first.stop()
    first.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    with TelemetryServer("127.0.0.1", port) as second:
        assert httpx.get(second.url + "/healthz", timeout=5).json() == {"status": "ok", "ready": True}


def test_port_in_use_is_a_clear_error(server: TelemetryServer) -> None:
    with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{server.port}"):
        TelemetryServer("127.0.0.1", server.port).start()


def test_starting_twice_is_refused(server: TelemetryServer) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        server.start()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"port": 70000}, "port 70000"), ({"port": 1, "readiness_timeout_s": 0}, "readiness_timeout_s")],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TelemetryServer("127.0.0.1", **kwargs)
