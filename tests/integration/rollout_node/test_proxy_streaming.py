"""`stream: true` through the agent proxy over real HTTP with the `openai` client and a real torch engine: chunks go
out while the engine is still generating, tool-call text is never streamed as content, and a failure after the
first chunk reaches the client as OpenAI's error event."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from bus.schema import Trajectory
from rollout_node.config import RolloutConfig
from rollout_node.engines.base import OnToken, Sample, TorchEngineConfig
from rollout_node.engines.torch_engine import TorchEngine
from rollout_node.proxy import AgentProxy
from slipstream.demo_model import build_demo_model

WAIT_S = 30.0
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TorchEngine:
    path = build_demo_model(tmp_path_factory.mktemp("demo"), init_std=0.3, seed=1)
    return TorchEngine.from_config(TorchEngineConfig(model_path=str(path)))


@pytest.fixture
def client(engine: TorchEngine) -> Iterator[openai.OpenAI]:
    published: list[Trajectory] = []
    proxy = AgentProxy(RolloutConfig(proxy_port=0), engine, engine.tokenizer, published.extend, lambda: False, "t")
    proxy.start()
    yield openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="none", max_retries=0)
    proxy.stop()


def long_seed(client: openai.OpenAI, kwargs: dict[str, Any]) -> int:
    """A seed whose (non-streamed) completion has at least 6 tokens: the stream must outlive its first chunk."""
    for seed in range(50):
        if client.completions.create(**kwargs, seed=seed).usage.completion_tokens >= 6:
            return seed
    raise AssertionError("no seed in 0..49 gives 6 tokens")


def test_chunks_go_out_while_the_engine_is_still_generating(
    client: openai.OpenAI, engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine stops after its first visible token until the client has that token's chunk: a proxy that sent
    # the events only once generation ended would leave it waiting out WAIT_S.
    kwargs: dict[str, Any] = {"model": "demo", "prompt": "1+1=", "max_tokens": 12, "temperature": 1.0}
    seed = long_seed(client, kwargs)
    whole = client.completions.create(**kwargs, seed=seed)
    seen, real_generate = threading.Event(), engine.generate
    waited: list[bool] = []

    def generate(*args: Any, on_token: OnToken | None = None, **kw: Any) -> list[list[Sample]]:
        text: list[int] = []

        def report(row: int, token_id: int, logprob: float) -> None:
            assert on_token is not None
            on_token(row, token_id, logprob)
            text.append(token_id)
            if not waited and engine.tokenizer.decode(text, skip_special_tokens=True):
                waited.append(seen.wait(WAIT_S))

        return real_generate(*args, on_token=report if on_token else None, **kw)

    monkeypatch.setattr(engine, "generate", generate)
    pieces = []
    for chunk in client.completions.create(**kwargs, seed=seed, stream=True):
        if chunk.choices[0].text:
            seen.set()
        pieces.append(chunk.choices[0].text)
    assert waited == [True], "the first chunk did not reach the client while the engine was generating"
    assert "".join(pieces) == whole.choices[0].text and len([p for p in pieces if p]) >= 2


def scripted(engine: TorchEngine, monkeypatch: pytest.MonkeyPatch, text: str, fail: bool = False) -> None:
    """The engine's next answer is `text` (the demo model never writes a call), reported token by token through
    on_token as the real engine does; `fail`: it raises after reporting them."""
    ids = engine.tokenizer.encode(text, add_special_tokens=False) + [engine.tokenizer.eos_token_id]

    def generate(*args: Any, on_token: OnToken | None = None, **kw: Any) -> list[list[Sample]]:
        for token_id in ids:
            if on_token is not None:
                on_token(0, token_id, -0.25)
        if fail:
            raise RuntimeError("the engine broke")
        return [[Sample(ids, [-0.25] * len(ids), [-0.25] * len(ids), "stop", [(0, len(ids), 0)], 0, text)]]

    monkeypatch.setattr(engine, "generate", generate)


def streamed(
    client: openai.OpenAI, messages: Any = ({"role": "user", "content": "2+3?"},), **kwargs: Any
) -> tuple[list[str], list[Any], list[float], str | None]:
    """(content deltas, tool-call deltas, streamed logprobs, finish reason) of one streamed chat call."""
    contents, calls, logprobs, finish = [], [], [], None
    for chunk in client.chat.completions.create(model="demo", messages=list(messages), stream=True, **kwargs):
        choice = chunk.choices[0]
        contents += [choice.delta.content] if choice.delta.content else []
        calls += choice.delta.tool_calls or []
        logprobs += [t.logprob for t in choice.logprobs.content] if choice.logprobs and choice.logprobs.content else []
        finish = choice.finish_reason or finish
    return contents, calls, logprobs, finish


def test_tool_call_text_is_held_back_and_comes_as_tool_calls(
    client: openai.OpenAI, engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = 'Let me add.  <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    scripted(engine, monkeypatch, text)
    contents, calls, logprobs, finish = streamed(client, tools=TOOLS, logprobs=True)
    assert "".join(contents) == "Let me add." and len(contents) > 1  # streamed piece by piece, the call held back
    assert not any("<" in piece for piece in contents)
    [call] = calls
    assert call.function.name == "add" and call.function.arguments == '{"a": 2, "b": 3}' and finish == "tool_calls"
    assert logprobs == [-0.25] * (len(engine.tokenizer.encode(text, add_special_tokens=False)) + 1)
    # Without tools the same text is content, streamed whole: nothing is held back.
    scripted(engine, monkeypatch, text)
    contents, calls, _, finish = streamed(client)
    assert "".join(contents) == text and calls == [] and finish == "stop"


def test_a_failure_after_the_first_chunk_is_an_error_event(
    client: openai.OpenAI, engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted(engine, monkeypatch, "4 and more", fail=True)
    with pytest.raises(openai.APIError, match="generation failed"):
        streamed(client)


def test_the_streamed_text_is_the_text_of_the_same_call_without_stream(
    client: openai.OpenAI, engine: TorchEngine
) -> None:
    messages: list[Any] = [{"role": "user", "content": "7+1="}]
    for seed in range(4):
        kwargs: dict[str, Any] = {"model": "demo", "messages": messages, "max_tokens": 10, "seed": seed}
        whole = client.chat.completions.create(**kwargs, logprobs=True).choices[0]
        contents, _, logprobs, finish = streamed(client, messages, max_tokens=10, seed=seed, logprobs=True)
        assert "".join(contents) == (whole.message.content or "") and finish == whole.finish_reason
        assert logprobs == pytest.approx([t.logprob for t in whole.logprobs.content], abs=1e-6)
