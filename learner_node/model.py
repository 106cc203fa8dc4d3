"""The learner's torch side: process group, FSDP2-sharded policy (+ value head, + frozen reference), optimizer,
learning-rate schedule, the forward pass that yields response logits, and full state dicts for broadcast/export.

Every rank calls everything here (FSDP2's all-gathers and reduce-scatters pair up across ranks). NCCL on GPU,
gloo on CPU; a single process (no torchrun) forms a world of one, so the code path is the same.

PPO's critic is a value head on the policy's last (normed) hidden state, `Linear(hidden, 1)`, trained with the
policy (shared trunk): no second model to shard, run or checkpoint, at the price of the value loss shaping the
trunk too (`learner.value_coef` weighs it). It is sharded with FSDP2 as a module of its own, so its parameter
names never mix with the policy's: the broadcast and the HF export carry the policy only.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from bus.settings import HubSource, load_pretrained
from learner_node.batching import Batch, response_logits
from learner_node.config import LearnerConfig
from learner_node.lora import add_adapters, enable_adapter_dropout, is_lora, merged_weights

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel  # peft is imported only with [model.lora] (learner_node.lora)

log = structlog.get_logger(__name__)

# FSDP2 warns about every view its root returns (the hidden states for the value head); nothing here edits them.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@dataclass(frozen=True)
class Runtime:
    """Where this rank runs: rank and world size of the default group, device, and forward precision."""

    rank: int
    world: int
    device: torch.device
    autocast: torch.dtype | None  # bf16 on GPU when enabled; None = float32

    def forward_context(self) -> torch.autocast:
        """Autocast for forward passes (a no-op context when `autocast` is None)."""
        enabled = self.autocast is not None
        return torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=enabled)


def init_distributed(cfg: LearnerConfig) -> Runtime:
    """Join the default process group: from torchrun's environment when set, else as a world of one."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("learner.device: 'cuda' asked for, but no GPU is visible")
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(seconds=cfg.collective_timeout_s)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Runtime(rank, world, device, torch.bfloat16 if use_cuda and cfg.bf16 else None)


def shard(module: nn.Module, runtime: Runtime) -> nn.Module:
    """FSDP2: each transformer block (the model's `_no_split_modules`) is one unit, the rest goes with the root.

    With one rank there is nothing to free after a forward (the shard is the whole tensor), so the blocks stay
    unsharded between forward and backward instead of being gathered twice. With bf16 (`runtime.autocast`, GPU),
    FSDP2's mixed precision gathers and computes with bf16 copies of the parameters and reduces gradients in
    float32 into the float32 master shards the optimizer steps."""
    block_names = set(getattr(module, "_no_split_modules", None) or ())
    options: dict[str, Any] = {"reshard_after_forward": runtime.world > 1}
    if runtime.autocast is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=runtime.autocast, reduce_dtype=torch.float32)
    for child in list(module.modules()):
        if child is not module and type(child).__name__ in block_names:
            fully_shard(child, **options)
    fully_shard(module, **options)
    return module


def load_policy(
    path: str,
    runtime: Runtime,
    *,
    trainable: bool = True,
    activation_checkpointing: bool = False,
    source: HubSource | None = None,
    adapters: PeftLoraConfig | None = None,
) -> PreTrainedModel | PeftModel:
    """The HF causal LM at `path` (a local folder, or a Hub id as `source` allows) in float32 (master weights),
    sharded, without dropout; frozen unless trainable. activation_checkpointing: each transformer block keeps only its
    inputs for the backward and recomputes the rest (`checkpoint_blocks`). adapters: a PeftModel whose LoRA adapters
    are the only trainable weights (`learner_node.lora`)."""
    model = load_pretrained(AutoModelForCausalLM, path, source or HubSource(), dtype=torch.float32)
    # The dtype the checkpoint was saved in (config.json), which the float32 load overwrote: the HF export's dtype.
    saved = load_pretrained(AutoConfig, path, source or HubSource())
    model.source_dtype = _dtype(getattr(saved, "dtype", None) or getattr(saved, "torch_dtype", None))
    model.to(runtime.device)
    model.config.use_cache = False  # training forwards never want a KV cache; generation passes its own
    if adapters is not None:
        model = add_adapters(model, adapters)
    model.eval()  # no dropout: the learner's logprobs must be the distribution the rollouts sampled from
    if adapters is not None and adapters.lora_dropout > 0:
        enable_adapter_dropout(model)  # asked for: only the adapters' inputs
    if not trainable:
        model.requires_grad_(False)
    elif activation_checkpointing:
        checkpoint_blocks(model)
    shard(model, runtime)
    return model


def _dtype(value: Any) -> torch.dtype:
    """A config's dtype (a torch.dtype or its name), float32 when it names none."""
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def checkpoint_blocks(module: nn.Module) -> int:
    """Activation checkpointing per transformer block (the model's `_no_split_modules`): each block's forward runs
    under non-reentrant `torch.utils.checkpoint`, so the backward recomputes its activations from its inputs.

    The block's `forward` is wrapped in place, not the module: parameter names (the weight broadcast's and the
    checkpoints' keys) stay the same, and FSDP2's hooks, which sit on the block's `__call__`, wrap the checkpointed
    forward as torchtitan's order (checkpoint inside the FSDP unit) does. HF's own gradient checkpointing would need
    `train()` mode, which turns dropout on. Returns the number of blocks wrapped."""
    block_names = set(getattr(module, "_no_split_modules", None) or ())
    wrapped = 0
    for child in module.modules():
        if child is not module and type(child).__name__ in block_names:
            child.forward = functools.partial(_checkpointed, child.forward)
            wrapped += 1
    if not wrapped:
        raise ValueError(f"learner.activation_checkpointing: {type(module).__name__} names no transformer block")
    return wrapped


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # no-grad passes (eval, proximal logprobs) keep nothing to recompute
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def build_value_head(policy: PreTrainedModel, runtime: Runtime) -> nn.Linear:
    """PPO's critic: Linear(hidden_size, 1) on the last hidden state, zero-initialised (V = 0 at the start)."""
    head = nn.Linear(policy.config.hidden_size, 1, device=runtime.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    fully_shard(head, reshard_after_forward=runtime.world > 1)
    return head


# Weight decay skips biases and norm scales, as transformers' Trainer does (`get_decay_parameter_names`, which
# TRL's trainers use): by name, or by shape (every 1-D parameter of a causal LM is a bias or a norm scale).
_NO_DECAY_NAME = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)", re.IGNORECASE)


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW's weight decay applies to the parameter `name`: matrices and embeddings yes, biases and
    LayerNorm/RMSNorm weights no."""
    return param.ndim >= 2 and not _NO_DECAY_NAME.search(name)


def build_optimizer(cfg: LearnerConfig, modules: list[nn.Module]) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `modules`: `weight_decay` on the matrices and embeddings, none on
    biases and norm weights (the same split as transformers' Trainer). Without weight decay the split changes
    nothing, so there is one parameter group: checkpoints written before the split still load (DCP keys the
    optimizer's state by group index)."""
    named = [(n, p) for m in modules for n, p in m.named_parameters() if p.requires_grad]
    if cfg.weight_decay == 0:
        groups = [{"params": [p for _, p in named], "weight_decay": 0.0}]
    else:
        groups = [
            {"params": [p for n, p in named if decays(n, p)], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ]
    # foreach explicitly: for FSDP2's DTensor parameters the default falls back to the per-tensor loop, slower.
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=betas, eps=cfg.adam_epsilon, foreach=True
    )


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """Multiplier of `lr` at optimizer step `step` (0-based): linear warmup, then constant or cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg: LearnerConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The `lr_factor` schedule, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def forward(
    model: nn.Module, batch: Batch, runtime: Runtime, *, temperature: float = 1.0, value_head: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response logits [B, T, V] (divided by `temperature`: the distribution the rollouts sampled from) and, with
    a value head, the values [B, T] of the states before each response token. Only the last T + 1 positions go
    through the LM head."""
    with runtime.forward_context():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=batch.response_length + 1,
            output_hidden_states=value_head is not None,
            use_cache=False,
        )
        logits = response_logits(out.logits, batch.response_length)
        values = None
        if value_head is not None:
            hidden = response_logits(out.hidden_states[-1], batch.response_length)
            values = value_head(hidden).squeeze(-1).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits, values


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on CPU on rank 0 ({} on the others). Collective: every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def policy_weights(policy: nn.Module) -> dict[str, torch.Tensor]:
    """What an engine loads: the policy's full weights under the base model's names, LoRA adapters merged in
    (`merged_weights`), on CPU on rank 0 ({} on the others). Collective: every rank must call it."""
    state = full_state_dict(policy)
    return merged_weights(policy, state) if state and is_lora(policy) else state
