"""A learner process with `[telemetry.tracking] tensorboard_dir`: its event file holds the numbers of its log lines
under TRL-like keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import FakeRollout, LearnerProcess


@pytest.mark.timeout(180)
def test_the_learner_writes_its_step_and_eval_metrics_to_tensorboard(
    tmp_path: Path, redis_server: Any, learner_config: Callable[..., Path]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = learner_config(max_steps=3, checkpoint_every=0)
    board = tmp_path / "tensorboard"
    with FakeRollout(redis_server.url):
        learner = LearnerProcess(config, "--telemetry.tracking.tensorboard_dir", str(board))
        assert learner.finish() == 0, "".join(learner.lines[-30:])

    events = EventAccumulator(str(board))
    events.Reload()
    steps = {e["step"]: e for e in learner.named("train_step")}
    assert sorted(steps) == [1, 2, 3]
    for key, field in [("reward", "reward_mean"), ("reward_std", "reward_std"), ("loss", "loss"),
                       ("completions/mean_length", "completion_length_mean"), ("clip_ratio/low_mean", "clip_frac_low"),
                       ("staleness", "staleness_mean"), ("learning_rate", "lr")]:  # fmt: skip
        written = {e.step: e.value for e in events.Scalars(key)}
        assert written == pytest.approx({step: e[field] for step, e in steps.items()}, rel=1e-6), key
    [final] = learner.named("eval")  # eval_every = 0: one evaluation, at the end
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(3, pytest.approx(final["eval_accuracy"]))]
