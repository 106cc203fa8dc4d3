"""SGLang's weight-update routes over `HttpReceiver`: bad requests are refused with SGLang's reply shape, naming the
field; nothing is loaded. (Receiving for real, over HTTP and gloo, is in tests/integration/weight_broadcast.)"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from weight_broadcast.http_receiver import HttpReceiver, weight_routes

BUCKET = {"names": ["w"], "dtypes": ["float32"], "shapes": [[2, 2]], "group_name": "g-1", "weight_version": "3"}


@pytest.fixture
def loads() -> list[int]:
    """The versions the engine was asked to load."""
    return []


@pytest.fixture
def client(loads: list[int]) -> TestClient:
    app = FastAPI()
    app.include_router(weight_routes(HttpReceiver(lambda named, version: loads.append(version))))
    return TestClient(app)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"load_format": None}, "load_format"),
        ({"load_format": "flattened_bucket"}, "group_name"),  # no group joined yet
        ({"load_format": "flattened_bucket", "dtypes": ["float32", "bfloat16"], "names": ["w", "b"],
          "shapes": [[2], [2]]}, "dtypes"),
        ({"load_format": "flattened_bucket", "shapes": []}, "names/dtypes/shapes"),
    ],
)  # fmt: skip
def test_a_bucket_that_cannot_be_received_is_refused(
    client: TestClient, loads: list[int], change: dict[str, object], field: str
) -> None:
    assert client.post("/begin_weight_update", json={"selector": "all"}).json()["success"] is True
    reply = client.post("/update_weights_from_distributed", json=BUCKET | change)
    assert reply.status_code == 400
    assert reply.json()["success"] is False and field in reply.json()["message"]
    assert loads == []


def test_requests_missing_a_field_are_refused_by_validation(client: TestClient) -> None:
    reply = client.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": 1})
    assert reply.status_code == 422 and "rank_offset" in reply.text


def test_destroying_a_group_this_engine_is_not_in_is_harmless(client: TestClient) -> None:
    reply = client.post("/destroy_weights_update_group", json={"group_name": "g-9"})
    assert reply.status_code == 200 and reply.json()["success"] is True


def test_buckets_are_refused_outside_a_session_and_sessions_do_not_nest_as_in_sglang(
    client: TestClient, loads: list[int]
) -> None:
    bucket = BUCKET | {"load_format": "flattened_bucket"}
    outside = client.post("/update_weights_from_distributed", json=bucket)
    assert outside.status_code == 400 and "between begin_weight_update() and end_weight_update()" in outside.text
    no_session = client.post("/end_weight_update", json={})
    assert no_session.status_code == 400 and "no weight-update session is open" in no_session.text
    assert client.post("/begin_weight_update", json={"selector": "all"}).status_code == 200
    twice = client.post("/begin_weight_update", json={"selector": "all"})
    assert twice.status_code == 400 and "already open" in twice.text
    assert client.post("/end_weight_update", json={}).json()["success"] is True
    assert client.post("/begin_weight_update", json={"selector": "draft"}).status_code == 200
    assert client.post("/begin_weight_update", json={"selector": "spare"}).status_code == 422
    assert loads == []
