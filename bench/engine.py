"""`slipstream bench engine [--json]`: TorchEngine sampling speed against transformers' own `generate`.

Both sample the same model (the demo model at >= 4M parameters) for the same left-padded batch, with the same
temperature, no top-k / top-p, and exactly `--new-tokens` tokens (eos disabled in both), in the same process and
threads. Runs alternate (engine, generate, engine, ...) so that load on a shared machine hits both alike;
`engine_ratio` is the median engine tokens/s over the median generate tokens/s (goal >= 1.0).

Measurements are the functions in `MEASUREMENTS`: each takes the prepared `Setup` and returns the fields it adds to
the report, so another one is one function and one list entry. `http_overhead_ratio` is the same engine's tokens/s
through serve-engine's HTTP routes (SGLangEngine client, localhost) over its tokens/s called in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Setup:
    """What every measurement shares: the parsed options and the demo model written for this run."""

    args: argparse.Namespace
    model_path: Path
    prompts: list[str]  # batch of arithmetic prompts of different lengths (left padding is exercised)


def measure_engine_ratio(setup: Setup) -> dict[str, Any]:
    """TorchEngine vs `model.generate` new tokens/s, do_sample with the same temperature, same model and batch."""
    import copy

    import torch

    from bus.schema import Sampling
    from rollout_node.engines.base import TorchEngineConfig
    from rollout_node.engines.torch_engine import TorchEngine

    args = setup.args
    engine = TorchEngine.from_config(
        TorchEngineConfig(model_path=str(setup.model_path), device=args.device, dtype=args.dtype, eos_token_ids=[])
    )
    prompt_ids = [engine.tokenizer.encode(p) for p in setup.prompts]
    encoded = engine.tokenizer(setup.prompts, return_tensors="pt", padding=True).to(args.device)
    generation_config = copy.deepcopy(engine.model.generation_config)
    generation_config.update(
        do_sample=True,
        temperature=args.temperature,
        top_k=None,
        top_p=1.0,
        max_new_tokens=args.new_tokens,
        eos_token_id=None,
    )

    def run_engine(seed: int) -> int:
        sampling = Sampling(temperature=args.temperature, max_new_tokens=args.new_tokens, seed=seed)
        samples = [s for group in engine.generate(prompt_ids, sampling) for s in group]
        return _exact_count(len(s.response_ids) for s in samples)

    def run_generate(seed: int) -> int:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = engine.model.generate(**encoded, generation_config=generation_config)
        return _exact_count([out.shape[1] - encoded["input_ids"].shape[1]] * out.shape[0])

    engine_rates, generate_rates = _alternate_rates(run_engine, run_generate, args.repeats)
    engine_median, generate_median = statistics.median(engine_rates), statistics.median(generate_rates)
    return {
        "engine_ratio": round(engine_median / generate_median, 3),
        "engine_tokens_per_s": round(engine_median, 1),
        "generate_tokens_per_s": round(generate_median, 1),
        "engine_ratio_per_repeat": [round(e / g, 3) for e, g in zip(engine_rates, generate_rates, strict=True)],
        "model_parameters": engine.model.num_parameters(),
        "batch": len(setup.prompts),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "device": args.device,
        "threads": torch.get_num_threads(),
    }


def measure_http_overhead(setup: Setup) -> dict[str, Any]:
    """The same TorchEngine over HTTP (SGLangEngine -> serve-engine's app on localhost, in this process) vs called
    in-process, new tokens/s on the same batch: `http_overhead_ratio` = HTTP / in-process (goal: close to 1.0)."""
    from bus.schema import Sampling
    from rollout_node.engines.base import TorchEngineConfig
    from rollout_node.engines.sglang import SGLangEngine
    from rollout_node.engines.torch_engine import TorchEngine
    from rollout_node.server import build_app
    from rollout_node.server_config import SGLangConfig
    from telemetry.http import serve_in_thread

    args = setup.args
    engine = TorchEngine.from_config(
        TorchEngineConfig(model_path=str(setup.model_path), device=args.device, dtype=args.dtype, eos_token_ids=[])
    )
    prompt_ids = [engine.tokenizer.encode(p) for p in setup.prompts]
    server = serve_in_thread(build_app(engine))
    client = SGLangEngine(server.url, SGLangConfig(url=server.url, api_key_env=None))

    def counted(target: Any) -> Callable[[int], int]:
        def run(seed: int) -> int:
            sampling = Sampling(temperature=args.temperature, max_new_tokens=args.new_tokens, seed=seed)
            return _exact_count(len(s.response_ids) for group in target.generate(prompt_ids, sampling) for s in group)

        return run

    try:
        http_rates, local_rates = _alternate_rates(counted(client), counted(engine), args.repeats)
    finally:
        client.close()
        server.stop()
    http_median, local_median = statistics.median(http_rates), statistics.median(local_rates)
    return {
        "http_overhead_ratio": round(http_median / local_median, 3),
        "http_tokens_per_s": round(http_median, 1),
        "inprocess_tokens_per_s": round(local_median, 1),
        "http_overhead_ratio_per_repeat": [round(h / i, 3) for h, i in zip(http_rates, local_rates, strict=True)],
    }


def _alternate_rates(
    first: Callable[[int], int], second: Callable[[int], int], repeats: int
) -> tuple[list[float], list[float]]:
    """Tokens/s of `first` and `second` (each `run(seed) -> tokens`), after one warm-up call each (first-call
    allocations and lazy inits are not measured), in alternating runs so that load on a shared machine hits both."""
    first(0)
    second(0)
    rates: tuple[list[float], list[float]] = ([], [])
    for repeat in range(repeats):
        for run, measured in zip((first, second), rates, strict=True):
            started = time.perf_counter()
            tokens = run(repeat)
            measured.append(tokens / (time.perf_counter() - started))
    return rates


def _exact_count(lengths: Any) -> int:
    """Total tokens, checking every row produced exactly the number asked for (else the rates compare nothing)."""
    lengths = list(lengths)
    if len(set(lengths)) != 1:
        raise RuntimeError(f"rows produced different token counts: {sorted(set(lengths))}")
    return sum(lengths)


MEASUREMENTS: list[Callable[[Setup], dict[str, Any]]] = [measure_engine_ratio, measure_http_overhead]


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {value})")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slipstream bench engine", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--batch", type=_at_least(1), default=16, help="prompts per batch (default: %(default)s)")
    parser.add_argument(
        "--new-tokens", type=_at_least(1), default=128, help="tokens sampled per row (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=_at_least(1), default=5, help="alternating timed runs of each (default: %(default)s)"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--hidden-size", type=_at_least(1), default=256, help="demo model width (default: %(default)s)")
    parser.add_argument("--num-layers", type=_at_least(1), default=6, help="demo model depth (default: %(default)s)")
    parser.add_argument(
        "--intermediate-size", type=_at_least(1), default=768, help="demo MLP width (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights (default: %(default)s)"
    )
    parser.add_argument(
        "--threads", type=_at_least(0), default=0, help="torch CPU threads, 0: torch's default (default: %(default)s)"
    )
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.temperature > 0:
        parser.error(f"--temperature: must be > 0, both sides sample (got {args.temperature})")
    import torch

    from slipstream.demo_model import build_demo_model
    from telemetry.logs import configure_logging

    configure_logging(level="warning")  # stderr; with --json, stdout holds the one JSON object only
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="slipstream-bench-engine-") as folder:
        model_path = build_demo_model(
            folder,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            intermediate_size=args.intermediate_size,
            max_position_embeddings=max(512, 64 + args.new_tokens),
            init_std=0.3,  # peaked logits, like a trained model's, rather than near-uniform ones
        )
        prompts = [f"{i % 10}+{(3 * i) % 10}=" * (1 + i % 4) for i in range(args.batch)]
        report: dict[str, Any] = {"bench": "engine"}
        for measure in MEASUREMENTS:
            report.update(measure(Setup(args, model_path, prompts)))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>24}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
