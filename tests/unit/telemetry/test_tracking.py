"""Experiment tracking: TRL-like keys, a real TensorBoard event file read back, wandb's calls, missing packages."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from telemetry.config import TelemetryConfig, TrackingConfig
from telemetry.tracking import NullTracker, TensorBoardTracker, Trackers, TrackingError, setup_tracking, trl_metrics

STEP = {
    "step": 3,
    "version": 3,
    "reward_mean": 0.5,
    "reward_std": 0.25,
    "completion_length_mean": 2.5,
    "completion_length_min": 1,
    "completion_length_max": 4,
    "loss": -0.125,
    "clip_frac_low": 0.0625,
    "clip_frac_high": 0.03125,
    "kl": 0.01,
    "entropy": 1.5,
    "lr": 0.001,
    "staleness_mean": 0.75,
    "staleness_max": 1,
    "tokens_per_s": 900.0,
    "importance_weight_mean": 1.0,
    "elapsed": 12.0,
    "settled": {"trained": 6},  # counts by kind: not a scalar
}
EVAL = {"step": 3, "version": 3, "eval_accuracy": 0.375, "eval_reward_mean": 0.5, "eval_samples": 8, "elapsed": 13}


class FakeWandb:
    """The slice of the wandb module the tracker uses: init -> a run with log and finish."""

    def __init__(self) -> None:
        self.init_kwargs: dict[str, Any] = {}
        self.logged: list[tuple[dict[str, float], int]] = []
        self.finished = False

    def init(self, **kwargs: Any) -> SimpleNamespace:
        self.init_kwargs = kwargs
        return SimpleNamespace(log=lambda data, step: self.logged.append((data, step)), finish=self._finish)

    def _finish(self) -> None:
        self.finished = True


def test_train_and_eval_events_get_trl_keys() -> None:
    metrics = trl_metrics("train_step", STEP)
    assert metrics == {
        "policy_version": 3.0,
        "reward": 0.5,
        "reward_std": 0.25,
        "completions/mean_length": 2.5,
        "completions/min_length": 1.0,
        "completions/max_length": 4.0,
        "loss": -0.125,
        "clip_ratio/low_mean": 0.0625,
        "clip_ratio/high_mean": 0.03125,
        "kl": 0.01,
        "entropy": 1.5,
        "learning_rate": 0.001,
        "staleness": 0.75,
        "staleness/max": 1.0,
        "tokens_per_second": 900.0,
        "importance_weight_mean": 1.0,  # no TRL name: kept as it is
    }
    evaluation = {"policy_version": 3.0, "eval/accuracy": 0.375, "eval/reward": 0.5, "eval/samples": 8.0}
    assert trl_metrics("eval", EVAL) == evaluation
    assert trl_metrics("summary", {"eval_accuracy": 0.5, "steps": 3}) == {}  # the run's end: no new numbers


def test_nothing_configured_imports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import of either would now fail
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    config = TrackingConfig(wandb_project="slipstream", wandb_mode="disabled")
    assert isinstance(setup_tracking(config, run_name="r", run_dir="."), NullTracker)
    assert isinstance(setup_tracking(TrackingConfig(), run_name="r", run_dir="."), NullTracker)


def test_tensorboard_event_file_holds_the_trl_keys_and_values(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = setup_tracking(TrackingConfig(tensorboard_dir=str(tmp_path / "tb")), run_name="r", run_dir=str(tmp_path))
    assert isinstance(tracker, TensorBoardTracker)
    tracker.record("train_step", STEP, step=3)
    tracker.record("train_step", {**STEP, "reward_mean": 0.75}, step=4)
    tracker.record("eval", EVAL, step=4)
    tracker.record("summary", {"eval_accuracy": 0.375}, step=4)
    tracker.close()

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    wanted = {"reward", "reward_std", "completions/mean_length", "clip_ratio/low_mean", "clip_ratio/high_mean", "kl",
              "entropy", "loss", "learning_rate", "staleness", "tokens_per_second", "eval/accuracy"}  # fmt: skip
    assert wanted <= scalars
    assert "settled" not in scalars and "elapsed" not in scalars and "step" not in scalars
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [(3, 0.5), (4, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(4, 0.375)]
    assert [(e.step, e.value) for e in events.Scalars("clip_ratio/low_mean")] == [(3, 0.0625), (4, 0.0625)]


def test_wandb_gets_one_run_with_redacted_config_and_each_events_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    config = TrackingConfig(tensorboard_dir=str(tmp_path / "tb"), wandb_project="slipstream", wandb_mode="offline")
    hparams = {"bus": {"url": "redis://:hunter2@redis:6379"}, "learner": {"lr": 0.001}}
    tracker = setup_tracking(config, run_name="demo", run_dir=str(tmp_path / "run"), hparams=hparams)
    assert isinstance(tracker, Trackers) and len(tracker.sinks) == 2  # TensorBoard and wandb at once
    tracker.record("train_step", STEP, step=3)
    tracker.record("eval", EVAL, step=3)
    tracker.close()

    kwargs = wandb.init_kwargs
    assert (kwargs["project"], kwargs["name"], kwargs["mode"]) == ("slipstream", "demo", "offline")
    assert kwargs["dir"] == str(tmp_path / "run") and (tmp_path / "run").is_dir()
    assert kwargs["config"] == {"bus": {"url": "redis://***@redis:6379"}, "learner": {"lr": 0.001}}
    assert [step for _, step in wandb.logged] == [3, 3]
    assert wandb.logged[0][0]["reward"] == 0.5 and wandb.logged[0][0]["clip_ratio/high_mean"] == 0.03125
    assert wandb.logged[1][0]["eval/accuracy"] == 0.375
    assert wandb.finished


@pytest.mark.parametrize(
    ("module", "config", "setting", "package"),
    [
        ("wandb", {"wandb_project": "slipstream"}, "wandb_project", "wandb"),
        ("torch.utils.tensorboard", {"tensorboard_dir": "tb"}, "tensorboard_dir", "tensorboard"),
    ],
)
def test_a_missing_package_is_an_error_naming_the_setting_and_the_pip_command(
    module: str, config: dict[str, str], setting: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(TrackingError) as error:
        setup_tracking(TrackingConfig(**config), run_name="r", run_dir=str(tmp_path))
    message = str(error.value)
    assert f"telemetry.tracking.{setting}" in message and f"the {package} package is not installed" in message
    assert "pip install 'slipstream[tracking]'" in message


@pytest.mark.parametrize(
    "tracking",
    [{"wandb_mode": "cloud"}, {"wandb_project": "team/project"}, {"wandb_project": ""}, {"tensorboard_dir": ""},
     {"tensorboard": "tb"}],
)  # fmt: skip
def test_bad_tracking_settings_are_rejected(tracking: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        TelemetryConfig(tracking=tracking)


def test_tracking_is_documented_and_off_by_default() -> None:
    assert TelemetryConfig().tracking == TrackingConfig(tensorboard_dir=None, wandb_project=None, wandb_mode="online")
    assert all(field.description for field in TrackingConfig.model_fields.values())
