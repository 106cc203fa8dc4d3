"""The built-in `reward_model` reward: a sequence-classification model (a tiny one built here, with the demo tokenizer)
scores (prompt, completion) pairs in batches, as its logit or normalised, and fails as a reward may: by counting an
error, never by stopping the node."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from envs.config import TaskConfig
from envs.rewards import RewardModel
from envs.rows import PromptRow
from envs.scoring import RewardSet
from slipstream.demo_model import PAD_TOKEN, VOCAB, build_demo_tokenizer

PROMPTS = ["3+4=", "12+7=", "rev 123=", "1+1="]
COMPLETIONS = ["7", "19", "321", "two"]


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reward-model")
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=VOCAB[PAD_TOKEN])  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    build_demo_tokenizer(256).save_pretrained(path)
    return path


def alone(reward: RewardModel, prompt: str, completion: str) -> float:
    return reward([completion], prompts=[prompt])[0]


def test_a_batch_scores_each_pair_as_it_scores_alone(reward_model_path: Path) -> None:
    reward = RewardModel(path=str(reward_model_path), batch_size=3)  # batches of 3 and 1, padded
    scores = reward(COMPLETIONS, prompts=PROMPTS)
    assert len(set(scores)) == len(scores)  # a random head still tells the pairs apart
    for score, prompt, completion in zip(scores, PROMPTS, COMPLETIONS, strict=True):
        assert score == pytest.approx(alone(reward, prompt, completion), abs=1e-5)


def test_normalisations(reward_model_path: Path) -> None:
    raw = RewardModel(path=str(reward_model_path))(COMPLETIONS, prompts=PROMPTS)
    sigmoid = RewardModel(path=str(reward_model_path), normalize="sigmoid")(COMPLETIONS, prompts=PROMPTS)
    assert sigmoid == pytest.approx([1 / (1 + math.exp(-v)) for v in raw])
    batch = RewardModel(path=str(reward_model_path), normalize="batch")(COMPLETIONS, prompts=PROMPTS)
    assert sum(batch) == pytest.approx(0.0, abs=1e-9) and sum(v * v for v in batch) / 4 == pytest.approx(1.0)


def test_a_task_scores_with_it_and_a_conversation_gives_the_completion_as_the_assistants_turn(
    reward_model_path: Path,
) -> None:
    task = TaskConfig(rewards=[{"function": "reward_model", "path": str(reward_model_path), "weight": 2.0}])
    rewards = RewardSet.from_config(task)
    rows = [PromptRow(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    result = rewards.score(COMPLETIONS, rows)
    assert result.errors == {"reward_model": 0}
    assert result.total == pytest.approx([2 * v for v in result.named["reward_model"]])
    chat = [PromptRow(f"c{i}", [{"role": "user", "content": p}]) for i, p in enumerate(PROMPTS)]
    assert rewards.score(COMPLETIONS, chat).named["reward_model"] != result.named["reward_model"]


def test_a_slow_or_missing_model_costs_the_score_and_counts_an_error(reward_model_path: Path, tmp_path: Path) -> None:
    rows = [PromptRow(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    slow = RewardSet([RewardModel(path=str(reward_model_path), timeout_s=1e-9)])
    assert slow.score(COMPLETIONS, rows).errors == {"reward_model": 1}
    with pytest.raises(ValueError, match=r"reward_model.path: cannot load .*local_files_only=True"):
        RewardModel(path=str(tmp_path / "nothing"), local_files_only=True)(["x"], prompts=["y"])
