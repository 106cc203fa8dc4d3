"""Hostile HTTP against every endpoint a node serves, over raw sockets: the engine server (SGLang routes), the agent
proxy (OpenAI routes) and the telemetry server (/metrics, /healthz).

Oversized bodies (declared or chunked), lying or conflicting lengths, stalled bodies and heads, malformed JSON, bytes
that are not UTF-8, nesting deeper than the parser goes, NaN, token ids beyond int32, garbage request lines, huge
targets and headers: each gets a 4xx (or, for a head that never completes, a closed connection) and never a 5xx,
and the server answers a valid request afterwards. A seeded fuzz of byte-mutated valid requests must not get a 5xx
either. The servers run in this process (one torch engine for two of them) on real sockets.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from rollout_node.config import RolloutConfig
from rollout_node.engines.base import TorchEngineConfig
from rollout_node.engines.torch_engine import TorchEngine
from rollout_node.proxy import AgentProxy
from rollout_node.server import build_app
from slipstream.demo_model import build_demo_model
from telemetry.http import serve_in_thread
from telemetry.server import TelemetryServer

MAX_BODY = 65_536  # every server here refuses a larger body
STALL_S = 1.0  # engine and proxy: a body not received within this long is refused
KEY = "hostile-test-key"
MAX_TOKEN_ID = 2**31 - 1


@dataclass
class Target:
    """One server under attack: where it listens, a JSON route to post to, what it takes, a GET that answers 200."""

    name: str
    port: int
    route: str
    auth: bytes  # a header line (with CRLF), or b""
    valid: bytes  # a valid body for `route`: one token from the engine
    get: str
    published: list[object] = field(default_factory=list)  # what the proxy published (must stay empty)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TorchEngine:
    model = build_demo_model(tmp_path_factory.mktemp("hostile-http-model"))
    return TorchEngine.from_config(TorchEngineConfig(model_path=str(model)))


@pytest.fixture(scope="module")
def targets(engine: TorchEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Target]]:
    app = build_app(engine, api_key=KEY, tokenizer=engine.tokenizer, max_body_bytes=MAX_BODY, body_timeout_s=STALL_S)
    server = serve_in_thread(app)
    token_file = Path(tmp_path_factory.mktemp("proxy")) / "token"
    token_file.write_text(KEY)
    published: list[object] = []
    config = RolloutConfig(
        proxy_port=0,
        proxy_token_file=str(token_file),
        proxy_max_request_bytes=MAX_BODY,
        proxy_body_timeout_s=STALL_S,
    )
    proxy = AgentProxy(config, engine, engine.tokenizer, published.extend, lambda: False, "hostile", "demo").start()
    telemetry = TelemetryServer(readiness=lambda: (True, {}), request_timeout_s=STALL_S).start()
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    one_token = json.dumps({"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}}).encode()
    completion = json.dumps({"prompt": [5, 6], "max_tokens": 1}).encode()
    yield {
        "engine": Target("engine", server.port, "/generate", auth, one_token, "/health"),
        "proxy": Target(
            "proxy", int(proxy.url.rsplit(":", 1)[1]), "/v1/completions", auth, completion, "/v1/models", published
        ),
        "telemetry": Target("telemetry", telemetry.port, "/metrics", b"", b"", "/metrics"),
    }
    telemetry.stop()
    proxy.stop()
    server.stop()


# --- raw HTTP --------------------------------------------------------------------------------------------------------
def exchange(target: Target, data: bytes, timeout_s: float = 30.0) -> int | None:
    """Send `data` on a fresh connection and return the status of the answer, or None when the server closed the
    connection without one."""
    with socket.create_connection(("127.0.0.1", target.port), timeout=timeout_s) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it answered and closed before the end
            sock.sendall(data)
        received = b""
        try:
            while b"\r\n" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:  # closed with our bytes unread: what it had sent may still be here
            pass
    if not received:
        return None
    status_line = received.split(b"\r\n", 1)[0].split()
    return int(status_line[1])


def request(
    target: Target, body: bytes, *, method: str = "POST", headers: bytes | None = None, length: int | None = None
) -> bytes:
    """A request to `target.route` with `body`; Content-Length `length` (default the body's) unless `headers` are
    given instead (then they say how the body is framed)."""
    framing = headers if headers is not None else f"Content-Length: {len(body) if length is None else length}\r\n"
    framing = framing.encode() if isinstance(framing, str) else framing
    head = f"{method} {target.route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    return head.encode() + target.auth + framing + b"\r\n" + body


def chunked(body: bytes, size: int = 4096) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def healthy(target: Target) -> bool:
    """Whether `target` answers a valid request with 200 (a generation where it has a JSON route)."""
    if target.valid:
        return exchange(target, request(target, target.valid)) == 200
    return exchange(target, f"GET {target.get} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()) == 200


# --- the catalogue ---------------------------------------------------------------------------------------------------
def nested(depth: int, body_of: Callable[[bytes], bytes]) -> bytes:
    """A body holding JSON arrays nested `depth` deep where a value belongs."""
    return body_of(b"[" * depth + b"]" * depth)


def as_prompt(target: Target, ids: bytes) -> bytes:
    """`target`'s body with `ids` (raw JSON) as its prompt."""
    key = b"input_ids" if target.name == "engine" else b"prompt"
    return b'{"%s": %s, "max_tokens": 1}' % (key, ids) if key == b"prompt" else b'{"%s": %s}' % (key, ids)


# name -> (the request for a target, the statuses allowed; telemetry answers any POST with 405 unread, unless the
# HTTP parser already refused its framing with a 400)
BODY_CASES: dict[str, tuple[Callable[[Target], bytes], set[int | None]]] = {
    "declared body over the limit": (lambda t: request(t, b"{" + b" " * MAX_BODY + b"}"), {413}),
    "chunked body over the limit": (
        lambda t: request(t, chunked(b'{"a": "' + b"x" * MAX_BODY + b'"}'), headers=b"Transfer-Encoding: chunked\r\n"),
        {413},
    ),
    "Content-Length not a number": (lambda t: request(t, b"{}", headers=b"Content-Length: 12abc\r\n"), {400}),
    "negative Content-Length": (lambda t: request(t, b"{}", headers=b"Content-Length: -1\r\n"), {400}),
    "Content-Length and chunked at once": (
        lambda t: request(t, chunked(b"{}"), headers=b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
        {400},
    ),
    "body stalls before its Content-Length": (lambda t: request(t, b'{"input', length=1000), {408}),
    "malformed JSON": (lambda t: request(t, b'{"prompt": [1, 2'), {400}),
    "bytes that are not UTF-8": (lambda t: request(t, b'{"prompt": "\xff\xfe\xfd"}'), {400}),
    "arrays nested 30,000 deep": (lambda t: request(t, nested(30_000, lambda v: as_prompt(t, v))), {400}),
    "objects nested 10,000 deep": (lambda t: request(t, b'{"a":' * 10_000 + b"1" + b"}" * 10_000), {400}),
    "a JSON array, not an object": (lambda t: request(t, b"[1, 2, 3]"), {400}),
    "NaN and Infinity": (lambda t: request(t, b'{"prompt": [5], "max_tokens": NaN, "temperature": Infinity}'), {400}),
    "token ids beyond int32": (lambda t: request(t, as_prompt(t, b"[5, 99999999999999999999]")), {400}),
    "negative token ids": (lambda t: request(t, as_prompt(t, b"[-1]")), {400}),
    "token id beyond the vocabulary": (lambda t: request(t, as_prompt(t, str([MAX_TOKEN_ID]).encode())), {400}),
    "empty body": (lambda t: request(t, b""), {400}),
}
LINE_CASES: dict[str, tuple[Callable[[Target], bytes], set[int | None]]] = {
    "garbage instead of a request line": (lambda t: b"\x00\x16\x03\x01 garbage\r\n\r\n", {400}),
    "request target of 100 KB": (
        lambda t: b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        {400, 401, 404, 414},
    ),
    "header of 1 MB": (lambda t: b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n", {400, 431}),
    "20,000 headers": (
        lambda t: b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(20_000)) + b"\r\n",
        {400, 431},
    ),
    "an unknown method": (lambda t: request(t, b"{}", method="BREW"), {400, 401, 404, 405}),
    "a NUL byte in the path": (lambda t: b"GET /v1/\x00models HTTP/1.1\r\nHost: x\r\n\r\n", {400, 401, 404}),
    "a head that never ends": (lambda t: b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a", {None, 408}),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["engine", "proxy", "telemetry"])
def test_oversized_and_malformed_bodies_get_a_4xx_and_the_server_serves_on(
    targets: dict[str, Target], name: str
) -> None:
    target = targets[name]
    wrong = {}
    for case, (make, allowed) in BODY_CASES.items():
        expected = ({405} | allowed & {400}) if name == "telemetry" else allowed
        status = exchange(target, make(target))
        if status not in expected:
            wrong[case] = status
    assert wrong == {}, f"{name}: statuses outside what each case allows"
    assert healthy(target) and not target.published


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["engine", "proxy", "telemetry"])
def test_malformed_request_lines_and_heads_get_a_4xx_or_are_closed(targets: dict[str, Target], name: str) -> None:
    target = targets[name]
    wrong = {}
    for case, (make, allowed) in LINE_CASES.items():
        status = exchange(target, make(target))
        if status not in allowed:
            wrong[case] = status
    assert wrong == {}, f"{name}: statuses outside what each case allows"
    assert healthy(target) and not target.published


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["engine", "proxy", "telemetry"])
def test_byte_mutations_of_a_valid_request_never_get_a_5xx(targets: dict[str, Target], name: str) -> None:
    target = targets[name]
    valid = request(target, target.valid) if target.valid else f"GET {target.get} HTTP/1.1\r\n\r\n".encode()
    rng = np.random.default_rng(7)
    statuses: list[int | None] = []
    for _ in range(150):
        data = bytearray(valid)
        for _ in range(int(rng.integers(1, 6))):
            at = int(rng.integers(len(data)))
            roll = rng.random()
            if roll < 0.4:
                data[at] = int(rng.integers(256))  # flip a byte
            elif roll < 0.7:
                data[at:at] = rng.bytes(int(rng.integers(1, 8)))  # insert
            else:
                del data[at : at + int(rng.integers(1, 8))]  # delete
        statuses.append(exchange(target, bytes(data) + b"\r\n\r\n", timeout_s=15.0))
    # 505 is the RFC's answer to an HTTP version it does not speak ("HTTP/9.1"): a refusal, not a server failure.
    server_errors = [s for s in statuses if s is not None and s >= 500 and s != 505]
    assert not server_errors, f"{name}: {len(server_errors)} of {len(statuses)} mutated requests got a 5xx"
    assert any(s is not None and 400 <= s < 500 for s in statuses)
    assert healthy(target) and not target.published
