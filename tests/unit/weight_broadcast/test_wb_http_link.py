"""What `HttpLink` says to an SGLang server, call by call, against a stand-in that answers as SGLang 0.5.23's
http_server.py and scheduler weight updater do (reply shapes, 400 with {"success": false, "message"}, the session
rules). Receiving for real over gloo is in tests/integration/weight_broadcast/test_wb_http.py."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from bus.schema import TensorSpec, Weights
from weight_broadcast.links import HttpLink, LinkError

WEIGHTS = Weights(
    version=7,
    tensors=[TensorSpec("a", "bfloat16", [2]), TensorSpec("b", "bfloat16", [3]), TensorSpec("c", "float32", [1])],
    buckets=[[0, 1], [2]],
    bucket_bytes=[10, 4],
    checksum="",
    group="slipstream-weights-3",
)


class StandIn:
    """SGLang's weight routes, recording each call; `fail_route` answers 400 on its first call, `session_open` is a
    session a dead sender left open, `sessions` False answers 404 to the session routes (SGLang < 0.5.22)."""

    def __init__(
        self, fail_route: str | None = None, session_open: bool = False, sessions: bool = True, paused: bool = False
    ) -> None:
        self.calls: list[tuple[str, dict[str, Any], str | None]] = []
        self.fail_route, self.session_open, self.sessions = fail_route, session_open, sessions
        self.paused = paused  # SGLang's /health generates a token: 503 after 20 s while paused
        self.unauthorized = False  # /model_info needs the plain API key when the link holds the admin key

    def __call__(self, request: httpx.Request) -> httpx.Response:
        route = request.url.path.lstrip("/")
        body = json.loads(request.content) if request.content else {}
        self.calls.append((route, body, request.headers.get("authorization")))
        if route == "health":
            return httpx.Response(503 if self.paused else 200)
        if not self.sessions and route.endswith("_weight_update"):
            return httpx.Response(404, json={"detail": "Not Found"})
        if route == self.fail_route:
            self.fail_route = None
            return httpx.Response(400, json={"success": False, "message": f"{route} broke"})
        if route == "begin_weight_update":
            if self.session_open:
                message = "a weight-update session is already open; call end_weight_update() first"
                return httpx.Response(400, json={"success": False, "message": message})
            self.session_open = True
        elif route == "end_weight_update":
            if not self.session_open:
                message = "no weight-update session is open; call begin_weight_update() first"
                return httpx.Response(400, json={"success": False, "message": message})
            self.session_open = False
        elif route == "update_weights_from_distributed" and not self.session_open:
            message = "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
            return httpx.Response(400, json={"success": False, "message": message})
        if route == "model_info":
            return httpx.Response(401 if self.unauthorized else 200, json={"weight_version": "default"})
        if route in ("pause_generation", "continue_generation"):
            return httpx.Response(200, json={"message": "ok", "status": "ok"})
        return httpx.Response(200, json={"success": True, "message": "Success"})

    @property
    def routes(self) -> list[str]:
        return [route for route, _, _ in self.calls]


def link_to(server: StandIn, api_key: str | None = None, pause_mode: str = "retract") -> HttpLink:
    link = HttpLink("sgl-0", "http://sgl:30000", n_ranks=2, pause_mode=pause_mode, api_key=api_key)
    link._http = httpx.Client(transport=httpx.MockTransport(server), headers=link._http.headers)
    return link


def deadline() -> float:
    return time.monotonic() + 5


def test_an_update_is_one_session_with_the_version_and_the_flush_on_the_last_bucket_only() -> None:
    server = StandIn()
    link_to(server, api_key="k-1").receive(WEIGHTS, deadline())
    assert server.routes == [
        "pause_generation",
        "begin_weight_update",
        "update_weights_from_distributed",
        "update_weights_from_distributed",
        "end_weight_update",
        "continue_generation",
    ]
    first, last = server.calls[2][1], server.calls[3][1]
    assert server.calls[1][1] == {"selector": "all"}
    assert (first["names"], first["dtypes"], first["shapes"]) == (["a", "b"], ["bfloat16", "bfloat16"], [[2], [3]])
    assert "weight_version" not in first and first["flush_cache"] is False
    assert last["names"] == ["c"] and last["weight_version"] == "7" and last["flush_cache"] is True
    assert {body["load_format"] for _, body, _ in server.calls[2:4]} == {"flattened_bucket"}
    assert {body["group_name"] for _, body, _ in server.calls[2:4]} == {"slipstream-weights-3"}
    assert {key for _, _, key in server.calls} == {"Bearer k-1"}
    assert not server.session_open


def test_a_bucket_that_fails_closes_the_session_resumes_generation_and_names_the_cause() -> None:
    server = StandIn(fail_route="update_weights_from_distributed")
    with pytest.raises(LinkError, match="-> 400: update_weights_from_distributed broke"):
        link_to(server).receive(WEIGHTS, deadline())
    assert server.routes[-2:] == ["end_weight_update", "continue_generation"]
    assert not server.session_open
    link_to(server).receive(WEIGHTS, deadline())  # the next update opens a session of its own
    assert server.routes[-1] == "continue_generation" and not server.session_open


def test_a_session_left_open_by_a_dead_sender_is_closed_and_the_update_goes_through() -> None:
    server = StandIn(session_open=True)
    link_to(server).receive(WEIGHTS, deadline())
    assert server.routes[:4] == ["pause_generation", "begin_weight_update", "end_weight_update", "begin_weight_update"]
    assert server.routes.count("update_weights_from_distributed") == 2 and not server.session_open


def test_a_server_without_the_session_routes_is_refused_with_the_version_it_needs() -> None:
    server = StandIn(sessions=False)
    with pytest.raises(LinkError, match=r"SGLang >= 0\.5\.22"):
        link_to(server).receive(WEIGHTS, deadline())
    assert "update_weights_from_distributed" not in server.routes
    assert server.routes[-1] == "continue_generation"


def test_no_api_key_sends_no_authorization_header() -> None:
    server = StandIn()
    link_to(server).receive(WEIGHTS, deadline())
    assert {key for _, _, key in server.calls} == {None}


def test_in_place_pauses_update_without_the_flush_sglang_refuses_while_requests_are_held() -> None:
    server = StandIn()
    link_to(server, pause_mode="in_place").receive(WEIGHTS, deadline())
    assert server.calls[0][1] == {"mode": "in_place"}
    buckets = [body for route, body, _ in server.calls if route == "update_weights_from_distributed"]
    assert [b["flush_cache"] for b in buckets] == [False, False] and buckets[-1]["weight_version"] == "7"


def test_a_server_left_paused_by_a_dead_sender_answers_the_roll_call_and_the_update_resumes_it() -> None:
    server = StandIn(paused=True, session_open=True)  # a sender died between pause and continue
    link = link_to(server)
    assert link.ready("g", deadline())
    server.unauthorized = True  # the admin key on a server with both keys: still there
    assert link.ready("g", deadline())
    link.receive(WEIGHTS, deadline())
    assert server.routes[-1] == "continue_generation" and not server.session_open


def test_a_server_that_does_not_answer_is_not_ready() -> None:
    link = HttpLink("sgl-0", "http://sgl:30000")
    link._http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(502)))
    assert not link.ready("g", deadline())
