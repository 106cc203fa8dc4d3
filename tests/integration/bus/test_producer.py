"""Producer SDK: connect by URL, build valid messages from plain lists, refuse bad ones before sending."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from bus import Producer
from bus.consumer import MessageConsumer
from bus.schema import Group, MessageError, Trajectory

G = "learners"


@pytest.fixture(params=["redis", "inproc"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.getfixturevalue("redis_server").url if request.param == "redis" else f"inproc://{request.node.name}"


def test_sent_trajectories_and_groups_arrive_as_sent(url: str) -> None:
    with Producer.connect(url, producer_name="agent-1") as producer:
        consumer = MessageConsumer(producer.transport, producer.stream, G, "c0")
        single = producer.trajectory(prompt_ids=[1, 2, 3], response_ids=[4, 5], logprobs=[-0.5, -1.5], reward=0.5)
        members = [
            producer.trajectory(prompt_ids=[1], response_ids=[7], logprobs=[-0.1], reward=float(i)) for i in range(3)
        ]
        group = producer.group(members, task_id="task-9")
        producer.send(single)
        producer.send_many([group])
        got = [r.message for r in consumer.poll(10, 0)]
    assert producer.stream == "slipstream:trajectories"
    first, second = got
    assert isinstance(first, Trajectory) and isinstance(second, Group)
    assert (first.id, first.group_id, first.producer) == (single.id, single.id, "agent-1")  # a group of one
    assert first.prompt_ids.tolist() == [1, 2, 3] and first.behavior_logprobs.dtype == np.float32
    assert second.id == group.id and second.task_id == "task-9"
    assert [t.group_id for t in second.trajectories] == [group.id] * 3
    assert [t.reward for t in second.trajectories] == [0.0, 1.0, 2.0]


def test_invalid_messages_are_refused_before_anything_is_sent(url: str) -> None:
    with Producer.connect(url, stream="s") as producer:
        with pytest.raises(MessageError, match=r"^behavior_logprobs: log-probability 0.5 > 0"):
            producer.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[0.5], reward=1.0)
        with pytest.raises(MessageError, match=r"^response_ids: length 2 != behavior_logprobs length 1"):
            producer.trajectory(prompt_ids=[1], response_ids=[2, 3], logprobs=[-0.5], reward=1.0)
        good = producer.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-0.5], reward=1.0)
        bad = producer.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-0.5], reward=1.0)
        bad.prompt_ids = np.array([-3])
        with pytest.raises(MessageError, match=r"^prompt_ids: token id -3 < 0"):
            producer.send_many([good, bad])
        assert producer.transport.length("s") == 0  # not even the good one went out


def test_connect_rejects_an_unknown_scheme_and_bad_options() -> None:
    with pytest.raises(ValueError, match="url: scheme 'http' is not one of"):
        Producer.connect("http://localhost:6379")
    with pytest.raises(ValueError, match="max_stream_length"):
        Producer.connect("inproc://x", max_stream_length=-1)
