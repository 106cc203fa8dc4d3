"""Tool calls read from a model's text (Hermes/Qwen `<tool_call>` JSON), as OpenAI's `tool_calls`."""

from __future__ import annotations

import json

from rollout_node.tool_calls import parse_tool_calls


def test_hermes_calls_become_tool_calls_and_the_rest_is_the_content() -> None:
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    text += '<tool_call>{"name": "mul", "arguments": "{\\"a\\": 4}"}</tool_call>'
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me add."
    assert [c["function"]["name"] for c in calls] == ["add", "mul"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 2, "b": 3}, {"a": 4}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_only_calls_give_no_content_and_what_is_not_a_call_stays_text() -> None:
    assert parse_tool_calls('<tool_call>{"name": "f"}</tool_call>', "hermes")[0] is None
    for broken in ("<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                   '<tool_call>["f"]</tool_call>', '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
                   "no call at all", '<tool_call>{"name": "f"}'):  # fmt: skip
        assert parse_tool_calls(broken, "hermes") == (broken, []), broken
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text, "none") == (text, [])


def test_content_keeps_its_leading_whitespace_and_loses_the_trailing_before_a_call() -> None:
    # What a stream already sent (leading text) must stay a prefix of the content; the whitespace before a call goes.
    text = '  Sure:\n <tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text, "hermes")[0] == "  Sure:"
