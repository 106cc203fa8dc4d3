"""The multi-turn interface with its calculator example, driven by a scripted policy and a real tokenizer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError

from envs import (
    CalculatorEnv,
    Environment,
    EnvReply,
    PolicyTurn,
    PromptRow,
    RewardSet,
    TaskConfig,
    make_environment,
    render_prompt,
    run_episode,
)
from envs.multiturn import calculate


class ScriptedPolicy:
    """Stands in for an engine: replies with fixed turns, logprob -0.5 per token, and records its inputs."""

    def __init__(self, tokenizer: Any, turns: list[str], finish_reason: str = "stop") -> None:
        self.tokenizer, self.turns, self.finish_reason = tokenizer, list(turns), finish_reason
        self.inputs: list[list[int]] = []

    async def __call__(self, input_ids: list[int]) -> PolicyTurn:
        self.inputs.append(list(input_ids))
        text = self.turns.pop(0)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        reason = self.finish_reason if not self.turns else "stop"
        return PolicyTurn(ids=ids, logprobs=[-0.5] * len(ids), text=text, finish_reason=reason)


def test_calculator_episode_masks_environment_tokens_and_scores(chat_tokenizer: Any) -> None:
    cfg = TaskConfig(environment="calculator", rewards=[{"function": "exact_match", "extract": "answer_tag"}])
    row = PromptRow(id="q", prompt="What is 37*91?", meta={"ground_truth": "3367"})
    prompt_ids = chat_tokenizer.encode(render_prompt(row.prompt, cfg.format, chat_tokenizer), add_special_tokens=False)
    env = make_environment(cfg.environment)
    assert isinstance(env, CalculatorEnv) and env.stop == ("</calc>",)
    policy = ScriptedPolicy(chat_tokenizer, ["Let me compute <calc>37*91</calc>", "so <answer>3367</answer>"])

    episode = asyncio.run(run_episode(env, row, prompt_ids, policy, chat_tokenizer, max_turns=cfg.max_turns))

    first, env_text, second = "Let me compute <calc>37*91</calc>", "<result>3367</result>", "so <answer>3367</answer>"
    assert episode.text == first + env_text + second
    assert (episode.turns, episode.finish_reason) == (2, "done")
    assert episode.loss_mask == [1] * len(first) + [0] * len(env_text) + [1] * len(second)
    assert episode.logprobs == [-0.5] * len(first) + [0.0] * len(env_text) + [-0.5] * len(second)
    assert chat_tokenizer.decode(episode.response_ids) == episode.text
    assert policy.inputs[1] == prompt_ids + episode.response_ids[: len(first) + len(env_text)]
    assert RewardSet.from_config(cfg).score([episode.text], [row]).total == [1.0]


def test_episode_ends_at_max_turns_and_on_length(chat_tokenizer: Any) -> None:
    env = CalculatorEnv()
    row = PromptRow(id="q", prompt="loop")
    looping = ScriptedPolicy(chat_tokenizer, ["<calc>1+1</calc>"] * 3)
    episode = asyncio.run(run_episode(env, row, [1], looping, chat_tokenizer, max_turns=3))
    assert (episode.turns, episode.finish_reason) == (3, "max_turns")
    assert episode.text == "<calc>1+1</calc><result>2</result>" * 2 + "<calc>1+1</calc>"  # no reply after the last turn
    cut = ScriptedPolicy(chat_tokenizer, ["<calc>1+"], finish_reason="length")
    episode = asyncio.run(run_episode(env, row, [1], cut, chat_tokenizer, max_turns=3))
    assert (episode.turns, episode.finish_reason, set(episode.loss_mask)) == (1, "length", {1})


@pytest.mark.parametrize(
    ("turn", "reply"),
    [
        ("<calc>(2+3)*4</calc>", EnvReply("<result>20</result>", done=False)),
        ("x <calc>7/2", EnvReply("<result>3.5</result>", done=False)),  # stop string trimmed by the engine
        ("<calc>2**40</calc>", EnvReply("<result>1099511627776</result>", done=False)),
        ("<calc>1/0</calc>", EnvReply("<result>error: division by zero</result>", done=False)),
        ("<calc>1+1</calc> so <answer>2</answer>", EnvReply("", done=True)),
        ("<answer>5</answer>", EnvReply("", done=True)),
    ],
)
def test_calculator_replies(turn: str, reply: EnvReply) -> None:
    assert CalculatorEnv().step(turn) == reply


def test_calculator_reports_refused_expressions_to_the_policy() -> None:
    reply = CalculatorEnv().step("<calc>__import__('os')</calc>")
    assert not reply.done and reply.text.startswith("<result>error: unsupported syntax: Call(")


@pytest.mark.parametrize("expression", ["2**1000", "9**9**9", "x+1", "(1).real", "[1]*9", "(-8)**0.5", "1" * 201])
def test_calculate_refuses_what_could_stall_or_escape(expression: str) -> None:
    with pytest.raises(ValueError):
        calculate(expression)


class Echo(Environment):
    def step(self, turn: str) -> EnvReply:
        return EnvReply(turn.upper(), done=False)


class NotAnEnvironment:
    pass


def test_make_environment_by_name_and_import_path() -> None:
    assert make_environment("") is None
    assert isinstance(make_environment(f"{__name__}:Echo"), Echo)
    with pytest.raises(ValueError, match="not an Environment subclass"):
        make_environment(f"{__name__}:NotAnEnvironment")
    with pytest.raises(ValueError, match="expected an import path"):
        make_environment("calculater")
    with pytest.raises(ValidationError, match="'calculater' is neither a built-in environment"):
        TaskConfig(environment="calculater")
