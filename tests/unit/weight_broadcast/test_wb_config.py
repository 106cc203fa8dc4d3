"""`[broadcast]` / `[weights]` sections: defaults, bounds that name the field, TOML + CLI loading, torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from bus.settings import ConfigError, NodeSettings, load_settings
from weight_broadcast.config import BroadcastConfig, ReceiverConfig


class Learner(NodeSettings):
    broadcast: BroadcastConfig = BroadcastConfig()


class Rollout(NodeSettings):
    weights: ReceiverConfig = ReceiverConfig()


def test_sections_load_from_toml_with_cli_overrides(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        '[broadcast]\nmaster_addr = "learner-0"\nbucket_mb = 64\n\n[weights]\nmaster_addr = "learner-0"\n'
    )
    learner = load_settings(Learner, config, ["--broadcast.checksum", "crc32", "--broadcast.timeout_s=5"])
    assert (learner.broadcast.master_addr, learner.broadcast.checksum) == ("learner-0", "crc32")
    assert learner.broadcast.bucket_bytes == 64 * 2**20 and learner.broadcast.timeout_s == 5
    rollout = load_settings(Rollout, config, ["--weights.double_buffer"])
    assert rollout.weights.master_addr == "learner-0" and rollout.weights.double_buffer is True


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["--broadcast.bucket_mb", "0"], "broadcast.bucket_mb"),
        (["--broadcast.timeout_s", "-1"], "broadcast.timeout_s"),
        (["--broadcast.master_port", "70000"], "broadcast.master_port"),
        (["--broadcast.checksum", "md5"], "broadcast.checksum"),
        (["--broadcast.backend", "mpi"], "broadcast.backend"),
        (["--broadcast.group_prefix", "has space"], "broadcast.group_prefix"),
        (["--broadcast.bucket_size", "1"], "broadcast.bucket_size"),
    ],
)
def test_bad_values_are_refused_naming_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(Learner, None, overrides)


def test_bucket_size_defaults_to_its_backend() -> None:
    """Small buckets pipeline copying with sending on CPUs; SGLang pays an HTTP call per bucket."""
    assert BroadcastConfig(backend="gloo").bucket_bytes < BroadcastConfig(backend="nccl").bucket_bytes
    assert BroadcastConfig(backend="nccl", bucket_mb=1.5).bucket_bytes == 3 * 2**19


def test_receiver_names_must_be_usable_as_store_keys() -> None:
    with pytest.raises(ValidationError, match="name"):
        ReceiverConfig(name="a/b")


def test_config_module_does_not_import_torch() -> None:
    code = "import sys, weight_broadcast.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
