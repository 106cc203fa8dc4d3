"""Reading a task's rows (JSONL, local Hugging Face datasets files, synthetic tasks) and splitting train from eval.

train = build_dataset(cfg, "train", tokenizer)   # shuffled, `cfg.epochs` passes (0: forever)
held_out = build_dataset(cfg, "eval", tokenizer)  # one pass, fixed order
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import structlog

from envs.config import TRAIN_SPLIT, TaskConfig
from envs.dataset import PromptDataset
from envs.render import prompt_tokens
from envs.rows import PromptRow, row_from_record
from envs.synthetic import arithmetic_rows, reverse_rows

log = structlog.get_logger(__name__)

Split = Literal["train", "eval"]


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON Lines file (one object per line, blank lines skipped) or of a JSON array file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON array: {exc}") from exc
        located = [(f"item {i}", r) for i, r in enumerate(records)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number}: invalid JSON: {exc}") from exc
    for where, record in located:
        if not isinstance(record, dict):
            raise ValueError(f"{path} {where}: expected a JSON object, got {type(record).__name__}")
    return [record for _, record in located]


def read_hf_records(path: Path, split: str) -> list[dict[str, Any]]:
    """Records of a local HF datasets file: a `save_to_disk` directory (Dataset or DatasetDict, `split` picked),
    an .arrow file, a .parquet file, or JSON(L) as written by `Dataset.to_json`."""
    if path.suffix in (".json", ".jsonl"):
        return read_json_records(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.suffix == ".parquet":
        import pyarrow.parquet  # lazy: ships with `datasets`, only needed here

        return pyarrow.parquet.read_table(path).to_pylist()
    try:
        import datasets  # lazy: heavy, and optional for every other source
    except ImportError as exc:
        raise ValueError(f"{path}: source='hf' needs the `datasets` package (pip install datasets)") from exc
    if path.suffix == ".arrow":
        return datasets.Dataset.from_file(str(path)).to_list()
    if not path.is_dir():
        raise ValueError(f"{path}: expected a save_to_disk directory, .arrow, .parquet, .json or .jsonl")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path}: split {split!r} not in {sorted(loaded)}")
        loaded = loaded[split]
    return loaded.to_list()


def _file_rows(cfg: TaskConfig, path: str, split: str, limit: int) -> list[PromptRow]:
    file = Path(path)
    records = read_json_records(file) if cfg.source == "jsonl" else read_hf_records(file, split)
    if limit:
        records = records[:limit]
    rows, seen = [], {}
    for index, record in enumerate(records):
        try:
            row = row_from_record(record, default_id=f"{file.stem}:{index}")
        except ValueError as exc:
            raise ValueError(f"{file} row {index}: {exc}") from exc
        if row.id in seen:
            raise ValueError(f"{file} row {index}: id {row.id!r} repeats row {seen[row.id]}")
        seen[row.id] = index
        rows.append(row)
    return rows


def _source_rows(cfg: TaskConfig) -> list[PromptRow]:
    if cfg.source == "arithmetic":
        rows = arithmetic_rows(cfg.arithmetic)
    elif cfg.source == "reverse":
        rows = reverse_rows(cfg.reverse)
    else:
        return _file_rows(cfg, cfg.path, cfg.split, cfg.max_rows)
    if cfg.max_rows and cfg.max_rows < len(rows):
        picked = sorted(random.Random(cfg.seed).sample(range(len(rows)), cfg.max_rows))
        rows = [rows[i] for i in picked]
    return rows


def load_rows(cfg: TaskConfig, split: Split) -> list[PromptRow]:
    """The rows of one split. With `eval_split = "train"` both splits are every training row (nothing is held out);
    else eval rows come from eval_path/eval_split when set; otherwise a seeded `eval_fraction` of the source is held
    out, and train is the rest (the two never share a row)."""
    if cfg.eval_split == TRAIN_SPLIT:
        return _source_rows(cfg)
    if cfg.eval_path or cfg.eval_split:
        if split == "train":
            return _source_rows(cfg)
        return _file_rows(cfg, cfg.eval_path or cfg.path, cfg.eval_split or cfg.split, limit=0)
    rows = _source_rows(cfg)
    # seed + 1: the eval draw must not replay the Random(seed) draw that sampled `max_rows` synthetic problems.
    held_out = set(random.Random(cfg.seed + 1).sample(range(len(rows)), round(len(rows) * cfg.eval_fraction)))
    return [row for i, row in enumerate(rows) if (i in held_out) == (split == "eval")]


def build_dataset(cfg: TaskConfig, split: Split = "train", tokenizer: Any | None = None) -> PromptDataset:
    """The split as a PromptDataset: train shuffles per `cfg.shuffle` (or balances answers) for `cfg.epochs`; eval is
    one ordered pass.

    With a tokenizer, rows whose rendered prompt exceeds `format.max_prompt_length` are dropped (and logged).
    """
    rows = load_rows(cfg, split)
    if tokenizer is not None:
        kept = [row for row in rows if prompt_tokens(row, cfg.format, tokenizer) <= cfg.format.max_prompt_length]
        if len(kept) < len(rows):
            log.warning("prompts_too_long_dropped", split=split, dropped=len(rows) - len(kept), kept=len(kept))
        rows = kept
    if not rows:
        raise ValueError(f"task split {split!r} has no rows (source {cfg.source!r}, eval_fraction {cfg.eval_fraction})")
    if split == "eval":
        return PromptDataset(rows, shuffle=False, seed=cfg.seed, epochs=1)
    return PromptDataset(rows, shuffle=cfg.shuffle, seed=cfg.seed, epochs=cfg.epochs, balance=cfg.balance == "answer")
