"""Prompt rendering with a real tokenizer's chat template, and the chat_template switch."""

from __future__ import annotations

from typing import Any

import pytest

from envs import FormatConfig, render_prompt
from envs.render import prompt_tokens
from envs.rows import PromptRow


def test_auto_templates_conversations_and_sends_text_as_it_is_like_trl(chat_tokenizer: Any) -> None:
    # TRL's maybe_apply_chat_template: only conversational rows are templated; a text prompt reaches the model as is.
    assert render_prompt("3+4=", FormatConfig(), chat_tokenizer) == "3+4="
    messages = [{"role": "user", "content": "3+4="}]
    assert render_prompt(messages, FormatConfig(), chat_tokenizer) == "<|user|>3+4=<|end|>\n<|assistant|>"


def test_on_templates_a_text_prompt_as_one_user_message(chat_tokenizer: Any) -> None:
    fmt = FormatConfig(chat_template="on", system_prompt="Add.")
    assert render_prompt("3+4=", fmt, chat_tokenizer) == "<|system|>Add.<|end|>\n<|user|>3+4=<|end|>\n<|assistant|>"
    on = FormatConfig(chat_template="on")
    assert render_prompt("3+4=", on, chat_tokenizer) == "<|user|>3+4=<|end|>\n<|assistant|>"


def test_a_system_message_in_the_prompt_is_kept_instead_of_the_configured_one(chat_tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "q"}]
    text = render_prompt(messages, FormatConfig(system_prompt="Configured."), chat_tokenizer)
    assert text == "<|system|>Mine.<|end|>\n<|user|>q<|end|>\n<|assistant|>"


def test_template_off_or_absent_sends_text_as_it_is(chat_tokenizer: Any, plain_tokenizer: Any) -> None:
    off = FormatConfig(chat_template="off", system_prompt="Add.")
    assert render_prompt("3+4=", off, chat_tokenizer) == "Add.\n3+4="
    assert render_prompt("3+4=", FormatConfig(), plain_tokenizer) == "3+4="
    assert render_prompt("3+4=", FormatConfig()) == "3+4="


def test_impossible_renderings_are_errors(chat_tokenizer: Any, plain_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="chat_template='on': the tokenizer has no chat_template"):
        render_prompt("3+4=", FormatConfig(chat_template="on"), plain_tokenizer)
    messages = [{"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="a conversational prompt needs a chat template"):
        render_prompt(messages, FormatConfig(chat_template="off"), chat_tokenizer)


def test_prompt_tokens_counts_the_rendered_prompt(chat_tokenizer: Any) -> None:
    row = PromptRow(id="r", prompt="3+4=")
    # <|user|> 3 + 4 = <|end|> \n <|assistant|>
    assert prompt_tokens(row, FormatConfig(chat_template="on"), chat_tokenizer) == 8
