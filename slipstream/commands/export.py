"""`slipstream export CKPT OUT --model PATH`: turn a learner's DCP checkpoint into an HF folder.

CKPT is a `step-N` folder under `<run.output_dir>/checkpoints`, or that checkpoints folder (its latest). PATH is the
run's `model.path` (a local folder or a Hub id): the architecture, tokenizer and dtype; the weights are the
checkpoint's. OUT loads with `AutoModelForCausalLM.from_pretrained` (and SGLang). A LoRA run's checkpoint exports
PEFT's adapter folder (`PeftModel.from_pretrained(base, OUT)`), and with --merged the merged full model in OUT/merged.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a step-N checkpoint folder, or a checkpoints folder (its latest)")
    parser.add_argument("out", help="the HF folder to write")
    parser.add_argument("--model", required=True, help="the run's model.path: local HF folder or Hub id")
    parser.add_argument("--max-shard-mb", type=int, default=5000, help="largest safetensors file (default: 5000)")
    parser.add_argument("--merged", action="store_true", help="LoRA: also the merged model, in OUT/merged")
    parser.add_argument("--local-files-only", action="store_true", help="never reach the Hub (the cache only)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run a Hub repository's own model code")


def run(args: argparse.Namespace) -> int:
    from bus.settings import ConfigError, HubSource
    from learner_node.checkpoint import export_checkpoint
    from telemetry.logs import configure_logging

    configure_logging(level="warning")
    if args.max_shard_mb < 1:
        raise SystemExit(f"slipstream export: --max-shard-mb: must be >= 1 (got {args.max_shard_mb})")
    source = HubSource(local_files_only=args.local_files_only, trust_remote_code=args.trust_remote_code)
    try:
        out = export_checkpoint(
            args.checkpoint, args.model, args.out, source=source, max_shard_mb=args.max_shard_mb, merged=args.merged
        )
    except (FileNotFoundError, ConfigError) as exc:
        raise SystemExit(f"slipstream export: {exc}") from exc
    print(f"HF export written to {out}", file=sys.stderr)
    return 0
