"""`slipstream bench gpu`, the device smoke run, on its CPU path: the same pieces (engine bench, GRPO steps of the
real Trainer fed by the engine, full weight updates into the engine) on the tiny model, so the script is known to run
before a GPU session spends its minutes on it."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench import gpu

REPO = Path(__file__).resolve().parents[3]


def test_the_smoke_run_trains_updates_the_engine_and_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--prompts", "2", "--group-size", "4",
            "--new-tokens", "6", "--engine-batch", "4", "--repeats", "1", "--json"]  # fmt: skip
    assert gpu.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine_ratio"] > 0 and report["learner_tokens_per_s"] > 0 and report["weight_update_s"] > 0
    assert report["engine_version"] == 3 and report["engine_matches_learner"] is True  # warm-up step + 2
    assert len(report["losses"]) == 3 and all(math.isfinite(v) for v in report["losses"])
    assert report["parameters"] == report["engine_model_parameters"] and report["learner_mfu"] is None  # no GPU peak


def test_the_qwen2_size_is_half_a_billion_parameters() -> None:
    shape = gpu.SIZES["qwen2-0.5b"]
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        tie_word_embeddings=True,
    )
    with torch.device("meta"):  # shapes only, no memory
        parameters = LlamaForCausalLM(config).num_parameters()
    assert 0.45e9 < parameters < 0.55e9, parameters


def test_the_device_wheels_script_is_valid_shell() -> None:
    assert subprocess.run(["sh", "-n", str(REPO / "bench" / "gpu_wheels.sh")]).returncode == 0
