"""`slipstream up --config C [--mode async|sync] [--section.field value ...]`: a whole cluster on this machine."""

from __future__ import annotations

import argparse

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
    from bus.settings import ConfigError, load_settings
    from slipstream.launcher import UpSettings, run_cluster

    overrides = list(args.overrides)
    if args.mode:
        overrides += ["--learner.mode", args.mode]
    try:
        settings = load_settings(UpSettings, args.config, overrides_for_up(overrides))
    except ConfigError as exc:
        raise SystemExit(f"slipstream up: {exc}") from None
    return run_cluster(settings, args.config, overrides)


def overrides_for_up(overrides: list[str]) -> list[str]:
    from slipstream.launcher import UpSettings, overrides_for

    return overrides_for(UpSettings, overrides)
