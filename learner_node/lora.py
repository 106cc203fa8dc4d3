"""LoRA adapters (PEFT) on the learner's policy: `[model.lora]` trains low-rank A/B pairs, the base stays frozen.

    adapters = peft_config(settings.model.lora)           # PEFT's LoraConfig from the [model.lora] section
    policy = load_policy(path, runtime, adapters=adapters) # a PeftModel, sharded with FSDP2 like any policy
    merged_weights(policy, full_state_dict(policy))        # W + scaling * B @ A under the base model's names
    with adapters_disabled(policy): policy(...)            # the base model (the reference), from the same weights

The engines (the torch engine, SGLang through update_weights_from_distributed) are sent the merged weights, named and
shaped as the base model's state dict, so that they load them as they load a full fine-tune's weights. The merge is
computed from the gathered state dict, out of place: the trained module (and, with one rank, the live base tensors
that the gathered state dict shares) is never changed. Only adapters on linear layers are accepted (PEFT's
`lora.Linear`, without DoRA or a LoRA bias): their merge is `transpose(B @ A, fan_in_fan_out) * scaling`, the formula
of PEFT's `Linear.get_delta_weight`.

The reference model (`beta > 0`, DPO) of a LoRA run is the policy itself with its adapters switched off (PEFT's
`disable_adapter()`, as TRL does for PEFT models): the frozen base weights are the initial policy, so no second copy
of the model is loaded or sharded.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel

from bus.settings import LoraConfig

# peft is imported where adapters are used, not here: importing it takes ~1.5 s, paid by every learner process
# (and every test that starts one) that has no [model.lora].
if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

ADAPTER = "default"  # PEFT's name of the one adapter a policy has
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's own parameter names
BASE_LAYER = ".base_layer"  # what a wrapped layer's own weight and bias gain in their names
SAVED = f".modules_to_save.{ADAPTER}."  # in the names of a modules_to_save layer's trained copy
ORIGINAL = ".original_module."  # in the names of a modules_to_save layer's frozen original


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    """PEFT's LoraConfig for the `[model.lora]` section (a causal LM, no bias trained)."""
    from peft import LoraConfig as PeftLoraConfig

    # ensure_weight_tying: a tied output head trains with its embedding's copy (without it PEFT would train the
    # embedding alone and leave the head the frozen original: an untied model that the tied base cannot hold).
    return PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None, ensure_weight_tying=bool(cfg.modules_to_save),
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip


def saved_peft_config(folder: str | Path) -> PeftLoraConfig:
    """The adapters' PEFT LoraConfig saved in `folder` (its adapter_config.json)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig.from_pretrained(str(folder))


def add_adapters(model: PreTrainedModel, adapters: PeftLoraConfig) -> PeftModel:
    """`model` with `adapters` injected (PEFT's `get_peft_model`: base weights frozen, A random, B zero, so the policy
    starts as the base model; `modules_to_save` get trained copies of their weights). A ValueError names
    `model.lora.target_modules` when they match no linear layer, or something else than linear layers, and
    `model.lora.modules_to_save` when one of them matches no module."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    try:
        wrapped = get_peft_model(model, adapters)
    except ValueError as exc:  # PEFT's "Target modules ... not found in the base model"
        raise ValueError(f"model.lora.target_modules: {exc}") from exc
    others = sorted({type(m).__name__ for m in lora_layers(wrapped).values() if type(m) is not LoraLinear})
    if others:
        raise ValueError(f"model.lora.target_modules: only linear layers take adapters here; they also match {others}")
    saved = saved_modules(wrapped)
    # PEFT skips a name that matches nothing, silently: the run would train less than it was told to.
    unmatched = [n for n in adapters.modules_to_save or () if not any(m == n or m.endswith(f".{n}") for m in saved)]
    if unmatched:
        raise ValueError(f"model.lora.modules_to_save: {unmatched} match no module of the model")
    return wrapped


def enable_adapter_dropout(model: PeftModel) -> None:
    """Put the adapters' dropout in training mode (the learner keeps the rest of the policy in eval mode: no dropout
    anywhere else), so that `[model.lora] dropout` applies to the learner's forwards."""
    for layer in lora_layers(model).values():
        layer.lora_dropout.train()


def is_lora(model: nn.Module) -> bool:
    """Whether `model` is a policy with adapters (never, while nothing has imported peft)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


@contextmanager
def adapters_disabled(model: PeftModel) -> Iterator[None]:
    """Within the block `model` computes its base model: PEFT's `disable_adapter()`, for FSDP2-sharded models.

    PEFT switches the adapters' `requires_grad` off on entry and back on at exit, on the parameters the modules hold
    at that moment. FSDP2 keeps the flag on its sharded parameters and copies it to the gathered ones on each gather,
    but a forward can leave the gathered ones in the modules (one rank, the root unit: not resharded after forward).
    Flipped there only, the sharded flag would stay off, and the next gather (the second micro-batch's forward) would
    hand out frozen adapters; so every unit is resharded before PEFT flips the flag, on entry and at exit."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.reshard()
    with model.disable_adapter():
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The layers holding adapters, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def saved_modules(model: nn.Module) -> list[str]:
    """The names of the modules trained in full (PEFT's `modules_to_save` wrappers), as the base model names them."""
    from peft.utils.other import ModulesToSaveWrapper

    return [base_name(name) for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def merged_weights(model: PeftModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged: `state` (the PeftModel's full state dict, e.g.
    `full_state_dict(model)`) renamed to the base model's names, each adapted weight replaced by a new tensor
    W + scaling * B @ A, the adapters' own tensors left out; a module trained in full (`modules_to_save`) is its
    trained copy, its frozen original left out. `state` is not changed."""
    from peft.utils.other import transpose

    merged: dict[str, torch.Tensor] = {}
    adapter_keys: set[str] = set()
    for name, layer in lora_layers(model).items():
        a = state[f"{name}.lora_A.{ADAPTER}.weight"]
        b = state[f"{name}.lora_B.{ADAPTER}.weight"]
        adapter_keys.update(f"{name}.{key}" for key in layer.state_dict() if not key.startswith("base_layer."))
        weight = state[f"{name}{BASE_LAYER}.weight"]
        delta = transpose(b @ a, layer.fan_in_fan_out) * layer.scaling[ADAPTER]
        merged[base_name(f"{name}{BASE_LAYER}.weight")] = weight + delta.to(weight.dtype)
    for key, value in state.items():
        if key not in adapter_keys and ORIGINAL not in key:
            merged.setdefault(base_name(key), value)
    return merged


def base_name(key: str) -> str:
    """A PeftModel parameter (or module) name as the base model names it."""
    return key.removeprefix(PEFT_PREFIX).replace(f"{BASE_LAYER}.", ".").replace(SAVED, ".")
