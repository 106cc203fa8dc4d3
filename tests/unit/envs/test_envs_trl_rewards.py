"""Reward functions written for TRL run unchanged: TRL's documented example rewards (their behaviour, rewritten here)
on standard and on conversational prompts, through `RewardSet.score` as the rollout node calls it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from envs import PromptRow, RewardSet
from envs.rewards import ExactMatch, UserFunction

# The examples of TRL's GRPOTrainer docs ("Using a custom reward function"), their behaviour: a length reward on
# standard completions (text), a format reward that reads completion[0]["content"] (conversational), and a
# ground-truth reward that reads `ground_truth` as a column. `prompts` must be what the dataset row held.
TRL_EXAMPLES = r"""
import re

def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]

def format_reward_func(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, content) else 0.0 for content in contents]

def boxed_reward(completions, ground_truth, **kwargs):
    found = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    return [1.0 if m and m.group(1) == gt else 0.0 for m, gt in zip(found, ground_truth)]

def last_user_turn(prompts, completions, **kwargs):
    return [float(len(prompt[-1]["content"])) for prompt in prompts]
"""


@pytest.fixture
def trl_module(importable: Callable[[str, str], str]) -> str:
    return importable("trl_examples", TRL_EXAMPLES)


def test_standard_prompts_pass_completions_as_text(trl_module: str) -> None:
    rewards = RewardSet(
        [UserFunction(function=f"{trl_module}:reward_len"), UserFunction(function=f"{trl_module}:boxed_reward")]
    )
    rows = [PromptRow("r", "What is 3+4?", {"ground_truth": "7"})] * 2
    result = rewards.score(["x" * 20, r"so \boxed{7}"], rows)
    assert result.named == {"reward_len": [0.0, -8.0], "boxed_reward": [0.0, 1.0]}
    assert result.errors == {"reward_len": 0, "boxed_reward": 0}


def test_conversational_prompts_pass_completions_and_prompts_as_messages(trl_module: str) -> None:
    rewards = RewardSet(
        [
            UserFunction(function=f"{trl_module}:format_reward_func"),
            UserFunction(function=f"{trl_module}:last_user_turn"),
            ExactMatch(function="exact_match"),  # a built-in reads the text either way
        ]
    )
    conversation = [{"role": "system", "content": "Think first."}, {"role": "user", "content": "3+4?"}]
    rows = [PromptRow("r", conversation, {"ground_truth": "7"})] * 2
    result = rewards.score(["<think>3 and 4</think><answer>7</answer>", "7"], rows)
    assert result.errors == {"format_reward_func": 0, "last_user_turn": 0, "exact_match": 0}
    assert result.named["format_reward_func"] == [1.0, 0.0]
    assert result.named["last_user_turn"] == [4.0, 4.0]
    assert result.named["exact_match"][1] == 1.0
