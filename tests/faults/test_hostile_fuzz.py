"""A flood of hostile messages on the trajectories stream while a real learner trains on a real rollout node's groups.

Random bytes, truncated msgpack, deep nesting, huge declared lengths, messages over max_message_bytes, wrong types,
NaN/inf, token ids beyond the vocabulary, mismatched lengths, duplicate ids, unknown and misplaced kinds, entries
without a `data` field, version-0 groups replayed when the learner is past max_staleness, groups claiming versions
above the learner's (up to 2^63-1), lone trajectories, exact replays of a valid group and groups re-sending
trajectory ids that were trained already - XADDed straight to the
stream in bursts, as a hostile producer would (no SDK, no backpressure). Each burst is checked as it settles (the
dead stream is capped at a few bursts):

- every broken message is in the dead stream once, its reason naming the broken field (dead == bad sent);
- stale, future-version and incomplete ones are dead-lettered with those reasons; exact replays are acked and
  never counted; ids trained before are counted as dropped:duplicate; the one valid group of each burst is trained once;
- the learner keeps training: finite losses, the accounting identity holds, nothing is lost;
- its RSS stays bounded (sampled with psutil throughout).

The learner runs with the codec limits of its model (`bus.vocab_size` = the demo model's 100 tokens, `max_tokens` =
its 512 positions): the learner does not derive them from the model itself (see docs/reliability.md).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pytest

from bench.soak import RssSampler

from .conftest import AUDIT_GROUP, Cluster, Node
from .hostile_helpers import (
    DUPLICATE,
    FUTURE,
    FUTURE_AHEAD,
    INCOMPLETE,
    INVALID,
    REPLAY,
    STALE,
    TRAINED,
    DeadReader,
    DeadRecord,
    Fate,
    Fuzzer,
    Limits,
    send,
)

MAX_STALENESS, GROUPS_PER_STEP = 2, 2  # the learner's (the valid group of a burst is trained within one step)
STALE_PER_BURST, SINGLES_PER_BURST = 20, 10  # plus future-version groups, a valid group, its replay, trained ids
RSS_GROWTH_BOUND = 200 * 2**20  # bytes the learner may grow by while the flood lasts (its own batches, caches)
MiB = 2**20


@dataclass
class Tally:
    """What the bursts came to: fuzz trajectories by fate, and every way a message ended differently than it must."""

    sent: Counter[str] = field(default_factory=Counter)  # messages by outcome
    trajectories: Counter[str] = field(default_factory=Counter)  # trajectories by outcome (the accounting's view)
    dead: int = 0  # dead letters of fuzz messages
    wrong: list[str] = field(default_factory=list)
    trained_ids: list[str] = field(default_factory=list)  # ids of the valid groups


def check_burst(fates: dict[str, Fate], dead: dict[str, DeadRecord], tally: Tally, stream: str) -> None:
    """Compare a settled burst with its dead letters (by source entry id) and add it to `tally`."""
    for entry_id, fate in fates.items():
        tally.sent[fate.outcome] += 1
        tally.trajectories[fate.outcome] += fate.trajectories
        record = dead.get(entry_id)
        if record is not None:
            tally.dead += 1
        if fate.outcome in (INVALID, STALE, FUTURE, INCOMPLETE):
            if record is None:
                tally.wrong.append(f"{fate.category} {entry_id}: not dead-lettered")
                continue
            reason, where = record.reason, (record.stream, record.group)
            named = reason.partition(":")[0]
            expected = fate.fields_named if fate.outcome == INVALID else (fate.outcome,)
            if named not in expected or where != (stream, "learner"):
                tally.wrong.append(f"{fate.category} {entry_id}: expected {expected}, dead-lettered as {reason!r}")
        elif record is not None:
            tally.wrong.append(f"{fate.category} {entry_id}: must not be dead-lettered, got {record}")
        if fate.outcome == TRAINED and fate.message_id:
            tally.trained_ids.append(fate.message_id)


def settled(cluster: Cluster, first: str, last: str) -> bool:
    """Whether the learner's group was delivered every entry up to `last` and acked all of [first, last]."""
    info = {g["name"].decode(): g for g in cluster.client.xinfo_groups(cluster.trajectories)}["learner"]
    delivered = _key(info["last-delivered-id"].decode()) >= _key(last)
    return delivered and not cluster.client.xpending_range(cluster.trajectories, "learner", first, last, 1)


def drained(cluster: Cluster) -> bool:
    """Whether the learner was delivered every entry and holds fewer than a step's groups (it cannot step on)."""
    info = {g["name"].decode(): g for g in cluster.client.xinfo_groups(cluster.trajectories)}["learner"]
    return info["lag"] == 0 and info["pending"] < GROUPS_PER_STEP


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def fuzz_while_training(cluster: Cluster, total: int, bursts: int) -> tuple[Tally, Node, dict[str, list[int]]]:
    """Send `total` hostile messages in `bursts` while the learner trains; returns the tally, the stopped learner
    and its RSS samples."""
    client, stream = cluster.client, cluster.trajectories
    # The harness keeps every entry for its audit (a group that never reads); this test counts as it goes instead,
    # so that the stream is trimmed as in production.
    client.xgroup_destroy(stream, AUDIT_GROUP)
    rollout, learner = cluster.rollout("rollout-0"), cluster.learner()

    # From version MAX_STALENESS + 1 on, a version-0 group is stale whenever it is consumed.
    def past() -> bool:
        return Cluster.steps(learner)[-1:] > [MAX_STALENESS]

    cluster.wait("a version past max_staleness", past, learner, rollout)
    sampler = RssSampler({"learner": learner.process.pid}, interval_s=0.1)
    fuzzer, reader, tally = Fuzzer(Limits(), seed=total), DeadReader(client, cluster.bus.dead), Tally()
    dedup_key = f"{cluster.bus.prefix}dedup:learner"
    per_burst = total // bursts
    try:
        for burst in range(bursts):
            trained_ids = [i.decode() for i in client.zrange(dedup_key, -2, -1)]  # the two newest trained ids
            invalid = (
                per_burst - STALE_PER_BURST - SINGLES_PER_BURST - len(FUTURE_AHEAD) - 2 - (1 if trained_ids else 0)
            )
            bulk = fuzzer.chunk(
                invalid, version=Cluster.steps(learner)[-1], stale=STALE_PER_BURST, singles=SINGLES_PER_BURST
            )
            # The burst's valid group claims the learner's version, and must be trained before the learner is
            # max_staleness steps further: the rollout node is frozen until the learner has trained what it held (up
            # to max_staleness + 1 steps ahead, by admission), so that the valid group is next; then the flood goes.
            rollout.pause()
            cluster.wait(f"the learner to drain before burst {burst}", partial(drained, cluster), learner)
            before = Cluster.steps(learner)[-1]
            messages = fuzzer.trainable(before, trained_ids) + bulk
            entry_ids = send(client, stream, messages)
            rollout.resume()
            # A producer counts what it published (an exact replay is the same message: counted once).
            client.hincrby(f"{cluster.bus.prefix}accounting", "published", sum(m.fate.trajectories for m in messages))
            fates = {entry_id: m.fate for entry_id, m in zip(entry_ids, messages, strict=True)}
            del messages
            cluster.wait(f"burst {burst} to settle", partial(settled, cluster, entry_ids[0], entry_ids[-1]), learner)
            check_burst(fates, reader.read(), tally, stream)
            # The burst's valid group was trained after the burst was sent: the learner trains on through each one.
            stepped = partial(lambda floor: Cluster.steps(learner)[-1] > floor, before)
            cluster.wait(f"a step after burst {burst}", stepped, learner)
        # One more step: its report counts the last dead letters into the accounting hash.
        step = Cluster.steps(learner)[-1]
        cluster.wait("a step after the flood", lambda: Cluster.steps(learner)[-1] > step, learner, rollout)
    finally:
        rss = sampler.stop()
    assert rollout.stop() == 0, rollout.tail()  # first: nothing is published after the learner's summary
    assert learner.stop() == 0, learner.tail()
    return tally, learner, rss


def assert_survived(cluster: Cluster, tally: Tally, learner: Node, rss: list[int]) -> None:
    """Every message ended as it must, the learner's training and accounting are intact, its memory bounded."""
    assert not tally.wrong, f"{len(tally.wrong)} messages ended wrongly, e.g.:\n" + "\n".join(tally.wrong[:15])
    assert tally.dead == tally.sent[INVALID] + tally.sent[STALE] + tally.sent[FUTURE] + tally.sent[INCOMPLETE]

    [summary] = learner.events("summary")
    accounting = summary["accounting"]
    assert accounting == cluster.accounting()
    assert accounting["dropped:invalid"] == tally.trajectories[INVALID]  # only the fuzz sends broken messages
    assert accounting["dropped:duplicate"] == tally.trajectories[DUPLICATE]
    assert accounting["dropped:stale"] >= tally.trajectories[STALE]  # a rollout group may turn stale too
    assert accounting["dropped:future_version"] == tally.trajectories[FUTURE] > 0  # never a rollout group
    assert accounting["dropped:incomplete_group"] >= tally.trajectories[INCOMPLETE]
    assert summary["balanced"] is True, summary  # published == trained + dropped + in flight
    assert tally.sent[REPLAY] == tally.sent[TRAINED] > 0

    steps = learner.events("train_step")
    assert accounting["trained"] == sum(e["samples"] for e in steps)
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in steps), steps
    scores = cluster.client.zmscore(f"{cluster.bus.prefix}dedup:learner", tally.trained_ids)
    assert all(score is not None for score in scores), "a valid group of the flood was not trained"

    assert rss, "no RSS sample of the learner"
    growth = max(rss) - rss[0]
    assert growth < RSS_GROWTH_BOUND, f"learner RSS grew {growth / MiB:.0f} MiB from {rss[0] / MiB:.0f} MiB"


def fuzz_settings(total: int, bursts: int) -> dict[str, dict[str, object]]:
    limits = Limits()
    return {
        "bus": {
            "vocab_size": limits.vocab_size,
            "max_tokens": limits.max_tokens,
            "max_message_bytes": limits.max_message_bytes,
            "max_group_size": limits.max_group_size,
            "max_meta_bytes": limits.max_meta_bytes,
            "dead_retain": 4 * (total // bursts),  # a few bursts: each is counted as it settles
            "max_stream_length": 10 * total,  # the fuzz ignores backpressure; the rollout node must not wait on it
        },
        "learner": {
            "max_steps": 100_000,
            "checkpoint_every": 0,
            "data_timeout_s": 120.0,
            "max_staleness": MAX_STALENESS,
            "groups_per_step": GROUPS_PER_STEP,
        },
    }


@pytest.mark.timeout(240)
def test_a_flood_of_100k_hostile_messages_is_dead_lettered_while_the_learner_trains_on(
    make_cluster: Callable[..., Cluster], record_property: Callable[[str, object], None]
) -> None:
    total, bursts = 100_000, 5
    cluster = make_cluster(fuzz_settings(total, bursts))
    tally, learner, rss = fuzz_while_training(cluster, total, bursts)
    assert sum(tally.sent.values()) == total
    assert_survived(cluster, tally, learner, rss["learner"])
    [summary] = learner.events("summary")
    record_property("steps_accounting", (summary["steps"], summary["accounting"]))
    record_property("hostile_messages", total)
    record_property("learner_rss_mib_start_max", (round(rss["learner"][0] / MiB), round(max(rss["learner"]) / MiB)))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_flood_of_1m_hostile_messages_is_dead_lettered_while_the_learner_trains_on(
    make_cluster: Callable[..., Cluster], record_property: Callable[[str, object], None]
) -> None:
    total, bursts = 1_000_000, 40
    cluster = make_cluster(fuzz_settings(total, bursts))
    tally, learner, rss = fuzz_while_training(cluster, total, bursts)
    assert sum(tally.sent.values()) == total
    assert_survived(cluster, tally, learner, rss["learner"])
    [summary] = learner.events("summary")
    record_property("steps_accounting", (summary["steps"], summary["accounting"]))
    record_property("hostile_messages", total)
    record_property("learner_rss_mib_start_max", (round(rss["learner"][0] / MiB), round(max(rss["learner"]) / MiB)))
