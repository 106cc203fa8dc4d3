"""Admission on learner rank 0: publish prompt tasks from the dataset, paced so nothing in flight gets too stale.

The capacity rule (AReaL's, arXiv 2505.24298): with G groups per step and s = max_staleness, a new task may be
published while

    published - trained - dropped < (s + 1) * G

counting tasks: every task published, those whose group was trained, and those whose group was dropped (stale or
incomplete: it will never be trained, so its slot is free again). AReaL writes the bound as published - dropped <
(version + s + 1) * G; with one version per step of G groups the two are the same, but counting trained groups
instead of versions stays right when a learner resumes from a checkpoint older than the tasks it published. Steps
take groups in order, so a task admitted at version v has fewer than (s + 1) * G tasks ahead of it and is trained
by version v + s: pacing bounds staleness before anything has to be dropped. Each task carries `min_version` (the
newest version handed to the weight broadcast), so no engine serves it with older weights than when it was admitted.

Task ids name the dataset position, `<run>:<nonce>:<epoch>:<index>` (the nonce is drawn when a run starts fresh and
kept when it resumes): every delivery of a task has the same id, so the group a rollout node makes of it (group id =
task id) is trained at most once, and a fresh run never collides with an old run's trained ids. The position and the
counters are `state` (`publish` persists it with each batch of tasks, so a resumed learner continues after the last
task it published, not after its checkpoint's).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from bus.schema import Sampling, Task
from envs.dataset import PromptDataset
from envs.rows import PROMPT_MESSAGES, PromptRow
from telemetry.metrics import ADMISSION_INFLIGHT_SAMPLES, ADMISSION_TASKS_PUBLISHED

MESSAGES_META_CHARS = 16_384  # content characters of a conversational prompt sent along in its task's meta

Publish = Callable[[list[Task], dict[str, Any]], Any]  # (tasks, the state after them): publish and persist at once


class Admission:
    """Publishes tasks within the capacity (see the module docstring). `prompt(row)` gives a task's prompt: the row's
    text (rendered by the rollout node), or token ids for prompts that only the learner can render."""

    def __init__(
        self,
        dataset: PromptDataset,
        publish: Publish,
        prompt: Callable[[PromptRow], str | np.ndarray],
        *,
        run_name: str,
        groups_per_step: int,
        max_staleness: int,
        n: int,
        sampling: Sampling,
    ) -> None:
        self.dataset, self.publish, self.prompt = dataset, publish, prompt
        self.run_name, self.groups_per_step, self.max_staleness = run_name, groups_per_step, max_staleness
        self.n, self.sampling = n, sampling
        self.nonce = os.urandom(3).hex()
        self.published = self.trained = self.dropped = 0  # tasks
        self.exhausted = False  # the dataset ran out (task.epochs > 0)

    @property
    def id_prefix(self) -> str:
        """What every task id of this run starts with."""
        return f"{self.run_name}:{self.nonce}:"

    def owns(self, task_id: str | None) -> bool:
        """Whether `task_id` is one of this run's tasks (external groups have other ids, or none)."""
        return task_id is not None and task_id.startswith(self.id_prefix)

    def in_flight(self) -> int:
        """Tasks published whose group was neither trained nor dropped yet."""
        return max(0, self.published - self.trained - self.dropped)

    def capacity(self) -> int:
        """Tasks that may be published now."""
        return max(0, (self.max_staleness + 1) * self.groups_per_step - self.in_flight())

    def record(self, trained: int, dropped: int) -> None:
        """Count tasks whose group was trained, or dropped (which frees its slot)."""
        self.trained += trained
        self.dropped += dropped
        ADMISSION_INFLIGHT_SAMPLES.set(self.in_flight() * self.n)

    def pump(self, min_version: int) -> int:
        """Publish as many tasks as the capacity allows (they carry `min_version`); returns how many."""
        tasks = []
        for _ in range(self.capacity()):
            try:
                row = next(self.dataset)
            except StopIteration:
                self.exhausted = True
                break
            # The position just taken: next() has moved past it (to index + 1 of the same epoch).
            epoch, index = self.dataset.epoch, self.dataset.index - 1
            tasks.append(
                Task(
                    id=f"{self.id_prefix}{epoch}:{index}",
                    prompt=self.prompt(row),
                    n=self.n,
                    sampling=self.sampling,
                    meta={**row.meta, "row_id": row.id, **_prompt_messages(row)},
                    min_version=min_version,
                )
            )
        if tasks:
            self.publish(tasks, {**self.state_dict(), "published": self.published + len(tasks)})
            self.published += len(tasks)
            ADMISSION_TASKS_PUBLISHED.inc(len(tasks))
            ADMISSION_INFLIGHT_SAMPLES.set(self.in_flight() * self.n)
        return len(tasks)

    def state_dict(self) -> dict[str, Any]:
        """Nonce, dataset position and task counters (flat: it is also a Redis hash)."""
        position = self.dataset.state_dict()
        counters = {"published": self.published, "trained": self.trained, "dropped": self.dropped}
        return {"nonce": self.nonce, **position, **counters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run from its saved state: its nonce (so its task ids), position and counters."""
        self.dataset.load_state_dict({key: int(state[key]) for key in ("epoch", "index", "seed", "size")})
        self.nonce = str(state["nonce"])
        self.published, self.trained, self.dropped = (int(state[k]) for k in ("published", "trained", "dropped"))


def _prompt_messages(row: PromptRow) -> dict[str, Any]:
    """A conversational row's messages for the task's meta (its prompt travels as token ids): the rollout node's
    rewards get them as TRL does. Beyond MESSAGES_META_CHARS of content they would crowd the meta bound
    (`bus.max_meta_bytes`): the rewards then get the prompt's text."""
    if isinstance(row.prompt, list) and sum(len(m["content"]) for m in row.prompt) <= MESSAGES_META_CHARS:
        return {PROMPT_MESSAGES: row.prompt}
    return {}
