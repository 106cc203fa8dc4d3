"""`slipstream bench losses`: what the learner's mathematics costs next to the model it trains (informational).

Times each function of `learner_node.algorithms` on B sequences x T tokens (forward + backward where it has a
gradient) and divides by one forward + backward of a small Llama (hidden 256, 4 layers, vocab 1024 by default) on
the same B x T batch. The model step is measured on `--model-batch` rows and scaled linearly to B (a B=64 step is
too slow for a 2-core machine); the output says so. token_logprobs is also compared with the naive
log_softmax + gather it replaces. Prints a table, or exactly one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from learner_node.algorithms import (
    dpo_loss,
    gae,
    group_advantages,
    kl_penalty,
    policy_loss,
    token_entropy,
    token_logprobs,
    value_loss,
    vtrace,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slipstream bench losses", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="B: sequences per batch")
    parser.add_argument("--tokens", type=int, default=1024, help="T: response tokens per sequence")
    parser.add_argument("--group-size", type=int, default=8, help="G: samples per group (divides B)")
    parser.add_argument("--model-batch", type=int, default=4, help="rows for the model step, scaled to B")
    parser.add_argument("--hidden", type=int, default=256, help="model hidden size")
    parser.add_argument("--layers", type=int, default=4, help="model layers")
    parser.add_argument("--vocab", type=int, default=1024, help="model vocabulary (also V for the logits kernels)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (the fastest is reported)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    args = parser.parse_args(argv)
    if args.batch % args.group_size or min(args.batch, args.tokens, args.model_batch, args.repeats) < 1:
        parser.error("--batch must be a multiple of --group-size and every size must be >= 1")
    return args


def _best_seconds(step: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of `step()` after one untimed warm-up call: on a shared machine, the least disturbed run."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def _model_step_seconds(args: argparse.Namespace) -> float:
    """One forward + backward of a small causal LM on [model_batch, T] token ids, with its LM loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        vocab_size=args.vocab,
        max_position_embeddings=args.tokens,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (args.model_batch, args.tokens))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return _best_seconds(step, max(1, args.repeats // 2))


def _loss_cases(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """name -> a call that runs one function on fresh-gradient inputs of B x T (x V for the logits kernels)."""
    b, t, v = args.batch, args.tokens, args.vocab
    behavior = -torch.rand(b, t) * 3
    proximal = behavior + 0.05 * torch.randn(b, t)
    current = (proximal + 0.05 * torch.randn(b, t)).requires_grad_()
    mask = torch.rand(b, t) > 0.1
    rewards = torch.rand(b)
    advantages = group_advantages(rewards, args.group_size)
    token_rewards = torch.zeros(b, t)
    token_rewards[:, -1] = rewards
    values = torch.randn(b, t).requires_grad_()
    old_values = values.detach() + 0.1 * torch.randn(b, t)
    logits = torch.randn(b, t, v).requires_grad_()
    token_ids = torch.randint(0, v, (b, t))

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        for leaf in (current, values, logits):
            leaf.grad = None

    def naive_logprobs() -> None:
        backward(torch.log_softmax(logits, -1).gather(-1, token_ids[..., None]).sum())

    return {
        "group_advantages": lambda: group_advantages(rewards, args.group_size),
        "gae": lambda: gae(token_rewards, values.detach(), mask, gamma=1.0, lam=0.95),
        "vtrace": lambda: vtrace(behavior, proximal, token_rewards, values.detach(), torch.zeros(b), mask),
        "kl_penalty_k3": lambda: backward(kl_penalty(current, behavior)[mask].mean()),
        "policy_loss_token_tis": lambda: backward(policy_loss(current, proximal, behavior, advantages, mask)[0]),
        "policy_loss_sequence_mis": lambda: backward(
            policy_loss(
                current,
                proximal,
                behavior,
                advantages,
                mask,
                importance_sampling_level="sequence",
                importance_correction="mask",
                loss_agg="seq-mean-token-mean",
            )[0]
        ),
        "value_loss_clipped": lambda: backward(value_loss(values, old_values, token_rewards, mask, 0.2)[0]),
        "dpo_loss": lambda: backward(
            dpo_loss(current.sum(-1)[0::2], current.sum(-1)[1::2], behavior.sum(-1)[0::2], behavior.sum(-1)[1::2])[0]
        ),
        "token_logprobs": lambda: backward(token_logprobs(logits, token_ids).sum()),
        "naive_log_softmax_gather": naive_logprobs,
        "token_entropy": lambda: backward(token_entropy(logits).sum()),
    }


def main(argv: list[str]) -> int:
    """Run the benchmark; returns the exit status."""
    args = _parse(argv)
    torch.manual_seed(0)
    model_seconds = _model_step_seconds(args) * args.batch / args.model_batch
    results = {
        name: {"seconds": seconds, "ratio_to_model_step": seconds / model_seconds}
        for name, seconds in ((name, _best_seconds(step, args.repeats)) for name, step in _loss_cases(args).items())
    }
    naive = results["naive_log_softmax_gather"]["seconds"]
    note = (
        f"model step measured on {args.model_batch} x {args.tokens} tokens and scaled"
        f" x{args.batch / args.model_batch:g} to B={args.batch}; {torch.get_num_threads()} CPU threads;"
        " losses are forward + backward where they have a gradient (advantage estimators have none)"
    )
    report = {
        "batch": args.batch,
        "tokens": args.tokens,
        "vocab": args.vocab,
        "model_step_seconds": model_seconds,
        "note": note,
        "losses": results,
        "token_logprobs_vs_naive": results["token_logprobs"]["seconds"] / naive,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"B={args.batch} T={args.tokens} V={args.vocab}: model forward+backward {model_seconds * 1e3:.1f} ms")
    print(f"({note})")
    print(f"{'function':28s} {'ms':>10s} {'x model step':>14s}")
    for name, row in results.items():
        print(f"{name:28s} {row['seconds'] * 1e3:10.2f} {row['ratio_to_model_step']:14.4f}")
    print(f"token_logprobs / naive log_softmax+gather: {report['token_logprobs_vs_naive']:.2f}x the time")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
