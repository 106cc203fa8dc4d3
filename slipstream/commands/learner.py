"""`slipstream learner [--config C] [--resume] [--nproc-per-node N] [--section.field value ...]`: a learner node.

One rank runs in this process; more ranks (`--nproc-per-node`, or `learner.nproc_per_node`) run under torchrun,
one process per rank (`python -m torch.distributed.run --standalone ... -m learner_node.main`). Several hosts
(`learner.nnodes` > 1) each run the same command with `learner.rdzv_endpoint` set to host 0's address. The settings are
checked here first, so a bad config fails before any process starts. SIGTERM and SIGINT are passed on to torchrun,
which passes them to every rank.

On a terminal (stdout a TTY) the learner runs as a child writing JSON log lines, and the person sees a live table of
its progress (`slipstream.progress`) with the other log lines above it, then the `done: ...` line. Elsewhere (pipes,
containers, CI) nothing changes: the log lines go to stderr as configured.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

TAKES_OVERRIDES = True  # dotted --section.field overrides arrive as args.overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="TOML file with the run's sections (e.g. configs/demo.toml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    parser.add_argument(
        "--nproc-per-node", type=int, default=None, metavar="N", help="learner ranks (default: learner.nproc_per_node)"
    )


def run(args: argparse.Namespace) -> int:
    from bus.settings import ConfigError, load_settings
    from learner_node.config import LearnerSettings

    overrides = list(getattr(args, "overrides", []))
    try:
        settings = load_settings(LearnerSettings, args.config, overrides)
    except ConfigError as exc:
        raise SystemExit(f"slipstream learner: {exc}") from None
    ranks = args.nproc_per_node or settings.learner.nproc_per_node
    if ranks < 1:
        raise SystemExit(f"slipstream learner: --nproc-per-node must be >= 1, got {ranks}")
    argv = [*(["--config", args.config] if args.config else []), *(["--resume"] if args.resume else []), *overrides]
    learner = settings.learner
    one_rank = ranks == 1 and learner.nnodes == 1
    watched = sys.stdout.isatty()
    if "LOCAL_RANK" in os.environ or (one_rank and not watched):
        from learner_node.main import main

        return main(argv)
    command = [sys.executable]
    if not one_rank:
        command += ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
        if learner.nnodes == 1:
            command.append("--standalone")
        else:  # every host runs the same command; c10d rendezvous at learner host 0 orders them
            command += [f"--nnodes={learner.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={learner.rdzv_endpoint}"]
            command.append(f"--rdzv-id={settings.run.name}")
    command += ["-m", "learner_node.main", *argv]
    if watched:
        return _watch([*command, "--telemetry.log_format", "json"])  # last: wins over the config's format
    return _forward_signals(subprocess.Popen(command)).wait()


def _forward_signals(child: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: child.send_signal(number))
    return child


def _watch(command: list[str]) -> int:
    """Run the learner with its log piped in: progress into a live table, every other line printed above it."""
    from slipstream.progress import Progress, follow, make_view

    child = _forward_signals(subprocess.Popen(command, stderr=subprocess.PIPE))
    view = make_view(sys.stdout, Progress())
    assert child.stderr is not None
    try:
        follow(child.stderr, view, echo=True)
        code = child.wait()
    finally:
        view.close()
    print(view.progress.done_line(code), flush=True)
    return code
