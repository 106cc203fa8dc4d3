"""`slipstream bench NAME [--json] [...]`: run `bench/NAME.py`'s `main(argv)`.

Every benchmark measures its raw baseline in the same run and prints the ratio, because this machine is noisy and
ratios are not.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def available() -> list[str]:
    import bench

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="benchmark to run: " + ", ".join(available()))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark (e.g. --json)")


def run(args: argparse.Namespace) -> int:
    if args.name not in available():
        raise SystemExit(f"slipstream bench: unknown benchmark {args.name!r}; choose one of {available()}")
    module = importlib.import_module(f"bench.{args.name}")
    return int(module.main(args.bench_args) or 0)
