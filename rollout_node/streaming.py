"""The agent proxy's `stream: true`: OpenAI server-sent events sent while the engine generates, token by token.

The engine reports each token as it is drawn (`Engine.generate(on_token=...)`, from its thread); `TextStream` turns
one choice's tokens into the text that is safe to send now, and `sse_events` writes the chunks: a role chunk per
choice (chat), content deltas as tokens arrive (each token's logprob attached to the delta its text went out in),
then, once generation ended and the reply is built exactly as without `stream`, the rest of the content, the tool
calls, the finish chunk, the usage (`stream_options.include_usage`) and `[DONE]`. Joined, the deltas are the reply's
content, and their logprobs the recorded tokens' behaviour logprobs.

What is held back: a character whose tokens are not all in yet (`\\ufffd`), and with tools the text from what may begin
a tool call (`<tool_call>` for hermes, or a prefix of it at the end) and any trailing whitespace, which the parser
trims before a call. A failure after the first chunk went out ends the stream with OpenAI's error event
(`data: {"error": {...}}`), which the `openai` client raises.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from rollout_node.engines.base import Sample
from rollout_node.sessions import ProxyError

Tokens = asyncio.Queue[tuple[int, int, float] | None]  # (row, token id, logprob); None: generation ended


def logprob_entries(tokenizer: Any, ids: list[int], logprobs: list[float]) -> list[dict[str, Any]]:
    """OpenAI chat `logprobs.content` entries of tokens `ids` [K] with their logprobs [K]."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return [
        {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
        for t, lp in zip(tokens, logprobs, strict=True)
    ]


class TextStream:
    """One choice's tokens as they arrive, and the part of their text that can be sent now (`add`) and at the end
    (`rest`). `hold`: the text that opens a tool call, or None when calls are not parsed."""

    def __init__(self, tokenizer: Any, hold: str | None) -> None:
        self.tokenizer, self.hold = tokenizer, hold
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read_offset]
        # Incremental detokenization (vLLM's): ids[prefix_offset:read_offset] decode to the end of `text`; decoding
        # from prefix_offset on, rather than each token alone or the whole response every time, keeps what depends on
        # the context (a leading space, a character split over tokens) right at O(new tokens) per step.
        self.prefix_offset = self.read_offset = 0
        self.sent_text = ""
        self.sent_tokens = 0  # tokens whose logprobs went out with a delta

    def add(self, token_id: int) -> tuple[str, range] | None:
        """Take the next token; returns (new text, the tokens it covers) when some text can go out now."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        known = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        extended = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(extended) > len(known) and not extended.endswith("\ufffd"):  # else: a character is still incomplete
            self.text += extended[len(known) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        visible = self._visible(self.text)
        if len(visible) <= len(self.sent_text) or not visible.startswith(self.sent_text):
            return None
        return self._send(visible, len(self.ids))

    def rest(self, content: str, tokens: int) -> tuple[str, range]:
        """What is left to send of the final `content`, over `tokens` response tokens in all."""
        if not content.startswith(self.sent_text):  # not reachable with a prefix-stable tokenizer: send no text twice
            return "", self._tokens(tokens)
        return self._send(content, tokens)

    def _send(self, text: str, tokens: int) -> tuple[str, range]:
        piece, self.sent_text = text[len(self.sent_text) :], text
        return piece, self._tokens(tokens)

    def _tokens(self, tokens: int) -> range:
        covered, self.sent_tokens = range(self.sent_tokens, tokens), max(tokens, self.sent_tokens)
        return covered

    def _visible(self, text: str) -> str:
        if self.hold is None:
            return text
        found = text.find(self.hold)
        if found >= 0:
            text = text[:found]
        else:
            longest = min(len(self.hold) - 1, len(text))
            partial = next((k for k in range(longest, 0, -1) if text.endswith(self.hold[:k])), 0)
            text = text[: len(text) - partial]
        return text.rstrip()


async def sse_events(
    *,
    chat: bool,
    choices: int,
    tokens: Tokens,
    result: Awaitable[tuple[list[int], list[Sample]]],
    build_reply: Callable[[list[int], list[Sample]], dict[str, Any]],
    tokenizer: Any,
    hold: str | None,
    logprobs: bool,
    include_usage: bool,
    head: dict[str, Any],
) -> AsyncIterator[str]:
    """The events of one streamed call (module docstring). `tokens` is fed by the engine until None; `result` is
    the generation (prompt, samples); `build_reply` makes the JSON reply the call would answer without `stream`;
    `head` holds id, created and model."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def event(deltas: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': deltas, **extra})}\n\n"

    def delta(index: int, piece: str, covered: range, ids: list[int], lps: list[float] | None) -> str:
        if not chat:
            return event([{"index": index, "text": piece, "logprobs": None, "finish_reason": None}])
        out: dict[str, Any] = {"index": index, "delta": {"content": piece}, "finish_reason": None}
        if logprobs and lps is not None and covered:
            entries = logprob_entries(tokenizer, [ids[k] for k in covered], [lps[k] for k in covered])
            out["logprobs"] = {"content": entries}
        return event([out])

    streams = [TextStream(tokenizer, hold) for _ in range(choices)]
    arrived: list[list[float]] = [[] for _ in range(choices)]
    if chat:
        for index in range(choices):
            yield event([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    while (item := await tokens.get()) is not None:
        row, token_id, logprob = item
        arrived[row].append(logprob)
        sent = streams[row].add(token_id)
        if sent is not None:
            yield delta(row, sent[0], sent[1], streams[row].ids, arrived[row])
    try:
        prompt, samples = await result
    except ProxyError as exc:  # the status line went out with the first chunk: the error is an event
        yield f"data: {json.dumps(exc.body())}\n\n"
        return
    reply = build_reply(prompt, samples)
    for choice, sample, stream in zip(reply["choices"], samples, streams, strict=True):
        index, ids, lps = choice["index"], sample.response_ids, sample.behavior_logprobs
        message = choice["message"] if chat else {"content": choice["text"]}
        piece, covered = stream.rest(message["content"] or "", len(ids))
        if piece or (chat and logprobs and covered):
            yield delta(index, piece, covered, ids, lps)
        if chat and "tool_calls" in message:
            calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
            yield event([{"index": index, "delta": {"tool_calls": calls}, "finish_reason": None}])
        finish = choice["finish_reason"]
        if chat:
            yield event([{"index": index, "delta": {}, "finish_reason": finish}])
        else:
            yield event([{"index": index, "text": "", "logprobs": None, "finish_reason": finish}])
    if include_usage:
        yield event([], usage=reply["usage"], policy_version=reply["policy_version"])
    yield "data: [DONE]\n\n"
