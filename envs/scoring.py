"""Scoring completions with a task's weighted reward functions, where one failing reward never kills the caller.

rewards = RewardSet.from_config(task_cfg)
result = rewards.score(completions, [row] * len(completions), completion_ids)
result.total        # weighted sum per completion
result.errors       # {"math": 1} -> the caller adds it to its reward-error counter
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from envs.config import TaskConfig
from envs.rewards import Reward, UserFunction
from envs.rows import PromptRow

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ScoreResult:
    """Scores of a batch of B completions.

    total: [B] weighted sum over the rewards.
    named: label -> [B] unweighted scores of that reward (all 0.0 when it failed on this batch).
    errors: label -> 1 when that reward failed on this batch, else 0; every label is present.
    """

    total: list[float]
    named: dict[str, list[float]]
    errors: dict[str, int]


def _checked(scores: Any, size: int) -> list[float]:
    """A reward's output as [size] finite floats (None, TRL's "not applicable", counts as 0.0)."""
    if isinstance(scores, str | bytes) or not isinstance(scores, Sequence):
        raise TypeError(f"returned {type(scores).__name__}, expected a list of floats")
    if len(scores) != size:
        raise ValueError(f"returned {len(scores)} scores for {size} completions")
    values = [0.0 if s is None else float(s) for s in scores]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"returned a non-finite score: {values}")
    return values


class RewardSet:
    """A task's reward functions with their weights; `score` calls each with the dataset columns as kwargs."""

    def __init__(self, rewards: Sequence[Reward]) -> None:
        labels = [r.label for r in rewards]
        if not rewards or len(set(labels)) != len(labels):
            raise ValueError(f"rewards: need at least one, with distinct labels (got {labels})")
        self.rewards = list(rewards)

    @classmethod
    def from_config(cls, cfg: TaskConfig) -> RewardSet:
        """The task's rewards; user functions are imported now so that a wrong path fails at start-up."""
        for reward in cfg.rewards:
            if isinstance(reward, UserFunction):
                reward.load()
        return cls(cfg.rewards)

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.rewards]

    def score(
        self, completions: list[str], rows: Sequence[PromptRow], completion_ids: list[list[int]] | None = None
    ) -> ScoreResult:
        """Score B completions; rows[i] is the prompt row of completions[i] (a group repeats its row).

        Reward functions receive `prompts` ([B] row prompts: text, or message lists for conversational rows),
        `completion_ids` ([B] token id lists, when given) and each meta column as a [B] list (None where a row lacks
        it). As in TRL, user functions get the completions of conversational rows as message lists
        (`[{"role": "assistant", "content": text}]`), of standard rows as text; built-in rewards always get text. A
        reward that raises or returns a malformed result scores 0.0 on the whole batch, counts one error and logs a
        warning.
        """
        if len(rows) != len(completions):
            raise ValueError(f"score: {len(rows)} rows for {len(completions)} completions")
        columns = dict.fromkeys(key for row in rows for key in row.meta)
        kwargs: dict[str, Any] = {key: [row.meta.get(key) for row in rows] for key in columns}
        kwargs["prompts"] = [row.prompt for row in rows]
        if completion_ids is not None:
            kwargs["completion_ids"] = completion_ids
        # TRL hands a conversational prompt's completions to reward functions as message lists; built-ins read text.
        conversational = bool(rows) and isinstance(rows[0].prompt, list)
        messages = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
        size = len(completions)
        named: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        for reward in self.rewards:
            given = messages if isinstance(reward, UserFunction) else completions
            try:
                named[reward.label] = _checked(reward(given, **kwargs), size)
                errors[reward.label] = 0
            except Exception as exc:  # a user's reward may raise anything; it must cost a score, not the node
                log.warning("reward_failed", reward=reward.label, batch=size, error=f"{type(exc).__name__}: {exc}")
                named[reward.label] = [0.0] * size
                errors[reward.label] = 1
        total = [sum(r.weight * named[r.label][i] for r in self.rewards) for i in range(size)]
        return ScoreResult(total=total, named=named, errors=errors)
