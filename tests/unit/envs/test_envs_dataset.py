"""Resumable dataset position, epochs and shuffling; the synthetic tasks' determinism and disjoint splits."""

from __future__ import annotations

import itertools
import operator

import pytest
from pydantic import ValidationError

from envs import PromptDataset, PromptRow, TaskConfig, build_dataset, load_rows


def rows(n: int) -> list[PromptRow]:
    return [PromptRow(id=str(i), prompt=f"p{i}") for i in range(n)]


def test_position_resumes_in_a_fresh_dataset_across_epochs() -> None:
    data = PromptDataset(rows(7), shuffle=True, seed=3, epochs=0)
    seen = [next(data).id for _ in range(10)]  # into the second epoch
    state = data.state_dict()
    expected = [next(data).id for _ in range(12)]
    resumed = PromptDataset(rows(7), shuffle=True, seed=3, epochs=0)
    resumed.load_state_dict(state)
    assert [next(resumed).id for _ in range(12)] == expected
    assert state["epoch"] == 1 and state["index"] == 3
    assert sorted(seen[:7]) == sorted(str(i) for i in range(7))  # an epoch is a permutation


def test_epochs_reshuffle_and_stop() -> None:
    data = PromptDataset(rows(20), shuffle=True, seed=0, epochs=2)
    first, second = [r.id for r in itertools.islice(data, 20)], [r.id for r in itertools.islice(data, 20)]
    assert sorted(first) == sorted(second) and first != second
    with pytest.raises(StopIteration):
        next(data)
    ordered = PromptDataset(rows(3), shuffle=False, seed=0, epochs=1)
    assert [r.id for r in ordered] == ["0", "1", "2"]


def test_balanced_epochs_serve_every_answer_equally_often_and_resume() -> None:
    # 1 row answers "a", 3 answer "b", 8 answer "c": shuffled epochs would serve "c" 8 times as often as "a".
    skewed = [
        PromptRow(id=f"{gt}{i}", prompt="p", meta={"ground_truth": gt})
        for gt, n in (("a", 1), ("b", 3), ("c", 8))
        for i in range(n)
    ]
    data = PromptDataset(skewed, shuffle=True, seed=5, epochs=0, balance=True)
    drawn = [next(data) for _ in range(12 * 5)]
    counts = {gt: sum(r.meta["ground_truth"] == gt for r in drawn) for gt in "abc"}
    assert counts == {"a": 20, "b": 20, "c": 20}
    assert {r.id for r in drawn if r.meta["ground_truth"] == "c"} == {f"c{i}" for i in range(8)}  # every row served
    state = data.state_dict()
    expected = [next(data).id for _ in range(15)]
    resumed = PromptDataset(skewed, shuffle=True, seed=5, epochs=0, balance=True)
    resumed.load_state_dict(state)
    assert [next(resumed).id for _ in range(15)] == expected


def test_state_from_another_dataset_is_refused() -> None:
    state = PromptDataset(rows(5), shuffle=True, seed=1, epochs=0).state_dict()
    with pytest.raises(ValueError, match="seed is 1 in the checkpoint but 2 now"):
        PromptDataset(rows(5), shuffle=True, seed=2, epochs=0).load_state_dict(state)
    with pytest.raises(ValueError, match="size is 5 in the checkpoint but 6 now"):
        PromptDataset(rows(6), shuffle=True, seed=1, epochs=0).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        PromptDataset(rows(5), shuffle=True, seed=1, epochs=0).load_state_dict({**state, "index": 9})


def test_arithmetic_is_deterministic_correct_and_splits_are_disjoint() -> None:
    cfg = TaskConfig(arithmetic={"ops": ["+", "-", "*"]}, eval_fraction=0.2, seed=5)
    train, held_out = load_rows(cfg, "train"), load_rows(cfg, "eval")
    assert len(train) + len(held_out) == 300 and len(held_out) == 60
    assert not {r.id for r in train} & {r.id for r in held_out}
    assert train == load_rows(cfg, "train") and held_out == load_rows(cfg, "eval")
    assert held_out != load_rows(cfg.model_copy(update={"seed": 6}), "eval")
    apply = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    for row in train + held_out:
        a, op, b = row.prompt[0], row.prompt[1], row.prompt[2]
        assert row.prompt == f"{a}{op}{b}=" and str(apply[op](int(a), int(b))) == row.meta["ground_truth"]
    sample = train[0]
    assert sample.id == f"arithmetic:{sample.prompt}"


def test_arithmetic_options_shape_the_problem_space() -> None:
    cfg = TaskConfig(arithmetic={"ops": ["-"], "min_operand": 2, "max_operand": 4, "allow_negative": False})
    everything = load_rows(cfg.model_copy(update={"eval_fraction": 0.0}), "train")
    assert sorted(r.prompt for r in everything) == ["2-2=", "3-2=", "3-3=", "4-2=", "4-3=", "4-4="]
    larger = TaskConfig(arithmetic={"ops": ["max", "min"], "max_operand": 2}, eval_fraction=0.0)
    assert {r.prompt: r.meta["ground_truth"] for r in load_rows(larger, "train")}["max(2,1)="] == "2"
    assert {r.prompt: r.meta["ground_truth"] for r in load_rows(larger, "train")}["min(2,1)="] == "1"
    one_digit = TaskConfig(arithmetic={"max_result": 3}, eval_fraction=0.0)
    assert sorted(r.prompt for r in load_rows(one_digit, "train")) == [
        f"{a}+{b}=" for a in range(4) for b in range(4) if a + b <= 3
    ]
    with pytest.raises(ValidationError, match=r"min_operand \(5\) must be <= max_operand \(4\)"):
        TaskConfig(arithmetic={"min_operand": 5, "max_operand": 4})


def test_reverse_task_and_seeded_max_rows_sample() -> None:
    cfg = TaskConfig(source="reverse", reverse={"min_length": 3, "max_length": 3}, max_rows=50, eval_fraction=0.1)
    train, held_out = load_rows(cfg, "train"), load_rows(cfg, "eval")
    assert len(train) == 45 and len(held_out) == 5
    for row in train:
        digits = row.prompt.removeprefix("rev ").removesuffix("=")
        assert len(digits) == 3 and row.meta["ground_truth"] == digits[::-1]
    assert train == load_rows(cfg, "train")
    assert train != load_rows(cfg.model_copy(update={"seed": 1}), "train")


def test_train_dataset_repeats_and_eval_is_one_ordered_pass() -> None:
    cfg = TaskConfig(eval_fraction=0.1)
    train, held_out = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    assert len(list(itertools.islice(train, 250))) == 250  # epochs=0 repeats forever
    assert [r.id for r in held_out] == [r.id for r in load_rows(cfg, "eval")]
    with pytest.raises(ValueError, match="split 'eval' has no rows"):
        build_dataset(cfg.model_copy(update={"eval_fraction": 0.0}), "eval")
