"""The tasks of `slipstream bench learn`: chosen to differ in kind, none of them tuned to the recipe that learns them.

Each is a `[task]` section given as overrides on top of the run's config (the learner section stays as it is):

- `max`: the built-in arithmetic source, "max(3,8)=" -> "8", exact match only (no shaped rewards), evaluated on the
  training prompts. Held out, with TRL's settings (no weight decay), every system plateaus below the target from 80
  training pairs (seeds 1 and 2, 2026-12-07: the reference at 0.5, Slipstream sync and async at 0.8-0.85, flat for
  the last 120-160 of 200 steps): that split measures generalisation, which weight decay buys (the demo recipe
  reaches 0.9 held out), not how fast RL learns;
- `min_jsonl`: "min(a,b)=" over two digits from a JSONL file the bench writes, exact match: the path a user's own
  dataset takes. Evaluated on the training prompts (what TRL's logged reward measures): held out, the reference loop
  itself plateaus at 0.70-0.75 with TRL's settings (no weight decay; 2026-12-06, docs/learner.md), so a held-out
  target would measure generalisation from 80 pairs, not how fast RL learns;
- `repeat`: generation-heavy: "7x32=" -> the digit written 32 times (responses of 32 tokens, so generation dominates
  a step), scored by `position_match` (the share of the 32 positions right), evaluated on the training prompts
  (`task.eval_split = "train"`: ten digits leave nothing to hold out), correct only when all 32 are right. Its
  answers need 33 tokens with the eos, so it sets `learner.max_new_tokens` to 40 on every system.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPEAT_LENGTH = 32


@dataclass(frozen=True)
class LearnTask:
    """A bench task: its `[task]` TOML (with `{folder}` for the files it writes) and the accuracy that counts as
    learned."""

    name: str
    toml: str
    target: float
    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # JSONL files to write first, by name
    # The response budget its answers need (TRL's max_completion_length for a dataset), the one learner setting a
    # task carries: a recipe cannot learn to write 32 characters in 4 tokens. None: the recipe's own.
    max_new_tokens: int | None = None

    def overrides(self) -> list[str]:
        """The command-line overrides this task adds to every system's run."""
        return [] if self.max_new_tokens is None else ["--learner.max_new_tokens", str(self.max_new_tokens)]

    def config(self, base: str, folder: Path) -> Path:
        """Write the task's files and `base` (a TOML text) with its own `[task]` sections replaced by this task's,
        into `folder`; returns the config's path."""
        for name, rows in self.files.items():
            (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        path = folder / f"{self.name}.toml"
        path.write_text(without_task(base) + "\n" + self.toml.replace("{folder}", str(folder)))
        return path


def without_task(toml: str) -> str:
    """`toml` without its `[task]`, `[task.*]` and `[[task.*]]` tables (everything else, comments included, kept)."""
    kept, in_task = [], False
    for line in toml.splitlines():
        header = re.match(r"^\s*\[\[?\s*([A-Za-z0-9_.\-]+)\s*\]\]?", line)
        if header:
            in_task = header.group(1).split(".")[0] == "task"
        if not in_task:
            kept.append(line)
    return "\n".join(kept) + "\n"


def position_match(completions: list[str], ground_truth: list[str], **_: Any) -> list[float]:
    """TRL-signature reward: the share of the ground truth's positions that the completion matches, minus the share
    of extra characters past its end (so "write exactly this" is the only way to 1.0)."""
    scores = []
    for completion, truth in zip(completions, ground_truth, strict=True):
        hits = sum(a == b for a, b in zip(completion, truth, strict=False))
        extra = max(0, len(completion) - len(truth))
        scores.append((hits - extra) / len(truth))
    return scores


_PLAIN = '[task.format]\nchat_template = "off"\n'
_EXACT = '[[task.rewards]]\nfunction = "exact_match"\n'


def _tasks() -> dict[str, LearnTask]:
    min_rows = [{"prompt": f"min({a},{b})=", "ground_truth": str(min(a, b))} for a in range(10) for b in range(10)]
    repeat_rows = [{"prompt": f"{d}x{REPEAT_LENGTH}=", "ground_truth": str(d) * REPEAT_LENGTH} for d in range(10)]
    tasks = [
        LearnTask(
            "max",
            '[task]\nsource = "arithmetic"\neval_split = "train"\n[task.arithmetic]\nops = ["max"]\n' + _PLAIN + _EXACT,
            target=0.9,
        ),
        LearnTask(
            "min_jsonl",
            '[task]\nsource = "jsonl"\npath = "{folder}/min.jsonl"\neval_split = "train"\n' + _PLAIN + _EXACT,
            target=0.9,
            files={"min.jsonl": min_rows},
        ),
        LearnTask(
            "repeat",
            '[task]\nsource = "jsonl"\npath = "{folder}/repeat.jsonl"\neval_split = "train"\n'
            + _PLAIN
            + '[[task.rewards]]\nfunction = "bench._learn_tasks:position_match"\n',
            target=0.9,
            files={"repeat.jsonl": repeat_rows},
            max_new_tokens=REPEAT_LENGTH + 8,
        ),
    ]
    return {task.name: task for task in tasks}


TASKS = _tasks()
