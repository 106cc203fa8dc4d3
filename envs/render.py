"""Rendering prompts (and preference completions) into the text a model sees.

`tokenizer` is any object with Hugging Face's tokenizer interface (`chat_template`, `apply_chat_template`, `encode`);
envs never imports transformers itself.
"""

from __future__ import annotations

from typing import Any

from envs.config import FormatConfig
from envs.rows import Message, Prompt, PromptRow


def uses_chat_template(fmt: FormatConfig, tokenizer: Any | None, prompt: Prompt) -> bool:
    """Whether `prompt` goes through the chat template; 'on' without a templated tokenizer is an error.

    'auto' follows TRL (`trl.data_utils.maybe_apply_chat_template`): a conversational prompt (a list of messages) is
    templated when the tokenizer has a template, a text prompt is sent as it is, so a TRL dataset's rows reach the
    model as the same tokens in both. 'on' also templates text prompts, as one user message."""
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if fmt.chat_template == "on" and not has_template:
        raise ValueError("format.chat_template='on': the tokenizer has no chat_template")
    if fmt.chat_template == "auto":
        return has_template and not isinstance(prompt, str)
    return fmt.chat_template == "on"


def _as_messages(prompt: Prompt, fmt: FormatConfig) -> list[Message]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if fmt.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    return messages


def render_prompt(prompt: Prompt, fmt: FormatConfig, tokenizer: Any | None = None) -> str:
    """The text to generate from: chat template with the generation prompt when it applies, else the system prompt
    (if any) and the text prompt separated by a newline."""
    if uses_chat_template(fmt, tokenizer, prompt):
        return tokenizer.apply_chat_template(_as_messages(prompt, fmt), tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError(f"a conversational prompt needs a chat template (format.chat_template={fmt.chat_template!r})")
    return f"{fmt.system_prompt}\n{prompt}" if fmt.system_prompt else prompt


def render_completion(prompt: Prompt, completion: Prompt, fmt: FormatConfig, tokenizer: Any | None = None) -> str:
    """The text that follows `render_prompt(prompt)` for a completion given as text (returned as is) or as assistant
    messages (rendered by the chat template after the prompt, the prompt's own rendering cut off)."""
    if isinstance(completion, str):
        return completion
    if not uses_chat_template(fmt, tokenizer, completion):
        raise ValueError("a conversational completion needs a tokenizer with a chat template")
    if isinstance(prompt, str) and fmt.chat_template == "auto":
        raise ValueError("a conversational completion needs a conversational prompt (or format.chat_template='on')")
    head = render_prompt(prompt, fmt, tokenizer)
    full = tokenizer.apply_chat_template(_as_messages(prompt, fmt) + list(completion), tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + completion")
    return full[len(head) :]


def render_preference(row: PromptRow, fmt: FormatConfig, tokenizer: Any | None = None) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts of a preference row; prompt + chosen is the full chosen sequence."""
    if not row.is_preference:
        raise ValueError(f"row {row.id!r}: not a preference row (needs 'chosen' and 'rejected')")
    chosen = render_completion(row.prompt, row.meta["chosen"], fmt, tokenizer)
    rejected = render_completion(row.prompt, row.meta["rejected"], fmt, tokenizer)
    return render_prompt(row.prompt, fmt, tokenizer), chosen, rejected


def prompt_tokens(row: PromptRow, fmt: FormatConfig, tokenizer: Any) -> int:
    """Token count of the rendered prompt (special tokens are in the rendering already, none are added)."""
    return len(tokenizer.encode(render_prompt(row.prompt, fmt, tokenizer), add_special_tokens=False))
