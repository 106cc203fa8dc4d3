"""Checkpoints (torch.distributed.checkpoint) and the HF export of the trained policy.

Layout under `<run.output_dir>/checkpoints`:

    step-00000040/dcp/            model (policy + value head) and optimizer, sharded, written by every rank (DCP)
    step-00000040/state-rank0.pt  this rank's RNG (torch, CUDA, numpy, random) and the run's state: step, policy
                                  version, scheduler, admission (dataset position, task counters), ...
    latest                        the name of the newest complete checkpoint

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
from typing import Any

import numpy as np
import structlog
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from transformers import AutoModelForCausalLM

from learner_node.model import Runtime, full_state_dict
from telemetry.metrics import LEARNER_CHECKPOINT_DURATION

log = structlog.get_logger(__name__)

LATEST = "latest"


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
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "dcp"))
        torch.save({"run": state, "rng": rng_state()}, path / f"state-rank{self.runtime.rank}.pt")
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
        model_state, optim_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
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


def export_hf(policy: nn.Module, tokenizer: Any, out_dir: str | Path, runtime: Runtime) -> Path:
    """Write the policy as an HF folder (`save_pretrained`: config, safetensors, tokenizer, generation config) that
    `AutoModelForCausalLM.from_pretrained` and SGLang load. Collective (the weights are gathered); rank 0 writes."""
    state = full_state_dict(policy)
    out = Path(out_dir)
    if runtime.rank == 0:
        # The loaded policy's own config and generation config: nothing is read again from model_path (a Hub id
        # would be fetched twice, a changed local folder would not match the weights).
        config = copy.deepcopy(policy.config)
        config.use_cache = True  # the learner turned it off for training; generation wants it
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state)
        model.generation_config = copy.deepcopy(policy.generation_config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        log.info("HF export written", path=str(out))
    _barrier(runtime)
    return out


def _barrier(runtime: Runtime) -> None:
    if runtime.world > 1:
        dist.barrier()
