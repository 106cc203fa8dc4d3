"""`slipstream up --config C [--mode async|sync] [--section.field value ...]`: a whole cluster on this machine."""

from __future__ import annotations

import argparse

from slipstream.commands import exit_on_config_error

TAKES_OVERRIDES = True  # dotted --section.field overrides arrive as args.overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML file with every node's sections (e.g. configs/demo.toml)")
    parser.add_argument(
        "--mode",
        choices=["async", "sync"],
        default=None,
        help="shortcut for --learner.mode: sync generates, then trains, one policy version at a time",
    )


def run(args: argparse.Namespace) -> int:
    from bus.settings import load_settings
    from slipstream.launcher import UpSettings, overrides_for, run_cluster

    overrides = list(args.overrides)
    if args.mode:
        overrides += ["--learner.mode", args.mode]
    with exit_on_config_error("up"):  # a malformed override fails in overrides_for already
        settings = load_settings(UpSettings, args.config, overrides_for(UpSettings, overrides))
    return run_cluster(settings, args.config, overrides)
