"""Checkpoints (torch.distributed.checkpoint) and the HF export of the trained policy.

Layout under `<run.output_dir>/checkpoints`:

    step-00000040/dcp/            model (policy + value head) and optimizer, sharded, written by every rank (DCP)
    step-00000040/state-rank0.pt  this rank's RNG (torch, CUDA, numpy, random) and the run's state: step, policy
                                  version, scheduler, admission (dataset position, task counters), ...
    step-00000040/adapter_config.json   a LoRA run's adapters (PEFT's config), to rebuild them from
    latest                        the name of the newest complete checkpoint

Only trained weights are saved (`TRAINED`: frozen ones are left out), so a LoRA run's checkpoint holds its adapters
and their optimizer state, not the base model, which `model.path` gives again on resume.

`latest` is replaced atomically by rank 0 only after every rank finished writing, so a learner killed while saving
resumes from the previous complete checkpoint. A resumed run loads the same world size's files; a rank without its
own state file (the world grew) takes rank 0's run state and keeps its fresh RNG.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from transformers import AutoModelForCausalLM

from bus.settings import HubSource
from learner_node.lora import ADAPTER, is_lora, merged_weights, saved_peft_config
from learner_node.model import Runtime, full_state_dict
from telemetry.metrics import LEARNER_CHECKPOINT_DURATION

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig  # imported only with [model.lora] (learner_node.lora)

log = structlog.get_logger(__name__)

LATEST = "latest"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name
# Checkpoints hold what trains: frozen weights (a LoRA run's base) come from model.path. Not strict on load: the
# frozen keys are missing by design, `_check_only_frozen_missing` refuses any other difference.
TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def rng_state() -> dict[str, Any]:
    """Every random generator this process draws from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and loads checkpoints under `root` (see the module docstring). Every rank calls save and load."""

    def __init__(self, root: str | Path, runtime: Runtime, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep: must be >= 1, got {keep}")
        self.root, self.runtime, self.keep = Path(root), runtime, keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        """Write checkpoint `step`: `model` (a module holding every trained module) and `optimizer` sharded, plus
        `state` (picklable run state) and this rank's RNG. Returns its folder once every rank is done."""
        started = time.monotonic()
        path = self.root / f"step-{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        model_state, optim_state = trained_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "dcp"))
        torch.save({"run": state, "rng": rng_state()}, path / f"state-rank{self.runtime.rank}.pt")
        adapters = adapter_config(model)
        if adapters is not None and self.runtime.rank == 0:
            adapters.save_pretrained(str(path))  # adapter_config.json: what `export_checkpoint` rebuilds them from
        _barrier(self.runtime)
        if self.runtime.rank == 0:
            temporary = self.root / f".{LATEST}.tmp"
            temporary.write_text(path.name)
            os.replace(temporary, self.root / LATEST)
            self._prune(path)
        _barrier(self.runtime)
        seconds = time.monotonic() - started
        LEARNER_CHECKPOINT_DURATION.observe(seconds)
        log.info("checkpoint saved", step=step, path=str(path), seconds=round(seconds, 3))
        return path

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load `path` into `model` and `optimizer`, restore this rank's RNG; returns the saved run state."""
        model_state, optim_state = trained_state_dict(model, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=str(path / "dcp"))
        keys = set_state_dict(
            model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"], options=TRAINED
        )
        _check_only_frozen_missing(model, keys)
        own = path / f"state-rank{self.runtime.rank}.pt"
        saved = torch.load(own if own.exists() else path / "state-rank0.pt", weights_only=False)
        if own.exists():
            set_rng_state(saved["rng"])
        else:
            log.warning("no RNG state for this rank in the checkpoint (world size changed?)", path=str(path))
        log.info("checkpoint loaded", path=str(path))
        return saved["run"]

    def _prune(self, newest: Path) -> None:
        """Delete all but the `keep` newest checkpoints."""
        kept = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in kept[: -self.keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)


def export_hf(
    policy: nn.Module, tokenizer: Any, out_dir: str | Path, runtime: Runtime, *, max_shard_mb: int = 5000,
    merged: bool = False,
) -> Path:  # fmt: skip
    """Write the policy as an HF folder (`save_pretrained`: config, safetensors, tokenizer, generation config) that
    `AutoModelForCausalLM.from_pretrained` and SGLang load, in the dtype of the checkpoint it was loaded from (a
    bfloat16 model exports bfloat16; the learner's float32 master weights are rounded once, here), in safetensors
    shards of at most `max_shard_mb` with an index past that. Collective (the weights are gathered); rank 0 writes.

    A LoRA policy writes PEFT's adapter folder instead (adapter_config.json naming the base model, the float32
    adapters in adapter_model.safetensors, the tokenizer: `PeftModel.from_pretrained(base, out)` loads it) and, with
    `merged`, the merged full model as above in `out/merged`."""
    state = full_state_dict(policy)
    out = Path(out_dir)
    if runtime.rank == 0:
        if is_lora(policy):
            # PEFT keeps the adapters' keys of the gathered state. No embedding layers: none is adapted (lora.py
            # refuses it), and PEFT's "auto" would look the base model up on the Hub to compare vocabulary sizes.
            policy.save_pretrained(str(out), state_dict=state, save_embedding_layers=False)
            tokenizer.save_pretrained(out)
            if merged:
                _save_full(policy, merged_weights(policy, state), tokenizer, out / "merged", max_shard_mb)
        else:
            _save_full(policy, state, tokenizer, out, max_shard_mb)
        log.info("HF export written", path=str(out), adapters=is_lora(policy), merged=merged and is_lora(policy))
    _barrier(runtime)
    return out


def _save_full(policy: nn.Module, state: dict[str, torch.Tensor], tokenizer: Any, out: Path, max_shard_mb: int) -> None:
    # The loaded policy's own config and generation config: nothing is read again from model_path (a Hub id would be
    # fetched twice, a changed local folder would not match the weights).
    dtype = getattr(policy, "source_dtype", torch.float32)
    config = copy.deepcopy(policy.config)
    config.use_cache = True  # the learner turned it off for training; generation wants it
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    model.generation_config = copy.deepcopy(policy.generation_config)
    model.save_pretrained(out, max_shard_size=f"{max_shard_mb}MB")
    tokenizer.save_pretrained(out)


def adapter_config(model: nn.Module) -> PeftLoraConfig | None:
    """The LoRA config of the policy in `model` (a policy, or a module holding one), or None without adapters."""
    policy = next((m for m in model.modules() if is_lora(m)), None)
    return policy.peft_config[ADAPTER] if policy is not None else None


def trained_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (sharded) model and optimizer state dicts of what trains: TRAINED's, less the tied aliases of frozen
    weights (`ignore_frozen_params` leaves e.g. a frozen embedding's `lm_head.weight` alias in)."""
    if optimizer is None:
        model_state, optim_state = get_model_state_dict(model, options=TRAINED), {}
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    frozen = _frozen_names(model)
    return {k: v for k, v in model_state.items() if k not in frozen}, optim_state


def _frozen_names(model: nn.Module) -> set[str]:
    """Every name of a frozen parameter, tied aliases included."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _check_only_frozen_missing(model: nn.Module, keys: Any) -> None:
    """A checkpoint holds the trained weights only (TRAINED): the frozen ones may be missing from it, nothing else."""
    frozen = _frozen_names(model)
    missing = [k for k in keys.missing_keys if k not in frozen]
    if missing or keys.unexpected_keys:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {keys.unexpected_keys}")


def _barrier(runtime: Runtime) -> None:
    if runtime.world > 1:
        dist.barrier()


def export_checkpoint(
    checkpoint: str | Path, model_path: str, out_dir: str | Path, *, source: HubSource | None = None,
    max_shard_mb: int = 5000, merged: bool = False,
) -> Path:  # fmt: skip
    """The policy of a DCP checkpoint (`checkpoint`: a step-N folder, or a checkpoints folder: its latest) as an HF
    folder, like the learner's own export. `model_path` (the run's `model.path`) gives the architecture, the
    tokenizer and the dtype; the weights are the checkpoint's. A LoRA run's checkpoint (its adapter_config.json)
    exports the adapter folder, and with `merged` the merged model too (`export_hf`). Runs as a world of one on CPU,
    in this process."""
    from transformers import AutoTokenizer

    from bus.settings import load_pretrained
    from learner_node.config import LearnerConfig
    from learner_node.model import init_distributed, load_policy

    path = Path(checkpoint)
    if (path / LATEST).exists():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "dcp").is_dir():
        raise FileNotFoundError(f"checkpoint: {path} holds no dcp/ folder (a step-N folder of a learner's checkpoints)")
    source = source or HubSource()
    runtime = init_distributed(LearnerConfig(device="cpu"))
    adapters = saved_peft_config(path) if (path / ADAPTER_CONFIG).exists() else None
    policy = load_policy(model_path, runtime, source=source, adapters=adapters)  # trainable: TRAINED's keys
    trained = nn.ModuleDict({"policy": policy})  # the learner saves its trained modules under these names
    state = trained_state_dict(trained)[0]
    dcp.load({"model": state}, checkpoint_id=str(path / "dcp"))  # only the policy: the optimizer stays on disk
    _check_only_frozen_missing(trained, set_model_state_dict(trained, state, options=TRAINED))
    tokenizer = load_pretrained(AutoTokenizer, model_path, source)
    return export_hf(policy, tokenizer, out_dir, runtime, max_shard_mb=max_shard_mb, merged=merged)
