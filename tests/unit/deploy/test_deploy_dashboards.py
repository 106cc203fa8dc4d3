"""Grafana dashboards and provisioning: generated JSON in sync, queries valid PromQL over exported metrics only."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parents[3]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD_FILES = {"overview.json", "learner.json", "rollout.json", "bus.json"}


def load_dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted((GRAFANA / "dashboards").glob("*.json"))}


def panel_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL expression) for every query of every panel."""
    return [
        (name, panel["title"], target["expr"])
        for name, board in load_dashboards().items()
        for panel in board["panels"]
        for target in panel["targets"]
    ]


def test_json_files_are_generated_from_the_source(dashboards_source: ModuleType) -> None:
    assert dashboards_source.main(["--check"]) == 0, "run python deploy/grafana/dashboards.py"
    assert set(load_dashboards()) == DASHBOARD_FILES


def test_check_notices_a_hand_edited_file(dashboards_source: ModuleType, tmp_path: Path, monkeypatch) -> None:
    for path, text in dashboards_source.rendered_files().items():
        (tmp_path / path.name).write_text(text)
    monkeypatch.setattr(dashboards_source, "DASHBOARD_DIR", tmp_path)
    assert dashboards_source.main(["--check"]) == 0
    (tmp_path / "bus.json").write_text((tmp_path / "bus.json").read_text().replace("Stream length", "Length"))
    assert dashboards_source.main(["--check"]) == 1


def test_overview_covers_throughput_reward_accuracy_versions_staleness() -> None:
    titles = " | ".join(p["title"].lower() for p in load_dashboards()["overview.json"]["panels"])
    for topic in ("per second", "reward", "accuracy", "version", "staleness"):
        assert topic in titles, f"overview has no {topic} panel: {titles}"


def test_panels_are_well_formed_and_laid_out_without_overlap() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    uids = set()
    for name, board in load_dashboards().items():
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        cells: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            assert panel["targets"] and panel["description"], f"{name}: {panel['title']}"
            assert panel["datasource"]["uid"] == uid and all(t["datasource"]["uid"] == uid for t in panel["targets"])
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']} is wider than the grid"
            xs, ys = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
            area = {(x, y) for x in xs for y in ys}
            assert not cells & area, f"{name}: {panel['title']} overlaps another panel"
            cells |= area
    assert len(uids) == len(DASHBOARD_FILES)


def test_queries_use_only_exported_metrics_and_labels(
    series: dict[str, frozenset[str]], promql: Callable[[str], tuple[dict[str, set[str]], set[str]]]
) -> None:
    for board, title, expr in panel_exprs():
        used, grouping = promql(expr)
        where = f"{board} / {title}: {expr}"
        assert used, where
        for name, labels in used.items():
            assert name in series, f"{where}: {name} is not exported by telemetry.metrics"
            assert labels <= series[name], f"{where}: {name} has no label(s) {labels - series[name]}"
        known = set().union(*(series[n] for n in used))
        assert grouping <= known, f"{where}: groups by unknown labels {grouping - known}"


def test_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool parses expressions in rule files; each query becomes a recording rule ($__rate_interval is Grafana's).
    rules = [
        {"record": f"slipstream:panel_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, (_, _, expr) in enumerate(panel_exprs())
    ]
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", "panels.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_provisioning_matches_compose_mounts() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])  # source:target[:ro]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "slipstream.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
