"""The rollout node's settings: one TOML shared with other nodes, defaults taken from [model], bounded fields, the
proxy token's sources, and the `slipstream rollout` command's handling of overrides."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bus.settings import ConfigError, load_settings
from rollout_node.config import RolloutSettings
from slipstream.cli import main

SHARED_TOML = """
[bus]
url = "redis://bus:6379/0"

[model]
path = "runs/x/model"
dtype = "bfloat16"

[learner]                 # another node's section: ignored by the rollout node
lr = 1e-4

[rollout]
tasks_per_call = 8
proxy_port = 8000

[rollout.torch]
max_batch_size = 32
"""


def test_shared_toml_loads_and_engine_settings_default_to_the_model_section(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(SHARED_TOML)
    settings = load_settings(RolloutSettings, config, ["--rollout.index", "3"])
    assert settings.rollout.tasks_per_call == 8 and settings.rollout.proxy_port == 8000
    assert settings.rollout.resolved_node_id() == f"{socket.gethostname()}-3"
    engine = settings.torch_engine_config()
    assert (engine.model_path, engine.dtype, engine.max_batch_size) == ("runs/x/model", "bfloat16", 32)
    assert settings.sglang_config().model_path == "runs/x/model"  # no [rollout.sglang]: launch on [model]

    # What [rollout.torch] or [rollout.sglang] set themselves wins over [model].
    own = load_settings(
        RolloutSettings,
        config,
        ["--rollout.torch.model_path", "other", "--rollout.sglang.url", "http://h:30000", "--rollout.node_id", "n-1"],
    )
    assert own.torch_engine_config().model_path == "other" and own.torch_engine_config().dtype == "bfloat16"
    assert own.sglang_config().url == "http://h:30000"
    assert own.rollout.resolved_node_id() == "n-1"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        (["--rollout.tasks_per_call", "0"], "rollout.tasks_per_call"),
        (["--rollout.proxy_port", "70000"], "rollout.proxy_port"),
        (["--rollout.node_id", "has space"], "rollout.node_id"),
        (["--rollout.engine", "vllm"], "rollout.engine"),
        (["--rollout.sglang.port", "1"], "rollout.sglang"),  # neither url nor model_path
        (["--rollout.unknown", "1"], "rollout.unknown"),
    ],
)
def test_bad_settings_name_the_field(override: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(RolloutSettings, None, override)


def test_proxy_token_comes_from_file_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLIPSTREAM_PROXY_TOKEN", raising=False)
    assert load_settings(RolloutSettings).rollout.proxy_token() is None
    monkeypatch.setenv("SLIPSTREAM_PROXY_TOKEN", "from-env")
    assert load_settings(RolloutSettings).rollout.proxy_token() == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    settings = load_settings(RolloutSettings, None, ["--rollout.proxy_token_file", str(token_file)])
    assert settings.rollout.proxy_token() == "from-file"
    missing = load_settings(RolloutSettings, None, ["--rollout.proxy_token_file", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="proxy_token_file"):
        missing.rollout.proxy_token()


def test_command_reports_bad_settings_before_loading_anything() -> None:
    with pytest.raises(SystemExit, match="rollout.tasks_per_call"):
        main(["rollout", "--rollout.tasks_per_call", "0"])
    with pytest.raises(SystemExit, match="nodes"):
        main(["rollout", "--nodes.x", "1"])
