"""Every command that loads settings ends with an error naming the field and the rule when one is wrong
(`slipstream.commands.load_or_exit`): `slipstream <command>: ...` on stderr and a non-zero exit status."""

from pathlib import Path

import pytest

from slipstream.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve-engine", "--serve_engine.port", "-1"], r"^slipstream serve-engine: invalid settings:\n.*port"),
        (["status", "--bus.block_ms", "-5"], r"^slipstream status: invalid settings:\n.*bus\.block_ms"),
        (["status", "--config", "/nonexistent/run.toml"], r"^slipstream status: config file /nonexistent/run\.toml"),
        (["up", "--config", "/nonexistent/run.toml"], r"^slipstream up: config file /nonexistent/run\.toml: not found"),
        (["up", "--config", "/nonexistent/run.toml", "stray"], r"^slipstream up: override 'stray': expected"),
    ],
)
def test_a_bad_setting_exits_with_the_field_and_the_rule(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message) as exited:
        main(argv)
    assert exited.value.code != 0


def test_serve_engine_exits_naming_an_unreadable_api_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-key"
    with pytest.raises(SystemExit, match=r"^slipstream serve-engine: api_key_file: cannot read a key from .*no-key"):
        main(["serve-engine", "--serve_engine.api_key_file", str(missing)])


def test_rollout_exits_with_the_error_like_every_command() -> None:
    with pytest.raises(SystemExit, match="^slipstream rollout: config file /nonexistent/run.toml: not found$"):
        main(["rollout", "--config", "/nonexistent/run.toml"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--up.demo_model.path", "/tmp/m"], "up.demo_model.path: Extra inputs are not permitted"),
        (["--up.demo_model.num_heads", "3"], "up.demo_model.num_heads: Value error, hidden_size (128) / num_heads"),
    ],
)
def test_up_names_a_bad_demo_model_field_before_starting_anything(override: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["up", "--config", "configs/demo.toml", *override])
    error = str(exited.value.code)  # printed on stderr by the interpreter, with exit status 1
    assert error.startswith("slipstream up: invalid settings") and message in error
