"""Messages that are valid on the wire but that this learner cannot use must be dead-lettered, not trained on.

Both tests run a learner with its configured defaults (no `bus.vocab_size`, the default consumer kinds), fed valid
groups by the test (far-future versions, so none turns stale): the learner takes the vocabulary and context length
from its model, and the message kinds from its algorithm.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from bus.codec import encode
from bus.schema import Preference, new_id

from .conftest import Cluster, Node
from .hostile_helpers import DeadReader, Fuzzer

FUTURE = 1_000_000  # a policy version no learner here reaches: these groups never turn stale


def start_learner(cluster: Cluster, payloads: list[bytes]) -> Node:
    """XADD `payloads`, then valid groups enough for the learner's 2 steps, and start it."""
    fuzzer = Fuzzer()
    groups = [encode(fuzzer.group(2, version=FUTURE)) for _ in range(4)]
    for data in [*payloads, *groups]:
        cluster.client.xadd(cluster.trajectories, {"data": data})
    return cluster.learner()


@pytest.mark.timeout(120)
def test_token_ids_beyond_the_models_vocabulary_are_dead_lettered_not_trained(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster({"learner": {"max_steps": 2, "checkpoint_every": 0}})
    fuzzer = Fuzzer()
    beyond = fuzzer.group(2, version=FUTURE)
    beyond.trajectories[0].response_ids = np.array([5, 100_000], dtype=np.int32)  # the demo model has 100 tokens
    beyond.trajectories[0].behavior_logprobs = np.array([-1.0, -1.0], dtype=np.float32)
    learner = start_learner(cluster, [encode(beyond)])
    assert learner.finish() == 0, learner.tail()
    [record] = DeadReader(cluster.client, cluster.bus.dead).read().values()
    assert record.reason.startswith("trajectories[0].response_ids: token id 100000 >= vocab_size")


@pytest.mark.timeout(120)
def test_a_preference_sent_to_a_grpo_learner_is_dead_lettered_not_counted_as_trained(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster({"learner": {"max_steps": 2, "checkpoint_every": 0}})
    pair = Preference(
        id=new_id(),
        producer="agent",
        prompt_ids=np.array([9, 10], dtype=np.int32),
        chosen_ids=np.array([20], dtype=np.int32),
        rejected_ids=np.array([21], dtype=np.int32),
    )
    learner = start_learner(cluster, [encode(pair)])
    assert learner.finish() == 0, learner.tail()
    [record] = DeadReader(cluster.client, cluster.bus.dead).read().values()
    assert record.reason.startswith("kind: expected one of ['group', 'trajectory']")
    assert cluster.accounting().get("trained") == 8  # the four groups' members, and nothing for the pair
