"""Agent sessions (one token stream, what the model generated has loss_mask 1), the session store's limits and TTL,
and the node's pure helpers: deterministic trajectory ids, episode version ranges, engine error labels."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bus.codec import MAX_NAME_CHARS, validate
from rollout_node.engines.base import Sample, error_reason
from rollout_node.engines.sglang import SGLangError, SGLangRequestError
from rollout_node.sessions import ProxyError, RewardRequest, Session, SessionStore
from rollout_node.trajectories import episode_versions, trajectory_id
from slipstream.demo_model import EOS_TOKEN, build_demo_tokenizer
from telemetry.metrics import REGISTRY


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_demo_tokenizer(512)


def sample(tokenizer: Any, text: str, version: int = 0, eos: bool = False, ranges: list | None = None) -> Sample:
    ids = tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])
    logprobs = [-0.5 - i for i in range(len(ids))]
    return Sample(ids, logprobs, logprobs, "stop", ranges or [(0, len(ids), version)], version, text)


def chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False), text


def test_chat_session_is_one_stream_with_generated_tokens_masked_in(tokenizer: Any) -> None:
    session = Session("s")
    turn1 = [{"role": "user", "content": "2+3="}]
    ids, text = chat(tokenizer, turn1)
    context = session.continuation(ids, text, tokenizer)
    assert context == ids  # the first prompt is the trajectory's prompt
    reply = sample(tokenizer, "<calc>2+3</calc>", version=4)  # ended by a stop string, no eos
    session.add(context, reply)

    turn2 = [*turn1, {"role": "assistant", "content": reply.text}, {"role": "tool", "content": "5"}]
    ids2, text2 = chat(tokenizer, turn2)
    context2 = session.continuation(ids2, text2, tokenizer)
    assert session.tokens + context2 == ids2  # the template's tokens between the turns are the new context
    answer = sample(tokenizer, "5", version=5, eos=True)
    session.add(context2, answer)

    traj = session.trajectory(RewardRequest(reward=1.0, rewards={"correct": 1.0}), "node:proxy")
    validate(traj)
    mask = traj.loss_mask.tolist()
    gen1, gen2 = len(reply.response_ids), len(answer.response_ids)
    assert traj.prompt_ids.tolist() == ids
    assert mask == [1] * gen1 + [0] * len(context2) + [1] * gen2
    assert traj.behavior_logprobs.tolist()[:gen1] == pytest.approx(reply.behavior_logprobs)
    assert set(traj.behavior_logprobs.tolist()[gen1 : gen1 + len(context2)]) == {0.0}
    assert traj.behavior_logprobs.tolist()[-gen2:] == pytest.approx(answer.behavior_logprobs)
    # Template tokens take the version of the token before them; the weights changed between the turns.
    assert traj.version_ranges == [(0, gen1 + len(context2), 4), (gen1 + len(context2), len(mask), 5)]
    assert traj.policy_version == 4 and traj.reward == 1.0 and traj.group_id == traj.id
    full = tokenizer.decode(traj.prompt_ids.tolist() + traj.response_ids.tolist(), skip_special_tokens=False)
    assert full == text2 + "5" + EOS_TOKEN


def test_text_prompt_extends_a_stream_that_ended_with_eos(tokenizer: Any) -> None:
    """A completions agent resends prompt + returned text (no eos token in it): matched by text, the eos the model
    generated stays in the stream."""
    session = Session("c")
    session.add(session.continuation(tokenizer.encode("3+4="), "3+4=", tokenizer), sample(tokenizer, "7", eos=True))
    follow = "3+4=7\nok"
    context = session.continuation(tokenizer.encode(follow), follow, tokenizer)
    assert tokenizer.decode(context) == "\nok"
    session.add(context, sample(tokenizer, "!"))
    assert session.loss_mask == [1, 1, 0, 0, 0, 1]


def test_a_prompt_that_does_not_continue_the_session_is_refused(tokenizer: Any) -> None:
    session = Session("d")
    session.add(session.continuation(tokenizer.encode("1+1="), "1+1=", tokenizer), sample(tokenizer, "2"))
    with pytest.raises(ProxyError) as refused:
        session.continuation(tokenizer.encode("1+1=3"), "1+1=3", tokenizer)
    assert refused.value.status == 409
    with pytest.raises(ProxyError, match="no completion"):
        Session("empty").trajectory(RewardRequest(reward=0.0), "p")


def abandoned() -> float:
    return REGISTRY.get_sample_value("slipstream_rollout_proxy_sessions_total", {"outcome": "abandoned"}) or 0.0


def test_store_limits_open_sessions_and_expires_idle_ones() -> None:
    store = SessionStore(ttl_s=0.05, max_sessions=2)
    store.get("a", create=True)
    store.get("b", create=True)
    with pytest.raises(ProxyError) as full:
        store.get("c", create=True)
    assert full.value.status == 429
    with pytest.raises(ProxyError) as unknown:
        store.get("c", create=False)
    assert unknown.value.status == 404
    store.get("b", create=False).busy = True  # a call in flight keeps its session
    before = abandoned()
    time.sleep(0.1)
    assert store.sweep() == 1
    assert abandoned() == before + 1
    assert set(store.open) == {"b"}
    store.finish("b", "traj-1")
    with pytest.raises(ProxyError) as ended:
        store.get("b", create=True)
    assert ended.value.status == 409


def test_trajectory_ids_are_deterministic_and_fit_a_name() -> None:
    assert trajectory_id("task-1", 3) == "task-1:3" == trajectory_id("task-1", 3)
    long_id = "t" * MAX_NAME_CHARS
    assert len(trajectory_id(long_id, 12)) <= MAX_NAME_CHARS
    assert trajectory_id(long_id, 1) != trajectory_id(long_id, 2) != trajectory_id("u" * MAX_NAME_CHARS, 2)


def test_episode_versions_give_environment_tokens_the_previous_version(tokenizer: Any) -> None:
    first = sample(tokenizer, "ab", ranges=[(0, 1, 3), (1, 2, 4)])  # weights switched inside the first turn
    second = sample(tokenizer, "c", version=4)
    assert episode_versions([1, 1, 0, 0, 1], [first, second]) == [(0, 1, 3), (1, 5, 4)]
    assert episode_versions([1, 0], [sample(tokenizer, "x", version=2)]) == [(0, 2, 2)]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TimeoutError("slow"), "timeout"),
        (ValueError("prompts[0]: bad"), "invalid"),
        (RuntimeError("x"), "error"),
        (SGLangError("down", route="/generate", reason="unreachable"), "unreachable"),
        (SGLangRequestError("bad", route="/generate", reason="http", status=400), "invalid"),
    ],
)
def test_engine_errors_get_low_cardinality_reasons(error: Exception, reason: str) -> None:
    assert error_reason(error) == reason
