"""Fixtures for the deployment tests: tools, the dashboards source, exported metric names, PromQL name extraction,
CLI and settings checks (fixtures, because test modules cannot import a conftest).

The deploy files are data (YAML, JSON, Dockerfiles), so these tests read them as an operator's tool would and check
them against the code they describe: metric names against `telemetry.metrics`, commands against the CLI parser.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
# Series Prometheus writes itself (per target), usable in any query.
BUILTIN_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}
_PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def require_tool(name: str) -> str:
    """Path of executable `name`; a missing one skips the test, or fails it under CI=true (where it must exist)."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (Debian: apt-get install -y prometheus docker-compose provides it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}; CI=true: a missing tool is a failure")
        pytest.skip(why)
    return path


def load_dashboards_source() -> ModuleType:
    """deploy/grafana/dashboards.py as a module (deploy/ is not a package: it is loaded by path)."""
    spec = importlib.util.spec_from_file_location("slipstream_dashboards", DEPLOY / "grafana" / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name a scraped node has (`telemetry.metrics.REGISTRY`'s `..._total`, `..._bucket`, ... and
    Prometheus' own `up`) -> the label names it carries, including the target labels Prometheus adds."""
    from telemetry.metrics import REGISTRY

    series = {name: labels | TARGET_LABELS for name, labels in BUILTIN_SERIES.items()}
    # prometheus_client keeps the name -> collector map and a wrapper's label names only privately; a labelled metric
    # with no children yet exports nothing through the public collect(), so its labels are not visible otherwise.
    for name, collector in REGISTRY._names_to_collectors.items():  # noqa: SLF001
        # A histogram with a negative bucket reserves its `_sum` name but never exports it (OpenMetrics forbids a
        # sum that can decrease), so a query on it would find nothing.
        if name.endswith("_sum") and getattr(collector, "_upper_bounds", [0.0])[0] < 0:
            continue
        labels = frozenset(getattr(collector, "_labelnames", ())) | TARGET_LABELS
        series[name] = labels | {"le"} if name.endswith("_bucket") else labels
    return series


def promql_references(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """Series names used in a PromQL expression with the label names matched on each, and the grouping labels.

    `sum by (stream) (rate(x_total{job="a", event=~"b"}[5m]))` -> ({"x_total": {"job", "event"}}, {"stream"}).
    A small scanner, not a parser: enough for the dashboards' and alerts' expressions, which it is tested on.
    """
    grouping: set[str] = set()

    def take_grouping(match: re.Match[str]) -> str:
        grouping.update(label.strip() for label in match.group(1).split(",") if label.strip())
        return " "

    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may contain anything
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", take_grouping, text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    series: dict[str, set[str]] = {}
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}", text):
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(2)))
        if match.group(1):
            series.setdefault(match.group(1), set()).update(labels)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b", " ", text)
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", text):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name.lower() not in _PROMQL_KEYWORDS:
            series.setdefault(name, set())
    return series, grouping


# Config section -> the class that reads it, where that class is known to the deploy files: an environment variable
# SLIPSTREAM_<SECTION>__<FIELD> or an override --section.field must name one of its fields.
SECTION_CLASSES: dict[str, str] = {
    "bus": "bus.config:BusConfig",
    "telemetry": "telemetry.config:TelemetryConfig",
    "broadcast": "weight_broadcast.config:BroadcastConfig",
    "weights": "weight_broadcast.config:ReceiverConfig",
    "learner": "learner_node.config:LearnerConfig",
    "rollout": "rollout_node.config:RolloutConfig",
}


def section_fields(section: str) -> set[str] | None:
    """Field names of a config section's class, or None while that class is not written yet."""
    module_name, _, class_name = SECTION_CLASSES[section].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None
    if not hasattr(module, class_name):
        pytest.fail(f"{module_name} has no {class_name}: update SECTION_CLASSES in tests/unit/deploy/conftest.py")
    return set(getattr(module, class_name).model_fields)


def setting_errors(setting: str) -> list[str]:
    """Problems with one setting written as `SLIPSTREAM_SECTION__FIELD` or `--section.field` (empty: fine)."""
    if setting.startswith("SLIPSTREAM_"):
        section, _, name = setting.removeprefix("SLIPSTREAM_").lower().partition("__")
    else:
        section, _, name = setting.removeprefix("--").replace("-", "_").partition(".")
    if section not in SECTION_CLASSES:
        return [f"{setting}: unknown config section {section!r} (known: {sorted(SECTION_CLASSES)})"]
    fields = section_fields(section)
    if fields is not None and name not in fields:
        return [f"{setting}: {SECTION_CLASSES[section]} has no field {name!r}"]
    return []


def parse_slipstream_command(argv: list[str]) -> bool:
    """Parse `slipstream ARGV` exactly as `slipstream.cli.main` does; False when the subcommand is not built yet.

    An unknown subcommand or a flag the subcommand rejects fails the test (argparse exits with status 2).
    """
    from slipstream.cli import COMMANDS, build_parser

    assert argv and argv[0] in COMMANDS, f"{argv}: {argv[:1]} is not a slipstream command ({sorted(COMMANDS)})"
    parser = build_parser()
    built = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: SLF001
    if argv[0] not in built:
        return False
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:
        pytest.fail(f"slipstream {' '.join(argv)}: rejected by the CLI parser (exit {exc.code})")
    if unknown and not getattr(args, "_takes_overrides", False):
        pytest.fail(f"slipstream {' '.join(argv)}: rejected by the CLI parser: {unknown}")
    return True


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    """`require_tool`."""
    return require_tool


@pytest.fixture(scope="session")
def dashboards_source() -> ModuleType:
    return load_dashboards_source()


@pytest.fixture(scope="session")
def series() -> dict[str, frozenset[str]]:
    """`exported_series()`."""
    return exported_series()


@pytest.fixture(scope="session")
def promql() -> Callable[[str], tuple[dict[str, set[str]], set[str]]]:
    """`promql_references`."""
    return promql_references


@pytest.fixture(scope="session")
def check_command() -> Callable[[list[str]], bool]:
    """`parse_slipstream_command`."""
    return parse_slipstream_command


@pytest.fixture(scope="session")
def check_setting() -> Callable[[str], list[str]]:
    """`setting_errors`."""
    return setting_errors
