"""`read_secret`: every secret (Redis password, engine API key, proxy token) is a file's first line, else an
environment variable, and a file that cannot give one is an error naming the setting."""

from pathlib import Path

import pytest

from bus.config import BusConfig
from bus.settings import ConfigError, read_secret
from rollout_node.config import RolloutConfig
from rollout_node.server_config import ServeEngineConfig


def test_the_file_wins_and_only_its_first_line_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_UNDER_TEST", "from-env")
    secret = tmp_path / "secret"
    secret.write_text("  from-file  \nsecond line\n")
    assert read_secret(str(secret), "SECRET_UNDER_TEST", "x_file") == "from-file"
    assert read_secret(None, "SECRET_UNDER_TEST", "x_file") == "from-env"


def test_the_environment_is_stripped_and_empty_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_UNDER_TEST", " padded \n")
    assert read_secret(None, "SECRET_UNDER_TEST", "x_file") == "padded"
    monkeypatch.setenv("SECRET_UNDER_TEST", "   ")
    assert read_secret(None, "SECRET_UNDER_TEST", "x_file") is None
    monkeypatch.delenv("SECRET_UNDER_TEST")
    assert read_secret(None, "SECRET_UNDER_TEST", "x_file") is None
    assert read_secret(None, None, "x_file") is None


@pytest.mark.parametrize("content", ["", "\n", "   \nsecret-on-line-two\n"])
def test_an_empty_file_is_an_error_naming_the_setting(tmp_path: Path, content: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text(content)
    with pytest.raises(ConfigError, match=r"^token_file: .*secret is empty \(the token is its first line\)$"):
        read_secret(str(secret), None, "token_file", "token")


def test_an_unreadable_file_is_an_error_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^key_file: cannot read a key from .*missing: No such file or directory$"):
        read_secret(str(tmp_path / "missing"), None, "key_file", "key")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ConfigError, match=r"^key_file: cannot read a key from .*binary: not text$"):
        read_secret(str(binary), None, "key_file", "key")


def test_every_secret_setting_reads_through_it(tmp_path: Path) -> None:
    """The Redis password, the proxy token and the engine API key follow one rule (docs/security.md)."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\nignored\n")
    assert BusConfig(password_file=str(secret)).password() == "s3cret"
    assert RolloutConfig(proxy_token_file=str(secret)).proxy_token() == "s3cret"
    assert ServeEngineConfig(api_key_file=str(secret)).api_key() == "s3cret"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for read, setting in [
        (BusConfig(password_file=str(empty)).password, "password_file"),
        (RolloutConfig(proxy_token_file=str(empty)).proxy_token, "proxy_token_file"),
        (ServeEngineConfig(api_key_file=str(empty)).api_key, "api_key_file"),
    ]:
        with pytest.raises(ConfigError, match=f"^{setting}: "):
            read()
