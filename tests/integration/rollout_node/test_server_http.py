"""serve-engine's HTTP contract over real sockets: SGLang-shaped outputs, stop trimming, API key, 4xx for bad input."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import bench.engine as engine_bench
from rollout_node.engines.base import TorchEngineConfig
from rollout_node.engines.torch_engine import TorchEngine
from rollout_node.server import build_app, weight_loader
from slipstream.demo_model import build_demo_model
from telemetry.http import ServerHandle, serve_in_thread
from weight_broadcast.http_receiver import HttpReceiver

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo"), hidden_size=64, intermediate_size=128, init_std=0.3)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> TorchEngine:
    return TorchEngine.from_config(TorchEngineConfig(model_path=str(model_path)))


@pytest.fixture(scope="module")
def server(engine: TorchEngine) -> Iterator[ServerHandle]:
    app = build_app(
        engine,
        api_key=KEY,
        receiver=HttpReceiver(weight_loader(engine), timeout_s=2.0),
        model_path="demo",
        tokenizer=engine.tokenizer,
        max_body_bytes=4096,
        body_timeout_s=0.5,
    )
    handle = serve_in_thread(app)
    yield handle
    handle.stop()


def post(server: ServerHandle, route: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, headers=AUTH, timeout=60, **kwargs)


def encode(engine: TorchEngine, *texts: str) -> list[list[int]]:
    return [engine.tokenizer.encode(text) for text in texts]


def test_generate_answers_like_sglang_one_output_per_sample_prompt_major(
    server: ServerHandle, engine: TorchEngine
) -> None:
    [one] = encode(engine, "3+4=")
    single = post(server, "/generate", {"input_ids": one, "sampling_params": {"max_new_tokens": 6}})
    assert single.status_code == 200 and isinstance(single.json(), dict)  # one prompt, n = 1: one object
    assert "output_token_logprobs" not in single.json()["meta_info"]  # only when asked for

    prompts = encode(engine, "12+7=", "9*9=")
    body = {
        "input_ids": prompts,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0.8, "n": 3, "sampling_seed": 5},
        "return_logprob": True,
        "return_text_in_logprobs": True,
    }
    outputs = post(server, "/generate", body).json()
    assert [o["meta_info"]["prompt_tokens"] for o in outputs] == [len(prompts[0])] * 3 + [len(prompts[1])] * 3
    for output in outputs:
        meta = output["meta_info"]
        assert {"id", "finish_reason", "completion_tokens", "cached_tokens", "e2e_latency"} <= set(meta)
        assert meta["weight_version"] == "0" and meta["completion_tokens"] == len(output["output_ids"])
        assert [entry[1] for entry in meta["output_token_logprobs"]] == output["output_ids"]
        assert all(entry[0] <= 0 and isinstance(entry[2], str) for entry in meta["output_token_logprobs"])
        reason = meta["finish_reason"]
        assert reason == {"type": "length", "length": 8} or (reason["type"] == "stop" and reason["matched"] == 3)
        assert meta["slipstream"]["version_ranges"] == [[0, len(output["output_ids"]), 0]]
    assert len({tuple(o["output_ids"]) for o in outputs}) > 1  # n samples, not n copies


def test_a_matched_stop_is_cut_from_the_text_unless_no_stop_trim(server: ServerHandle, engine: TorchEngine) -> None:
    params = {"max_new_tokens": 24, "temperature": 1.0, "sampling_seed": 11}
    [free] = post(server, "/generate", {"input_ids": encode(engine, "1+1="), "sampling_params": params}).json()
    text = free["text"]
    assert len(text) >= 6, "the seeded sample ended too early to pick a stop string from"
    stop = text[3:5]

    def run(**extra: Any) -> dict[str, Any]:
        body = {"input_ids": encode(engine, "1+1="), "sampling_params": {**params, "stop": [stop], **extra}}
        [output] = post(server, "/generate", body).json()
        return output

    trimmed, untrimmed = run(), run(no_stop_trim=True)
    assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop in untrimmed["text"] and trimmed["text"] == untrimmed["text"][: untrimmed["text"].find(stop)]
    assert trimmed["output_ids"] == untrimmed["output_ids"]  # trimming is text only; the tokens are all there

    stop_id = free["output_ids"][2]
    body = {"input_ids": encode(engine, "1+1="), "sampling_params": {**params, "stop_token_ids": [stop_id]}}
    [by_id] = post(server, "/generate", body).json()
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert by_id["output_ids"][-1] == stop_id
    assert by_id["text"] == engine.tokenizer.decode(by_id["output_ids"][:-1], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "/generate"),
        ("POST", "/pause_generation"),
        ("POST", "/continue_generation"),
        ("POST", "/flush_cache"),
        ("POST", "/abort_request"),
        ("POST", "/update_weight_version"),
        ("POST", "/init_weights_update_group"),
        ("POST", "/update_weights_from_distributed"),
        ("POST", "/destroy_weights_update_group"),
        ("GET", "/model_info"),
    ],
)
def test_routes_need_the_api_key(server: ServerHandle, method: str, route: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
        response = httpx.request(method, f"{server.url}{route}", json={}, headers=headers, timeout=10)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
    # With the key the request reaches the route (which may still refuse the empty body, but not for auth).
    assert httpx.request(method, f"{server.url}{route}", json={}, headers=AUTH, timeout=10).status_code != 401


def test_health_and_metrics_are_open_and_control_routes_work_with_the_key(server: ServerHandle) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/health_generate", timeout=30).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.status_code == 200 and "slipstream_rollout_policy_version" in metrics.text
    assert post(server, "/pause_generation", {"mode": "in_place"}).json()["status"] == "ok"
    assert post(server, "/continue_generation", {}).status_code == 200
    assert post(server, "/flush_cache", None).status_code == 200
    info = httpx.get(f"{server.url}/get_server_info", headers=AUTH).json()
    assert info["slipstream"]["logprobs"] == "sampled"


def test_update_weight_version_relabels_what_every_route_reports(server: ServerHandle, engine: TorchEngine) -> None:
    assert post(server, "/update_weight_version", {"new_version": "4"}).json()["success"] is True
    try:
        for route in ("/model_info", "/get_model_info", "/weight_version", "/get_weight_version"):
            assert httpx.get(f"{server.url}{route}", headers=AUTH).json()["weight_version"] == "4"
        [output] = post(server, "/generate", {"input_ids": encode(engine, "2+2=")}).json()
        assert output["meta_info"]["weight_version"] == "4"
        assert output["meta_info"]["slipstream"]["policy_version"] == 4
        refused = post(server, "/update_weight_version", {"new_version": "four"})
        assert refused.status_code == 400 and "new_version" in refused.json()["error"]["message"]
    finally:
        post(server, "/update_weight_version", {"new_version": "0"})


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"input_ids": [[5, 6]], "sampling_params": {"temperature": -1}}, "sampling_params.0.temperature"),
        ({"input_ids": [[5, 6]], "sampling_params": {"temprature": 1}}, "sampling_params.0.temprature"),
        ({"input_ids": [[5, 6]], "sampling_params": {"top_k": 0}}, "sampling_params.0.top_k"),
        ({"input_ids": [[5, 6]], "stream": True}, "stream"),
        ({"input_ids": [[5, 6]], "top_logprobs_num": 3}, "top_logprobs_num"),
        ({"text": "3+4="}, "input_ids"),
        ({"input_ids": [[]]}, "input_ids.0"),
        ({"input_ids": [[-1]]}, "input_ids.0.0"),
        ({"input_ids": [[10**6]]}, "prompts[0]"),  # the engine's own check, passed on as a 400
        ({"input_ids": [[5], [6]], "sampling_params": [{"n": 1}, {"n": 2}]}, "sampling_params"),
        ({"input_ids": [[5]], "lora_path": "x"}, "lora_path"),
        ({"input_ids": [[5]], "sampling_params": {"stop": [str(i) for i in range(33)]}}, "sampling_params.0.stop"),
    ],
)
def test_invalid_fields_get_a_400_that_names_them(server: ServerHandle, body: dict[str, Any], names: str) -> None:
    response = post(server, "/generate", body)
    assert response.status_code == 400, response.text
    assert names in response.json()["error"]["message"]


def test_malformed_oversized_and_slow_bodies_get_4xx_never_500(server: ServerHandle) -> None:
    headers = {**AUTH, "content-type": "application/json"}
    malformed = httpx.post(f"{server.url}/generate", content=b'{"input_ids": [1,', headers=headers)
    assert malformed.status_code == 400 and "invalid JSON" in malformed.json()["error"]["message"]
    not_an_object = httpx.post(f"{server.url}/generate", content=b"[1, 2]", headers=headers)
    assert not_an_object.status_code == 400

    big = json.dumps({"input_ids": [[5] * 4000]}).encode()
    assert httpx.post(f"{server.url}/generate", content=big, headers=headers).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"input_ids": [['
        for _ in range(400):
            yield b"5, 5, 5, 5, 5, "
        yield b"5]]}"

    assert httpx.post(f"{server.url}/generate", content=chunks(), headers=headers).status_code == 413

    with socket.create_connection((server.host, server.port), timeout=10) as sock:  # declares 100 bytes, sends 2
        sock.sendall(
            f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{}".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")


def test_what_sglang_ignores_or_accepts_is_served_as_sglang_serves_it(server: ServerHandle) -> None:
    # SGLang ignores unknown top-level keys (api_types.GenerateRequest) and takes any int64 sampling_seed.
    body = {"input_ids": [[5, 6]], "priority": 3, "routing_key": "a", "sampling_params": {"max_new_tokens": 2}}
    assert post(server, "/generate", body).status_code == 200
    seeded = {"input_ids": [[5, 6]], "sampling_params": {"max_new_tokens": 3, "sampling_seed": -(2**63)}}
    first, again = (post(server, "/generate", seeded).json()[0]["output_ids"] for _ in range(2))
    assert first == again and len(first) == 3


def test_weight_routes_refuse_a_group_they_cannot_join_with_400(server: ServerHandle) -> None:
    body = {"names": ["w"], "dtypes": ["float32"], "shapes": [[2]], "group_name": "no"}
    body["load_format"] = "flattened_bucket"
    assert post(server, "/begin_weight_update", {"selector": "all"}).json()["success"] is True
    response = post(server, "/update_weights_from_distributed", body)
    assert post(server, "/end_weight_update", {}).json()["success"] is True
    assert response.status_code == 400 and response.json()["success"] is False
    assert "group_name" in response.json()["message"]


def test_the_engine_bench_measures_the_http_overhead_against_the_same_engine_in_process(model_path: Path) -> None:
    args = engine_bench.build_parser().parse_args(["--batch", "2", "--new-tokens", "4", "--repeats", "1"])
    report = engine_bench.measure_http_overhead(engine_bench.Setup(args, model_path, ["1+1=", "22+3="]))
    assert report["http_overhead_ratio"] > 0 and len(report["http_overhead_ratio_per_repeat"]) == 1
