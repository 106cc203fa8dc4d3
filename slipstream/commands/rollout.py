"""`slipstream rollout [--config C] [--section.field VALUE ...]`: run a rollout node until SIGTERM/SIGINT.

Settings come from the TOML file's sections (`rollout_node.config.RolloutSettings`), SLIPSTREAM_* environment
variables and dotted overrides (`--rollout.engine sglang`, `--bus.url redis://h:6379`, `--rollout.torch.device cpu`).
Torch and the engine load only once the node starts.
"""

from __future__ import annotations

import argparse

from slipstream.commands import load_or_exit

TAKES_OVERRIDES = True  # dotted --section.field overrides arrive as args.overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [-h] [--config CONFIG] [--section.field VALUE ...]"
    parser.add_argument("--config", default=None, help="TOML file with the node's sections (others are ignored)")


def run(args: argparse.Namespace) -> int:
    from rollout_node.config import RolloutSettings

    settings = load_or_exit(RolloutSettings, args, "rollout")

    from rollout_node.node import run_node

    return run_node(settings)
