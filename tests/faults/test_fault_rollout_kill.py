"""A rollout node SIGKILLed while it holds tasks: after their lease (bus.lease_ms) another node claims them, finishes
them and the learner trains their groups; the learner never waits on the dead node. And a node that outlives its
lease (slow, not dead): the node that claimed its tasks publishes their groups, the slow one neither publishes a
second copy nor requeues tasks that are no longer its own, so no trajectory is published twice."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from bus.settings import deep_merge

from .conftest import Cluster, log_time

LEASE_MS = 2000
# max_staleness 0: only one step's tasks are in flight, so the learner needs the tasks a dead or slow node holds.
SETTINGS = {"bus": {"lease_ms": LEASE_MS}, "learner": {"max_steps": 6, "max_staleness": 0, "checkpoint_every": 0}}


@pytest.mark.timeout(180)
def test_tasks_of_a_killed_rollout_node_are_finished_by_another_after_the_lease(
    make_cluster: Callable[..., Cluster], record_property: Callable[[str, object], None]
) -> None:
    cluster = make_cluster(SETTINGS)
    survivor, doomed = cluster.rollout("rollout-b"), cluster.rollout("rollout-a")
    for node in (survivor, doomed):
        cluster.wait(f"{node.name} to start", lambda: node.events("rollout node started"), node)  # noqa: B023
    learner = cluster.learner()
    # Frozen (SIGSTOP) the moment it is seen holding tasks, so what it holds cannot change before the kill; if it
    # settled them in the millisecond in between, it runs on and is caught again.
    held: dict[str, int] = {}
    while not held:
        cluster.wait("the doomed node to hold tasks", lambda: cluster.pending_tasks("rollout-a"), doomed, learner)
        doomed.pause()
        held = cluster.pending_tasks("rollout-a")
        if not held:
            doomed.resume()
    doomed.kill()
    killed_at = time.time()
    task_ids = set(cluster.task_ids(held))

    def finished_by_survivor() -> bool:
        return task_ids <= {g.id for _, g in cluster.groups() if g.producer == "rollout-b"}

    cluster.wait("the survivor to finish the dead node's tasks", finished_by_survivor, learner, survivor)
    finished_at = time.time()
    assert learner.finish() == 0, learner.tail()
    assert cluster.steps(learner) == list(range(1, 7))
    assert survivor.stop() == 0, survivor.tail()
    assert not cluster.pending_tasks(doomed.name), "the dead node still holds tasks"

    audit = cluster.audit()
    held_ids = {t.id for _, g in cluster.groups() if g.id in task_ids for t in g.trajectories}
    assert held_ids and held_ids <= audit.trained | audit.dropped | audit.in_flight
    assert not audit.unaccounted
    assert audit.accounting["trained"] == len(audit.trained)
    assert audit.accounting["published"] == (
        audit.accounting["trained"] + audit.dropped_total + audit.in_flight_copies()
    )

    claims = [e for e in survivor.events("claimed stale entries") if e.get("stream", "").endswith("tasks")]
    record_property("lease_ms", LEASE_MS)
    record_property("tasks_held_by_killed_node", len(held))
    record_property("held_for_ms_at_kill", max(held.values()))
    record_property("claimed_s_after_kill", round(min(log_time(e) for e in claims) - killed_at, 2) if claims else None)
    record_property("finished_s_after_kill", round(finished_at - killed_at, 2))
    next_step = min(log_time(e) for e in learner.events("train_step") if log_time(e) > killed_at)
    record_property("next_learner_step_s_after_kill", round(next_step - killed_at, 2))


@pytest.mark.slow  # over a minute on 2 cores; faster integration tests cover the same path
@pytest.mark.timeout(180)
def test_a_node_slower_than_its_lease_neither_publishes_nor_requeues_tasks_claimed_by_another(
    make_cluster: Callable[..., Cluster],
) -> None:
    # The learner runs until stopped: it must still be asking for tasks when the slow node takes them late.
    cluster = make_cluster(deep_merge(SETTINGS, {"learner": {"max_steps": 10_000}}))
    fast = cluster.rollout("rollout-b")
    # Without weights its engine stays at version 0: the first tasks (min_version 0) it runs at once; every later
    # one waits 6 s for weights that never come, three leases, while the fast node claims it and publishes its group.
    slow = cluster.rollout("rollout-a", "--rollout.receive_weights", "false", "--rollout.min_version_wait_s", "6")
    for node in (fast, slow):
        cluster.wait(f"{node.name} to start", lambda: node.events("rollout node started"), node)  # noqa: B023
    learner = cluster.learner()
    # Every task still pending after the first step has min_version >= 1: the slow node cannot run it in time.
    cluster.wait("a first step", lambda: cluster.steps(learner), learner, fast)
    held = set(cluster.wait("the slow node to hold tasks", lambda: cluster.pending_tasks("rollout-a"), slow, learner))
    held_tasks = set(cluster.task_ids(held))
    cluster.wait(
        "the slow node to give up its results",
        lambda: held_tasks <= {e["task_id"] for e in slow.events("result dropped: task claimed by another node")},
        slow,
        learner,
    )
    # Stopped while it holds tasks the fast node claimed meanwhile: it must not put them back on the stream.
    again = set(cluster.wait("the slow node to take more", lambda: cluster.pending_tasks("rollout-a"), slow, learner))
    again_tasks = set(cluster.task_ids(again))  # read now: acked task entries are trimmed later
    cluster.wait("them to be claimed", lambda: not again & set(cluster.pending_tasks("rollout-a")), slow, learner)
    assert slow.stop() == 0, slow.tail()
    left = [e for e in slow.events("task settled") if e["action"] == "left to the node that claimed it"]
    assert {e["entry_id"] for e in left} == again

    assert learner.stop() == 0, learner.tail()
    assert fast.stop() == 0, fast.tail()
    groups = cluster.groups()
    assert held_tasks <= {g.id for _, g in groups if g.producer == "rollout-b"}
    assert not any(g.producer == "rollout-a" for _, g in groups if g.id in held_tasks | again_tasks)
    audit = cluster.audit()
    assert set(audit.copies.values()) == {1}, "a trajectory was published twice"
    assert not audit.unaccounted and audit.accounting["trained"] == len(audit.trained)
    assert audit.accounting["published"] == (
        audit.accounting["trained"] + audit.dropped_total + audit.in_flight_copies()
    )
