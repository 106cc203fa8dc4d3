"""Faults during a weight broadcast, with a real learner and real rollout nodes (torch engines, gloo group).

- An engine SIGKILLed a few milliseconds after the learner announced an update (the test watches the learner's
  rendezvous store as an engine does): the learner times it out (broadcast.timeout_s), removes it and goes on
  training and updating the other engine; restarted, the engine rejoins and gets the current weights.
- The learner SIGKILLed while an update is on its way - frozen (SIGSTOP) a few milliseconds after announcing it,
  with the engine still waiting for that version, then killed: the rollout node keeps serving the last version it
  loaded completely - its samples carry that version and their logprobs are that version's (recomputed here from
  the learner's checkpoint of that step), never a mix of two versions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from bus.codec import encode
from bus.schema import Sampling, Task, Trajectory, new_id
from weight_broadcast.rendezvous import Board

from .conftest import Cluster, Node, log_time

TIMEOUT_S = 3.0  # broadcast.timeout_s and weights.timeout_s
VERSION = "slipstream_rollout_policy_version"
TOLERANCE = 2e-5  # float error of recomputing a logprob in one forward pass (the engine decodes with a KV cache)
IN_FLIGHT_S = 0.005  # after an announcement: the buckets are on their way (an update takes ~10-50 ms here)
SETTLE_S = 0.2  # far longer than loading the tiny model, far shorter than the timeouts


def freeze_during_an_update(cluster: Cluster, board: Board, learner: Node, engine: Node) -> int:
    """Freeze (SIGSTOP) the learner a few milliseconds after it announces an update, when `engine` has not loaded
    that version (if it has, the learner goes on and the next update is tried); returns the version announced."""
    while True:
        seq = board.store.add("announce/seq", 0)
        _, weights = cluster.wait("an update", lambda: board.next_announcement(seq, 0.5), learner, engine)  # noqa: B023
        time.sleep(IN_FLIGHT_S)
        learner.pause()
        time.sleep(SETTLE_S)  # an engine that had every bucket has loaded them by now; the others wait for the rest
        if engine.metric(VERSION) != weights.version:
            return weights.version
        learner.resume()


def loaded(node: Node) -> list[int]:
    """Versions the node's engine loaded, in order ("weights loaded" events)."""
    return [int(e["version"]) for e in node.events("weights loaded")]


@pytest.mark.slow  # over a minute on 2 cores; faster integration tests cover the same path
@pytest.mark.timeout(180)
def test_an_engine_killed_during_an_update_is_removed_in_time_and_rejoins_with_the_current_weights(
    make_cluster: Callable[..., Cluster], record_property: Callable[[str, object], None]
) -> None:
    # Runs until stopped. Small buckets: an update is many collectives, so it is caught unfinished more often.
    cluster = make_cluster({"learner": {"max_steps": 10_000, "checkpoint_every": 0}, "broadcast": {"bucket_mb": 0.05}})
    survivor, doomed = cluster.rollout("rollout-0"), cluster.rollout("rollout-1")
    learner = cluster.learner()
    board = cluster.board()

    def both_served() -> bool:
        return any({"rollout-0", "rollout-1"} <= set(e["delivered"]) for e in learner.events("weights delivered"))

    cluster.wait("both engines to get an update", both_served, learner, survivor, doomed)
    seq = board.store.add("announce/seq", 0)
    _, weights = cluster.wait("an update", lambda: board.next_announcement(seq, 0.5), learner, survivor, doomed)
    doomed.kill()  # a few milliseconds into the update: the buckets are on their way
    killed_at = time.time()

    [removed] = cluster.wait(
        "the dead engine to be removed",
        lambda: [e for e in learner.events("engine removed from the weight broadcast") if e["engine"] == "rollout-1"],
        learner,
        survivor,
    )
    # The update under way when it died did not reach it (its first report; the version is re-sent to the others).
    report = next(e for e in learner.events() if e["event"].startswith("weights") and e["version"] == weights.version)
    assert "rollout-1" in report["failed"] and "rollout-1" not in report["delivered"]
    # The learner went on training and updating the survivor without the dead engine.
    after = removed["policy_version"]
    cluster.wait("the survivor to get later updates", lambda: max(loaded(survivor)) >= after + 3, learner, survivor)
    assert max(cluster.steps(learner)) >= after + 3

    rejoined_at = time.time()
    current = max(cluster.steps(learner))
    back = cluster.rollout("rollout-1")
    cluster.wait("the restarted engine to load weights", lambda: loaded(back), learner, survivor, back)
    assert loaded(back)[0] >= current  # the current weights on joining, not the version it died with
    cluster.wait("it to follow later updates", lambda: max(loaded(back)) > loaded(back)[0], learner, back)

    for node in (survivor, back):
        assert node.stop() == 0, node.tail()
    assert learner.stop() == 0, learner.tail()
    audit = cluster.audit()
    assert not audit.unaccounted and audit.accounting["trained"] == len(audit.trained)

    record_property("broadcast_timeout_s", TIMEOUT_S)
    record_property("killed_during_version", weights.version)
    record_property("update_reported_failed_s_after_kill", round(log_time(report) - killed_at, 2))
    record_property("update_failure", report["failed"]["rollout-1"][:200])
    record_property("removed_s_after_kill", round(log_time(removed) - killed_at, 2))
    record_property("removal_reason", removed["reason"])
    record_property("rejoined_with_version_s", round(log_time(back.events("weights loaded")[0]) - rejoined_at, 2))


@pytest.mark.timeout(180)
def test_a_learner_killed_during_an_update_leaves_the_engine_serving_its_last_complete_version(
    make_cluster: Callable[..., Cluster], record_property: Callable[[str, object], None]
) -> None:
    # A checkpoint at every step: the weights of any version the engine may hold are on disk to compare with.
    settings = {"learner": {"max_steps": 10_000, "checkpoint_every": 1}, "broadcast": {"bucket_mb": 0.05}}
    cluster = make_cluster(settings)
    node = cluster.rollout("rollout-0")
    learner = cluster.learner()
    board = cluster.board()
    cluster.wait("the engine to load a trained version", lambda: max(loaded(node), default=0) >= 2, learner, node)
    announced = freeze_during_an_update(cluster, board, learner, node)
    learner.kill()
    killed_at = time.time()

    served = int(node.metric(VERSION) or 0)  # what it holds: it can load nothing more, the learner is gone
    assert 1 <= served < announced and max(loaded(node)) == served

    # It keeps serving: a task sampled at temperature 1, so each token's logprob is the model's own.
    task = Task(id=new_id(), prompt="3+4=", n=4, sampling=Sampling(temperature=1.0, max_new_tokens=3))
    cluster.transport.publish(cluster.bus.stream("tasks"), [encode(task)])
    [group] = cluster.wait("the engine to answer", lambda: [g for _, g in cluster.groups() if g.id == task.id], node)
    assert {t.policy_version for t in group.trajectories} == {served}

    # ... and those logprobs are exactly version `served`'s: the checkpoint of that step, as announced. Against the
    # newest older version whose weights differ (a step may change nothing when all its rewards tie), the same
    # comparison shows how far apart two versions are: a mix of versions would be off by as much.
    assert cluster.announced()[served].checksum  # the complete update of `served` was announced with a checksum
    weights = cluster.checkpoint_weights(served)
    earlier = next((v for v in range(served - 1, 0, -1) if differs(cluster.checkpoint_weights(v), weights)), None)
    assert earlier is not None, f"training changed nothing in {served} steps"
    mismatch = logprob_error(cluster, weights, group.trajectories)
    apart = logprob_error(cluster, cluster.checkpoint_weights(earlier), group.trajectories)
    assert mismatch < TOLERANCE < apart
    assert node.stop() == 0, node.tail()

    cut = [e for e in node.events("weight broadcast failed") if log_time(e) >= killed_at]
    record_property("announced_version_at_kill", announced)
    record_property("engine_serves_version", served)
    record_property("engine_was_receiving", bool(cut))
    record_property("logprob_mismatch_vs_checkpoint", mismatch)
    record_property("logprob_mismatch_vs_older_version", apart)


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


def logprob_error(cluster: Cluster, weights: dict[str, torch.Tensor], trajectories: list[Trajectory]) -> float:
    """The largest difference between the trajectories' behaviour logprobs and those recomputed under `weights`
    (one forward over prompt [P] + response [T] each; the logprobs of the T response tokens compared)."""
    model = AutoModelForCausalLM.from_pretrained(cluster.settings["model"]["path"])
    model.load_state_dict(weights)
    error = 0.0
    for trajectory in trajectories:
        prompt, response = trajectory.prompt_ids.tolist(), trajectory.response_ids.tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].float()
        logprobs = logits[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        error = max(error, float((logprobs - torch.tensor(trajectory.behavior_logprobs)).abs().max()))
    return error
