"""Experiment tracking: the learner's progress events as TensorBoard scalars and wandb history, under TRL-like keys.

    tracker = setup_tracking(settings.telemetry.tracking, run_name="demo", run_dir="runs/demo", hparams={...})
    tracker.record("train_step", {"reward_mean": 0.4, "clip_frac_low": 0.01, ...}, step=7)   # -> reward, clip_ratio/...
    tracker.close()

The learner (rank 0) hands every progress event it logs to `record`, so the numbers in TensorBoard and wandb are the
numbers of its log lines, renamed the way TRL names them so that dashboards built for TRL runs read these too. The
sink packages are optional (`pip install 'slipstream[tracking]'`) and imported only when configured; a missing one is
a `TrackingError` naming the setting and the pip command.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from telemetry.config import TrackingConfig
from telemetry.logs import redact

# Our event fields -> TRL's key, where TRL has one; other numeric fields keep their own names.
TRAIN_KEYS = {
    "reward_mean": "reward",
    "reward_std": "reward_std",
    "completion_length_mean": "completions/mean_length",
    "completion_length_min": "completions/min_length",
    "completion_length_max": "completions/max_length",
    "clip_frac_low": "clip_ratio/low_mean",
    "clip_frac_high": "clip_ratio/high_mean",
    "kl": "kl",
    "entropy": "entropy",
    "loss": "loss",
    "lr": "learning_rate",
    "grad_norm": "grad_norm",
    "staleness_mean": "staleness",
    "staleness_max": "staleness/max",
    "tokens_per_s": "tokens_per_second",
    "version": "policy_version",
    "step_s": "step_time",
}
EVAL_KEYS = {
    "eval_accuracy": "eval/accuracy",
    "eval_reward_mean": "eval/reward",
    "eval_samples": "eval/samples",
    "version": "policy_version",
}
# Positions and clocks, not metrics: the step is the x axis, and both sinks keep wall time themselves.
NOT_METRICS = frozenset({"step", "elapsed", "elapsed_s"})


class TrackingError(RuntimeError):
    """A configured sink cannot start (its package is missing)."""


def trl_metrics(event: str, fields: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one progress event under TRL-like keys: "train_step" -> reward, loss, clip_ratio/low_mean, ...;
    "eval" -> eval/accuracy, ...; any other event -> none. Non-numeric fields (counts by reason, ...) are left out."""
    if event == "train_step":
        names = TRAIN_KEYS
    elif event == "eval":
        names = EVAL_KEYS
    else:
        return {}
    return {
        names.get(key, key): float(value)
        for key, value in fields.items()
        if key not in NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool)
    }


class Tracker(ABC):
    """A sink for the learner's metrics."""

    def record(self, event: str, fields: Mapping[str, Any], *, step: int) -> None:
        """Log one progress event's metrics (nothing for an event that has none)."""
        metrics = trl_metrics(event, fields)
        if metrics:
            self.log(metrics, step)

    @abstractmethod
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Write `metrics` (already under their tracked names) at `step`."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release; no call after this."""


class NullTracker(Tracker):
    """Nothing configured (and every rank but 0)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Scalars in a TensorBoard event file in `log_dir` (torch's SummaryWriter, as TRL's TensorBoard callback)."""

    FLUSH_S = 10  # a killed learner loses at most this much of the curves

    def __init__(self, log_dir: str) -> None:
        module = _require("torch.utils.tensorboard", "tensorboard_dir", "tensorboard")
        self.writer = module.SummaryWriter(log_dir=log_dir, flush_secs=self.FLUSH_S)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """One wandb run per Slipstream run; its config is the run's settings, with secrets redacted."""

    def __init__(self, project: str, mode: str, *, run_name: str, run_dir: str, hparams: Mapping[str, Any]) -> None:
        wandb = _require("wandb", "wandb_project", "wandb")
        Path(run_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to a temp folder when it is missing
        self.run = wandb.init(project=project, name=run_name, mode=mode, dir=run_dir, config=redact(dict(hparams)))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers(Tracker):
    """Several sinks at once (TensorBoard and wandb)."""

    def __init__(self, sinks: list[Tracker]) -> None:
        self.sinks = sinks

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def setup_tracking(
    config: TrackingConfig, *, run_name: str, run_dir: str, hparams: Mapping[str, Any] | None = None
) -> Tracker:
    """The sinks `config` turns on (a `NullTracker` when none). wandb writes its files under `run_dir`."""
    sinks: list[Tracker] = []
    try:
        if config.tensorboard_dir is not None:
            sinks.append(TensorBoardTracker(config.tensorboard_dir))
        if config.wandb_project is not None and config.wandb_mode != "disabled":
            wandb = WandbTracker(
                config.wandb_project, config.wandb_mode, run_name=run_name, run_dir=run_dir, hparams=hparams or {}
            )
            sinks.append(wandb)
    except TrackingError:
        for sink in sinks:  # the one that did start
            sink.close()
        raise
    if not sinks:
        return NullTracker()
    return sinks[0] if len(sinks) == 1 else Trackers(sinks)


def _require(module: str, setting: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackingError(
            f"telemetry.tracking.{setting} is set, but the {package} package is not installed: "
            f"pip install 'slipstream[tracking]' (or pip install {package})"
        ) from exc
