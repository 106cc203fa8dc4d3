"""Every config in configs/ loads with every node's settings: no typo, no out-of-bounds value, no stale field."""

import tomllib
from pathlib import Path

import pytest

from bus.settings import load_settings
from learner_node.config import LearnerSettings
from rollout_node.config import RolloutSettings
from rollout_node.server_config import ServeEngineSettings
from slipstream.launcher import UpSettings

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))
NODES = [LearnerSettings, RolloutSettings, ServeEngineSettings, UpSettings]
KNOWN_SECTIONS = set().union(*(cls.model_fields for cls in NODES))


def test_there_are_configs_for_every_algorithm() -> None:
    names = {path.stem for path in CONFIGS}
    assert {"demo", "grpo", "ppo", "dpo", "gpu-grpo"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_for_every_node(path: Path) -> None:
    sections = set(tomllib.loads(path.read_text()))
    assert sections <= KNOWN_SECTIONS, f"{path.name}: sections no node reads: {sorted(sections - KNOWN_SECTIONS)}"
    for cls in NODES:
        load_settings(cls, path)  # raises ConfigError naming the field and the rule
