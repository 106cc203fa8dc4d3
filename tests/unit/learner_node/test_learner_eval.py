"""Greedy eval: batched left-padded generation equals transformers' greedy generate, and accuracy applies the
task's rewards with the threshold."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.config import TaskConfig
from envs.render import render_prompt
from learner_node.config import LearnerConfig
from learner_node.evaluation import Evaluator, greedy_generate
from learner_node.model import init_distributed, load_policy
from slipstream.demo_model import build_demo_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A peaked random init with a loud eos: greedy responses vary by prompt, and some end early.
    path = build_demo_model(tmp_path_factory.mktemp("demo"), init_std=0.3, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.eos_token_id] *= 4.0
    model.save_pretrained(path)
    return str(path)


def reference_greedy(model_path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_path)
    eos = model.generation_config.eos_token_id
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[
            0, len(prompt) :
        ]
        tokens = generated.tolist()
        out.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    return out


def test_batched_greedy_generation_equals_transformers_generate(model_path: str) -> None:
    runtime = init_distributed(LearnerConfig())
    policy = load_policy(model_path, runtime)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in ["3+4=", "12*31=", "7=", "abc def ghi="]]
    got = greedy_generate(policy, prompts, runtime, max_new_tokens=6, eos_ids=[tokenizer.eos_token_id], pad_id=0)
    assert got == reference_greedy(model_path, prompts, 6)
    assert any(len(r) < 6 for r in got)  # some rows stopped at eos, while others went on


def test_accuracy_counts_completions_whose_reward_reaches_the_threshold(model_path: str) -> None:
    runtime = init_distributed(LearnerConfig())
    policy = load_policy(model_path, runtime)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rewards = [{"function": "format", "pattern": r"^\d", "name": "digit"}, {"function": "format", "pattern": ".*"}]
    task = TaskConfig(format={"chat_template": "off"}, eval_fraction=0.5, rewards=rewards)
    evaluator = Evaluator(task, tokenizer, runtime, max_new_tokens=3, batch_size=7, threshold=2.0)
    prompts = [
        tokenizer.encode(render_prompt(r.prompt, task.format, None), add_special_tokens=False) for r in evaluator.rows
    ]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in reference_greedy(model_path, prompts, 3)]
    starts_with_digit = sum(t[:1].isdigit() for t in texts) / len(texts)

    assert evaluator.evaluate(policy)["eval_accuracy"] == pytest.approx(starts_with_digit)  # both rewards needed
    evaluator.threshold = 1.0
    result = evaluator.evaluate(policy)  # the always-true reward alone reaches 1.0
    assert result["eval_accuracy"] == 1.0 and result["eval_samples"] == len(evaluator.rows) == 50
    assert result["eval_reward_mean"] == pytest.approx(1.0 + starts_with_digit)
