"""The learner's settings: one TOML for every node, dotted overrides, errors that name the field and the rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bus.settings import ConfigError, load_settings
from learner_node.config import LearnerConfig, LearnerSettings

TOML = """
[run]
name = "t"
[learner]
algorithm = "ppo"
groups_per_step = 4
lr = 1e-4
[rollout]            # another node's section: ignored here
tasks_per_call = 2
"""


def test_settings_from_toml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    settings = load_settings(LearnerSettings, path, ["--learner.lr", "3e-3", "--broadcast.master_port=0"])
    assert (settings.learner.algorithm, settings.learner.groups_per_step, settings.learner.lr) == ("ppo", 4, 3e-3)
    assert settings.broadcast.master_port == 0 and settings.run.name == "t"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--learner.lr", "0"], "learner.lr: Input should be greater than 0"),
        (["--learner.algorithm", "a2c"], "learner.algorithm"),
        (["--learner.lr_typo", "1"], "learner.lr_typo: Extra inputs are not permitted"),
        (["--learner.importance_floor", "0.9", "--learner.importance_cap", "0.5"], "importance_floor (0.9) must be <"),
        (["--learner.num_generations", "1"], "num_generations (1) must be >= min_group_size (2)"),
        (["--learner.group_timeout_s", "120"], "group_timeout_s (120.0) must be shorter than bus.lease_ms"),
    ],
)
def test_bad_settings_name_the_field_and_the_rule(override: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(LearnerSettings, None, override)
    assert message in str(error.value)


def test_grpo_needs_pairs_of_samples_ppo_does_not() -> None:
    with pytest.raises(ValueError, match="min_group_size: must be >= 2 for grpo"):
        LearnerConfig(min_group_size=1, num_generations=1)
    assert LearnerConfig(algorithm="ppo", min_group_size=1, num_generations=1).min_group_size == 1


def test_command_help_is_light_and_a_bad_config_fails_before_starting(tmp_path: Path) -> None:
    code = "import sys; from slipstream.cli import main; main(['learner', '--help'])"
    probe = "import sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", f"{code}"], capture_output=True, text=True)
    assert "--nproc-per-node" in out.stdout and "--resume" in out.stdout
    light = subprocess.run(
        [sys.executable, "-c", f"import slipstream.commands.learner, learner_node.config; {probe}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert light.stdout.strip() == "False"  # parsing and settings never load torch
    bad = subprocess.run(
        [sys.executable, "-m", "slipstream", "learner", "--learner.max_steps", "0"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "learner.max_steps" in bad.stderr
