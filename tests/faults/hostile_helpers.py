"""Shared pieces of the hostile-input and load tests (tests/faults/test_hostile_*.py, tests/faults/test_load_*.py).

- `Fuzzer`: the hostile corpus sent straight to the trajectories stream (XADD, field `data`): every message knows
  what must become of it (dead-lettered naming a field, dropped as stale or incomplete, trained once, counted as a
  duplicate), so a test can check each one.
- `DeadReader`: the dead stream's records by the entry id they came from, read onwards as they come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import redis

from bus.codec import encode
from bus.schema import Group, Heartbeat, Task, Trajectory, new_id

# --- the hostile corpus ----------------------------------------------------------------------------------------------
INVALID, STALE, FUTURE, INCOMPLETE, TRAINED, DUPLICATE, REPLAY = (
    "invalid", "stale", "future_version", "incomplete_group", "trained", "duplicate", "replay"
)  # fmt: skip

FUTURE_AHEAD = (100_000, None)  # versions above the learner's in each burst: this far ahead, and int64's largest


@dataclass(frozen=True)
class Fate:
    """What must become of a fuzz message.

    outcome: INVALID (dead-lettered; the reason names one of `fields_named`), STALE, FUTURE or INCOMPLETE
    (dead-lettered by the learner with that reason), TRAINED (a valid group, trained once), DUPLICATE (its members
    were trained already: counted as dropped:duplicate), REPLAY (the same bytes as an earlier TRAINED message: acked,
    never counted). trajectories: what it stands for in the accounting (a group's members, else 1). message_id: its
    id, if it has one.
    """

    category: str
    outcome: str
    trajectories: int
    fields_named: tuple[str, ...] = ()
    message_id: str | None = None


@dataclass(frozen=True)
class Hostile:
    """One fuzz message: its XADD fields and its fate."""

    fields: dict[bytes, bytes]
    fate: Fate

    @classmethod
    def of(
        cls,
        category: str,
        fields: dict[bytes, bytes],
        outcome: str,
        trajectories: int,
        fields_named: tuple[str, ...] = (),
        message_id: str | None = None,
    ) -> Hostile:
        return cls(fields, Fate(category, outcome, trajectories, fields_named, message_id))


@dataclass
class Limits:
    """The codec limits the learner under attack runs with (its --bus.* settings)."""

    vocab_size: int = 100
    max_tokens: int = 512
    max_message_bytes: int = 65_536
    max_group_size: int = 64
    max_meta_bytes: int = 4096


@dataclass
class Fuzzer:
    """Makes hostile messages (see `Hostile`) from a seeded generator. `chunk(n, ...)` is one burst of them."""

    limits: Limits = field(default_factory=Limits)
    seed: int = 0
    producer: str = "fuzzer"

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._encoded: dict[int, bytes] = {}
        self._mutations = self._wire_mutations()

    # -- valid messages ------------------------------------------------------------------------------------------------
    def member(self, group_id: str, version: int, traj_id: str | None = None) -> Trajectory:
        """A valid trajectory: prompt int32 [3], response int32 [1..3] inside the vocabulary."""
        response = self.rng.integers(4, self.limits.vocab_size, int(self.rng.integers(1, 4)), dtype=np.int32)
        return Trajectory(
            id=traj_id or new_id(),
            group_id=group_id,
            producer=self.producer,
            prompt_ids=np.array([9, 10, 11], dtype=np.int32),
            response_ids=response,
            behavior_logprobs=np.full(len(response), -4.6, dtype=np.float32),
            reward=float(self.rng.integers(0, 2)),
            policy_version=version,
        )

    def group(self, members: int = 2, version: int = 0, ids: list[str] | None = None) -> Group:
        """A valid group of `members` (or of the trajectory ids `ids`) claiming policy `version`."""
        group_id = new_id()
        ids = ids or [new_id() for _ in range(members)]
        trajectories = [self.member(group_id, version, i) for i in ids]
        return Group(id=group_id, producer=self.producer, trajectories=trajectories)

    def scored(self, rewards: Iterable[float], version: int = 0) -> Group:
        """A valid group of policy `version` whose members scored `rewards`, in order."""
        rewards = list(rewards)
        group = self.group(len(rewards), version=version)
        for member, reward in zip(group.trajectories, rewards, strict=True):
            member.reward = reward
        return group

    def encoded(self, members: int = 2) -> bytes:
        """The wire bytes of one valid group of `members` (made once per size: broken copies need no fresh ids)."""
        if members not in self._encoded:
            self._encoded[members] = encode(self.group(members))
        return self._encoded[members]

    def wire(self, members: int = 2) -> dict[str, Any]:
        """A valid group's msgpack map (arrays as bin), a fresh one to corrupt."""
        return msgpack.unpackb(self.encoded(members), raw=False)

    # -- the burst -----------------------------------------------------------------------------------------------------
    def chunk(self, invalid: int, *, version: int, stale: int = 0, singles: int = 0) -> list[Hostile]:
        """The bulk of one burst, shuffled: `invalid` broken messages of every category, `stale` valid groups of
        version 0 (send them when the learner is past max_staleness), `singles` lone trajectories and groups of one
        (incomplete), and groups of versions above the learner's `version` (one at 2^63-1): no policy the learner
        published made them."""
        out = self.invalid(invalid)
        for _ in range(stale):
            group = self.group(2, version=0)
            out.append(Hostile.of("stale_replay", _data(encode(group)), STALE, 2, message_id=group.id))
        for i in range(singles):
            if i % 2:
                lone = self.group(1, version=0)
                out.append(Hostile.of("group_of_one", _data(encode(lone)), INCOMPLETE, 1, message_id=lone.id))
            else:
                single = self.member(new_id(), version=0)
                out.append(Hostile.of("single", _data(encode(single)), INCOMPLETE, 1, message_id=single.id))
        for ahead in FUTURE_AHEAD:
            group = self.group(2, version=2**63 - 1 if ahead is None else version + ahead)
            out.append(Hostile.of("future_version", _data(encode(group)), FUTURE, 2, message_id=group.id))
        return [out[i] for i in self.rng.permutation(len(out))]

    def trainable(self, version: int, trained_ids: Iterable[str] = ()) -> list[Hostile]:
        """What of a burst must be trained or counted: one valid group of policy `version` (the learner's now),
        its exact replay (after it) and one group re-using `trained_ids` (when given). Sent ahead of the bulk, they
        are consumed before the learner steps on past max_staleness."""
        valid = self.group(2, version=version)
        data = encode(valid)
        out = [
            Hostile.of("valid", _data(data), TRAINED, 2, message_id=valid.id),
            Hostile.of("exact_replay", _data(data), REPLAY, 0, message_id=valid.id),
        ]
        trained = list(trained_ids)
        if trained:
            again = self.group(version=version, ids=trained)
            out.append(Hostile.of("trained_ids", _data(encode(again)), DUPLICATE, len(trained), message_id=again.id))
        return out

    def invalid(self, count: int) -> list[Hostile]:
        """`count` broken messages of random categories. Deep nesting is rarer than the rest only because it is the
        costly one to refuse (msgpack builds its 1024 levels first, ~0.2 ms): that keeps a flood's run short."""
        makers = (self._random_bytes, self._truncated, self._deep, self._huge_length, self._mutated, self._wrong_kind,
                  self._no_data_field, self._oversized)  # fmt: skip
        weights = np.array([3, 3, 1, 2, 8, 2, 2, 0.05], dtype=float)  # oversized ones are few: each is 64 KiB
        return [makers[i]() for i in self.rng.choice(len(makers), size=count, p=weights / weights.sum())]

    def _random_bytes(self) -> Hostile:
        data = self.rng.bytes(int(self.rng.integers(0, 48)))
        return Hostile.of("random_bytes", _data(data), INVALID, 1, ("data", "kind", "v"))

    def _truncated(self) -> Hostile:
        """Cut anywhere: the reason names the field whose value was cut (or `data`, cut in a key or a header)."""
        data = self.encoded()
        cut = int(self.rng.integers(1, len(data)))
        wire = msgpack.unpackb(data, raw=False)
        members = {f"trajectories[{i}]": member for i, member in enumerate(wire["trajectories"])}
        fields = ("data", *wire, *members, *(f"{name}.{key}" for name, member in members.items() for key in member))
        return Hostile.of("truncated", _data(data[:cut]), INVALID, 1, fields)

    def _deep(self) -> Hostile:
        depth = int(self.rng.integers(1025, 1500))  # msgpack's unpacker stops at 1024 levels
        nested = b"\x91" * depth + b"\xc0"  # [[[...nil...]]]
        if self.rng.random() < 0.5:
            data = nested
        else:  # a group map whose meta nests that deep
            wire = self.wire()
            del wire["meta"]
            header = b"\xde" + (len(wire) + 1).to_bytes(2, "big")  # map16 of one entry more than packed below
            data = header + msgpack.packb(wire)[1:] + msgpack.packb("meta") + nested
        return Hostile.of("deep_nesting", _data(data), INVALID, 1, ("data", "meta"))

    def _huge_length(self) -> Hostile:
        headers = (b"\xc6\x7f\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff")
        header = headers[int(self.rng.integers(len(headers)))]
        if self.rng.random() < 0.5:
            data = header + self.rng.bytes(16)
        else:  # a plausible start, then a field declaring gigabytes
            data = b"\x83" + msgpack.packb("kind") + msgpack.packb("group") + msgpack.packb("id") + header + b"xy"
        return Hostile.of("huge_length", _data(data), INVALID, 1, ("data", "id"))

    def _mutated(self) -> Hostile:
        name, members, apply, named = self._mutations[int(self.rng.integers(len(self._mutations)))]
        wire = self.wire(members)
        apply(wire)
        data = msgpack.packb(wire, use_bin_type=True)
        count = len(wire["trajectories"]) if isinstance(wire.get("trajectories"), list) else 1
        return Hostile.of(name, _data(data), INVALID, max(count, 1), named)

    def _wrong_kind(self) -> Hostile:
        if self.rng.random() < 0.5:
            message: Task | Heartbeat = Task(id=new_id(), prompt="1+1=", n=2)
        else:
            message = Heartbeat(node_id="intruder", role="rollout")
        return Hostile.of("wrong_kind", _data(encode(message)), INVALID, 1, ("kind",))

    def _oversized(self) -> Hostile:
        """A group over max_message_bytes (refused on its size, before parsing)."""
        wire = self.wire()
        wire["meta"] = {"blob": "x" * self.limits.max_message_bytes}
        return Hostile.of("oversized", _data(msgpack.packb(wire)), INVALID, 2, ("data",))

    def _no_data_field(self) -> Hostile:
        return Hostile.of("no_data_field", {b"payload": self.encoded()}, INVALID, 1, ("entry",))

    def _wire_mutations(self) -> list[tuple[str, int, Callable[[dict[str, Any]], None], tuple[str, ...]]]:
        """(category, members, change to a valid group's map, the field the reason must name)."""
        lim = self.limits
        f32 = np.dtype("<f4")

        def member(i: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
            return lambda wire: wire["trajectories"][i].__setitem__(key, value)

        def top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
            return lambda wire: wire.__setitem__(key, value)

        def drop(key: str) -> Callable[[dict[str, Any]], None]:
            return lambda wire: wire.pop(key)

        def ids(values: list[int]) -> bytes:
            return np.array(values, dtype="<i4").tobytes()

        def same_ids(wire: dict[str, Any]) -> None:
            wire["trajectories"][1]["id"] = wire["trajectories"][0]["id"]

        def long_logprobs(wire: dict[str, Any]) -> None:
            member_map = wire["trajectories"][0]
            member_map["behavior_logprobs"] += np.array([-1.0], f32).tobytes()

        def mask_longer(wire: dict[str, Any]) -> None:
            member_map = wire["trajectories"][0]
            member_map["loss_mask"] = bytes(len(member_map["response_ids"]) // 4 + 1)

        too_long = ids([5] * (lim.max_tokens + 1))
        t0, t1 = "trajectories[0].", "trajectories[1]."
        return [
            ("wrong_type", 2, member(0, "reward", "high"), (t0 + "reward",)),
            ("wrong_type", 2, member(1, "policy_version", -1), (t1 + "policy_version",)),
            ("wrong_type", 2, member(0, "policy_version", 2.5), (t0 + "policy_version",)),
            ("wrong_type", 2, member(0, "prompt_ids", "abc"), (t0 + "prompt_ids",)),
            ("wrong_type", 2, member(1, "id", 17), (t1 + "id",)),
            ("wrong_type", 2, member(0, "finish_reason", ""), (t0 + "finish_reason",)),
            ("wrong_type", 2, member(0, "loss_mask", b"\x02"), (t0 + "loss_mask", t0 + "response_ids")),
            ("wrong_type", 2, member(0, "version_ranges", [[0, 9, 1]]), (t0 + "version_ranges",)),
            ("wrong_type", 2, top("trajectories", {"a": 1}), ("trajectories",)),
            ("wrong_type", 2, top("trajectories", []), ("trajectories",)),
            ("wrong_type", 2, top("trajectories", ["x", 5]), ("trajectories[0]",)),
            ("wrong_type", 2, top("id", 5), ("id",)),
            ("wrong_type", 2, top("meta", [1, 2]), ("meta",)),
            ("wrong_type", 2, top("created_at", -5.0), ("created_at",)),
            ("wrong_type", 2, top("producer", "p" * 300), ("producer",)),
            ("wrong_type", 2, drop("id"), ("id",)),
            ("non_finite", 2, member(0, "reward", float("nan")), (t0 + "reward",)),
            ("non_finite", 2, member(1, "reward", float("inf")), (t1 + "reward",)),
            ("non_finite", 2, member(0, "rewards", {"format": float("-inf")}), (t0 + "rewards.format",)),
            ("non_finite", 2, member(0, "behavior_logprobs", np.array([np.nan] * 3, f32).tobytes()),
             (t0 + "behavior_logprobs", t0 + "response_ids")),
            ("non_finite", 2, member(1, "behavior_logprobs", np.array([-np.inf] * 3, f32).tobytes()),
             (t1 + "behavior_logprobs", t1 + "response_ids")),
            ("non_finite", 2, member(0, "behavior_logprobs", np.array([0.5] * 3, f32).tobytes()),
             (t0 + "behavior_logprobs", t0 + "response_ids")),
            ("non_finite", 2, top("created_at", float("inf")), ("created_at",)),
            ("out_of_vocab", 2, member(0, "response_ids", ids([lim.vocab_size])), (t0 + "response_ids",)),
            ("out_of_vocab", 2, member(1, "response_ids", ids([2**31 - 1])), (t1 + "response_ids",)),
            ("out_of_vocab", 2, member(0, "prompt_ids", ids([3, -1])), (t0 + "prompt_ids",)),
            ("out_of_vocab", 2, member(0, "prompt_ids", [lim.vocab_size + 7]), (t0 + "prompt_ids",)),
            ("mismatched_length", 2, long_logprobs, (t0 + "response_ids",)),
            ("mismatched_length", 2, mask_longer, (t0 + "response_ids",)),
            ("mismatched_length", 2, member(0, "response_ids", b"\x05\x00\x00"), (t0 + "response_ids",)),
            ("mismatched_length", 2, member(0, "response_ids", b""), (t0 + "response_ids",)),
            ("too_large", 2, member(0, "response_ids", too_long), (t0 + "response_ids",)),
            ("too_large", 2, top("meta", {"blob": "x" * (lim.max_meta_bytes + 1)}), ("meta",)),
            ("too_large", lim.max_group_size + 1, lambda wire: None, ("trajectories",)),
            ("duplicate_ids", 2, same_ids, (t1 + "id",)),
            ("duplicate_ids", 2, member(1, "group_id", "another-group"), (t1 + "group_id",)),
            ("unknown_kind", 2, top("kind", "bogus"), ("kind",)),
            ("unknown_kind", 2, top("kind", 7), ("kind",)),
            ("unknown_kind", 2, drop("kind"), ("kind",)),
            ("unknown_kind", 2, top("v", 2), ("v",)),
            ("unknown_kind", 2, top("v", "1"), ("v",)),
        ]  # fmt: skip


def _data(payload: bytes) -> dict[bytes, bytes]:
    return {b"data": payload}


def send(client: redis.Redis, stream: str, messages: list[Hostile], batch: int = 2000) -> list[str]:
    """XADD every message (pipelined, no backpressure: a hostile producer ignores it); returns their entry ids."""
    entry_ids: list[str] = []
    for start in range(0, len(messages), batch):
        pipe = client.pipeline(transaction=False)
        for message in messages[start : start + batch]:
            pipe.xadd(stream, message.fields)
        entry_ids += [i.decode() for i in pipe.execute()]
    return entry_ids


@dataclass(frozen=True)
class DeadRecord:
    """One dead letter: why, and the stream and group that rejected it."""

    reason: str
    stream: str
    group: str


class DeadReader:
    """Reads the dead stream onwards from where it last stopped (so a capped dead stream can be counted as it goes)."""

    def __init__(self, client: redis.Redis, dead_stream: str, batch: int = 10_000) -> None:
        self.client, self.stream, self.batch = client, dead_stream, batch
        self._after = "-"

    def read(self) -> dict[str, DeadRecord]:
        """The records added since the last call, by the entry id they came from (their `entry_id` field)."""
        out: dict[str, DeadRecord] = {}
        while True:
            entries = self.client.xrange(self.stream, min=self._after, max="+", count=self.batch)
            for _, fields in entries:
                text = {k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"data"}
                out[text["entry_id"]] = DeadRecord(text["reason"], text["stream"], text["group"])
            if entries:
                self._after = "(" + entries[-1][0].decode()
            if len(entries) < self.batch:
                return out
