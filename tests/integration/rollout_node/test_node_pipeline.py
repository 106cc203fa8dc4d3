"""The rollout node's pipeline in this process (real Redis, real torch engine): failing rewards, multi-turn episodes,
tasks the engine rejects or fails on, and min_version waits."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.codec import decode, encode
from bus.config import BusConfig
from bus.schema import Group, Join, Sampling, Task, new_id
from bus.settings import load_settings
from bus.transport import setup_transport
from envs.rows import PROMPT_MESSAGES
from rollout_node.config import RolloutSettings
from rollout_node.engines.base import TorchEngineConfig
from rollout_node.engines.torch_engine import TorchEngine
from rollout_node.node import RolloutNode
from rollout_node.server import build_app
from slipstream.demo_model import build_demo_model
from telemetry.http import serve_in_thread
from telemetry.metrics import REGISTRY

WAIT_S = 60.0

USER_CODE = '''
from envs import EnvReply, Environment


def explode(completions, **kwargs):
    raise RuntimeError("this reward always fails")


def conversational(prompts, completions, **kwargs):
    """TRL's conversational shape: a message list per prompt and per completion; 1.0 where both are."""
    user = [p[-1]["content"] == "2+2?" for p in prompts]
    text = [c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in completions]
    return [float(u and t) for u, t in zip(user, text)]


class Observe(Environment):
    """Answers every policy turn with the same observation."""

    def step(self, turn):
        return EnvReply(" obs ", done=False)
'''


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo"), init_std=0.3, seed=1)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "rollout_user_code.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rollout_user_code"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_until(what: str, done: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (result := done()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}")
        time.sleep(0.05)
    return result


class Cluster:
    """A node in this process and the test's handle on its bus."""

    def __init__(self, url: str, model: Path) -> None:
        self.url, self.model = url, model
        self.bus = BusConfig(url=url)
        self.transport = setup_transport(self.bus)
        self.node: RolloutNode | None = None

    def start(self, *overrides: str) -> RolloutNode:
        """A started node; its torch engine is built here (so a test can reach into it), other engines by the node."""
        base = ["--bus.url", self.url, "--bus.block_ms", "100", "--model.path", str(self.model)]
        base += ["--telemetry.port", "0", "--rollout.receive_weights", "false", "--rollout.node_id", "local"]
        settings = load_settings(RolloutSettings, None, [*base, *overrides])
        torch_engine = settings.rollout.engine == "torch"
        engine = TorchEngine.from_config(settings.torch_engine_config()) if torch_engine else None
        self.node = RolloutNode(settings, engine=engine).start()
        return self.node

    def publish(self, *tasks: Task) -> None:
        self.transport.publish(self.bus.stream("tasks"), [encode(t) for t in tasks])

    def groups(self, count: int) -> dict[str, Group]:
        def read() -> dict[str, Group]:
            entries = self.transport.read(self.bus.stream("trajectories"), "0", 1000, 0)
            return {g.id: g for g in (decode(e.data) for e in entries)}

        return wait_until(f"{count} groups", lambda: len(g := read()) >= count and g)

    def dead(self) -> list[Any]:
        return self.transport.dead_letters()

    def close(self) -> None:
        if self.node is not None:
            self.node.shutdown()
            self.node = None


@pytest.fixture
def cluster(redis_server: Any, model_path: Path) -> Iterator[Cluster]:
    view = Cluster(redis_server.url, model_path)
    yield view
    view.close()
    view.transport.close()


def task(prompt: str | list[int] = "2+2=", n: int = 2, max_new_tokens: int = 4, **fields: Any) -> Task:
    sampling = Sampling(max_new_tokens=max_new_tokens)
    return Task(id=new_id(), prompt=prompt, n=n, sampling=sampling, meta={"ground_truth": "4"}, **fields)


def test_a_failing_reward_scores_zero_and_is_counted(cluster: Cluster, user_module: str) -> None:
    before = metric("slipstream_rollout_reward_errors_total", function="explode")
    rewards = f'[{{"function": "{user_module}:explode", "weight": 2.0}}, {{"function": "exact_match"}}]'
    node = cluster.start("--task.rewards", rewards)
    assert node.readiness()[0]
    tasks = [task(), task()]
    cluster.publish(*tasks)
    groups = cluster.groups(len(tasks))
    for t in tasks:
        for tr in groups[t.id].trajectories:
            assert tr.rewards["explode"] == 0.0
            assert tr.reward == tr.rewards["exact_match"]  # the failed reward adds nothing
    assert metric("slipstream_rollout_reward_errors_total", function="explode") == before + len(tasks)


def test_a_conversational_task_gives_rewards_its_messages_as_trl_does(cluster: Cluster, user_module: str) -> None:
    # The learner sends a conversation as the token ids of its rendering, with the messages in the task's meta.
    node = cluster.start("--task.rewards", f'[{{"function": "{user_module}:conversational"}}]')
    assert node.readiness()[0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    conversation = task(prompt=[5, 6, 7, 8])
    conversation.meta[PROMPT_MESSAGES] = messages
    broken = task(prompt=[5, 6, 7, 8])
    broken.meta[PROMPT_MESSAGES] = [{"role": "user"}]  # no content: the task is refused naming the field
    cluster.publish(conversation, broken)
    [group] = cluster.groups(1).values()
    assert [t.rewards["conversational"] for t in group.trajectories] == [1.0, 1.0]
    [dead] = wait_until("the broken task's dead letter", cluster.dead)
    assert dead.reason.startswith("prompt: column 'meta.prompt_messages', message 0:"), dead.reason


def test_multi_turn_episode_masks_environment_tokens(cluster: Cluster, user_module: str) -> None:
    node = cluster.start("--task.environment", f"{user_module}:Observe", "--task.max_turns", "3")
    t = task(n=3)
    t.sampling.stop_token_ids = list(range(len(node.tokenizer)))  # every token ends a policy turn: one token each
    cluster.publish(t)
    group = cluster.groups(1)[t.id]
    observation = node.tokenizer.encode(" obs ", add_special_tokens=False)
    assert len(group.trajectories) == 3
    for tr in group.trajectories:
        mask = tr.loss_mask.tolist()
        assert mask == [1] + [0] * len(observation) + [1] + [0] * len(observation) + [1]
        assert tr.response_ids.tolist()[1 : 1 + len(observation)] == observation
        logprobs = tr.behavior_logprobs.tolist()
        assert all(lp == 0.0 for lp, m in zip(logprobs, mask, strict=True) if m == 0)
        assert all(lp < 0.0 for lp, m in zip(logprobs, mask, strict=True) if m == 1)
        assert tr.finish_reason == "max_turns" and tr.policy_version == 0 and tr.version_ranges is None


def test_an_invalid_task_is_dead_lettered_without_costing_its_batch(cluster: Cluster) -> None:
    before = metric("slipstream_rollout_engine_errors_total", reason="invalid")
    too_long = task(prompt=[40] * 510, max_new_tokens=8)  # over the model's 512 positions
    fine = task(max_new_tokens=8)
    cluster.publish(too_long, fine)  # same sampling and n: one engine call
    cluster.start("--rollout.tasks_per_call", "2")
    groups = cluster.groups(1)
    [dead] = wait_until("a dead letter", cluster.dead)
    assert fine.id in groups and too_long.id not in groups
    assert decode(dead.data).id == too_long.id and "context" in dead.reason and "engine (invalid" in dead.reason
    assert metric("slipstream_rollout_engine_errors_total", reason="invalid") == before + 1


def test_an_engine_failure_requeues_the_task(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    before = metric("slipstream_rollout_engine_errors_total", reason="error")
    node = cluster.start("--rollout.engine_retry_s", "0.01")
    assert node.engine is not None
    generate, failures = node.engine.generate, []

    def crash_once(*args: Any, **kwargs: Any) -> Any:  # fault injection: the first call dies, the rest are real
        if not failures:
            failures.append(1)
            raise RuntimeError("engine crashed")
        return generate(*args, **kwargs)

    monkeypatch.setattr(node.engine, "generate", crash_once)
    t = task()
    cluster.publish(t)
    assert t.id in cluster.groups(1)
    assert failures and metric("slipstream_rollout_engine_errors_total", reason="error") == before + 1
    assert not cluster.dead()


def test_a_task_waits_for_its_min_version(cluster: Cluster) -> None:
    node = cluster.start("--rollout.min_version_wait_s", str(WAIT_S))
    assert node.engine is not None
    t = task(min_version=1)
    cluster.publish(t)
    wait_until("the node to take the task", lambda: node.readiness()[1]["tasks_in_hand"] == 1)
    weights = [(name, tensor.detach().clone()) for name, tensor in node.engine.model.state_dict().items()]
    node._load_weights(weights, 1)  # what the weight receiver calls when the learner's update arrives
    group = cluster.groups(1)[t.id]
    assert {tr.policy_version for tr in group.trajectories} == {1}


def test_sglang_engine_node_announces_its_server_and_publishes_groups(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SGLang path end to end against `serve-engine`'s app (SGLang's routes over a torch engine, real HTTP)."""
    monkeypatch.delenv("SLIPSTREAM_ENGINE_API_KEY", raising=False)
    served = TorchEngine.from_config(TorchEngineConfig(model_path=str(cluster.model)))
    server = serve_in_thread(build_app(served, tokenizer=served.tokenizer))
    try:
        cluster.start("--rollout.engine", "sglang", "--rollout.sglang.url", server.url)
        t = task(n=3)
        cluster.publish(t)
        group = cluster.groups(1)[t.id]
        assert len(group.trajectories) == 3 and {tr.policy_version for tr in group.trajectories} == {0}
        join = decode(cluster.transport.read(cluster.bus.stream("control"), "0", 1, 0)[0].data)
        assert isinstance(join, Join) and join.address == server.url
        assert join.meta == {"engine": "sglang", "n_ranks": 1}
    finally:
        cluster.close()
        server.stop()
