"""BusConfig: documented, bounded fields; errors that name the field; stream keys, codec limits, passwords."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bus.config import BusConfig
from bus.settings import ConfigError, NodeSettings, load_settings


class Node(NodeSettings):
    bus: BusConfig = BusConfig()


def test_every_field_is_documented() -> None:
    undocumented = [name for name, f in BusConfig.model_fields.items() if not f.description]
    assert undocumented == []


def test_stream_keys_take_the_prefix() -> None:
    config = BusConfig(prefix="exp1:", tasks_stream="prompts")
    assert config.stream("tasks") == "exp1:prompts"
    assert config.stream("trajectories") == "exp1:trajectories"
    assert config.dead == "exp1:dead"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"type": "kafka"}, "type"),
        ({"max_stream_length": 0}, "max_stream_length"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"lease_ms": 1}, "lease_ms"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"block_ms": 5000, "socket_timeout_s": 2}, "block_ms"),
        ({"reconnect_min_s": 10, "reconnect_max_s": 1}, "reconnect_min_s"),
        ({"zmq_curve_allowed_keys_dir": "/keys"}, "zmq_curve_secret_key_file"),
        ({"control_stream": "tasks"}, "control_stream"),
        ({"password_env": "not a name"}, "password_env"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        BusConfig(**overrides)


def test_loads_from_toml_and_cli_overrides_with_errors_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[bus]\ntype = "zmq"\nmax_stream_length = 50\n')
    settings = load_settings(Node, path, ["--bus.max_stream_length", "7", "--bus.prefix=x:"])
    assert (settings.bus.type, settings.bus.max_stream_length, settings.bus.prefix) == ("zmq", 7, "x:")
    with pytest.raises(ConfigError, match="bus.max_stream_length"):
        load_settings(Node, path, ["--bus.max_stream_length", "-1"])


def test_codec_limits_follow_the_config() -> None:
    limits = BusConfig(max_tokens=99, vocab_size=1000, max_message_bytes=4096).limits()
    assert (limits.max_tokens, limits.vocab_size, limits.max_message_bytes) == (99, 1000, 4096)


def test_password_comes_from_a_file_first_then_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_REDIS_PASSWORD", "from-env")
    assert BusConfig(password_env="MY_REDIS_PASSWORD").password() == "from-env"
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    assert BusConfig(password_file=str(secret), password_env="MY_REDIS_PASSWORD").password() == "from-file"
    monkeypatch.delenv("MY_REDIS_PASSWORD")
    assert BusConfig(password_env="MY_REDIS_PASSWORD").password() is None
    with pytest.raises(ValueError, match="password_file: cannot read a password from"):
        BusConfig(password_file=str(tmp_path / "missing")).password()
