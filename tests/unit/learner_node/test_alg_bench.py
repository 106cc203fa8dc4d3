"""bench/losses.py on a tiny problem: --json prints exactly one JSON object with a ratio for every function."""

from __future__ import annotations

import json

import pytest

from bench import losses

TINY = ["--batch", "4", "--tokens", "16", "--group-size", "2", "--model-batch", "2", "--vocab", "32"]
TINY += ["--hidden", "64", "--layers", "1", "--repeats", "1"]


def test_bench_losses_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert losses.main([*TINY, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # fails unless stdout is exactly one JSON document
    assert report["batch"] == 4 and report["tokens"] == 16
    assert "scaled x2" in report["note"]
    expected = {"policy_loss_token_tis", "value_loss_clipped", "dpo_loss", "gae", "vtrace", "token_logprobs"}
    assert expected <= set(report["losses"])
    for row in report["losses"].values():
        assert row["seconds"] > 0 and row["ratio_to_model_step"] == pytest.approx(
            row["seconds"] / report["model_step_seconds"]
        )


def test_bench_losses_table_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert losses.main(TINY) == 0
    assert "x model step" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        losses.main(["--batch", "6", "--group-size", "4"])
    assert exit_info.value.code == 2
