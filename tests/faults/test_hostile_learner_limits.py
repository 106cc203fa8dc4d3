"""Messages that are valid on the wire but that this learner cannot use must be dead-lettered, not trained on; what it
trains must leave the model finite and every trajectory trained once.

Every test runs a learner with its configured defaults (no `bus.vocab_size`, the default consumer kinds, 2 groups per
step, max_staleness 1), fed by the test: its messages, then valid groups of version 0 enough for 2 steps (none turns
stale by then). The learner takes the vocabulary and context length from its model, and the message kinds from its
algorithm.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bus.codec import encode
from bus.schema import MAX_ABS_REWARD, Preference, new_id

from .conftest import Cluster, Node
from .hostile_helpers import DeadReader, Fuzzer


def start_learner(cluster: Cluster, payloads: list[bytes], groups: int = 4, *args: str) -> Node:
    """XADD `payloads`, then `groups` valid groups (enough for the learner's 2 steps), and start it (with `args`)."""
    fuzzer = Fuzzer()
    groups = [encode(fuzzer.group(2, version=0)) for _ in range(groups)]
    for data in [*payloads, *groups]:
        cluster.client.xadd(cluster.trajectories, {"data": data})
    return cluster.learner(*args)


@pytest.mark.timeout(150)
def test_messages_this_learner_cannot_use_are_dead_lettered_with_their_reason_and_the_rest_train_finitely(
    make_cluster: Callable[..., Cluster],
) -> None:
    """One learner, fed one message of each kind it must refuse, then valid groups: each refused one is dead-lettered
    with the reason that names it, nothing of them is counted as trained, and the steps stay finite."""
    cluster = make_cluster({"learner": {"max_steps": 2, "checkpoint_every": 0}})
    fuzzer = Fuzzer()
    beyond = fuzzer.group(2, version=0)
    beyond.trajectories[0].response_ids = np.array([5, 100_000], dtype=np.int32)  # the demo model has 100 tokens
    beyond.trajectories[0].behavior_logprobs = np.array([-1.0, -1.0], dtype=np.float32)
    pair = Preference(
        id=new_id(),
        producer="agent",
        prompt_ids=np.array([9, 10], dtype=np.int32),
        chosen_ids=np.array([20], dtype=np.int32),
        rejected_ids=np.array([21], dtype=np.int32),
    )
    # (1e308, -1e308, 0, 0) made the advantages NaN and every later step NaN before rewards were bounded on the wire.
    huge = fuzzer.scored((1e308, -1e308, 0.0, 0.0))
    at_bound = fuzzer.scored((MAX_ABS_REWARD, -MAX_ABS_REWARD, 0.0, 0.0))  # valid: trained in step 1
    # 2^63-1 used to pass the staleness check with a lag of 0 (the lag is negative).
    ahead = [fuzzer.group(2, version=v) for v in (1, 2**63 - 1)]
    hostile = [encode(beyond), encode(pair), encode(huge, validate=False), *(encode(g) for g in ahead)]
    learner = start_learner(cluster, [*hostile, encode(at_bound)], groups=3)  # steps: (at_bound, g1), (g2, g3)
    assert learner.finish() == 0, learner.tail()
    reasons = sorted(r.reason for r in DeadReader(cluster.client, cluster.bus.dead).read().values())
    expected = [
        "future_version: policy version above the learner's version 0",
        "future_version: policy version above the learner's version 0",
        "kind: expected one of ['group', 'trajectory']",
        "trajectories[0].response_ids: token id 100000 >= vocab_size",
        "trajectories[0].reward: must be <= 1000000000.0 (got 1e+308)",
    ]
    assert [r[: len(e)] for r, e in zip(reasons, expected, strict=True)] == expected, reasons
    steps = learner.events("train_step")
    assert [e["samples"] for e in steps] == [4 + 2, 2 + 2]
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in steps), steps
    accounting = cluster.accounting()
    assert accounting.get("trained") == 4 + 3 * 2 and accounting.get("dropped:future_version") == 4, accounting


@pytest.mark.timeout(120)
def test_one_trajectory_id_in_two_groups_of_one_step_is_trained_once(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster({"learner": {"max_steps": 2, "checkpoint_every": 0}})
    fuzzer = Fuzzer()
    first = fuzzer.group(2)
    again = fuzzer.group(ids=[t.id for t in first.trajectories])  # another group id, the same member ids
    learner = start_learner(cluster, [encode(first), encode(again)], groups=2)  # steps: (first, again), the 2 groups
    assert learner.finish() == 0, learner.tail()
    accounting = cluster.accounting()
    assert (accounting["trained"], accounting["dropped:duplicate"]) == (2 + 2 * 2, 2), accounting
    assert [e["samples"] for e in learner.events("train_step")] == [2, 4]
    dedup = cluster.client.zmscore(f"{cluster.bus.prefix}dedup:learner", [t.id for t in first.trajectories])
    assert all(score is not None for score in dedup)


@pytest.mark.timeout(180)
def test_groups_over_the_size_bound_leave_prefixes_that_are_counted_and_paged(
    make_cluster: Callable[..., Cluster],
) -> None:
    # 8 x 40 MB dead letters used to hold Redis at 445 MB, each re-decoded whole by the accounting's scan (+3.27 GB
    # for a 48 MB one) and read whole by `slipstream status`.
    cluster = make_cluster({"learner": {"max_steps": 2, "checkpoint_every": 0}})
    wire = Fuzzer().wire(2)
    wire["meta"] = {"blob": "x" * 40_000_000}
    oversized = msgpack.packb(wire)
    learner = start_learner(cluster, [oversized, oversized])
    assert learner.finish() == 0, learner.tail()
    assert cluster.accounting()["dropped:invalid"] == 2 * 2  # each stands for its 2 members, counted from the header
    assert cluster.client.memory_usage(cluster.bus.dead) < 2**20  # two prefixes of 16 KiB, not 80 MB of copies

    def status(*args: str) -> dict[str, Any]:
        argv = [sys.executable, "-m", "slipstream", "status", "--json", "--bus.url", cluster.redis_url, *args]
        return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout)

    first = status("--dead", "1")
    [newest] = first["dead_letters"]
    assert newest["size"] == len(oversized) and newest["truncated"] is True
    assert newest["sha256"] == hashlib.sha256(oversized).hexdigest()
    assert newest["reason"].startswith("data:") and "max_message_bytes" in newest["reason"]
    second = status("--dead", "1", "--dead-before", first["dead_next"])
    assert len(second["dead_letters"]) == 1 and second["dead_next"] is None
    assert second["dead_letters"][0]["entry_id"] < newest["entry_id"]


@pytest.mark.timeout(180)
def test_a_step_whose_gradient_is_not_finite_is_never_applied_and_its_batch_is_dead_lettered(
    make_cluster: Callable[..., Cluster], fault_model: Path, tmp_path: Path
) -> None:
    # Valid messages cannot make a gradient NaN any more (rewards and logprobs are bounded on the wire): a poisoned
    # weight can. One NaN in the output layer makes every logprob, loss and gradient NaN.
    poisoned = tmp_path / "poisoned-model"
    shutil.copytree(fault_model, poisoned)
    weights = load_file(poisoned / "model.safetensors")
    name = next(n for n in weights if "lm_head" in n or "embed_tokens" in n)
    weights[name][5, 0] = float("nan")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    before = {n: t.clone() for n, t in weights.items()}
    cluster = make_cluster({"learner": {"max_steps": 2, "checkpoint_every": 1, "data_timeout_s": 8.0}})
    fuzzer = Fuzzer()
    groups = [encode(fuzzer.scored((0.0, 1.0))) for _ in range(4)]  # advantages not 0: the (NaN) gradient is made
    learner = start_learner(cluster, groups, 0, "--model.path", str(poisoned))
    assert learner.finish() == 1, learner.tail()  # no step possible: every batch refused, then no data
    reasons = [r.reason for r in DeadReader(cluster.client, cluster.bus.dead).read().values()]
    assert len(reasons) == 4 and all(r.startswith("nonfinite_gradient: ") for r in reasons), reasons
    assert cluster.accounting()["dropped:nonfinite_gradient"] == 4 * 2
    assert not learner.events("train_step")
    [summary] = learner.events("summary")
    assert summary["steps"] == 0 and summary["accounting"]["dropped:nonfinite_gradient"] == 4 * 2
    assert cluster.latest_checkpoint() == 0
    saved = cluster.checkpoint_weights(0)
    for n, t in before.items():  # nothing was applied: the weights are the poisoned ones, not NaN everywhere
        assert torch.equal(torch.nan_to_num(saved[n].float()), torch.nan_to_num(t.float())), n
