"""The `slipstream` command: fast help, subcommand dispatch, override handling, key generation."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from slipstream.cli import COMMANDS, build_parser, main

HELP_WITHOUT_TORCH = """
import sys
from slipstream.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
assert "torch" not in sys.modules, "torch was imported"
assert "transformers" not in sys.modules, "transformers was imported"
"""


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in sorted(COMMANDS)])
def test_help_imports_neither_torch_nor_transformers(argv: list[str]) -> None:
    """Parse first, import torch later: that is what keeps `--help` instant."""
    out = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH.format(argv=argv)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "usage: slipstream" in out.stdout


def test_every_command_module_is_present() -> None:
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(choices) == set(COMMANDS)


def test_unknown_argument_is_an_error_for_commands_without_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["keys", "/tmp/x", "name", "--bogus.flag", "1"])
    assert "unrecognized arguments: --bogus.flag 1" in capsys.readouterr().err


def test_status_reports_a_bad_override_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="bus.block_ms"):
        main(["status", "--bus.url", "redis://127.0.0.1:1", "--bus.block_ms", "-5"])


def test_keys_writes_curve_pairs_with_private_secrets(tmp_path: Path) -> None:
    import zmq.auth

    assert main(["keys", str(tmp_path), "learner", "agent-1"]) == 0
    public, secret = zmq.auth.load_certificate(str(tmp_path / "agent-1.key_secret"))
    assert len(public) == 40 and secret is not None and len(secret) == 40
    assert stat.S_IMODE(os.stat(tmp_path / "agent-1.key_secret").st_mode) == 0o600
    with pytest.raises(SystemExit, match="exists"):
        main(["keys", str(tmp_path), "learner"])
    with pytest.raises(SystemExit, match="use 1-64 letters"):
        main(["keys", str(tmp_path), "../escape"])
