"""One learner rank for test_learner_ranks.py: FSDP2 over gloo, a few trainer steps on a fixed batch, results to JSON.

python ranks_worker.py MODEL_PATH OUT_JSON [budgeted|lora]    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the env)

budgeted: activation checkpointing and micro-batches by a token budget, which must not change the steps.
lora: rank-4 LoRA adapters on every linear layer train alone; the checksums are of the merged weights (base names).
The reference is the policy with its adapters disabled (no second model); after the steps, its logprobs on a batch
are compared with a plain base model's.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bus.schema import Trajectory
from bus.settings import LoraConfig
from learner_node.batching import collate
from learner_node.config import LearnerConfig
from learner_node.groups import Unit
from learner_node.lora import peft_config
from learner_node.model import build_optimizer, build_scheduler, init_distributed, load_policy, policy_weights
from learner_node.trainer import Trainer

STEPS = 3


def batch(step: int) -> list[Unit]:
    """Five groups of uneven sizes and lengths (the ranks get unequal rows), the same on every rank."""
    rng = np.random.default_rng(step)
    units = []
    for g, size in enumerate([2, 5, 3, 4, 2]):
        members = []
        for i in range(size):
            response = rng.integers(4, 90, rng.integers(1, 7)).astype(np.int32)
            members.append(
                Trajectory(
                    id=f"s{step}g{g}t{i}",
                    group_id=f"g{g}",
                    producer="test",
                    prompt_ids=rng.integers(4, 90, rng.integers(2, 8)).astype(np.int32),
                    response_ids=response,
                    behavior_logprobs=np.full(len(response), -4.6, np.float32),
                    reward=float(rng.random()),
                )  # fmt: skip
            )
        units.append(Unit(f"g{g}", members))
    return units


def run(model_path: str, mode: str | None) -> dict:
    cut = {"max_tokens_per_micro_batch": 40, "activation_checkpointing": True} if mode == "budgeted" else {}
    cfg = LearnerConfig(
        lr=1e-2, micro_batch_size=3, adam_epsilon=1e-2, beta=0.05, loss_agg="seq-mean-token-mean", **cut
    )
    runtime = init_distributed(cfg)
    adapters = peft_config(LoraConfig(rank=4, alpha=8)) if mode == "lora" else None
    policy = load_policy(model_path, runtime, activation_checkpointing=cfg.activation_checkpointing, adapters=adapters)
    reference = load_policy(model_path, runtime, trainable=False) if adapters is None else None
    optimizer = build_optimizer(cfg, [policy])
    trainer = Trainer(cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer), reference=reference)
    trained = [p for p in policy.parameters() if p.requires_grad]
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in trained)
    total = sum(p.numel() for p in trained)
    metrics = [trainer.step(batch(step)) for step in range(STEPS)]
    weights = policy_weights(policy)
    result = {
        "rank": runtime.rank,
        "world": runtime.world,
        "local_numel": local,
        "total_numel": total,
        "metrics": metrics,
        "checksums": {k: float(v.double().sum()) for k, v in weights.items()},
    }
    if adapters is not None:
        base = load_policy(model_path, runtime, trainable=False)
        rows = collate([t for unit in batch(STEPS) for t in unit.samples]).to(runtime.device)
        with torch.no_grad():
            reference_logprobs = trainer._reference_logprobs(rows)
            base_logprobs = trainer._logprobs(base, rows)[0]
            policy_logprobs = trainer._logprobs(policy, rows)[0]
        result["reference_to_base"] = float((reference_logprobs - base_logprobs).abs().max())
        result["policy_to_base"] = float((policy_logprobs - base_logprobs).abs().max())
    return result


if __name__ == "__main__":
    torch.manual_seed(0)
    result = run(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else None)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    # No rank tears gloo down while another may still use it: a worker once died at the end with "terminate called
    # without an active exception" (exit -6) in a fresh-clone run of the suite.
    dist.barrier()
    dist.destroy_process_group()
