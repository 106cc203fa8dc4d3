"""Turning consumed messages into training units: whole groups, groups assembled from single trajectories, pairs.

A `group` message is a unit at once. `trajectory` messages (external agents send them one at a time) wait in a
buffer under their group_id until `group_size` of them are there, or until `timeout_s` after the first arrived:
then the partial group trains if it has at least `min_group_size` members, else it is dropped as
"incomplete_group". A `preference` message is a unit of its own (DPO).

Units keep the bus entries they came from (`received`): the rank that consumed an entry settles it after the step.

`collect` stops reading once the units held for a step and the buffered singles (`group_size` of them to a unit) reach
the assembler's `capacity`: a flood of groups stays on the stream, unread, where it fills the stream up to
`bus.max_stream_length` and makes the producers wait, instead of filling the learner's memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bus.consumer import MessageConsumer, Received
from bus.schema import Group, Preference, Trajectory

Clock = Callable[[], float]


@dataclass
class Unit:
    """What a step trains from one source.

    key: group id (or preference id). samples: the group's members to train on (a preference: none, see `pair`).
    message_ids: ids of the bus messages it came from (1 for a group or a pair, one per member for assembled
    singles). received: those entries, on the rank that consumed them only (never sent to other ranks).
    duplicates: members removed because their id was trained already. task_id: the admission task it answers.
    """

    key: str
    samples: list[Trajectory]
    message_ids: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    pair: Preference | None = None
    duplicates: int = 0
    task_id: str | None = None

    @classmethod
    def of(cls, key: str, samples: list[Trajectory], received: list[Received], **kw: Any) -> Unit:
        """A unit made of consumed entries."""
        return cls(key, samples, [r.id or "" for r in received], list(received), **kw)

    @property
    def min_version(self) -> int:
        """The oldest policy version among the members' tokens (a pair: 0, pairs carry no version)."""
        return min((s.min_policy_version for s in self.samples), default=0)

    @property
    def max_version(self) -> int:
        """The newest policy version among the members' tokens (a pair: 0)."""
        return max((s.max_policy_version for s in self.samples), default=0)

    @property
    def size(self) -> int:
        """Trajectories this unit stands for on the bus (what the accounting counts): members plus duplicates."""
        return 1 if self.pair is not None else len(self.samples) + self.duplicates

    def stripped(self) -> Unit:
        """This unit without its entries: what travels to the other ranks."""
        return replace(self, received=[])

    def without(self, message_ids: set[str]) -> list[Received]:
        """Remove the messages `message_ids` (and the members they carried); returns their entries."""
        removed = [r for r in self.received if r.id in message_ids]
        self.received = [r for r in self.received if r.id not in message_ids]
        self.message_ids = [i for i in self.message_ids if i not in message_ids]
        self.samples = [s for s in self.samples if s.id not in message_ids]
        return removed


@dataclass
class _Pending:
    first_seen: float
    received: list[Received] = field(default_factory=list)


class GroupAssembler:
    """Collects consumed messages into units (see the module docstring). Not thread-safe: one per polling thread."""

    def __init__(
        self,
        group_size: int,
        min_group_size: int,
        timeout_s: float,
        clock: Clock = time.monotonic,
        capacity: int | None = None,
    ):
        if not 1 <= min_group_size <= group_size:
            raise ValueError(f"min_group_size: must be in [1, group_size={group_size}], got {min_group_size}")
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity: must be >= 1 unit (None: unbounded), got {capacity}")
        self.group_size, self.min_group_size, self.timeout_s = group_size, min_group_size, timeout_s
        self.clock, self.capacity = clock, capacity
        self._ready: list[Unit] = []
        self._incomplete: list[Unit] = []
        self._pending: dict[str, _Pending] = {}

    @property
    def buffered(self) -> int:
        """Single trajectories waiting for the rest of their group."""
        return sum(len(p.received) for p in self._pending.values())

    def full(self, held: int) -> bool:
        """Whether `held` units (taken, not trained yet) and the buffered singles (`group_size` to a unit) reach
        `capacity`."""
        return self.capacity is not None and held + self.buffered // self.group_size >= self.capacity

    def collect(self, consumer: MessageConsumer, held: int, block_ms: int) -> tuple[list[Unit], list[Unit]]:
        """Poll `consumer` unless `full(held)`, add what came, then `take()`. One poll reads up to `consume_batch`
        entries (not fewer: most of a flood may be broken messages that only need dead-lettering), so what is held
        stays below `capacity + consume_batch` units. When full nothing is read: the entries wait on the stream,
        undelivered, for this rank or another."""
        if self.full(held):
            time.sleep(block_ms / 1000)  # as long as the poll would have waited: the caller's loop must not spin
        else:
            self.add(consumer.poll(block_ms=block_ms))
        return self.take()

    def add(self, items: Sequence[Received]) -> None:
        """Take consumed messages (groups, trajectories, preferences)."""
        for received in items:
            message = received.message
            if isinstance(message, Group):
                unit = Unit.of(message.id, list(message.trajectories), [received], task_id=message.task_id)
                (self._ready if len(unit.samples) >= self.min_group_size else self._incomplete).append(unit)
            elif isinstance(message, Preference):
                self._ready.append(Unit.of(message.id, [], [received], pair=message))
            elif isinstance(message, Trajectory):
                pending = self._pending.setdefault(message.group_id, _Pending(self.clock()))
                pending.received.append(received)
                if len(pending.received) >= self.group_size:
                    self._ready.append(self._assembled(message.group_id))
            else:
                raise TypeError(f"message kind {type(message).__name__} cannot be trained on")

    def take(self) -> tuple[list[Unit], list[Unit]]:
        """(units ready to train, units to drop as incomplete groups), each returned once, oldest first."""
        now = self.clock()
        for group_id in [g for g, p in self._pending.items() if now - p.first_seen >= self.timeout_s]:
            unit = self._assembled(group_id)
            (self._ready if len(unit.samples) >= self.min_group_size else self._incomplete).append(unit)
        ready, incomplete = self._ready, self._incomplete
        self._ready, self._incomplete = [], []
        return ready, incomplete

    def _assembled(self, group_id: str) -> Unit:
        received = self._pending.pop(group_id).received
        samples = [r.message for r in received]
        return Unit.of(group_id, samples, received)  # type: ignore[arg-type]  # only trajectories are buffered


def split_trained(units: list[Unit], seen: Callable[[list[str]], list[bool]]) -> tuple[list[Unit], list[Received]]:
    """Check units against the trained ids (one `seen` call): -> (units to train, copies to release uncounted).

    A message whose id was trained already is a re-delivered copy of something settled (e.g. an entry claimed by
    two ranks): it is released, not counted, because it was published once; with it goes its member (a single
    trajectory) or its whole group. Members of a group message whose own id was trained already are removed and
    counted in `duplicates` (the same trajectory published again, in another group).
    """
    if not units:
        return [], []
    flags = iter(seen([i for u in units for i in (*u.message_ids, *(s.id for s in u.samples))]))
    fresh: list[Unit] = []
    copies: list[Received] = []
    for unit in units:
        copied = {i for i in unit.message_ids if next(flags)}
        trained = {s.id for s in unit.samples if next(flags)} - copied
        if copied:
            copies += unit.without(copied)
            if not unit.message_ids:
                continue  # the group message (or every member) is the copy
        unit.samples = [s for s in unit.samples if s.id not in trained]
        unit.duplicates += len(trained)
        fresh.append(unit)
    return fresh, copies


def drop_repeats(units: list[Unit]) -> tuple[list[Unit], list[Received]]:
    """The step's units with every message and every trajectory kept once (the first occurrence, in order):
    -> (units, entries of the removed repeats).

    Two ranks can hold copies of one message (an entry claimed by both, or published twice): the copy's entry is
    released uncounted. Two different group messages can carry the same trajectory id (a producer, or a hostile
    one, publishing a member again in another group): the later member is removed and counted in `duplicates`, as
    `split_trained` does across steps, so no trajectory is trained twice in a step. Every rank runs this on the same
    gathered list and so removes the same copies."""
    seen: set[str] = set()
    members: set[str] = set()
    kept: list[Unit] = []
    repeats: list[Received] = []
    for unit in units:
        again = {i for i in unit.message_ids if i in seen}
        seen.update(unit.message_ids)
        if again:
            repeats += unit.without(again)
            if not unit.message_ids:
                continue
        fresh = [s for s in unit.samples if s.id not in members]
        unit.duplicates += len(unit.samples) - len(fresh)
        unit.samples = fresh
        members.update(s.id for s in fresh)
        kept.append(unit)
    return kept, repeats


def zero_variance(unit: Unit) -> bool:
    """Whether every member of `unit` scored the same reward: GRPO's advantages are then all 0 (no signal)."""
    return len({s.reward for s in unit.samples}) <= 1
