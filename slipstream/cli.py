"""The `slipstream` command: parses first, imports heavy modules (torch, transformers) only in the chosen command.

Each subcommand lives in `slipstream.commands.<module>` and exposes `add_arguments(parser)` and `run(args) -> int`.
Those modules must stay import-light so that `slipstream --help` answers in well under a second. A module that sets
`TAKES_OVERRIDES = True` receives every argument its parser does not know as `args.overrides` (the dotted
`--section.field value` settings overrides); for the others an unknown argument is an error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under slipstream.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("up", "run a whole local cluster (embedded Redis, learner, rollout nodes) from one config"),
    "learner": ("learner", "run a learner node (torchrun job, FSDP2)"),
    "rollout": ("rollout", "run a rollout node: tasks from the bus -> engine -> rewards -> trajectories"),
    "serve-engine": ("serve_engine", "serve the torch engine behind SGLang-compatible HTTP routes"),
    "produce": ("produce", "publish trajectories from a JSONL file or a synthetic source onto the bus"),
    "bench": ("bench", "run a benchmark from bench/ and print ratios against raw baselines"),
    "status": ("status", "print the cluster at a glance from Redis"),
    "keys": ("keys", "generate ZeroMQ CURVE key pairs"),
    "acl": ("acl", "render the Redis ACL file (one user per role) and make its password files"),
    "demo-model": ("demo_model", "write the tiny HF-format demo model and tokenizer to a folder"),
    "export": ("export", "turn a learner's DCP checkpoint into an HF folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slipstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            command = importlib.import_module(f"slipstream.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"slipstream.commands.{module}":
                raise
            continue  # not built yet: the command is simply absent from this install
        p = sub.add_parser(name, help=help_text, description=help_text)
        command.add_arguments(p)
        p.set_defaults(_run=command.run, _takes_overrides=getattr(command, "TAKES_OVERRIDES", False))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if getattr(args, "_takes_overrides", False):
        args.overrides = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
