"""`slipstream bench e2e`: wall time to reach the demo's target accuracy, synchronous vs asynchronous, same config.

Runs the real system twice through `slipstream up` (embedded Redis, learner and rollout nodes as processes): once
with `--learner.mode sync` (generate, then train, one policy version at a time) and once with `--learner.mode
async`, each until the learner's greedy eval accuracy reaches `--target` (the learner stops there) or `--timeout`.
Prints `async_speedup` = sync time-to-target / async time-to-target (goal >= 1.5). A run that never reaches the
target counts as its timeout and is flagged. With `--repeats N` the modes alternate N times and the medians are
compared: time to target is one noisy RL run per sample. `step_speedup` (sync seconds per step / async seconds per
step, medians) is the steadier figure: what overlapping generation with training buys per step.

    slipstream bench e2e --config configs/demo.toml --target 0.9 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from typing import Any


def time_to_target(config: str, mode: str, target: float, timeout_s: float, extra: list[str]) -> dict[str, Any]:
    """One `slipstream up` run in `mode`; its time to the first eval at or above `target`."""
    from bus.settings import load_settings
    from slipstream.launcher import UpSettings, overrides_for, run_cluster
    from slipstream.progress import Progress

    with tempfile.TemporaryDirectory(prefix=f"slipstream-e2e-{mode}-") as out_dir:
        overrides = [
            *extra,
            "--learner.mode", mode,
            "--learner.target_accuracy", str(target),
            "--run.output_dir", out_dir,
            "--up.timeout_s", str(timeout_s),
        ]  # fmt: skip
        settings = load_settings(UpSettings, config, overrides_for(UpSettings, overrides))
        progress = Progress(target_accuracy=target)
        code = run_cluster(settings, config, overrides, out=sys.stderr, progress=progress)
    reached = progress.reached_target_s
    return {
        "exit_code": code,
        "reached_target": reached is not None,
        "time_to_target_s": reached if reached is not None else progress.elapsed(),  # unreached: all it ran
        "final_eval_accuracy": progress.eval_accuracy,
        "steps": progress.step,
        "steps_to_target": progress.reached_target_step,
        "seconds_per_step": progress.elapsed() / max(progress.step, 1),
        "evals": progress.evals,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slipstream bench e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml", help="the run's TOML (both modes use it)")
    parser.add_argument("--target", type=float, default=0.9, help="greedy eval accuracy to reach")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (alternating); medians are compared")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args, extra = parser.parse_known_args(argv)
    if not 0 < args.target <= 1 or args.timeout <= 0 or args.repeats < 1:
        parser.error("--target must be in (0, 1], --timeout > 0 and --repeats >= 1")
    runs: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
    with contextlib.redirect_stdout(sys.stderr):  # progress goes to stderr; stdout carries the result only
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(time_to_target(args.config, mode, args.target, args.timeout, extra))
    result: dict[str, Any] = {"target_accuracy": args.target, "repeats": args.repeats}
    for mode, done in runs.items():
        result[f"{mode}_runs"] = done
        result[f"{mode}_reached_target"] = all(run["reached_target"] for run in done)
        for key in ("time_to_target_s", "seconds_per_step"):
            result[f"{mode}_{key}"] = statistics.median(run[key] for run in done)
    result["async_speedup"] = result["sync_time_to_target_s"] / result["async_time_to_target_s"]
    result["step_speedup"] = result["sync_seconds_per_step"] / result["async_seconds_per_step"]
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        if not key.endswith("_runs"):
            print(f"{key:32s} {value}")
    print(f"async_speedup {result['async_speedup']:.2f} (goal >= 1.5)")
    return 0
