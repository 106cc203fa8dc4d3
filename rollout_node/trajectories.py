"""From generated samples to what the rollout node puts on the trajectories stream, and its count of them.

- `Completion`: one sample in trajectory form (a single-turn sample, or a whole multi-turn episode).
- `trajectory_id`, `episode_versions`: ids that are the same on every delivery of a task, and an episode's ranges.
- `score_group`: a task's completions scored with the task's rewards, as ONE Group (group id = task id).
- `Publisher`: validates, publishes and counts what went out (docs/rollout.md, accounting).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bus.codec import MAX_NAME_CHARS, encode
from bus.consumer import MessageConsumer, Received
from bus.schema import Group, Task, Trajectory
from bus.transport import Delivery, Transport
from envs import PromptRow, RewardSet
from rollout_node.engines.base import Sample, VersionRange, token_versions, version_ranges
from telemetry.metrics import (
    ROLLOUT_REWARD,
    ROLLOUT_REWARD_ERRORS,
    ROLLOUT_SAMPLES_GENERATED,
    ROLLOUT_TOKENS_GENERATED,
    TRAJECTORIES_PUBLISHED,
)


@dataclass(frozen=True)
class Completion:
    """One sample in trajectory form. response_ids [T], logprobs [T] (behaviour policy, 0.0 on environment tokens),
    loss_mask [T] (0 on environment tokens) or None (all 1); version_ranges cover [0, T) in order."""

    response_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int] | None
    version_ranges: list[VersionRange]
    text: str
    finish_reason: str

    @classmethod
    def of(cls, sample: Sample) -> Completion:
        return cls(
            sample.response_ids,
            sample.behavior_logprobs,
            None,
            sample.version_ranges,
            sample.text,
            sample.finish_reason,
        )

    @property
    def aborted(self) -> bool:
        """Cut short by `Engine.abort` (shutdown, or the engine dropped it): the task is run again, not published."""
        return self.finish_reason == "abort" or not self.response_ids


def trajectory_id(task_id: str, index: int) -> str:
    """`<task id>:<index>`, the same for every delivery of a task (a sha256 of the task id when that is too long)."""
    suffix = f":{index}"
    if len(task_id) + len(suffix) > MAX_NAME_CHARS:
        task_id = hashlib.sha256(task_id.encode()).hexdigest()
    return task_id + suffix


def episode_versions(loss_mask: Sequence[int], turns: Sequence[Sample]) -> list[VersionRange]:
    """Version ranges of an episode's response: policy tokens (loss_mask 1) take their turn's versions in order,
    environment tokens the version of the policy token before them."""
    policy_versions = [v for turn in turns for v in token_versions(turn.version_ranges)]
    versions, taken = [], 0
    for mask in loss_mask:
        if mask:
            versions.append(policy_versions[taken])
            taken += 1
        else:
            versions.append(versions[-1] if versions else policy_versions[0])
    return version_ranges(versions)


def score_group(
    task: Task, row: PromptRow, prompt_ids: list[int], completions: list[Completion], rewards: RewardSet, producer: str
) -> Group:
    """Score a task's completions (prompt_ids [P]) with `rewards` and build its Group (metrics counted here)."""
    texts, response_ids = [c.text for c in completions], [c.response_ids for c in completions]
    result = rewards.score(texts, [row] * len(completions), response_ids)
    for label, failed in result.errors.items():
        if failed:
            ROLLOUT_REWARD_ERRORS.labels(label).inc()
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    trajectories = []
    for i, c in enumerate(completions):
        trajectories.append(
            Trajectory(
                id=trajectory_id(task.id, i),
                group_id=task.id,
                producer=producer,
                prompt_ids=prompt,
                response_ids=np.asarray(c.response_ids, dtype=np.int32),
                behavior_logprobs=np.asarray(c.logprobs, dtype=np.float32),
                loss_mask=None if c.loss_mask is None else np.asarray(c.loss_mask, dtype=np.uint8),
                reward=result.total[i],
                rewards={label: scores[i] for label, scores in result.named.items()},
                policy_version=c.version_ranges[0][2],
                version_ranges=c.version_ranges if len(c.version_ranges) > 1 else None,
                finish_reason=c.finish_reason,
            )
        )
        ROLLOUT_REWARD.observe(result.total[i])
        ROLLOUT_TOKENS_GENERATED.inc(sum(c.loss_mask) if c.loss_mask is not None else len(c.response_ids))
    ROLLOUT_SAMPLES_GENERATED.inc(len(trajectories))
    return Group(id=task.id, producer=producer, trajectories=trajectories, task_id=task.id)


class Publisher:
    """Puts groups and trajectories on the trajectories stream and counts what went out: TRAJECTORIES_PUBLISHED and,
    on Redis, HINCRBY `<prefix>accounting` `published` by the number of trajectories (docs/rollout.md, accounting).

    A task's group goes out with `publish_result`: the XADD, the count and the task's ack in one transaction, so a
    node killed at any point leaves the group published, counted and its task acked, or none of it. `publish`
    (agent sessions, no task) counts in a second round trip: a crash in between leaves trajectories published but
    not counted, which shows as trained + dropped exceeding published. Thread-safe (the transport is)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.stream = transport.config.stream("trajectories")
        self.accounting_key = transport.config.prefix + "accounting"

    def publish(self, messages: Sequence[Group | Trajectory]) -> list[str]:
        """Validate and encode every message (a `MessageError` names the field; nothing is sent then), publish them
        in one round trip (waiting while the stream is full) and count their trajectories. Returns the entry ids."""
        payloads, count = self._encode(messages)
        entry_ids = self.transport.publish(self.stream, payloads)
        store = self.transport.ledger()
        if store is not None:
            store.retrying(lambda: store.client.hincrby(self.accounting_key, "published", count))
        TRAJECTORIES_PUBLISHED.inc(count)
        return entry_ids

    def publish_result(self, group: Group, task: Received, consumer: MessageConsumer) -> bool:
        """Publish `task`'s group, count it and ack `task` on `consumer`'s group at once (`publish` validates the
        same way). False when nothing was published because the node no longer holds the task: its lease expired
        and another node claimed it (that node publishes the group), or it was acked already."""
        payloads, count = self._encode([group])
        source = Delivery(consumer.stream, task.entry_id, task.data, task.deliveries)
        counter = (self.accounting_key, "published", count)
        entry_ids = self.transport.publish_and_ack(
            self.stream, payloads, source, consumer.group, consumer.consumer, counter
        )
        if entry_ids is None:
            return False
        TRAJECTORIES_PUBLISHED.inc(count)
        return True

    def _encode(self, messages: Sequence[Group | Trajectory]) -> tuple[list[bytes], int]:
        """The wire bytes of `messages` (raises `MessageError` naming the field) and their trajectory count."""
        limits = self.transport.config.limits()
        payloads = [encode(m, limits=limits) for m in messages]
        return payloads, sum(len(m.trajectories) if isinstance(m, Group) else 1 for m in messages)
