"""One learner rank for test_learner_ranks.py's TRL parity test: FSDP2 over gloo, float64 policy, one trainer step
on the pickled units, the step's metrics to JSON and (rank 0) the full gradients, read before AdamW's step, to .pt.

python trl_parity_worker.py MODEL_PATH OUT_JSON UNITS_PICKLE   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""

from __future__ import annotations

import json
import pickle
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from learner_node.config import LearnerConfig
from learner_node.model import build_optimizer, build_scheduler, init_distributed, shard
from learner_node.trainer import Trainer

# The same settings as tests/unit/learner_node/test_trl_parity.py (token-mean = TRL dapo, group scaling).
CONFIG = {
    "lr": 1e-3, "max_grad_norm": None, "micro_batch_size": 2, "max_new_tokens": 6, "temperature": 0.7,
    "num_generations": 4, "loss_agg": "token-mean", "scale_rewards": "group",
}  # fmt: skip
PAD = 0


def run(model_path: str, units_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = LearnerConfig(**CONFIG)
    runtime = init_distributed(cfg)
    # learner_node.model.load_policy, in float64
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64, local_files_only=True)
    policy.config.use_cache = False
    policy.eval()
    shard(policy, runtime)
    optimizer = build_optimizer(cfg, [policy])
    trainer = Trainer(cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer), pad_id=PAD)
    grads: dict[str, torch.Tensor] = {}

    def snapshot(*_: object) -> None:  # every rank runs it: full_tensor() is a collective
        for name, param in policy.named_parameters():
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            grads[name] = grad.detach().clone()

    optimizer.register_step_pre_hook(snapshot)
    with open(units_path, "rb") as f:
        units = pickle.load(f)
    metrics = trainer.step(units)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in policy.parameters())
    total = sum(p.numel() for p in policy.parameters())
    return {"rank": runtime.rank, "world": runtime.world, "metrics": metrics, "local_numel": local,
            "total_numel": total}, grads  # fmt: skip


if __name__ == "__main__":
    result, gradients = run(sys.argv[1], sys.argv[3])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    if result["rank"] == 0:
        torch.save(gradients, sys.argv[2] + ".grads.pt")
    # No rank tears gloo down while another may still use it: a worker once died at the end with "terminate called
    # without an active exception" (exit -6) in a fresh-clone run of the suite.
    dist.barrier()
    dist.destroy_process_group()
