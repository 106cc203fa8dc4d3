"""Rendering the Redis ACL file: password hashes from files, keys from the [bus] config, no secret ever printed.

(That the rendered rules load into a real redis-server and hold there is test_acl_roles.py's job.)
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from bus.acl import TEMPLATE, AclError, main, render, user_names, write_passwords
from bus.config import BusConfig


def users(text: str) -> dict[str, str]:
    """user name -> its whole rule line."""
    return {line.split()[1]: line for line in text.splitlines()}


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    write_passwords(folder, [*user_names(), "producer-agent-1", "producer-agent-2"])
    return folder


def test_the_shipped_template_renders_every_role_with_hashes_and_no_placeholders(secrets_dir: Path) -> None:
    text = render(BusConfig(), secrets_dir)
    rules = users(text)
    assert set(rules) == {"default", "admin", "learner", "rollout", "status", "producer", "producer-agent-1",
                          "producer-agent-2"}  # fmt: skip
    assert rules["default"].split()[2] == "off"
    for name, line in rules.items():
        if name == "default":
            continue
        password = (secrets_dir / name).read_text().strip()
        assert f" #{hashlib.sha256(password.encode()).hexdigest()} " in line
        assert password not in text  # only the hash goes into the file
    assert "{" not in text and "#" not in text.replace(" #", "")  # no placeholder left, no comment line
    assert "(%W~slipstream:trajectories +xadd +xlen)" in rules["producer-agent-1"]
    assert "~slipstream:tasks" not in rules["producer"]


def test_a_producer_user_per_password_file_and_none_without(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    write_passwords(folder, ["admin", "learner", "rollout", "status"])
    assert not any(name.startswith("producer") for name in users(render(BusConfig(), folder)))
    write_passwords(folder, ["producer-x"])
    assert [n for n in users(render(BusConfig(), folder)) if n.startswith("producer")] == ["producer-x"]


def test_keys_follow_the_bus_config_with_glob_characters_escaped(secrets_dir: Path) -> None:
    config = BusConfig(prefix="run*1:", trajectories_stream="traj[a]")
    rules = users(render(config, secrets_dir))
    assert "(%W~run\\*1:traj\\[a\\] +xadd +xlen)" in rules["producer"]
    assert "(%R~run\\*1:* " in rules["status"]  # the prefix is literal, the trailing * is the wildcard
    assert "(~run\\*1:dedup:* " in rules["learner"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prefix": "a b:"}, r"prefix: 'a b:' cannot go into an ACL file \(no whitespace or parentheses\)"),
        ({"tasks_stream": "t(1)"}, r"tasks_stream: 'slipstream:t\(1\)' cannot go into an ACL file"),
    ],
)
def test_keys_that_cannot_be_written_name_the_field(secrets_dir: Path, fields: dict[str, str], message: str) -> None:
    with pytest.raises(AclError, match=message):
        render(BusConfig(**fields), secrets_dir)


def test_missing_short_or_empty_passwords_are_refused_by_name(secrets_dir: Path) -> None:
    (secrets_dir / "learner").unlink()
    with pytest.raises(AclError, match=r"password file .*/learner: missing \(user learner;"):
        render(BusConfig(), secrets_dir)
    (secrets_dir / "learner").write_text("short\n")
    with pytest.raises(AclError, match="learner: the password must have at least 16 characters"):
        render(BusConfig(), secrets_dir)
    (secrets_dir / "learner").write_text("\n")
    with pytest.raises(AclError, match="learner: "):
        render(BusConfig(), secrets_dir)


def test_template_mistakes_name_the_line(secrets_dir: Path) -> None:
    with pytest.raises(AclError, match=r"template line 2: unknown placeholder \{stream\}"):
        render(BusConfig(), secrets_dir, "# comment\nuser admin on {password} ~{stream}\n")
    with pytest.raises(AclError, match="template line 1: must start with 'user NAME'"):
        render(BusConfig(), secrets_dir, "admin on nopass\n")
    with pytest.raises(AclError, match="template line 1: a continuation line before any user line"):
        render(BusConfig(), secrets_dir, "  +@all\n")


def test_password_files_are_private_random_and_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    written = write_passwords(folder, ["learner", "status"])
    assert [p.name for p in written] == ["learner", "status"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written)
    first = (folder / "learner").read_text()
    assert len(first.strip()) >= 40 and first != (folder / "status").read_text()
    assert write_passwords(folder, ["learner"]) == []
    assert (folder / "learner").read_text() == first
    with pytest.raises(AclError, match="user name 'a b'"):
        write_passwords(folder, ["a b"])


def test_command_line_prints_the_file_and_keeps_passwords_off_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "secrets"
    assert main(["passwords", str(folder)]) == 0
    out, err = capsys.readouterr()
    passwords = [(folder / name).read_text().strip() for name in user_names()]
    assert out == "" and all(p not in err for p in passwords) and f"wrote {folder / 'learner'}" in err
    config = tmp_path / "run.toml"
    config.write_text('[bus]\nprefix = "exp7:"\n')
    assert main(["render", "--password-dir", str(folder), "--config", str(config), "--bus.dead_stream", "dlq"]) == 0
    out, err = capsys.readouterr()
    assert "(%W~exp7:dlq +xadd)" in users(out)["rollout"] and err == ""
    assert all(p not in out for p in passwords)
    assert main(["render", "--password-dir", str(tmp_path / "none"), "--template", str(TEMPLATE)]) == 2
    assert "bus.acl render: password file" in capsys.readouterr().err
