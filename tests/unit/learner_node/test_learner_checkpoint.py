"""Checkpoints round-trip model, optimizer, scheduler, RNG and run state (dataset position); the HF export loads."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.dataset import PromptDataset
from envs.rows import PromptRow
from learner_node.checkpoint import Checkpointer, export_hf
from learner_node.config import LearnerConfig
from learner_node.model import build_optimizer, build_scheduler, full_state_dict, init_distributed, load_policy
from slipstream.demo_model import build_demo_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_demo_model(tmp_path_factory.mktemp("demo")))


def train_a_little(model_path: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    cfg = LearnerConfig(lr=1e-2, lr_scheduler="cosine", max_steps=10)
    runtime = init_distributed(cfg)
    policy = load_policy(model_path, runtime)
    optimizer = build_optimizer(cfg, [policy])
    scheduler = build_scheduler(cfg, optimizer)
    ids = torch.randint(4, 90, (2, 6))
    for _ in range(2):
        policy(input_ids=ids).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return policy, optimizer, scheduler


def test_save_then_load_restores_everything(model_path: str, tmp_path: Path) -> None:
    runtime = init_distributed(LearnerConfig())
    policy, optimizer, scheduler = train_a_little(model_path)
    rows = [PromptRow(f"r{i}", f"{i}=") for i in range(5)]
    dataset = PromptDataset(rows, shuffle=True, seed=3, epochs=0)
    for _ in range(7):
        next(dataset)
    checkpointer = Checkpointer(tmp_path / "ckpt", runtime, keep=2)
    assert checkpointer.latest() is None
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    state = {"step": 2, "version": 2, "scheduler": scheduler.state_dict(), "dataset": dataset.state_dict()}
    path = checkpointer.save(2, policy, optimizer, state)
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    expected_rows = [next(dataset).id for _ in range(4)]
    weights = {k: v.clone() for k, v in full_state_dict(policy).items()}
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}

    fresh, fresh_optimizer, fresh_scheduler = train_a_little(model_path)  # different weights and moments
    fresh_optimizer.param_groups[0]["lr"] = 123.0
    resumed = PromptDataset(rows, shuffle=True, seed=3, epochs=0)
    run = Checkpointer(tmp_path / "ckpt", runtime).load(checkpointer.latest(), fresh, fresh_optimizer)
    fresh_scheduler.load_state_dict(run["scheduler"])
    resumed.load_state_dict(run["dataset"])

    assert checkpointer.latest() == path and run["step"] == 2
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    assert [next(resumed).id for _ in range(4)] == expected_rows
    for name, tensor in full_state_dict(fresh).items():
        assert torch.equal(tensor, weights[name]), name
    for key, value in fresh_optimizer.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(moments[key])), key
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_only_the_newest_checkpoints_are_kept(model_path: str, tmp_path: Path) -> None:
    runtime = init_distributed(LearnerConfig())
    policy, optimizer, _ = train_a_little(model_path)
    checkpointer = Checkpointer(tmp_path, runtime, keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, policy, optimizer, {"step": step})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert checkpointer.latest() == tmp_path / "step-00000003"


def test_hf_export_loads_with_auto_classes(model_path: str, tmp_path: Path) -> None:
    runtime = init_distributed(LearnerConfig())
    policy, _, _ = train_a_little(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    out = export_hf(policy, tokenizer, tmp_path / "hf", runtime)
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    trained = full_state_dict(policy)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert AutoTokenizer.from_pretrained(out).encode("3+4=", add_special_tokens=False) == tokenizer.encode(
        "3+4=", add_special_tokens=False
    )
    ids = torch.tensor([tokenizer.encode("3+4=", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)


def test_a_bf16_model_exports_bf16_in_shards_with_an_index(tmp_path: Path) -> None:
    source = build_demo_model(tmp_path / "bf16", hidden_size=256, num_layers=4, intermediate_size=768)  # ~9 MB
    model = AutoModelForCausalLM.from_pretrained(source)
    model.to(torch.bfloat16).save_pretrained(source)  # a checkpoint saved in bfloat16, as most are
    runtime = init_distributed(LearnerConfig())
    policy = load_policy(str(source), runtime)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # master weights
    out = export_hf(policy, AutoTokenizer.from_pretrained(source), tmp_path / "hf", runtime, max_shard_mb=1)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    master = full_state_dict(policy)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, master[name].to(torch.bfloat16)), name


def test_slipstream_export_turns_a_checkpoint_into_the_same_hf_folder(model_path: str, tmp_path: Path) -> None:
    from slipstream.cli import main

    runtime = init_distributed(LearnerConfig())
    policy, optimizer, _ = train_a_little(model_path)
    trained = torch.nn.ModuleDict({"policy": policy})  # what the learner checkpoints
    Checkpointer(tmp_path / "checkpoints", runtime).save(2, trained, optimizer, {"step": 2})
    assert main(["export", str(tmp_path / "checkpoints"), str(tmp_path / "hf"), "--model", model_path]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    master = full_state_dict(policy)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, master[name]), name
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():  # the exported model computes what the trained policy computes
        assert torch.allclose(loaded(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(SystemExit, match="holds no dcp/ folder"):
        main(["export", str(tmp_path), str(tmp_path / "x"), "--model", model_path])
