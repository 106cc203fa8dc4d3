"""`slipstream bench learn`: does Slipstream learn as fast per step as a plain GRPO loop, sync and async?

One command, one run. For every task (bench/_learn_tasks.py) and seed, on the same freshly built demo model, the
same task and the same hyperparameters (the config's sections other than `[task]`; `configs/demo.toml` by default):

- `reference`: a single-process textbook GRPO loop (transformers `generate` + the clipped surrogate, no bus;
  bench/_grpo_reference.py), in this process;
- `sync` and `async`: the real system through `slipstream up` (`--learner.mode sync|async`).

Each runs until its greedy eval accuracy reaches the task's target or `--max-steps`. Printed per task (medians over
seeds; a run that never reaches the target counts as `--max-steps` steps and its seconds, and is flagged):

    sync_steps_ratio   = sync steps to target / reference steps     (goal <= 1.1)
    async_steps_ratio  = async steps to target / reference steps    (goal <= 1.3)
    async_time_ratio   = async seconds to target / sync seconds     (goal <= 0.67 where generation dominates)
    longest_flat_steps = the longest run of steps with no new best accuracy while below target (a freeze: >= 300)

    slipstream bench learn --tasks max,min_jsonl,repeat --seeds 5 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._learn_tasks import TASKS, LearnTask

SYSTEMS = ("reference", "sync", "async")


def longest_flat(evals: list[tuple[int, float, float]], target: float) -> int:
    """Steps of the longest stretch over which the best accuracy so far did not rise, while below `target`.
    `evals`: (step, seconds, accuracy) in order."""
    best, since, longest = -1.0, 0, 0
    for step, _, accuracy in evals:
        if accuracy > best:
            best, since = accuracy, step
        if best >= target:
            break
        longest = max(longest, step - since)
    return longest


def reference_run(config: Path, overrides: list[str], target: float, max_steps: int, timeout_s: float) -> dict:
    """The plain GRPO loop on `config` until `target`, `max_steps` or `timeout_s`."""
    import torch

    from bench._grpo_reference import ReferenceGRPO
    from bus.settings import load_settings
    from learner_node.config import LearnerSettings

    settings = load_settings(LearnerSettings, config, overrides)
    cfg = settings.learner
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    reference = ReferenceGRPO(
        settings.model.path, settings.task, cfg, seed=settings.run.seed, eval_split=settings.task.eval_split
    )
    started = time.monotonic()
    evals = [(0, 0.0, reference.evaluate())]
    step, reached = 0, None
    while step < max_steps and time.monotonic() - started < timeout_s:
        reference.step()
        step += 1
        if step % cfg.eval_every == 0 or step == max_steps:
            evals.append((step, round(time.monotonic() - started, 2), reference.evaluate()))
            if evals[-1][2] >= target:
                reached = evals[-1]
                break
    return {
        "reached_target": reached is not None,
        "steps_to_target": reached[0] if reached else None,
        "time_to_target_s": reached[1] if reached else time.monotonic() - started,
        "final_eval_accuracy": evals[-1][2],
        "steps": step,
        "seconds_per_step": (time.monotonic() - started) / max(step, 1),
        "evals": evals,
    }


def run_task(task: LearnTask, base: str, seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every system on one task and seed, sharing one freshly built model."""
    from bench.e2e import time_to_target
    from slipstream.demo_model import build_demo_model

    with tempfile.TemporaryDirectory(prefix=f"slipstream-learn-{task.name}-") as tmp:
        folder = Path(tmp)
        build_demo_model(folder / "model", seed=seed)
        config = task.config(base, folder)
        overrides = [
            "--model.path", str(folder / "model"), "--run.seed", str(seed),
            "--learner.max_steps", str(args.max_steps), "--learner.target_accuracy", str(task.target),
            *task.overrides(),
        ]  # fmt: skip
        results: dict[str, dict[str, Any]] = {}
        for system in args.systems:
            if system == "reference":
                results[system] = reference_run(config, overrides, task.target, args.max_steps, args.timeout)
            else:
                up = [*overrides, "--up.build_demo_model", "false"]
                results[system] = time_to_target(str(config), system, task.target, args.timeout, up)
            results[system]["longest_flat_steps"] = longest_flat(results[system]["evals"], task.target)
            print(f"[learn] {task.name} seed {seed} {system}: {_brief(results[system])}", file=sys.stderr)
    return results


def _brief(run: dict[str, Any]) -> str:
    steps = run["steps_to_target"] if run["reached_target"] else f">{run['steps']}"
    return f"steps={steps} seconds={run['time_to_target_s']:.1f} final={run['final_eval_accuracy']:.3f}"


def summarise(task: LearnTask, runs: list[dict[str, dict[str, Any]]], max_steps: int) -> dict[str, Any]:
    """Medians over seeds and the ratios (a run short of the target counts as max_steps and its seconds)."""
    out: dict[str, Any] = {"target_accuracy": task.target, "seeds": len(runs)}
    for system in runs[0]:
        done = [r[system] for r in runs]
        out[f"{system}_reached_target"] = sum(r["reached_target"] for r in done)
        out[f"{system}_steps_to_target"] = statistics.median(
            r["steps_to_target"] if r["reached_target"] else max_steps for r in done
        )
        out[f"{system}_time_to_target_s"] = round(statistics.median(r["time_to_target_s"] for r in done), 2)
        out[f"{system}_seconds_per_step"] = round(statistics.median(r["seconds_per_step"] for r in done), 4)
        out[f"{system}_longest_flat_steps"] = max(r["longest_flat_steps"] for r in done)
    if "reference" in runs[0]:
        for system in ("sync", "async"):
            if system in runs[0]:
                ratio = out[f"{system}_steps_to_target"] / max(out["reference_steps_to_target"], 1)
                out[f"{system}_steps_ratio"] = round(ratio, 3)
    if "sync" in runs[0] and "async" in runs[0]:
        out["async_time_ratio"] = round(out["async_time_to_target_s"] / max(out["sync_time_to_target_s"], 1e-9), 3)
    out["runs"] = runs
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slipstream bench learn", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml", help="the recipe: every section but [task] is used")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per task (model initialisation and sampling)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--max-steps", type=int, default=600, help="steps allowed per run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    names = [t for t in args.tasks.split(",") if t]
    unknown = [n for n in names if n not in TASKS] + [s for s in args.systems if s not in SYSTEMS]
    if unknown or args.seeds < 1 or args.max_steps < 1 or args.first_seed < 0:
        parser.error(f"unknown tasks/systems {unknown}; --seeds and --max-steps must be >= 1, --first-seed >= 0")
    base = Path(args.config).read_text()
    result: dict[str, Any] = {"config": args.config, "max_steps": args.max_steps, "tasks": {}}
    with contextlib.redirect_stdout(sys.stderr):  # progress goes to stderr; stdout carries the result only
        for name in names:
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            runs = [run_task(TASKS[name], base, seed, args) for seed in seeds]
            result["tasks"][name] = summarise(TASKS[name], runs, args.max_steps)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, summary in result["tasks"].items():
        print(f"== {name}")
        for key, value in summary.items():
            if key != "runs":
                print(f"  {key:32s} {value}")
    return 0
