"""The learner's settings: one TOML for every node, dotted overrides, errors that name the field and the rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bus.settings import ConfigError, load_settings
from learner_node.config import TRL_ALIASES, TRL_REFUSED, LearnerConfig, LearnerSettings

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
        (["--learner.tasks", "none", "--learner.target_accuracy", "0.9"], "target_accuracy: never reached with tasks"),
        (["--learner.tasks", "agent"], "learner.tasks"),
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


TRL_TOML = """
[learner]
learning_rate = 5e-6
num_iterations = 2
max_completion_length = 256
per_device_train_batch_size = 16
loss_type = "dr_grpo"
num_generations = 4          # the names TRL and Slipstream share need nothing
beta = 0.04
epsilon_high = 0.28
scale_rewards = "batch"
importance_sampling_level = "sequence"
"""


def test_trl_grpo_config_names_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "trl.toml"
    path.write_text(TRL_TOML)
    learner = load_settings(LearnerSettings, path).learner
    assert (learner.lr, learner.ppo_epochs, learner.max_new_tokens, learner.micro_batch_size) == (5e-6, 2, 256, 16)
    assert learner.loss_agg == "seq-mean-token-sum-norm"
    assert (learner.num_generations, learner.beta, learner.epsilon_high) == (4, 0.04, 0.28)
    assert (learner.scale_rewards, learner.importance_sampling_level) == ("batch", "sequence")
    assert "learning_rate" not in learner.model_dump()  # only Slipstream's names are kept


@pytest.mark.parametrize(
    ("loss_type", "loss_agg"),
    [("dapo", "token-mean"), ("bnpo", "token-mean"), ("grpo", "seq-mean-token-mean"),
     ("dr_grpo", "seq-mean-token-sum-norm")],
)  # fmt: skip
def test_trl_loss_type_sets_loss_agg(loss_type: str, loss_agg: str) -> None:
    assert LearnerConfig(loss_type=loss_type).loss_agg == loss_agg


def test_trl_boolean_scale_rewards() -> None:
    assert LearnerConfig(scale_rewards=True).scale_rewards == "group"
    assert LearnerConfig(scale_rewards=False).scale_rewards == "none"
    assert load_settings(LearnerSettings, None, ["--learner.scale_rewards", "false"]).learner.scale_rewards == "none"


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo", "vespo", "token-mean", ""])
def test_other_trl_loss_types_are_refused(loss_type: str) -> None:
    with pytest.raises(ConfigError, match=rf"learner: .*loss_type: '{loss_type}' is not accepted; accepted: 'dapo'"):
        load_settings(LearnerSettings, None, [f"--learner.loss_type={loss_type}"])


REFUSED_TRL_NAMES = [  # (name, part of its reason)
    ("gradient_accumulation_steps", "set groups_per_step"),
    ("steps_per_generation", "groups_per_step fresh groups"),
    ("generation_batch_size", "set groups_per_step"),
    ("use_vllm", "rollout nodes"),
    ("vllm_mode", "rollout nodes"),
    ("vllm_importance_sampling_correction", "set importance_correction"),
    ("vllm_importance_sampling_mode", "set importance_correction"),
    ("vllm_importance_sampling_cap", "set importance_cap"),
    ("vllm_importance_sampling_clip_max", "set importance_cap"),
    ("vllm_importance_sampling_clip_min", "set importance_floor"),
    ("mask_truncated_completions", "truncated completions"),
    ("top_k", "temperature and top_p"),
    ("min_p", "temperature and top_p"),
    ("repetition_penalty", "temperature and top_p"),
    ("lr_scheduler_type", "set lr_scheduler"),
    ("use_bias_correction_kl", "not weighted by the ratio"),
    ("delta", "set dual_clip"),
]


@pytest.mark.parametrize(("name", "reason"), REFUSED_TRL_NAMES)
def test_trl_names_without_an_equivalent_are_refused_with_the_reason(tmp_path: Path, name: str, reason: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[learner]\n{name} = 1\n")
    with pytest.raises(ConfigError) as error:
        load_settings(LearnerSettings, path)
    message = str(error.value)
    assert f"{name}: TRL's GRPOConfig setting, not used by Slipstream" in message and reason in message


def test_every_refused_trl_name_is_tested_and_no_alias_is_a_field() -> None:
    assert {name for name, _ in REFUSED_TRL_NAMES} == set(TRL_REFUSED)
    fields = set(LearnerConfig.model_fields)
    assert set(TRL_ALIASES.values()) <= fields and not (set(TRL_ALIASES) | set(TRL_REFUSED)) & fields


@pytest.mark.parametrize(
    ("alias", "name", "value"),
    [("learning_rate", "lr", "1e-5"), ("num_iterations", "ppo_epochs", "2"),
     ("max_completion_length", "max_new_tokens", "32"), ("per_device_train_batch_size", "micro_batch_size", "8"),
     ("loss_type", "loss_agg", '"grpo"')],
)  # fmt: skip
def test_a_trl_name_and_its_slipstream_name_together_are_refused(
    tmp_path: Path, alias: str, name: str, value: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[learner]\n{name} = {value}\n")
    with pytest.raises(ConfigError, match=f"{alias} and {name}: both given"):  # the file's name and the CLI's
        load_settings(LearnerSettings, path, [f"--learner.{alias}", value])
    with pytest.raises(ValueError, match=f"{alias} and {name}: both given"):
        LearnerConfig(**{alias: 1, name: 1})


def test_dotted_cli_overrides_take_trl_names(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TOML.replace("lr = 1e-4", "learning_rate = 1e-4"))
    overrides = ["--learner.learning_rate", "1e-3", "--learner.loss_type=grpo", "--learner.num-iterations", "3"]
    learner = load_settings(LearnerSettings, path, overrides).learner
    assert (learner.lr, learner.loss_agg, learner.ppo_epochs) == (1e-3, "seq-mean-token-mean", 3)
    assert learner.groups_per_step == 4  # the file's other settings stay
    with pytest.raises(ConfigError, match=r"learner.lr: Input should be greater than 0"):  # bounds of the field apply
        load_settings(LearnerSettings, None, ["--learner.learning_rate", "0"])
