"""`slipstream rollout [--config C] [--section.field VALUE ...]`: run a rollout node until SIGTERM/SIGINT.

Settings come from the TOML file's sections (`rollout_node.config.RolloutSettings`), SLIPSTREAM_* environment
variables and dotted overrides (`--rollout.engine sglang`, `--bus.url redis://h:6379`, `--rollout.torch.device cpu`).
Torch and the engine load only once the node starts.
"""

from __future__ import annotations

import argparse
import sys

TAKES_OVERRIDES = True  # dotted --section.field overrides arrive as args.overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [-h] [--config CONFIG] [--section.field VALUE ...]"
    parser.add_argument("--config", default=None, help="TOML file with the node's sections (others are ignored)")


def run(args: argparse.Namespace) -> int:
    from bus.settings import ConfigError, load_settings
    from rollout_node.config import RolloutSettings

    try:
        settings = load_settings(RolloutSettings, args.config, list(getattr(args, "overrides", [])))
    except ConfigError as exc:
        print(f"slipstream rollout: {exc}", file=sys.stderr)
        return 2

    from rollout_node.node import run_node

    return run_node(settings)
