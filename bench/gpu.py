"""`slipstream bench gpu [--json]`: the GPU smoke run, one command that fits 8 minutes on one H100.

On one device, with a Qwen2-shaped random model of ~0.5B parameters built in code (`--size qwen2-0.5b`: hidden
896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings; the demo tokenizer, whose ids
are a subset of the vocabulary):

1. the torch engine's sampling tokens/s against transformers' `generate`, same model, batch and dtype
   (`bench engine`'s measurement: `engine_ratio`);
2. a few GRPO steps of the real learner (`Trainer.step`: FSDP2 on one rank, float32 master weights, bf16 autocast on
   CUDA) on groups the engine sampled, with random rewards: learner tokens/s, and MFU = 6 x parameters x tokens/s
   over the GPU's dense bf16 peak;
3. after each step, a full weight update into the engine: the learner's full state dict gathered to rank 0 and
   loaded by the engine (in one process: an NCCL broadcast to an engine needs a second GPU);

and peak GPU memory. `--size tiny --device cpu` runs the same path in seconds (its test). The device image has CUDA
torch and transformers; this project's other dependencies travel as wheels (bench/gpu_wheels.sh).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

from bench._report import print_report

SIZES: dict[str, dict[str, int]] = {
    "qwen2-0.5b": {
        "hidden_size": 896,
        "num_layers": 24,
        "num_heads": 14,
        "num_kv_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_position_embeddings": 1024,
    },
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
}
# Dense bf16 peak, FLOP/s, by a substring of torch.cuda.get_device_name() (SXM parts; the PCIe H100 is lower).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slipstream bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--size", choices=sorted(SIZES), default="qwen2-0.5b", help="model (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto: cuda when visible (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps, after one warm-up (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per GRPO step (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per row (default: %(default)s)")
    parser.add_argument("--engine-batch", type=int, default=32, help="rows of the engine bench (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="engine bench runs of each (default: %(default)s)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.steps, args.prompts, args.group_size, args.new_tokens, args.engine_batch, args.repeats) < 1:
        parser.error("every count must be >= 1")
    import torch

    from telemetry.logs import configure_logging

    configure_logging(level="warning")  # stderr; with --json, stdout holds the one JSON object only
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        report = _run(args, device, tmp)
    print_report(report, args.json)
    return 0


def _run(args: argparse.Namespace, device: str, tmp: str) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    from bench.engine import Setup, measure_engine_ratio
    from learner_node.config import LearnerConfig
    from learner_node.model import build_optimizer, build_scheduler, full_state_dict, init_distributed, load_policy
    from learner_node.trainer import Trainer
    from rollout_node.engines.base import TorchEngineConfig
    from rollout_node.engines.torch_engine import TorchEngine
    from slipstream.demo_model import build_demo_model

    hf_logging.disable_progress_bar()
    cuda = device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    started = time.perf_counter()
    path = build_demo_model(f"{tmp}/model", **SIZES[args.size])
    build_s = time.perf_counter() - started
    prompts = [f"{i % 10}+{(3 * i) % 10}=" * (1 + i % 4) for i in range(args.engine_batch)]
    engine_args = argparse.Namespace(device=device, dtype=dtype, temperature=1.0, new_tokens=args.new_tokens,
                                     repeats=args.repeats)  # fmt: skip
    report: dict[str, Any] = {"size": args.size, "device": _device_name(device), "model_build_s": round(build_s, 1)}
    report |= {f"engine_{k}" if not k.startswith("engine") else k: v
               for k, v in measure_engine_ratio(Setup(engine_args, path, prompts)).items()}  # fmt: skip

    cfg = LearnerConfig(device=device, lr=1e-6, max_new_tokens=args.new_tokens, micro_batch_size=args.group_size)
    runtime = init_distributed(cfg)
    policy = load_policy(str(path), runtime)
    optimizer = build_optimizer(cfg, [policy])
    trainer = Trainer(cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer))
    engine = TorchEngine.from_config(TorchEngineConfig(model_path=str(path), device=device, dtype=dtype))
    parameters = sum(p.numel() for p in policy.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_rates, update_seconds, generate_seconds, losses = [], [], [], []
    for step in range(args.steps + 1):  # step 0 warms up (allocations, autotuning), not measured
        t0 = time.perf_counter()
        units = _units(engine, prompts[: args.prompts], args, step)
        t1 = time.perf_counter()
        metrics = trainer.step(units)
        _sync(cuda)
        t2 = time.perf_counter()
        state = full_state_dict(policy)
        engine.load_weights(state.items(), version=step + 1)
        _sync(cuda)
        t3 = time.perf_counter()
        losses.append(metrics["loss"])
        if step:
            tokens = sum(len(s.prompt_ids) + len(s.response_ids) for u in units for s in u.samples)
            generate_seconds.append(t1 - t0)
            train_rates.append(tokens / (t2 - t1))
            update_seconds.append(t3 - t2)
    learner_rate = statistics.median(train_rates)
    peak = PEAK_BF16_FLOPS.get(next((k for k in PEAK_BF16_FLOPS if k in report["device"]), ""), 0.0)
    report |= {
        "parameters": parameters,
        "learner_tokens_per_s": round(learner_rate, 1),
        "learner_mfu": round(6 * parameters * learner_rate / peak, 4) if peak else None,
        "grpo_generate_s": round(statistics.median(generate_seconds), 3),
        "weight_update_s": round(statistics.median(update_seconds), 3),
        "weight_update_mb": round(sum(t.numel() * t.element_size() for t in state.values()) / 2**20, 1),
        "losses": [round(float(v), 5) for v in losses],
        "engine_version": engine.version,
        "engine_matches_learner": _same_weights(engine, state),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "steps": args.steps,
        "samples_per_step": args.prompts * args.group_size,
    }
    return report


def _units(engine: Any, prompts: list[str], args: argparse.Namespace, step: int) -> list[Any]:
    """One GRPO step's groups: `args.group_size` samples of each prompt from the engine, random rewards."""
    import numpy as np

    from bus.schema import Sampling, Trajectory, new_id
    from learner_node.groups import Unit

    rng = np.random.default_rng(step)
    ids = [engine.tokenizer.encode(p) for p in prompts]
    sampling = Sampling(temperature=1.0, max_new_tokens=args.new_tokens, seed=step)
    units = []
    for prompt, samples in zip(ids, engine.generate(ids, sampling, n=args.group_size), strict=True):
        group = new_id()
        members = [
            Trajectory(
                id=new_id(),
                group_id=group,
                producer="bench-gpu",
                prompt_ids=np.asarray(prompt, dtype=np.int32),
                response_ids=np.asarray(s.response_ids, dtype=np.int32),
                behavior_logprobs=np.asarray(s.behavior_logprobs, dtype=np.float32),
                reward=float(rng.random()),
                policy_version=s.policy_version,
                version_ranges=[tuple(r) for r in s.version_ranges],
                finish_reason=s.finish_reason,
            )
            for s in samples
        ]
        units.append(Unit(group, members))
    return units


def _same_weights(engine: Any, state: dict[str, Any]) -> bool:
    """Whether the engine's weights are the learner's last state, cast to the engine's dtype."""
    live = engine._weights
    return all(live[name].equal(tensor.to(live[name].device, live[name].dtype)) for name, tensor in state.items())


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"
