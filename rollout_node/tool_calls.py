"""Tool calls in a model's output, as OpenAI's `tool_calls` (`rollout.proxy_tool_parser`).

`hermes`: the format of Hermes, Qwen2.5/Qwen3 and most chat templates that take `tools`: each call is
`<tool_call>{"name": "...", "arguments": {...}}</tool_call>`; the text outside the tags is the message's content
(its trailing whitespace trimmed when there were calls).
A block that is not such JSON is left in the content as text: a malformed call reaches the agent as what the model
wrote, never as an error. `none`: tool calls are not parsed (the text is the content).
"""

from __future__ import annotations

import json
import re
from typing import Any

from bus.schema import new_id
from rollout_node.config import ToolParser

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_CALL_STARTS: dict[ToolParser, str] = {"hermes": "<tool_call>"}


def call_start(parser: ToolParser) -> str | None:
    """The text that opens a tool call in `parser`'s format (a stream holds back what may be its beginning)."""
    return _CALL_STARTS.get(parser)


def parse_tool_calls(text: str, parser: ToolParser) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a completion's `text`: content None when the text was only tool calls."""
    if parser == "none":
        return text, []
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    end = 0
    for match in _HERMES.finditer(text):
        call = _hermes_call(match.group(1))
        if call is None:
            continue  # stays in the content, as written
        kept.append(text[end : match.start()])
        end = match.end()
        calls.append(call)
    if not calls:
        return text, []
    content = ("".join(kept) + text[end:]).rstrip()  # leading whitespace stays: it may have been streamed already
    return content or None, calls


def _hermes_call(body: str) -> dict[str, Any] | None:
    """One OpenAI tool call from a `<tool_call>` block's JSON, or None when it is not a call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments already encoded
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {
        "id": f"call_{new_id()}",
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }
