"""`slipstream bench learner`: the learner's training throughput against a plain training loop, same model and batch.

Learner side, per step (the learner node's own pieces, on a real Redis): consume the step's groups from the
trajectories stream (decode, validate, dedup check), assemble them, train (collate, micro-batches, forward with the
response-only LM head, logprobs, the decoupled GRPO loss with its off-policy weights, backward, clipping, AdamW under
FSDP2) and settle (acks, dedup marks and counts in one Redis transaction). The groups are published before the
clock starts: producing them is the rollout nodes' work. Baseline, per step: the same model without FSDP on the same
token ids (already padded), forward + log-softmax gather + a policy-gradient loss + backward + AdamW.

Rounds alternate learner and baseline steps so both see the same (noisy, shared) machine; the medians are reported.
`learner_ratio` = learner tokens/s / baseline tokens/s (goal >= 0.85). `--json` prints exactly one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch

from bench._report import print_report


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slipstream bench learner", description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=4, help="groups per step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per group")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    parser.add_argument("--response-tokens", type=int, default=96, help="response length (each sample varies +-25%%)")
    parser.add_argument("--hidden", type=int, default=256, help="model hidden size")
    parser.add_argument("--layers", type=int, default=4, help="model layers")
    parser.add_argument("--steps", type=int, default=6, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    args = parser.parse_args(argv)
    if min(args.groups, args.group_size, args.prompt_tokens, args.response_tokens, args.steps) < 1:
        parser.error("every size must be >= 1")
    return args


def _groups(producer: Any, args: argparse.Namespace, rng: np.random.Generator) -> list[Any]:
    """One step's groups of random samples (vocabulary of the demo model)."""
    groups = []
    for _ in range(args.groups):
        members = []
        for i in range(args.group_size):
            length = int(args.response_tokens * rng.uniform(0.75, 1.25))
            members.append(
                producer.trajectory(
                    prompt_ids=rng.integers(4, 100, args.prompt_tokens),
                    response_ids=rng.integers(4, 100, length),
                    logprobs=np.full(length, -4.6, np.float32),
                    reward=float(i % 2),
                )
            )
        groups.append(producer.group(members))
    return groups


def main(argv: list[str]) -> int:
    args = _parse(argv)
    from telemetry.logs import configure_logging

    configure_logging("auto", "warning")  # stderr only: with --json, stdout holds exactly one JSON object
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from bus.config import BusConfig
    from bus.consumer import MessageConsumer
    from bus.dedup import RedisDedup
    from bus.embedded import EmbeddedRedis
    from bus.producer import Producer
    from bus.schema import Group
    from bus.transport import setup_transport
    from learner_node.accounting import Ledger
    from learner_node.algorithms import token_logprobs
    from learner_node.batching import collate
    from learner_node.config import LearnerConfig
    from learner_node.groups import GroupAssembler, split_trained
    from learner_node.model import build_optimizer, build_scheduler, init_distributed, load_policy
    from learner_node.trainer import Trainer
    from slipstream.demo_model import build_demo_model

    hf_logging.disable_progress_bar()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp, EmbeddedRedis(data_dir=tmp) as redis:
        path = build_demo_model(f"{tmp}/model", hidden_size=args.hidden, num_layers=args.layers,
                                intermediate_size=3 * args.hidden, num_heads=4, num_kv_heads=2)  # fmt: skip
        config = BusConfig(url=redis.url, block_ms=100, consume_batch=args.groups)
        transport = setup_transport(config)
        producer = Producer(transport, config.stream("trajectories"), "bench")
        cfg = LearnerConfig(
            lr=1e-5, micro_batch_size=args.groups * args.group_size, max_new_tokens=args.response_tokens
        )
        runtime = init_distributed(cfg)
        policy = load_policy(str(path), runtime)
        optimizer = build_optimizer(cfg, [policy])
        trainer = Trainer(cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer))
        dedup = RedisDedup(transport, "bench:dedup")
        consumer = MessageConsumer(transport, config.stream("trajectories"), "learner", "learner-0",
                                   kinds=(Group,), dedup=dedup)  # fmt: skip
        ledger = Ledger(transport, consumer, dedup)
        assembler = GroupAssembler(args.group_size, 2, 30.0)

        plain = AutoModelForCausalLM.from_pretrained(path)
        plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-5)

        def learner_step() -> int:
            units: list[Any] = []
            while len(units) < args.groups:
                assembler.add(consumer.poll(count=args.groups - len(units), block_ms=1000))
                units += assembler.take()[0]
            units, copies = split_trained(units, dedup.seen)
            trainer.step(units)
            ledger.settle(units)
            return sum(len(s.prompt_ids) + len(s.response_ids) for u in units for s in u.samples)

        def baseline_step(groups: list[Any]) -> int:
            batch = collate([t for g in groups for t in g.trajectories], [1.0] * (args.groups * args.group_size))
            logits = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logprobs = token_logprobs(logits[:, -batch.response_length - 1 : -1], batch.response_ids)
            loss = -(logprobs * batch.mask).sum() / batch.mask.sum()
            loss.backward()
            plain_optimizer.step()
            plain_optimizer.zero_grad(set_to_none=True)
            return batch.tokens

        rounds = [_groups(producer, args, rng) for _ in range(args.steps + 1)]
        for groups in rounds:
            producer.send_many(groups)
        learner_rates, baseline_rates = [], []
        for i, groups in enumerate(rounds):
            start = time.perf_counter()
            tokens = learner_step()
            middle = time.perf_counter()
            baseline_tokens = baseline_step(groups)
            end = time.perf_counter()
            if i > 0:  # round 0 warms up (allocations, first Redis round trips)
                learner_rates.append(tokens / (middle - start))
                baseline_rates.append(baseline_tokens / (end - middle))
        transport.close()
    learner, baseline = statistics.median(learner_rates), statistics.median(baseline_rates)
    result = {
        "learner_tokens_per_s": round(learner, 1),
        "baseline_tokens_per_s": round(baseline, 1),
        "learner_ratio": round(learner / baseline, 3),
        "ratios": [round(a / b, 3) for a, b in zip(learner_rates, baseline_rates, strict=True)],
        "tokens_per_step": args.groups * args.group_size * (args.prompt_tokens + args.response_tokens),
        "model": f"hidden {args.hidden}, {args.layers} layers",
        "steps": args.steps,
    }
    print_report(result, args.json, key_width=24)
    if not args.json:
        print(f"learner_ratio {result['learner_ratio']:.3f} (goal >= 0.85)")
    return 0
