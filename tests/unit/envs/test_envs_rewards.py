"""Every reward function on hand-written cases; RewardSet weighting, failures and user functions by import path."""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from envs import (
    ExactMatch,
    FormatTags,
    LengthPenalty,
    MathAnswer,
    PromptRow,
    RewardSet,
    TaskConfig,
    UserFunction,
)
from envs.answers import fallback_equivalent, math_equivalent, to_fraction


def test_exact_match_normalisation_options() -> None:
    completions = ["  7 ", "Paris\nFrance", "PARIS", "x <answer> 12 </answer>", "no tag 12"]
    truth = ["7", "Paris France", "paris", "12", "12"]
    assert ExactMatch()(completions, ground_truth=truth) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert ExactMatch(ignore_case=True)(completions, ground_truth=truth) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert ExactMatch(normalize_whitespace=False)(completions, ground_truth=truth) == [0.0] * 5
    assert ExactMatch(extract="answer_tag")(completions, ground_truth=truth) == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert ExactMatch(extract="first_line")(["\n7\n8", "8\n7"], ground_truth=["7", "7"]) == [1.0, 0.0]
    assert ExactMatch()(["b", "c"], ground_truth=[["a", "b"], ["a", "b"]]) == [1.0, 0.0]  # any accepted answer


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("0.5", "1/2", 1.0),
        ("The answer is $\\frac{1}{2}$.", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("1/2", "$\\frac{1}{2}$", 1.0),
        ("So it is \\boxed{\\frac{2}{4}}", "0.5", 1.0),
        ("0.25", "1/2", 0.0),
        ("$1+x$", "x+1", 1.0),
        ("I get 7 apples", "8", 0.0),
    ],
)
def test_math_answer_equivalent_forms(completion: str, gold: str, expected: float) -> None:
    assert MathAnswer()([completion], ground_truth=[gold]) == [expected]


def test_math_answer_off_the_main_thread_uses_the_sympy_free_fallback() -> None:
    completions = ["$\\frac{1}{2}$", "0.5", "it is 3/4", "\\boxed{-2}", "7"]
    golds = ["0.5", "1/2", "0.5", "-2", "8"]
    results: list[list[float]] = []
    worker = threading.Thread(target=lambda: results.append(MathAnswer()(completions, ground_truth=golds)))
    worker.start()
    worker.join(timeout=30)
    assert results == [[1.0, 1.0, 0.0, 1.0, 0.0]]


# (completion, gold, expected): plain numeric answers that math_verify (main thread) and the fallback (worker
# threads) must score alike; a number glued to a letter or sign before it is not an answer.
SAME_ON_EVERY_THREAD = [
    ("7", "7", 1.0),
    ("x7", "7", 0.0),
    ("a7", "7", 0.0),
    ("abc7def", "7", 0.0),
    ("\\boxed{x7}", "7", 0.0),
    ("$x7$", "7", 0.0),
    ("+7", "7", 0.0),
    ("(7)", "7", 0.0),
    ("-7", "7", 0.0),
    ("7x", "7", 1.0),
    ("I get 7 apples", "7", 1.0),
    ("x = 7", "7", 1.0),
    ("\\boxed{7}", "7", 1.0),
    ("$7$", "7", 1.0),
    ("the answer: 7.", "7", 1.0),
    ("7.0", "7", 1.0),
    ("14/2", "7", 1.0),
    ("0.5", "1/2", 1.0),
    ("The answer is $\\frac{1}{2}$.", "0.5", 1.0),
    ("So it is \\boxed{\\frac{2}{4}}", "0.5", 1.0),
    ("$-\\frac{1}{2}$", "-0.5", 1.0),
    ("about 1,000.", "1000", 1.0),
    ("x = 1,2", "12", 0.0),
    ("7,8", "8", 0.0),
    ("3+4", "4", 0.0),
    ("2^3", "3", 0.0),
    ("7 - 3 = 4", "4", 1.0),
    ("5 minus 3 gives 2", "5", 0.0),
]


def _score_on_a_worker_thread(completions: list[str], golds: list[str]) -> list[float]:
    results: list[list[float]] = []
    worker = threading.Thread(target=lambda: results.append(MathAnswer()(completions, ground_truth=golds)))
    worker.start()
    worker.join(timeout=30)
    assert len(results) == 1, "the worker thread did not finish scoring"
    return results[0]


def test_math_answer_scores_plain_numbers_alike_on_the_main_and_a_worker_thread() -> None:
    completions, golds = [c for c, _, _ in SAME_ON_EVERY_THREAD], [g for _, g, _ in SAME_ON_EVERY_THREAD]
    main = MathAnswer()(completions, ground_truth=golds)
    worker = _score_on_a_worker_thread(completions, golds)
    assert list(zip(completions, golds, main, strict=True)) == SAME_ON_EVERY_THREAD
    assert list(zip(completions, golds, worker, strict=True)) == SAME_ON_EVERY_THREAD


def test_the_fallback_accepts_nothing_that_math_verify_rejects() -> None:
    """Where math_verify knows more (it evaluates "3+4"), the fallback may reject; it never accepts more."""
    cases = [
        ("3+4", "7"), ("3+4", "3"), ("5 - 7", "-2"), ("5 - 7", "7"), ("2^3", "8"), ("2^3", "2"), ("7,8", "7"),
        ("1,5", "1.5"), ("1/2/3", "1/2"), ("7 * 2", "14"), ("7*2", "7"), ("y7z", "7"), ("x:7", "7"), ("_7", "7"),
    ]  # fmt: skip
    for prediction, gold in cases:
        assert math_equivalent(prediction, gold, timeout_s=5) or not fallback_equivalent(prediction, gold), (
            f"fallback accepts {prediction!r} for {gold!r}; math_verify rejects it"
        )


def test_fallback_parses_numbers_exactly() -> None:
    assert to_fraction("\\frac{3}{6}") == to_fraction("0.5") == to_fraction(" 1/2 ") == to_fraction("$0.50$") == 0.5
    assert to_fraction("1,000") == 1000 and to_fraction("-\\dfrac{1}{4}") == to_fraction("-0.25")
    assert to_fraction("x+1") is None and to_fraction("1/0") is None
    assert fallback_equivalent("so x = 3, y = \\boxed{4}", "4") and fallback_equivalent("about 1,000.", "1000")
    assert not fallback_equivalent("x = 1,2", "12")
    assert fallback_equivalent("2 plus 3 gives 5", "5") and not fallback_equivalent("5 minus 3 gives 2", "5")
    assert fallback_equivalent("so \\boxed{X + 1}", "x+1") and fallback_equivalent(" $x + 1$ ", "x+1")
    assert not fallback_equivalent("the answer is x+1", "x+1")  # non-numeric: the whole region must match


def test_format_reward_and_its_pattern_validation() -> None:
    completions = [
        "<think>a\nb</think> <answer>3</answer>",
        "<answer>3</answer>",
        "<think>x</think><answer>3</answer>!",
    ]
    assert FormatTags()(completions) == [1.0, 0.0, 0.0]
    assert FormatTags(pattern=r".*<answer>\d+</answer>")(completions) == [1.0, 1.0, 1.0]
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        FormatTags(pattern="(<think>")


def test_length_penalty_is_dapo_soft_overlong_punishment() -> None:
    penalty = LengthPenalty(max_completion_length=10, soft_punish_cache=4)
    ids = [[0] * n for n in (3, 6, 7, 8, 10, 11)]
    assert penalty([""] * len(ids), completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert LengthPenalty(max_completion_length=5, soft_punish_cache=0)(["", ""], completion_ids=[[0] * 5, [0] * 6]) == [
        0.0,
        -1.0,
    ]
    with pytest.raises(ValidationError, match=r"soft_punish_cache \(20\) must be <= max_completion_length \(10\)"):
        LengthPenalty(max_completion_length=10, soft_punish_cache=20)


def test_reward_set_weights_columns_and_completion_ids() -> None:
    cfg = TaskConfig(
        rewards=[
            {"function": "exact_match", "weight": 1.0},
            {"function": "format", "weight": 0.5, "pattern": r"^\d+$"},
            {"function": "length_penalty", "weight": 2.0, "max_completion_length": 4, "soft_punish_cache": 2},
        ]
    )
    row = PromptRow(id="r", prompt="3+4=", meta={"ground_truth": "7"})
    result = RewardSet.from_config(cfg).score(["7", "8", "7 7"], [row] * 3, completion_ids=[[1], [1], [1, 1, 1]])
    assert result.named == {
        "exact_match": [1.0, 0.0, 0.0],
        "format": [1.0, 1.0, 0.0],
        "length_penalty": [0.0, 0.0, -0.5],
    }
    assert result.total == [1.5, 0.5, -1.0]
    assert result.errors == {"exact_match": 0, "format": 0, "length_penalty": 0}


def test_a_raising_reward_scores_zero_counts_an_error_and_logs() -> None:
    cfg = TaskConfig(rewards=[{"function": "exact_match"}, {"function": "length_penalty"}])
    rows = [PromptRow(id="r", prompt="1+1=", meta={"ground_truth": "2"})] * 2
    with capture_logs() as logs:
        result = RewardSet.from_config(cfg).score(["2", "3"], rows)  # no completion_ids: length_penalty raises
    assert result.named["length_penalty"] == [0.0, 0.0] and result.total == [1.0, 0.0]
    assert result.errors == {"exact_match": 0, "length_penalty": 1}
    (line,) = [entry for entry in logs if entry["event"] == "reward_failed"]
    assert line["reward"] == "length_penalty" and "completion_ids" in line["error"]


USER_MODULE = """
def brevity(completions, ground_truth, target, **kwargs):
    return [1.0 if len(c) <= target and g in c else 0.0 for c, g in zip(completions, ground_truth)]

def broken(completions, **kwargs):
    return [1.0]  # wrong length

not_a_function = 3
"""


@pytest.fixture
def user_module(importable: Callable[[str, str], str]) -> str:
    return importable("user_rewards", USER_MODULE)


def test_user_function_by_import_path_from_toml(user_module: str) -> None:
    toml = f"""
    [[rewards]]
    function = "{user_module}:brevity"
    kwargs = {{ target = 3 }}
    weight = 2.0
    [[rewards]]
    function = "{user_module}:broken"
    name = "broken_one"
    """
    cfg = TaskConfig(**tomllib.loads(toml))
    reward_set = RewardSet.from_config(cfg)
    assert reward_set.labels == ["brevity", "broken_one"]
    rows = [PromptRow(id=str(i), prompt="q", meta={"ground_truth": g}) for i, g in enumerate(["ok", "ok"])]
    result = reward_set.score(["ok", "ok but long"], rows)
    assert result.named["brevity"] == [1.0, 0.0] and result.total == [2.0, 0.0]
    assert result.errors == {"brevity": 0, "broken_one": 1}


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("exact_mtch", "neither a built-in reward"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:not_a_function", "is not callable"),
    ],
)
def test_bad_user_functions_fail_at_start_up(user_module: str, function: str, message: str) -> None:
    with pytest.raises((ValueError, ValidationError), match=message):
        RewardSet.from_config(TaskConfig(rewards=[{"function": function.format(module=user_module)}]))


def test_reward_labels_must_be_distinct_and_options_known() -> None:
    with pytest.raises(ValidationError, match="give one of them a distinct `name`"):
        TaskConfig(rewards=[{"function": "math"}, {"function": "math", "weight": 0.1}])
    assert TaskConfig(rewards=[{"function": "math"}, {"function": "math", "name": "math2"}]).rewards[1].label == "math2"
    with pytest.raises(ValidationError, match="timeout"):
        TaskConfig(rewards=[{"function": "math", "timeout": 3}])
    with pytest.raises(ValidationError, match="less than or equal to 100"):
        TaskConfig(rewards=[{"function": "format", "weight": 1000}])


def test_user_function_model_round_trips(user_module: str) -> None:
    reward = UserFunction(function=f"{user_module}:brevity", kwargs={"target": 10})
    dumped: dict[str, Any] = reward.model_dump()
    assert TaskConfig(rewards=[dumped]).rewards[0] == reward
    assert reward(["hello"], ground_truth=["hell"]) == [1.0]


def test_numeric_closeness_gives_partial_credit_by_distance() -> None:
    from envs.rewards import NumericCloseness

    reward = NumericCloseness(scale=5.0)
    scores = reward(["7", "5", "x", " 7 ", "12", "nan"], ground_truth=["7"] * 6)
    assert scores == [1.0, 0.6, 0.0, 1.0, 0.0, 0.0]
