"""`slipstream bench learn`'s own pieces: the freeze measure, the task configs it writes, the repeat task's reward,
and the reference GRPO loop learning a trivial task (so a broken reference cannot pass for a slow one)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from bench._learn_tasks import TASKS, position_match, without_task
from bench.learn import longest_flat, summarise


def test_longest_flat_counts_steps_without_a_new_best_below_target() -> None:
    evals = [(0, 0.0, 0.0), (20, 1.0, 0.5), (40, 2.0, 0.5), (60, 3.0, 0.4), (80, 4.0, 0.6), (100, 5.0, 0.95)]
    assert longest_flat(evals, target=0.9) == 40  # best 0.5 from step 20 to step 60
    assert longest_flat(evals[:2] + [(400, 9.0, 0.5)], target=0.9) == 380  # a freeze
    assert longest_flat([(0, 0.0, 0.95), (20, 1.0, 0.1)], target=0.9) == 0  # reached at once: nothing after counts


def test_each_task_replaces_the_configs_task_and_keeps_the_rest(tmp_path: Path) -> None:
    base = Path("configs/demo.toml").read_text()
    assert "[task" not in without_task(base) and "[learner]" in without_task(base)
    for task in TASKS.values():
        folder = tmp_path / task.name
        folder.mkdir()
        config = tomllib.loads(task.config(base, folder).read_text())
        assert config["learner"] == tomllib.loads(base)["learner"]  # the recipe is the same for every task
        assert "balance" not in config["task"]  # nothing of the demo's own task leaks into the bench's
        for name in task.files:
            assert (folder / name).read_text().count("\n") == len(task.files[name])
    assert tomllib.loads(TASKS["repeat"].config(base, tmp_path).read_text())["task"]["eval_split"] == "train"


def test_only_the_repeat_task_sets_a_response_budget_and_it_fits_its_answers(tmp_path: Path) -> None:
    from bus.settings import load_settings
    from learner_node.config import LearnerSettings

    assert [name for name, task in TASKS.items() if task.overrides()] == ["repeat"]
    repeat = TASKS["repeat"]
    settings = load_settings(LearnerSettings, repeat.config(Path("configs/demo.toml").read_text(), tmp_path),
                             repeat.overrides())  # fmt: skip
    answer = repeat.files["repeat.jsonl"][0]["ground_truth"]
    assert settings.learner.max_new_tokens >= len(answer) + 1  # one token per character, then the eos


def test_position_match_is_one_only_for_the_exact_answer() -> None:
    truth = ["7" * 32] * 4
    scores = position_match(["7" * 32, "7" * 16, "7" * 33, "x" + "7" * 31], ground_truth=truth)
    assert scores == [1.0, 0.5, 31 / 32, 31 / 32]


def test_summary_counts_a_run_short_of_target_as_max_steps() -> None:
    def run(steps: int | None) -> dict:
        return {"reached_target": steps is not None, "steps_to_target": steps, "time_to_target_s": 10.0,
                "seconds_per_step": 0.1, "longest_flat_steps": 0}  # fmt: skip

    runs = [{"reference": run(100), "sync": run(None), "async": run(120)}]
    summary = summarise(TASKS["max"], runs, max_steps=500)
    assert summary["sync_steps_ratio"] == 5.0 and summary["async_steps_ratio"] == 1.2
    assert summary["sync_reached_target"] == 0 and summary["async_time_ratio"] == 1.0


@pytest.mark.timeout(240)
def test_the_reference_loop_learns_a_one_answer_task(tmp_path: Path) -> None:
    """Every prompt's answer is "7": the textbook loop must find it from reward alone within a few dozen steps."""
    from bench._grpo_reference import ReferenceGRPO
    from envs.config import TaskConfig
    from learner_node.config import LearnerConfig
    from slipstream.demo_model import build_demo_model

    torch.set_num_threads(1)
    rows = "".join(f'{{"prompt": "{i}?", "ground_truth": "7"}}\n' for i in range(10))
    (tmp_path / "seven.jsonl").write_text(rows)
    task = TaskConfig(
        source="jsonl", path=str(tmp_path / "seven.jsonl"), eval_split="train", format={"chat_template": "off"},
        rewards=[{"function": "exact_match"}],
    )  # fmt: skip
    cfg = LearnerConfig(groups_per_step=8, num_generations=8, max_new_tokens=1, lr=1e-2, scale_rewards="none")
    reference = ReferenceGRPO(str(build_demo_model(tmp_path / "model")), task, cfg, seed=0, eval_split="train")
    assert reference.evaluate() == 0.0
    for _ in range(60):
        reference.step()
    assert reference.evaluate() == 1.0
