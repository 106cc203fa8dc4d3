"""One prompt row and how dataset records in TRL's formats become one.

Accepted record shapes (the columns TRL documents for its trainers):

- standard prompt-only:    {"prompt": "3+4=", "ground_truth": "7"}          (alias columns: "answer", "solution")
- conversational prompt:   {"prompt": [{"role": "user", "content": "..."}], "answer": "..."}
- conversational LM:       {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}]}
  trailing assistant turns are not part of the prompt; their text is kept as meta["completion"].
- preference:              {"prompt": ..., "chosen": ..., "rejected": ...}  (text or message lists)

Every other column is kept in `meta` (it becomes a keyword argument of the reward functions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
Prompt = str | list[Message]

# Ground truth may come under any of these names (TRL's reward functions read `solution`); the first present wins
# and is copied to meta["ground_truth"], so built-in rewards read one name whatever the dataset called it.
GROUND_TRUTH_COLUMNS = ("ground_truth", "answer", "solution")
# The task meta key that carries a conversational prompt's messages from the learner (which sends the prompt as
# token ids: only its rendering gives them) to the rollout node's rewards (TRL passes them as `prompts`).
PROMPT_MESSAGES = "prompt_messages"


@dataclass(frozen=True)
class PromptRow:
    """A prompt to generate from.

    id: stable across restarts (from the record's "id" column, else "<source>:<index>"); repeats in every epoch.
    prompt: plain text, or a conversation (list of {"role", "content"}) rendered later with a chat template.
    meta: ground truth ("ground_truth") and every other column of the record; preference rows also carry
        "chosen" and "rejected" (text or message lists).
    """

    id: str
    prompt: Prompt
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_preference(self) -> bool:
        return "chosen" in self.meta and "rejected" in self.meta


def check_messages(value: Any, column: str) -> list[Message]:
    """`value` as a list of {"role": str, "content": str} messages; a ValueError names the column and the message."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"column {column!r}: expected a non-empty list of {{role, content}} messages")
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise ValueError(f"column {column!r}, message {i}: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"column {column!r}, message {i}: 'role' must be a non-empty string")
        if not isinstance(content, str):
            kind = type(content).__name__
            raise ValueError(f"column {column!r}, message {i}: 'content' must be a string (got {kind})")
        messages.append({"role": role, "content": content})
    return messages


def _text_or_messages(value: Any, column: str) -> Prompt:
    if isinstance(value, str):
        return value
    return check_messages(value, column)


def row_from_record(record: Mapping[str, Any], default_id: str) -> PromptRow:
    """Normalise one dataset record (see the module docstring for the shapes) into a PromptRow.

    None-valued columns count as absent: columnar files (parquet, arrow) fill the columns a row lacks with None.
    Raises ValueError naming the rule that the record breaks.
    """
    columns = {k: v for k, v in record.items() if v is not None}
    row_id = str(columns.pop("id", default_id))
    meta: dict[str, Any] = {}
    if "messages" in columns:
        messages = check_messages(columns.pop("messages"), "messages")
        completion: list[str] = []
        while messages and messages[-1]["role"] == "assistant":
            completion.insert(0, messages.pop()["content"])
        if not messages:
            raise ValueError("column 'messages': needs at least one non-assistant message to prompt with")
        prompt: Prompt = messages
        if completion:
            meta["completion"] = "".join(completion)
    elif "prompt" in columns:
        prompt = _text_or_messages(columns.pop("prompt"), "prompt")
    else:
        raise ValueError(f"needs a 'prompt' or a 'messages' column (got {sorted(record)})")
    if ("chosen" in columns) != ("rejected" in columns):
        raise ValueError("a preference row needs both 'chosen' and 'rejected'")
    for column in ("chosen", "rejected"):
        if column in columns:
            columns[column] = _text_or_messages(columns[column], column)
    meta.update(columns)
    truth = next((columns[c] for c in GROUND_TRUTH_COLUMNS if c in columns), None)
    if truth is not None:
        meta["ground_truth"] = truth
    return PromptRow(id=row_id, prompt=prompt, meta=meta)
