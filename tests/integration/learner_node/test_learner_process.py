"""A learner process trains on groups from a fake rollout node on a real Redis: every published trajectory ends
trained or dropped with a reason, and a learner killed with SIGKILL resumes from its checkpoint without training
any trajectory twice."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from bus.config import BusConfig
from bus.producer import Producer

from .conftest import FakeRollout, LearnerProcess


def odd_messages(producer: Producer, client: Any, version: int) -> None:
    """Besides the answers to tasks: garbage, one group sent twice (a retried send: same message id), and a group
    of policy version 0 sent when the learner is far past it. Each is counted once as published, as a producer
    would count it. The group sent twice claims a version ahead of the learner (as after a learner restarted from
    an older checkpoint), so it cannot turn stale while it waits behind the tasks' groups."""

    def member(token: int) -> Any:
        return producer.trajectory(
            prompt_ids=[1], response_ids=[token], logprobs=[-1.0], reward=float(token % 2),
            policy_version=0 if token > 6 else version + 100,
        )  # fmt: skip

    client.xadd(producer.stream, {"data": b"\x92not a message"})
    twice = producer.group([member(5), member(6)])
    producer.send(twice)
    producer.send(twice)
    producer.send(producer.group([member(7), member(8)]))  # version 0: too stale by now
    client.hincrby("slipstream:accounting", "published", 1 + 2 + 2)


def summary_of(learner: LearnerProcess) -> dict[str, Any]:
    [summary] = learner.named("summary")
    return summary


@pytest.mark.timeout(180)
def test_learner_trains_what_is_published_and_accounts_for_all_of_it(
    redis_server: Any, learner_config: Callable[..., Path]
) -> None:
    config = learner_config(max_steps=10, checkpoint_every=0, eval_limit=4)
    # max_staleness 1 and 2 groups per step keep at most 4 tasks in flight: after 12 answered tasks the learner has
    # trained 8 groups (4 steps), so a group of version 0 is 4 versions behind.
    with FakeRollout(redis_server.url, extra=odd_messages, extra_after=12):
        learner = LearnerProcess(config)
        assert learner.finish() == 0, "".join(learner.lines[-30:])
    steps = learner.named("train_step")
    assert [e["step"] for e in steps] == list(range(1, 11))
    assert all(e["staleness_max"] <= 1 for e in steps)  # max_staleness = 1: pacing kept it, or the filter dropped
    # The group sent twice claims a version 100 ahead of the learner: it is fresh (lag 0), not 100 versions negative.
    assert all(e["staleness_mean"] >= 0 for e in steps), [e["staleness_mean"] for e in steps]
    summary = summary_of(learner)
    accounting = summary["accounting"]
    # The version-0 group is stale; the other groups are paced to lag <= 1, but an extra group takes a step's slot
    # and can push a task's group to lag 2, which the filter drops too. The copy sent twice is not a drop.
    assert accounting["dropped:invalid"] == 1 and accounting["dropped:stale"] >= 2, accounting
    assert "dropped:duplicate" not in accounting
    assert accounting["trained"] == sum(e["samples"] for e in steps)
    dropped = sum(v for k, v in accounting.items() if k.startswith("dropped:"))
    assert accounting["published"] == accounting["trained"] + dropped + summary["in_flight"]
    assert summary["balanced"] is True and summary["steps"] == 10 and summary["eval_accuracy"] is not None


@pytest.mark.timeout(240)
def test_a_learner_killed_with_sigkill_resumes_without_training_anything_twice(
    redis_server: Any, learner_config: Callable[..., Path]
) -> None:
    config = learner_config(max_steps=8, checkpoint_every=3, keep_checkpoints=2)
    with FakeRollout(redis_server.url):
        first = LearnerProcess(config)
        first.wait_for(lambda: any(e["step"] >= 5 for e in first.named("train_step")), timeout=120)
        first.kill()  # after the checkpoint of step 3, in the middle of later steps
        trained_before = {e["step"] for e in first.named("train_step")}

        second = LearnerProcess(config, "--resume")
        assert second.finish() == 0, "".join(second.lines[-30:])
    [resumed] = second.named("resumed")
    assert resumed["step"] == 3
    assert [e["step"] for e in second.named("train_step")] == [4, 5, 6, 7, 8]
    assert max(trained_before) >= 5
    summary = summary_of(second)
    accounting = summary["accounting"]
    # Every trajectory trained before the kill (even after the checkpoint) was settled with its ack and its dedup
    # mark, so the resumed learner never trained it again: were one trained twice, trained + dropped + in flight
    # would exceed what was published.
    dropped = sum(v for k, v in accounting.items() if k.startswith("dropped:"))
    assert accounting["published"] == accounting["trained"] + dropped + summary["in_flight"]
    assert accounting["trained"] >= 8 * 2 * 3


@pytest.mark.timeout(180)
def test_dpo_from_the_tasks_preference_rows(tmp_path: Path, learner_config: Callable[..., Path]) -> None:
    rows = tmp_path / "prefs.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1), "answer": str(a + b)})
            + "\n"
            for a in range(4)
            for b in range(4)
        )
    )
    config = learner_config(algorithm="dpo", dpo_source="dataset", max_steps=4, groups_per_step=4, lr=1e-2)
    text = config.read_text().replace("[task]\n", f'[task]\nsource = "jsonl"\npath = "{rows}"\neval_fraction = 0.25\n')
    config.write_text(text)
    learner = LearnerProcess(config)  # no rollout node: the learner reads its pairs itself
    assert learner.finish() == 0, "".join(learner.lines[-30:])
    steps = learner.named("train_step")
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(e["samples"] == 4 for e in steps)
    assert steps[0]["reward_accuracy"] <= steps[-1]["reward_accuracy"] and steps[-1]["loss"] < steps[0]["loss"]


@pytest.mark.timeout(180)
def test_dynamic_sampling_trains_only_groups_with_a_signal_and_accounts_for_the_rest(
    redis_server: Any, learner_config: Callable[..., Path]
) -> None:
    """DAPO's dynamic sampling with a real learner and Redis: groups of 2 random 0/1 rewards are flat half the time;
    those are settled as dropped:zero_variance (not trained, not dead-lettered), the admission publishes other tasks
    in their place, every step trains groups_per_step groups that all carry a signal, and the books balance."""
    config = learner_config(max_steps=6, num_generations=2, dynamic_sampling=True)
    with FakeRollout(redis_server.url) as rollout:
        learner = LearnerProcess(config)
        assert learner.finish() == 0, "".join(learner.lines[-30:])
    steps = learner.named("train_step")
    assert [e["step"] for e in steps] == list(range(1, 7))
    # A flat group of GRPO gives advantages of exactly 0: none reached a step.
    skipped = [e["zero_advantage_skipped_frac"] for e in steps]
    assert skipped == [0.0] * 6, skipped
    assert all(e["samples"] == 4 for e in steps)  # 2 groups of 2 per step, every one of them informative
    accounting = summary_of(learner)["accounting"]
    assert accounting["dropped:zero_variance"] >= 2, accounting  # P(no flat group in >= 12 answered) < 1e-3
    config_bus = BusConfig(url=redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    dead = client.xrange(config_bus.stream("dead"))
    assert not [fields for _, fields in dead if b"zero_variance" in b" ".join(fields.values())]  # settled, not dead
    assert accounting["trained"] == sum(e["samples"] for e in steps)
    summary = summary_of(learner)
    assert summary["balanced"] is True, summary
    assert rollout.answered * 2 >= accounting["trained"] + accounting["dropped:zero_variance"]


@pytest.mark.timeout(240)
def test_a_lora_learner_checkpoints_resumes_and_exports_its_adapters(
    tmp_path: Path, redis_server: Any, learner_config: Callable[..., Path]
) -> None:
    """`[model.lora]` through the node: adapters trained, checkpointed with their config, resumed, and exported as
    PEFT's adapter folder with the merged model beside it."""
    config = learner_config(max_steps=4, checkpoint_every=2, export_hf=True)
    lora = ["--model.lora.rank", "4", "--model.lora.export_merged", "true"]
    with FakeRollout(redis_server.url):
        first = LearnerProcess(config, *lora)
        assert first.finish() == 0, "".join(first.lines[-30:])
        second = LearnerProcess(config, "--resume", "--learner.max_steps", "6", *lora)
        assert second.finish() == 0, "".join(second.lines[-30:])
    [resumed] = second.named("resumed")
    assert resumed["step"] == 4 and [e["step"] for e in second.named("train_step")] == [5, 6]
    run = tmp_path / "run"
    adapters = json.loads((run / "checkpoints" / "step-00000006" / "adapter_config.json").read_text())
    assert adapters["r"] == 4 and adapters["peft_type"] == "LORA"
    assert (run / "hf" / "adapter_model.safetensors").exists() and (run / "hf" / "merged" / "config.json").exists()
    assert (run / "checkpoints" / "step-00000006" / "hf" / "adapter_config.json").exists()
