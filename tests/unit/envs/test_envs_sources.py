"""Prompt sources: each TRL record format from JSONL, local HF datasets files, splits, limits and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from envs import TaskConfig, build_dataset, load_rows, render_preference, render_prompt


def write_jsonl(path: Path, records: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def jsonl_task(path: str, **overrides: Any) -> TaskConfig:
    return TaskConfig(source="jsonl", path=path, eval_fraction=0.0, **overrides)


def test_standard_rows_normalise_ground_truth_aliases_and_keep_columns(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"prompt": "1+1=", "ground_truth": "2", "level": 1},
            {"prompt": "2+2=", "answer": "4"},
            {"id": "q-7", "prompt": "3+3=", "solution": "6", "source": "book"},
        ],
    )
    rows = load_rows(jsonl_task(path), "train")
    assert [r.id for r in rows] == ["math:0", "math:1", "q-7"]
    assert [r.meta["ground_truth"] for r in rows] == ["2", "4", "6"]
    assert rows[0].meta["level"] == 1
    assert rows[2].meta == {"solution": "6", "source": "book", "ground_truth": "6"}


def test_conversational_messages_drop_trailing_assistant_into_meta(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "answer": "Paris"}])
    (row,) = load_rows(jsonl_task(path), "train")
    assert row.prompt == messages[:2]
    assert row.meta["completion"] == "Paris"
    assert row.meta["ground_truth"] == "Paris"


def test_conversational_prompt_renders_with_the_chat_template(tmp_path: Path, chat_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "2*3="}], "ground_truth": "6"}])
    cfg = jsonl_task(path, format={"system_prompt": "Answer with a number."})
    (row,) = load_rows(cfg, "train")
    text = render_prompt(row.prompt, cfg.format, chat_tokenizer)
    assert text == "<|system|>Answer with a number.<|end|>\n<|user|>2*3=<|end|>\n<|assistant|>"


def test_preference_rows_standard_and_conversational(tmp_path: Path, chat_tokenizer: Any) -> None:
    user = [{"role": "user", "content": "Say hi"}]
    path = write_jsonl(
        tmp_path / "pref.jsonl",
        [
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {
                "prompt": user,
                "chosen": [{"role": "assistant", "content": "hi"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            },
        ],
    )
    cfg = jsonl_task(path)
    standard, conversational = load_rows(cfg, "train")
    assert standard.is_preference and conversational.is_preference
    off = cfg.format.model_copy(update={"chat_template": "off"})
    assert render_preference(standard, off) == ("The sky is", " blue.", " green.")
    prompt, chosen, rejected = render_preference(conversational, cfg.format, chat_tokenizer)
    assert prompt == "<|user|>Say hi<|end|>\n<|assistant|>"
    assert (chosen, rejected) == ("hi<|end|>\n", "no<|end|>\n")


def test_json_array_file_is_read_like_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": "b"}]), encoding="utf-8")
    (row,) = load_rows(TaskConfig(source="hf", path=str(path), eval_fraction=0.0), "train")
    assert (row.prompt, row.meta["ground_truth"]) == ("a", "b")


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"question": "x"}], "row 0: needs a 'prompt' or a 'messages' column"),
        ([{"prompt": "x"}, {"messages": [{"role": "user", "content": 3}]}], "row 1: column 'messages', message 0"),
        ([{"prompt": "x", "chosen": "y"}], "needs both 'chosen' and 'rejected'"),
        ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], "id 'a' repeats row 0"),
        ([{"messages": [{"role": "assistant", "content": "only"}]}], "at least one non-assistant message"),
        (["just a string"], "line 1: expected a JSON object"),
    ],
)
def test_bad_records_name_the_file_row_and_rule(tmp_path: Path, records: list[Any], message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match="bad.jsonl") as caught:
        load_rows(jsonl_task(path), "train")
    assert message in str(caught.value)


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl line 3: invalid JSON"):
        load_rows(jsonl_task(str(path)), "train")


def test_eval_fraction_holds_out_disjoint_rows_and_max_rows_takes_the_first(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(50)])
    cfg = TaskConfig(source="jsonl", path=path, eval_fraction=0.2, max_rows=40)
    train, held_out = load_rows(cfg, "train"), load_rows(cfg, "eval")
    assert len(held_out) == 8 and len(train) == 32
    assert {r.id for r in train} | {r.id for r in held_out} == {f"n:{i}" for i in range(40)}
    assert not {r.id for r in train} & {r.id for r in held_out}


def test_eval_path_supplies_the_held_out_rows(tmp_path: Path) -> None:
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    eval_path = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "c", "answer": "C"}])
    cfg = TaskConfig(source="jsonl", path=train_path, eval_path=eval_path)
    assert [r.prompt for r in load_rows(cfg, "train")] == ["a", "b"]
    held_out = build_dataset(cfg, "eval")
    assert [(r.id, r.prompt) for r in held_out] == [("test:0", "c")]


def test_overlong_prompts_are_dropped_with_a_tokenizer(tmp_path: Path, plain_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "len.jsonl", [{"prompt": "x" * n} for n in (3, 10, 30)])
    cfg = jsonl_task(path, format={"max_prompt_length": 10})
    assert sorted(len(r.prompt) for r in build_dataset(cfg, tokenizer=plain_tokenizer).rows) == [3, 10]
    assert len(build_dataset(cfg)) == 3  # no tokenizer, no length check


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="path: required for source='jsonl'"):
        TaskConfig(source="jsonl")
    with pytest.raises(ValidationError, match="eval_split: only 'train' or '' unless source='hf'"):
        TaskConfig(source="jsonl", path="x.jsonl", eval_split="test")
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        TaskConfig(sorce="jsonl")
    with pytest.raises(ValidationError, match="less than or equal to 0.9"):
        TaskConfig(eval_fraction=1.0)


def test_eval_split_train_evaluates_on_every_training_row(tmp_path: Path) -> None:
    """`eval_split = "train"` holds nothing out: both splits are every row (for tasks where held-out rows measure
    memorisation, not RL); it cannot be combined with a separate eval file."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"{i}=", "ground_truth": str(i)} for i in range(10)])
    cfg = TaskConfig(source="jsonl", path=path, eval_split="train", eval_fraction=0.5)
    assert [r.prompt for r in load_rows(cfg, "eval")] == [r.prompt for r in load_rows(cfg, "train")]
    assert len(load_rows(cfg, "train")) == 10
    synthetic = TaskConfig(source="arithmetic", eval_split="train")
    assert len(load_rows(synthetic, "eval")) == len(load_rows(synthetic, "train")) == 100
    with pytest.raises(ValidationError, match="cannot be combined with eval_path"):
        TaskConfig(source="jsonl", path="x.jsonl", eval_path="y.jsonl", eval_split="train")


@pytest.fixture(scope="module")
def hf_datasets() -> Any:
    """The optional `datasets` package: missing is a skip locally and a failure under CI=true."""
    if os.environ.get("CI") == "true":
        import datasets
    else:
        datasets = pytest.importorskip("datasets")
    return datasets


def test_hf_save_to_disk_arrow_and_parquet(tmp_path: Path, hf_datasets: Any) -> None:
    train = hf_datasets.Dataset.from_list(
        [{"prompt": "1+2=", "solution": "3", "extra": None}, {"prompt": "2+2=", "solution": "4", "extra": "z"}]
    )
    test = hf_datasets.Dataset.from_list([{"prompt": "5+5=", "solution": "10", "extra": None}])
    hf_datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    cfg = TaskConfig(source="hf", path=str(tmp_path / "dd"), split="train", eval_split="test")
    rows = load_rows(cfg, "train")
    assert [(r.prompt, r.meta["ground_truth"]) for r in rows] == [("1+2=", "3"), ("2+2=", "4")]
    assert "extra" not in rows[0].meta and rows[1].meta["extra"] == "z"  # None columns count as absent
    assert [r.prompt for r in load_rows(cfg, "eval")] == ["5+5="]
    with pytest.raises(ValueError, match=r"split 'dev' not in \['test', 'train'\]"):
        load_rows(cfg.model_copy(update={"split": "dev"}), "train")

    train.to_parquet(str(tmp_path / "train.parquet"))
    parquet = TaskConfig(source="hf", path=str(tmp_path / "train.parquet"), eval_fraction=0.0)
    assert [r.meta["ground_truth"] for r in load_rows(parquet, "train")] == ["3", "4"]

    train.save_to_disk(str(tmp_path / "single"))
    (arrow_file,) = (tmp_path / "single").glob("*.arrow")
    arrow = TaskConfig(source="hf", path=str(arrow_file), eval_fraction=0.0)
    assert [r.prompt for r in load_rows(arrow, "train")] == ["1+2=", "2+2="]
