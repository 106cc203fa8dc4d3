"""`slipstream bench learner_memory [--json]`: the learner's peak memory and tokens/s with and without activation
checkpointing, on a Llama-shaped random model of ~73M parameters built in code.

Each configuration runs in its own process (peak memory is a per-process figure): the real `Trainer.step` (FSDP2 on
one rank) on the same batch of `--rows` sequences of `--length` tokens, `--steps` timed steps after one warm-up.
Peak memory is `torch.cuda.max_memory_allocated` on GPU and the growth of the process's peak RSS over its size after
loading the model on CPU. The baseline is the same step without checkpointing: `memory_ratio` = checkpointed peak /
baseline peak, `speed_ratio` = checkpointed tokens/s / baseline tokens/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from typing import Any

from bench._report import print_report

MODEL = {  # ~73M parameters: 10 blocks of 640 wide, a 32000-token vocabulary (tied)
    "hidden_size": 640,
    "num_layers": 10,
    "num_heads": 10,
    "num_kv_heads": 2,
    "intermediate_size": 1920,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slipstream bench learner_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--rows", type=int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default: %(default)s)")
    parser.add_argument("--model-path", help=argparse.SUPPRESS)  # set for the child processes
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.rows, args.length, args.steps) < 1:
        parser.error("--rows, --length and --steps must be >= 1")
    if args.model_path:  # one configuration, in this (child) process
        print(json.dumps(_measure(args)))
        return 0
    from slipstream.demo_model import build_demo_model

    with tempfile.TemporaryDirectory(prefix="bench-learner-memory-") as tmp:
        path = build_demo_model(f"{tmp}/model", **MODEL)
        runs = {name: _child(argv, str(path), on) for name, on in (("baseline", False), ("checkpointed", True))}
    base, ckpt = runs["baseline"], runs["checkpointed"]
    report: dict[str, Any] = {
        "parameters": base["parameters"],
        "device": base["device"],
        "tokens_per_step": args.rows * args.length,
        "baseline_peak_mib": base["peak_mib"],
        "checkpointed_peak_mib": ckpt["peak_mib"],
        "memory_ratio": round(ckpt["peak_mib"] / base["peak_mib"], 3),
        "baseline_tokens_per_s": base["tokens_per_s"],
        "checkpointed_tokens_per_s": ckpt["tokens_per_s"],
        "speed_ratio": round(ckpt["tokens_per_s"] / base["tokens_per_s"], 3),
        "same_loss": base["losses"] == ckpt["losses"],
    }
    print_report(report, args.json)
    return 0


def _child(argv: list[str], path: str, checkpointing: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", "slipstream", "bench", "learner_memory", *argv, "--model-path", path]
    out = subprocess.run(command + (["--checkpointing"] if checkpointing else []), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"learner_memory child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import resource
    import time

    import numpy as np
    import torch

    from bus.schema import Trajectory
    from learner_node.config import LearnerConfig
    from learner_node.groups import Unit
    from learner_node.model import build_optimizer, build_scheduler, init_distributed, load_policy
    from learner_node.trainer import Trainer
    from telemetry.logs import configure_logging

    configure_logging(level="warning")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cfg = LearnerConfig(device=device, lr=1e-6, micro_batch_size=args.rows, max_new_tokens=args.length,
                        activation_checkpointing=args.checkpointing, skip_zero_advantage=False)  # fmt: skip
    runtime = init_distributed(cfg)
    policy = load_policy(args.model_path, runtime, activation_checkpointing=args.checkpointing)
    optimizer = build_optimizer(cfg, [policy])
    trainer = Trainer(cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer))
    rng = np.random.default_rng(0)
    prompt, response = args.length // 4, args.length - args.length // 4
    members = [
        Trajectory(
            id=f"t{i}",
            group_id="g",
            producer="bench",
            reward=float(i % 2),
            prompt_ids=rng.integers(4, 100, prompt).astype(np.int32),
            response_ids=rng.integers(4, 100, response).astype(np.int32),
            behavior_logprobs=np.full(response, -10.0, np.float32),
        )  # fmt: skip
        for i in range(args.rows)
    ]
    cuda = runtime.device.type == "cuda"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak so far (the model loaded)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        metrics = trainer.step([Unit("g", members)])
        if cuda:
            torch.cuda.synchronize()
        if step:
            seconds.append(time.perf_counter() - started)
        losses.append(round(float(metrics["loss"]), 6))
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {
        "parameters": sum(p.numel() for p in policy.parameters()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_mib": round(peak_mib, 1),
        "tokens_per_s": round(args.rows * args.length * len(seconds) / sum(seconds), 1),
        "losses": losses,
    }
