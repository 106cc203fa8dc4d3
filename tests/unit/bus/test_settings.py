"""Settings loading: defaults < TOML < environment < dotted CLI overrides, with errors that name the field."""

from pathlib import Path

import pytest
from pydantic import Field

from bus.settings import ConfigError, NodeSettings, Section, load_settings, parse_overrides


class Optim(Section):
    lr: float = Field(1e-3, gt=0, le=1, description="learning rate")
    steps: int = Field(10, ge=1, description="optimizer steps")
    betas: list[float] = Field([0.9, 0.99], description="AdamW betas")


class Link(Section):
    url: str | None = Field(None, description="bus URL")


class Node(NodeSettings):
    optim: Optim = Optim()
    link: Link = Link()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 0.01\nsteps = 5\n[other_node]\nanything = 1\n")
    return path


def test_defaults_without_file() -> None:
    assert load_settings(Node).optim.lr == 1e-3


def test_toml_then_cli_override_one_field(config_file: Path) -> None:
    s = load_settings(Node, config_file, ["--optim.lr", "1e-6", "--optim.betas=[0.8, 0.9]"])
    assert s.optim.lr == 1e-6
    assert s.optim.steps == 5  # the rest of the TOML section survives a one-field override
    assert s.optim.betas == [0.8, 0.9]


def test_environment_between_toml_and_cli(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_LINK__URL", "redis://env:1")
    assert load_settings(Node, config_file).link.url == "redis://env:1"
    assert load_settings(Node, config_file, ["--link.url", "redis://cli:2"]).link.url == "redis://cli:2"


def test_other_nodes_sections_are_ignored_but_cli_sections_must_exist(config_file: Path) -> None:
    load_settings(Node, config_file)
    with pytest.raises(ConfigError, match=r"\['other_node'\]"):
        load_settings(Node, config_file, ["--other_node.anything", "2"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["--optim.lr", "-1"], "optim.lr: Input should be greater than 0"),
        (["--optim.lrr", "1"], "optim.lrr: Extra inputs are not permitted"),
        (["--optim.steps", "many"], "optim.steps"),
        (["optim.lr"], "expected --section.field"),
    ],
)
def test_errors_name_field_and_rule(config_file: Path, override: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_settings(Node, config_file, override)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(Node, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(Node, tmp_path / "missing.toml")


def test_override_values_parse_as_json_then_toml_then_string() -> None:
    parsed = parse_overrides(["--a.n", "3", "--a.f", "true", "--a.s", "hello world", "--a.flag"])
    assert parsed == {"a": {"n": 3, "f": True, "s": "hello world", "flag": True}}
