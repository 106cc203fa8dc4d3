"""The agent proxy over real HTTP, with a real torch engine and a real Redis: an `openai`-client session becomes one
trajectory (generated tokens trainable, the rest masked), tokens guard state-changing routes, bad requests get 4xx,
idle sessions expire, and a weight update from a real `WeightSender` is answered with 503 + Retry-After."""

from __future__ import annotations

import json
import random
import runpy
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bus.codec import decode
from bus.config import BusConfig
from bus.schema import Join, Trajectory
from bus.settings import load_settings
from bus.transport import Transport, setup_transport
from rollout_node.config import RolloutConfig, RolloutSettings
from rollout_node.engines.base import Sample, TorchEngineConfig
from rollout_node.engines.torch_engine import TorchEngine
from rollout_node.node import RolloutNode
from rollout_node.proxy import AgentProxy
from rollout_node.trajectories import Publisher
from slipstream.demo_model import build_demo_model
from telemetry.metrics import REGISTRY

EXAMPLE = Path(__file__).parents[3] / "examples" / "agent_tool_loop.py"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 60.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo"), init_std=0.3, seed=1)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> TorchEngine:
    return TorchEngine.from_config(TorchEngineConfig(model_path=str(model_path)))


@pytest.fixture
def bus(redis_server: Any) -> Iterator[Transport]:
    transport = setup_transport(BusConfig(url=redis_server.url))
    yield transport
    transport.close()


@pytest.fixture
def start_proxy(bus: Transport, engine: TorchEngine, tmp_path: Path) -> Iterator[Callable[..., AgentProxy]]:
    """`start_proxy(bus_fields=None, **RolloutConfig fields)` -> a running proxy that requires TOKEN and publishes on
    `bus` (through a transport with `bus_fields` changed, when given)."""
    token_file = tmp_path / "proxy-token"
    token_file.write_text(TOKEN + "\n")
    started: list[AgentProxy] = []
    transports: list[Transport] = []

    def start(bus_fields: dict[str, Any] | None = None, **fields: Any) -> AgentProxy:
        config = RolloutConfig(proxy_port=0, proxy_token_file=str(token_file), **fields)
        if bus_fields:
            transports.append(setup_transport(bus.config.model_copy(update=bus_fields)))
        publish = Publisher(transports[-1] if bus_fields else bus).publish
        started.append(AgentProxy(config, engine, engine.tokenizer, publish, lambda: False, "test:proxy", "demo"))
        return started[-1].start()

    yield start
    for proxy in started:
        proxy.stop()
    for transport in transports:
        transport.close()


def published(bus: Transport) -> list[Trajectory]:
    entries = bus.read(bus.config.stream("trajectories"), "0", 100, 0)
    return [decode(e.data) for e in entries]


def sessions(outcome: str) -> float:
    return REGISTRY.get_sample_value("slipstream_rollout_proxy_sessions_total", {"outcome": outcome}) or 0.0


def test_an_openai_client_session_becomes_one_trajectory(
    start_proxy: Callable[..., AgentProxy], bus: Transport, engine: TorchEngine
) -> None:
    proxy = start_proxy()
    tokenizer = engine.tokenizer
    before = sessions("published")
    client = openai.OpenAI(base_url=f"{proxy.url}/v1/sessions/agent-1", api_key=TOKEN, max_retries=0)
    turn1 = [{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "2+3="}]
    first = client.chat.completions.create(model="demo", messages=turn1, max_tokens=5, logprobs=True, seed=1)
    reply = first.choices[0].message.content
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "tool", "content": "<result>5</result>"}]
    second = client.chat.completions.create(model="demo", messages=turn2, max_tokens=5, logprobs=True, seed=2)

    answer = httpx.post(f"{proxy.url}/v1/sessions/agent-1/reward", json={"reward": 1.0}, headers=AUTH).json()
    assert answer["published"] is True
    [traj] = published(bus)
    assert traj.id == answer["trajectory_id"] and traj.group_id == traj.id and traj.producer == "test:proxy"
    assert traj.reward == 1.0 and traj.policy_version == 0 and traj.meta == {"session": "agent-1"}

    def rendered(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    prompt, response = traj.prompt_ids.tolist(), traj.response_ids.tolist()
    assert prompt == tokenizer.encode(rendered(turn1), add_special_tokens=False)
    g1, g2 = first.usage.completion_tokens, second.usage.completion_tokens
    context = len(response) - g1 - g2
    assert second.usage.prompt_tokens == len(prompt) + g1 + context
    # The stream up to the second generation is exactly the agent's second conversation, as the model saw it.
    assert tokenizer.decode(prompt + response[: g1 + context], skip_special_tokens=False) == rendered(turn2)
    assert traj.loss_mask.tolist() == [1] * g1 + [0] * context + [1] * g2
    logprobs = traj.behavior_logprobs.tolist()
    assert logprobs[:g1] == pytest.approx([t.logprob for t in first.choices[0].logprobs.content], abs=1e-6)
    assert logprobs[g1 : g1 + context] == [0.0] * context
    assert logprobs[g1 + context :] == pytest.approx([t.logprob for t in second.choices[0].logprobs.content], abs=1e-6)
    assert sessions("published") == before + 1
    assert int(bus.client.hget("slipstream:accounting", "published")) == 1

    # A repeated reward (the agent retried after a lost reply) publishes nothing more.
    again = httpx.post(f"{proxy.url}/v1/sessions/agent-1/reward", json={"reward": 1.0}, headers=AUTH).json()
    assert again == {**answer, "published": False} and len(published(bus)) == 1


def test_plain_routes_answer_without_recording(start_proxy: Callable[..., AgentProxy], bus: Transport) -> None:
    proxy = start_proxy()
    models = httpx.get(f"{proxy.url}/v1/models").json()  # no token needed to read the model list
    assert [m["id"] for m in models["data"]] == ["demo"]
    body = {"prompt": "3+4=", "n": 3, "max_tokens": 4, "logprobs": 0, "stop": ["\n"]}
    completion = httpx.post(f"{proxy.url}/v1/completions", json=body, headers=AUTH).json()
    assert [c["index"] for c in completion["choices"]] == [0, 1, 2]
    for choice in completion["choices"]:
        assert len(choice["logprobs"]["token_logprobs"]) == len(choice["logprobs"]["tokens"]) >= 1
    assert completion["usage"]["prompt_tokens"] == 4 and completion["policy_version"] == 0
    assert published(bus) == []


def test_the_example_agent_publishes_one_trajectory_per_episode(
    start_proxy: Callable[..., AgentProxy], bus: Transport, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    proxy = start_proxy()
    monkeypatch.setenv("SLIPSTREAM_PROXY_TOKEN", TOKEN)
    example = runpy.run_path(str(EXAMPLE))
    rng = random.Random(0)
    assert {example["run_tool"]("draw_number", "{}", rng, 2) for _ in range(40)} == {"0", "1"}  # 0 .. choices - 1
    assert example["run_tool"]("draw_number", '{"n": 1}', rng, 10).startswith("error")
    cases = [(None, "3", True), ("3", None, False), ("3", "x", False), ("3", "37", False), ("3", "3", True)]
    assert [example["score"](*case) for case in cases] == [0.0, 0.0, 0.2, pytest.approx(0.8), pytest.approx(1.9)]
    args = ["--proxy", proxy.url, "--episodes", "3", "--group-size", "3", "--concurrency", "2", "--max-tokens", "6"]
    assert example["main"](args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trajectories = {t.id: t for t in published(bus)}
    assert sorted(trajectories) == sorted(summary["trajectories"]) and summary["episodes"] == 3
    assert len({t.group_id for t in trajectories.values()}) == 1  # one GRPO group of --group-size episodes
    for traj in trajectories.values():
        assert traj.loss_mask.tolist()[0] == 1 and set(traj.rewards) == {"correct", "called"}
        assert set(traj.meta) >= {"drawn", "answer", "session"}


def test_state_changing_routes_need_the_token(start_proxy: Callable[..., AgentProxy]) -> None:
    proxy = start_proxy()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = httpx.post(f"{proxy.url}/v1/sessions/s/chat/completions", json=body, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["type"] == "authentication_error"
    assert httpx.post(f"{proxy.url}/v1/sessions/s/reward", json={"reward": 1}).status_code == 401
    assert httpx.delete(f"{proxy.url}/v1/sessions/s").status_code == 401
    assert httpx.post(f"{proxy.url}/v1/sessions/s/chat/completions", json=body, headers=AUTH).status_code == 200


def test_malformed_requests_get_a_4xx_naming_the_problem(start_proxy: Callable[..., AgentProxy]) -> None:
    proxy = start_proxy(proxy_max_request_bytes=4096, proxy_max_n=4, proxy_max_tokens=64)
    chat = f"{proxy.url}/v1/sessions/m/chat/completions"
    user = [{"role": "user", "content": "2+2="}]
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (chat, {"content": b"{not json"}, 400, "not JSON"),
        (chat, {"json": {"max_tokens": 4}}, 400, "messages"),
        (chat, {"json": {"messages": user, "temperature": -1}}, 400, "temperature"),
        (chat, {"json": {"messages": user, "n": 2}}, 400, "n: must be 1 inside a session"),
        (chat, {"json": {"messages": user, "max_tokens": 65}}, 400, "max_tokens"),
        (chat, {"json": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}, 400, "text parts"),
        (chat, {"json": {"messages": [{"role": "user", "content": "x" * 5000}]}}, 413, "request body"),
        (f"{proxy.url}/v1/completions", {"json": {"prompt": [40] * 600, "max_tokens": 4}}, 400, "context"),
        (f"{proxy.url}/v1/completions", {"json": {"prompt": "1", "n": 5}}, 400, "n: must be <= 4"),
        (f"{proxy.url}/v1/sessions/bad id/completions", {"json": {"prompt": "1"}}, 400, "session_id"),
        (f"{proxy.url}/v1/sessions/nobody/reward", {"json": {"reward": 1.0}}, 404, "not open"),
        (f"{proxy.url}/v1/sessions/m/reward", {"json": {"reward": "high"}}, 400, "reward"),
    ]
    for url, request, status, message in cases:
        answer = httpx.post(url, headers=AUTH, **request)
        assert answer.status_code == status, (request, answer.text)
        assert message in answer.json()["error"]["message"], (request, answer.text)
    # A session only continues its own stream: an unrelated conversation is a conflict.
    assert httpx.post(chat, headers=AUTH, json={"messages": user, "max_tokens": 2}).status_code == 200
    other = [{"role": "user", "content": "something else"}]
    conflict = httpx.post(chat, headers=AUTH, json={"messages": other, "max_tokens": 2})
    assert conflict.status_code == 409 and "one token stream" in conflict.json()["error"]["message"]


def test_a_session_the_bus_would_refuse_is_rejected(start_proxy: Callable[..., AgentProxy], bus: Transport) -> None:
    proxy = start_proxy(bus_fields={"max_tokens": 8})
    before = sessions("rejected")
    body = {"prompt": "1+2+3+4+5+6=", "max_tokens": 2}  # a 12-token prompt: over the bus limit of 8
    assert httpx.post(f"{proxy.url}/v1/sessions/big/completions", json=body, headers=AUTH).status_code == 200
    refused = httpx.post(f"{proxy.url}/v1/sessions/big/reward", json={"reward": 1.0}, headers=AUTH)
    assert refused.status_code == 400 and "max_tokens" in refused.json()["error"]["message"]
    assert sessions("rejected") == before + 1 and published(bus) == []
    assert httpx.post(f"{proxy.url}/v1/sessions/big/reward", json={"reward": 1.0}, headers=AUTH).status_code == 404


def test_an_idle_session_expires_as_abandoned(start_proxy: Callable[..., AgentProxy], bus: Transport) -> None:
    proxy = start_proxy(proxy_session_ttl_s=0.2)
    before = sessions("abandoned")
    body = {"prompt": "5+5=", "max_tokens": 2}
    assert httpx.post(f"{proxy.url}/v1/sessions/idle/completions", json=body, headers=AUTH).status_code == 200
    deadline = time.monotonic() + WAIT_S
    while sessions("abandoned") == before:
        assert time.monotonic() < deadline, "the session never expired"
        time.sleep(0.05)
    late = httpx.post(f"{proxy.url}/v1/sessions/idle/reward", json={"reward": 1.0}, headers=AUTH)
    assert late.status_code == 404 and published(bus) == []


LEARNER = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from weight_broadcast.config import BroadcastConfig
from telemetry.logs import configure_logging
from weight_broadcast.sender import WeightSender

configure_logging("console", "warning")  # logs to stderr: stdout carries the port and the acks
sender = WeightSender(BroadcastConfig(master_port=0, timeout_s=10, join_poll_s=0.05)).start()
print(sender.port, flush=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
for line in sys.stdin:  # one version number per line: send the weights, shifted a little, as that version
    version = int(line)
    with torch.no_grad():
        weights = {name: t + 0.01 * version for name, t in model.state_dict().items()}
    print(json.dumps(sender.update(weights, version).delivered), flush=True)
sender.close()
"""


def test_weight_update_is_answered_with_503_then_serves_the_new_version(
    redis_server: Any, model_path: Path, bus: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The learner's WeightSender runs in a process of its own: a process holds one end of a broadcast group.
    learner = subprocess.Popen(
        [sys.executable, "-c", LEARNER, str(model_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert learner.stdin is not None and learner.stdout is not None
    port = learner.stdout.readline().strip()
    overrides = ["--bus.url", redis_server.url, "--model.path", str(model_path), "--telemetry.port", "0"]
    overrides += ["--rollout.node_id", "proxied", "--rollout.proxy_port", "0", "--weights.master_port", port]
    overrides += ["--weights.timeout_s", "10"]
    monkeypatch.delenv("SLIPSTREAM_PROXY_TOKEN", raising=False)
    node = RolloutNode(load_settings(RolloutSettings, None, overrides)).start()
    try:
        assert node.engine is not None and node._proxy is not None
        url = f"{node._proxy.url}/v1/completions"
        join = decode(bus.read(bus.config.stream("control"), "0", 1, 0)[0].data)
        assert isinstance(join, Join) and join.meta["proxy"] == node._proxy.url

        # Hold the engine's load open (fault injection around the real load) so the window can be observed.
        loading, release, load = threading.Event(), threading.Event(), node.engine.load_weights

        def held_load(*args: Any) -> None:
            loading.set()
            assert release.wait(WAIT_S)
            load(*args)

        monkeypatch.setattr(node.engine, "load_weights", held_load)
        learner.stdin.write("1\n")
        learner.stdin.flush()
        assert loading.wait(WAIT_S) and node.updating()
        busy = httpx.post(url, json={"prompt": "1+1=", "max_tokens": 2})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        release.set()
        assert json.loads(learner.stdout.readline()) == ["proxied"]  # the learner got the node's ack
        deadline = time.monotonic() + WAIT_S
        while node.updating():
            assert time.monotonic() < deadline, "the update never finished"
            time.sleep(0.05)
        served = httpx.post(url, json={"prompt": "1+1=", "max_tokens": 2})
        assert served.status_code == 200 and served.json()["policy_version"] == 1
    finally:
        node.request_stop()
        node.shutdown()
        learner.stdin.close()
        learner.wait(timeout=WAIT_S)


def test_a_streamed_session_records_what_it_streamed(
    start_proxy: Callable[..., AgentProxy], bus: Transport, engine: TorchEngine
) -> None:
    proxy = start_proxy()
    client = openai.OpenAI(base_url=f"{proxy.url}/v1/sessions/streamer", api_key=TOKEN, max_retries=0)
    messages = [{"role": "user", "content": "2+3="}]
    stream = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=6, logprobs=True, seed=3, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant" and deltas[-1].finish_reason in ("stop", "length")
    text = "".join(d.delta.content or "" for d in deltas)
    streamed_logprobs = [t.logprob for d in deltas if d.logprobs for t in d.logprobs.content]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(streamed_logprobs)
    httpx.post(f"{proxy.url}/v1/sessions/streamer/reward", json={"reward": 0.5}, headers=AUTH).raise_for_status()
    [traj] = published(bus)
    assert traj.behavior_logprobs.tolist() == pytest.approx(streamed_logprobs, abs=1e-6)
    assert engine.tokenizer.decode(traj.response_ids.tolist(), skip_special_tokens=True) == text
    # Plain completions stream too; the joined text is the text of the call without `stream`.
    plain = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0)
    kwargs: dict[str, Any] = {"model": "demo", "prompt": "1+1=", "max_tokens": 5, "seed": 7, "temperature": 0}
    whole = plain.completions.create(**kwargs).choices[0].text
    assert "".join(c.choices[0].text for c in plain.completions.create(**kwargs, stream=True)) == whole


def test_tool_calls_come_back_parsed_and_the_next_turn_continues_the_session(
    start_proxy: Callable[..., AgentProxy], bus: Transport, engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo model never writes a tool call: the engine's first answer is replaced by one (a real tokenizer's
    # ids), the second is the real engine's. The proxy must parse it, and render it back as the ids it was: the
    # special token after the call, which the reply's text drops, too.
    tokenizer, real_generate = engine.tokenizer, engine.generate
    call_text = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    ids = [*tokenizer.encode(call_text, add_special_tokens=False), tokenizer.pad_token_id, tokenizer.eos_token_id]
    scripted = Sample(ids, [-0.5] * len(ids), [-0.5] * len(ids), "stop", [(0, len(ids), 0)], 0, call_text)
    answers = iter([[[scripted]]])
    monkeypatch.setattr(engine, "generate", lambda *a, **k: next(answers, None) or real_generate(*a, **k))
    proxy = start_proxy()
    client = openai.OpenAI(base_url=f"{proxy.url}/v1/sessions/tools", api_key=TOKEN, max_retries=0)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "2+3?"}]
    first = client.chat.completions.create(model="demo", messages=messages, tools=tools, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("add", {"a": 2, "b": 3})
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    client.chat.completions.create(model="demo", messages=messages, tools=tools, max_tokens=4, seed=1)
    httpx.post(f"{proxy.url}/v1/sessions/tools/reward", json={"reward": 1.0}, headers=AUTH).raise_for_status()
    [traj] = published(bus)
    response = traj.response_ids.tolist()
    assert response[: len(ids)] == ids and traj.loss_mask.tolist()[: len(ids)] == [1] * len(ids)
    assert "5" in tokenizer.decode(response[len(ids) :])  # the tool's result, then the second generation


def test_fields_that_would_change_sampling_are_refused_by_name(start_proxy: Callable[..., AgentProxy]) -> None:
    proxy = start_proxy()
    chat = f"{proxy.url}/v1/chat/completions"
    user = [{"role": "user", "content": "2+2="}]
    for field, value in [
        ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 10}), ("presence_penalty", 0.5),
        ("frequency_penalty", 1.0), ("functions", [{"name": "f"}]), ("tool_choice", {"type": "function"}),
        ("tool_choice", "required"),
    ]:  # fmt: skip
        answer = httpx.post(chat, headers=AUTH, json={"messages": user, "max_tokens": 2, field: value})
        assert answer.status_code == 400, (field, answer.text)
        assert answer.json()["error"]["message"].startswith(field), (field, answer.text)
    neutral = {"response_format": {"type": "text"}, "logit_bias": {}, "presence_penalty": 0, "tool_choice": "none"}
    assert httpx.post(chat, headers=AUTH, json={"messages": user, "max_tokens": 2, **neutral}).status_code == 200
