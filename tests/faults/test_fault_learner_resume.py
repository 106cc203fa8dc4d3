"""The learner SIGKILLed mid-run and restarted with `--resume`, with a real rollout node feeding it all along:
training continues from the newest complete checkpoint, and every published trajectory ends trained exactly once,
dropped with a reason, or still in flight - none lost, none trained twice."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .conftest import Cluster

MAX_STEPS, EVERY = 12, 3  # checkpoint_every


@pytest.mark.timeout(180)
def test_learner_killed_mid_run_resumes_from_its_checkpoint_and_trains_nothing_twice(
    make_cluster: Callable[..., Cluster], record_property: Callable[[str, object], None]
) -> None:
    cluster = make_cluster({"learner": {"max_steps": MAX_STEPS, "checkpoint_every": EVERY}})
    rollout = cluster.rollout("rollout-0")
    first = cluster.learner()
    # Killed past a checkpoint and between two: the steps since were settled (acked, marked trained, counted) but
    # are not in the checkpoint. Frozen first, so the step it is killed at is known (its log is final).
    done = 0
    while not done % EVERY:  # killed right at a checkpoint, nothing would be settled after it: one step more
        past = max(done, EVERY)
        cluster.wait("a step past a checkpoint", lambda past=past: max(cluster.steps(first), default=0) > past, first)
        first.pause()
        done = max(cluster.steps(first))
        if not done % EVERY:
            first.resume()
    first.kill()
    checkpoint = cluster.latest_checkpoint()
    assert checkpoint is not None and EVERY <= checkpoint < done < MAX_STEPS

    second = cluster.learner("--resume")
    assert second.finish() == 0, second.tail()
    [resumed] = second.events("resumed")
    assert resumed["step"] == checkpoint and resumed["version"] == checkpoint
    assert cluster.steps(second) == list(range(checkpoint + 1, MAX_STEPS + 1))
    assert rollout.stop() == 0, rollout.tail()

    audit = cluster.audit()
    accounting = audit.accounting
    assert not audit.unaccounted, f"lost: {sorted(audit.unaccounted)[:5]}"
    # Trained once: the counter of trained trajectories equals the distinct ids marked trained. A trajectory trained
    # twice (e.g. by the resumed learner after the killed one settled it) would count twice but be one id.
    assert accounting["trained"] == len(audit.trained) > 0
    assert not audit.trained & audit.dropped
    # Every published copy is counted once: trained, dropped with a reason, or in flight.
    assert sum(audit.copies.values()) == accounting["published"]
    assert accounting["published"] == accounting["trained"] + audit.dropped_total + audit.in_flight_copies()

    settled_after = sum(e["samples"] for e in first.events("train_step") if e["step"] > checkpoint)
    record_property("killed_after_step", done)
    record_property("resumed_from_checkpoint", checkpoint)
    record_property("trajectories_settled_after_checkpoint", settled_after)
    record_property("published", accounting["published"])
    record_property("trained", accounting["trained"])
    record_property("dropped", audit.dropped_total)
    record_property("in_flight_at_end", audit.in_flight_copies())
