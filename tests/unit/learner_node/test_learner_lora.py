"""[model.lora]: only the adapters train (FSDP2, one rank here; two in tests/integration/learner_node), the engines get
merged weights under the base model's names, checkpoints hold the adapters, the export is PEFT's adapter folder (and,
on request, the merged model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from transformers import AutoModelForCausalLM, AutoTokenizer

from bus.settings import ConfigError, LoraConfig, load_settings
from learner_node import node
from learner_node.batching import collate
from learner_node.checkpoint import Checkpointer, export_hf
from learner_node.config import LearnerConfig, LearnerSettings
from learner_node.lora import peft_config
from learner_node.model import (
    build_optimizer,
    build_scheduler,
    full_state_dict,
    init_distributed,
    load_policy,
    policy_weights,
)
from learner_node.trainer import Trainer
from slipstream.demo_model import build_demo_model

from .test_learner_trainer import groups

LORA = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_demo_model(tmp_path_factory.mktemp("demo")))


def lora_trainer(model_path: str, lora: LoraConfig = LORA, **overrides: object) -> Trainer:
    cfg = LearnerConfig(**{"lr": 5e-2, "max_new_tokens": 8, **overrides})  # type: ignore[arg-type]
    runtime = init_distributed(cfg)
    policy = load_policy(model_path, runtime, adapters=peft_config(lora),
                         activation_checkpointing=cfg.activation_checkpointing)  # fmt: skip
    optimizer = build_optimizer(cfg, [policy])
    return Trainer(cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer))


def greedy(model: torch.nn.Module, prompt: list[int], steps: int = 6) -> list[int]:
    """Greedy tokens by full forwards (no KV cache): works for the sharded PeftModel and a plain HF model alike."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def trained_a_little(model_path: str, steps: int = 3) -> Trainer:
    trainer = lora_trainer(model_path)
    for step in range(steps):
        trainer.step(groups(seed=step))
    return trainer


def test_only_the_adapters_train(model_path: str) -> None:
    trainer = lora_trainer(model_path, activation_checkpointing=True)
    policy = trainer.policy
    base = AutoModelForCausalLM.from_pretrained(model_path)
    adapters = {n for n, p in policy.named_parameters() if "lora_" in n}
    assert adapters and {n for n, p in policy.named_parameters() if p.requires_grad} == adapters
    assert len(trainer.params) == len(adapters)  # the optimizer steps the adapters only
    # 2 layers x (q, v, down) x (A, B) adapters, nothing else: the targets were honoured.
    assert len(adapters) == 12 and all(any(t in n for t in ("q_proj", "v_proj", "down_proj")) for n in adapters)
    ids = torch.tensor([PROMPT])
    policy(input_ids=ids).logits.square().mean().backward()
    assert all(p.grad is None for n, p in policy.named_parameters() if n not in adapters)
    assert all(p.grad is not None for n, p in policy.named_parameters() if n in adapters)
    trainer.optimizer.zero_grad(set_to_none=True)
    before = full_state_dict(policy)
    before = {k: v.clone() for k, v in before.items()}
    metrics = trainer.step(groups())
    after = full_state_dict(policy)
    assert metrics["grad_norm"] > 0
    for name, value in after.items():
        if ".lora_" not in name:
            assert torch.equal(value, before[name]), name  # the base is frozen
        elif ".lora_B." in name:
            assert not torch.equal(value, before[name]), name  # B starts at 0 and takes the first step's gradient
    # The base weights are still the checkpoint's: the merge is all that differs from the base model.
    merged = policy_weights(policy)
    for name, value in base.state_dict().items():
        if name in merged and not any(t in name for t in ("q_proj", "v_proj", "down_proj")):
            assert torch.equal(merged[name], value), name


def test_the_merged_weights_are_the_base_models_names_and_shapes_and_compute_the_policy(model_path: str) -> None:
    trainer = trained_a_little(model_path)
    policy = trainer.policy
    base = load_policy(model_path, trainer.runtime, trainable=False)
    merged = policy_weights(policy)
    base_state = full_state_dict(base)
    assert {k: tuple(v.shape) for k, v in merged.items()} == {k: tuple(v.shape) for k, v in base_state.items()}
    assert any(not torch.equal(merged[k], base_state[k]) for k in merged)  # training moved the merged weights
    plain = AutoModelForCausalLM.from_pretrained(model_path)
    plain.load_state_dict(merged)  # strict: exactly the base model's keys
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)
    assert greedy(plain, PROMPT) == greedy(policy, PROMPT)


def test_a_lora_policy_is_its_own_reference_the_base_model(model_path: str) -> None:
    # No reference model given. Micro-batches of 3: each backward reshards, and the next forward gathers the adapters
    # again with FSDP2's requires_grad flag, which the reference passes must have left on.
    trainer = lora_trainer(model_path, beta=0.1, micro_batch_size=3)
    base = load_policy(model_path, trainer.runtime, trainable=False)
    batch = collate([t for unit in groups(seed=9) for t in unit.samples])

    def logprobs(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return trainer._logprobs(model, batch)[0]

    for step in range(4):
        with torch.no_grad():
            assert torch.equal(trainer._reference_logprobs(batch), logprobs(base)), step
        adapters = {n: p.detach().clone() for n, p in full_state_dict(trainer.policy).items() if ".lora_B." in n}
        metrics = trainer.step(groups(seed=step))
        moved = full_state_dict(trainer.policy)
        # Every step still trains every adapter: the reference passes leave them trainable under FSDP2.
        assert all(not torch.equal(moved[n], value) for n, value in adapters.items()), step
    assert metrics["kl"] > 0
    assert not torch.allclose(logprobs(trainer.policy), logprobs(base), atol=1e-3)  # the policy left its base
    assert torch.equal(trainer._reference_logprobs(batch), logprobs(base))  # the reference did not


@pytest.mark.parametrize(("lora", "models"), [(LORA, 1), (None, 2)])
def test_a_lora_learner_loads_no_reference_model(
    model_path: str, monkeypatch: pytest.MonkeyPatch, lora: LoraConfig | None, models: int
) -> None:
    loads: list[str] = []

    def counted_load_policy(path: str, *args: object, **kwargs: object) -> torch.nn.Module:
        loads.append(path)
        return load_policy(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(node, "load_policy", counted_load_policy)
    learner = node.LearnerNode.__new__(node.LearnerNode)  # only its model: no bus, no telemetry
    learner.settings = LearnerSettings(model={"path": model_path, "lora": lora}, learner={"beta": 0.1})
    learner.cfg, learner.pad_id = learner.settings.learner, 0
    learner.runtime = init_distributed(learner.cfg)
    learner._build_model()
    assert len(loads) == models  # the policy, and without LoRA the reference
    assert (learner.reference is None) == (lora is not None)
    assert learner.trainer.step(groups())["kl"] == 0  # the step's pre-pass took reference logprobs: policy = base


def test_modules_to_save_train_the_tied_embedding_and_head_in_full(model_path: str, tmp_path: Path) -> None:
    lora = LoraConfig(rank=4, alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    trainer = lora_trainer(model_path, lora, beta=0.1)
    plain = AutoModelForCausalLM.from_pretrained(model_path)
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".lora_" not in n} == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight"
    }
    for step in range(2):
        trainer.step(groups(seed=step))
    merged = policy_weights(trainer.policy)
    # The merge holds the trained copy under the base names; the output head is still the embedding (tied).
    assert not torch.equal(merged["model.embed_tokens.weight"], plain.state_dict()["model.embed_tokens.weight"])
    plain.load_state_dict(merged)  # strict: exactly the base model's keys
    assert torch.equal(plain.lm_head.weight, merged["model.embed_tokens.weight"])
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, trainer.policy(input_ids=ids).logits, atol=1e-5)
        batch = collate([t for unit in groups(seed=9) for t in unit.samples])
        base = load_policy(model_path, trainer.runtime, trainable=False)
        assert torch.equal(trainer._reference_logprobs(batch), trainer._logprobs(base, batch)[0])  # originals
    path = Checkpointer(tmp_path / "ckpt", trainer.runtime).save(
        2, torch.nn.ModuleDict({"policy": trainer.policy}), trainer.optimizer, {"step": 2}
    )
    saved = {
        k for k in FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata if k.startswith("model.")
    }
    copies = {
        f"model.policy.base_model.model.{m}.modules_to_save.default.weight" for m in ("model.embed_tokens", "lm_head")
    }
    assert {k for k in saved if ".lora_" not in k} == copies  # the trained copy (and its tied alias), no original
    out = export_hf(trainer.policy, AutoTokenizer.from_pretrained(model_path), tmp_path / "hf", trainer.runtime)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), out)
    assert greedy(adapted.eval(), PROMPT) == greedy(trainer.policy, PROMPT)


def test_a_checkpoint_holds_the_adapters_and_resumes_them(model_path: str, tmp_path: Path) -> None:
    trainer = trained_a_little(model_path)
    trained = torch.nn.ModuleDict({"policy": trainer.policy})
    path = Checkpointer(tmp_path / "ckpt", trainer.runtime).save(3, trained, trainer.optimizer, {"step": 3})
    saved = set(FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata)
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert model_keys and all(".lora_" in k for k in model_keys)  # the adapters, not the frozen base
    assert (path / "adapter_config.json").exists()
    weights = {k: v.clone() for k, v in full_state_dict(trainer.policy).items()}
    moments = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}

    fresh = trained_a_little(model_path, steps=1)  # other adapters, other moments
    fresh_trained = torch.nn.ModuleDict({"policy": fresh.policy})
    Checkpointer(tmp_path / "ckpt", fresh.runtime).load(path, fresh_trained, fresh.optimizer)
    for name, tensor in full_state_dict(fresh.policy).items():
        assert torch.equal(tensor, weights[name]), name
    for key, value in fresh.optimizer.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(moments[key])), key
    # A LoRA checkpoint does not load into a fully trained policy: DCP names the weight it lacks.
    full = load_policy(model_path, trainer.runtime)
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: model.policy.model.embed"):
        Checkpointer(tmp_path / "ckpt", trainer.runtime).load(path, torch.nn.ModuleDict({"policy": full}),
                                                               build_optimizer(LearnerConfig(), [full]))  # fmt: skip


def test_the_export_is_an_adapter_folder_and_on_request_the_merged_model(model_path: str, tmp_path: Path) -> None:
    trainer = trained_a_little(model_path)
    policy = trainer.policy
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    out = export_hf(policy, tokenizer, tmp_path / "hf", trainer.runtime, merged=True)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()  # the folder holds the adapters, not a copy of the base
    expected = greedy(policy, PROMPT)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = policy(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True)
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, logits, atol=1e-5)
        assert torch.allclose(merged(input_ids=ids).logits, logits, atol=1e-5)
    assert greedy(adapted, PROMPT) == expected == greedy(merged, PROMPT)
    assert AutoTokenizer.from_pretrained(out).encode("3+4=") == tokenizer.encode("3+4=")


def test_slipstream_export_rebuilds_the_adapters_of_a_lora_checkpoint(model_path: str, tmp_path: Path) -> None:
    from slipstream.cli import main

    trainer = trained_a_little(model_path)
    trained = torch.nn.ModuleDict({"policy": trainer.policy})
    Checkpointer(tmp_path / "checkpoints", trainer.runtime).save(3, trained, trainer.optimizer, {"step": 3})
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "checkpoints"), str(out), "--model", model_path, "--merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True)
    assert greedy(merged, PROMPT) == greedy(trainer.policy, PROMPT)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), out)
    assert greedy(adapted.eval(), PROMPT) == greedy(trainer.policy, PROMPT)


def test_lora_settings_are_bounded_and_name_the_field(tmp_path: Path) -> None:
    toml = tmp_path / "lora.toml"
    toml.write_text('[model]\npath = "m"\n\n[model.lora]\nrank = 64\nalpha = 128\ntarget_modules = ["q_proj"]\n')
    settings = load_settings(LearnerSettings, toml, [])
    assert settings.model.lora == LoraConfig(rank=64, alpha=128, target_modules=["q_proj"])
    assert load_settings(LearnerSettings, None, []).model.lora is None  # no section: full fine-tuning
    for override, message in [
        (["--model.lora.rank", "0"], "model.lora.rank: Input should be greater than or equal to 1"),
        (["--model.lora.dropout", "1"], "model.lora.dropout: Input should be less than 1"),
        (["--model.lora.target_modules", "[]"], "model.lora.target_modules: Value error, must name at least one"),
        (["--model.lora.target_modules", '["q proj"]'], "are not module names"),
        (["--model.lora.ranks", "8"], "model.lora.ranks: Extra inputs are not permitted"),
        (["--model.lora.modules_to_save", '["embed tokens"]'], "model.lora.modules_to_save: .*are not module names"),
        (["--model.lora.modules_to_save", json.dumps([f"m{i}" for i in range(9)])], "should have at most 8 items"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_settings(LearnerSettings, toml, override)


def test_targets_that_match_no_linear_layer_are_refused(model_path: str) -> None:
    runtime = init_distributed(LearnerConfig())
    with pytest.raises(ValueError, match="model.lora.target_modules: .*not found"):
        load_policy(model_path, runtime, adapters=peft_config(LoraConfig(target_modules=["no_such_proj"])))
    with pytest.raises(ValueError, match="model.lora.target_modules: only linear layers.*Embedding"):
        load_policy(model_path, runtime, adapters=peft_config(LoraConfig(target_modules=["embed_tokens"])))
    with pytest.raises(ValueError, match=r"model.lora.modules_to_save: \['no_such_norm'\] match no module"):
        load_policy(model_path, runtime, adapters=peft_config(LoraConfig(modules_to_save=["norm", "no_such_norm"])))


def test_adapter_dropout_applies_only_when_asked(model_path: str) -> None:
    runtime = init_distributed(LearnerConfig())
    ids = torch.tensor([PROMPT])
    for dropout, differ in [(0.0, False), (0.5, True)]:
        policy = load_policy(model_path, runtime, adapters=peft_config(LoraConfig(rank=4, dropout=dropout)))
        with torch.no_grad():
            for name, p in policy.named_parameters():  # before any forward (FSDP2 holds the sharded parameters)
                if ".lora_B." in name:
                    p.normal_(std=0.5)  # with B = 0 the adapters' input, dropped or not, changes nothing
            first, second = (policy(input_ids=ids).logits for _ in range(2))
        assert (not torch.equal(first, second)) == differ, dropout
        assert not any(m.training for n, m in policy.named_modules() if "lora_dropout" not in n)  # the rest: eval


def test_a_learner_without_lora_never_imports_peft() -> None:
    # Importing peft costs ~1.5 s per learner process; only [model.lora] may pay it.
    code = "import sys, learner_node.node, learner_node.checkpoint; print('peft' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"
