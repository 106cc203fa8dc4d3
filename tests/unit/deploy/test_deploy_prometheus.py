"""Prometheus config and alert rules: promtool accepts them, every alert is proven to fire, names exist."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[3] / "deploy" / "prometheus"

REQUIRED_ALERTS = {
    "SlipstreamLearnerStuck",
    "SlipstreamNoTrajectories",
    "SlipstreamDeadLettersGrowing",
    "SlipstreamRolloutNodeDown",
    "SlipstreamStalenessAboveBound",
}


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_config_and_rules(promtool: str) -> None:
    config = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr
    rules = run_promtool(promtool, "check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_every_alert_fires_in_promtool_unit_tests(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # An alert without a firing case in alerts_test.yml is unproven: each must appear with a non-empty expectation.
    cases = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    proven = {c["alertname"] for t in cases for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
    assert {r["alert"] for r in alert_rules()} <= proven


def test_promtool_unit_tests_fail_when_an_alert_is_broken(promtool: str, tmp_path: Path) -> None:
    # The unit tests are worth something only if they notice a broken rule: raise the stuck threshold to a day.
    broken = (PROMETHEUS_DIR / "alerts.yml").read_text().replace("> 600", "> 86400")
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "SlipstreamLearnerStuck" in result.stdout + result.stderr


def test_required_alerts_exist_with_severity_and_docs() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert set(rules) >= REQUIRED_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_alert_expressions_use_only_exported_metrics_and_labels(
    series: dict[str, frozenset[str]], promql: Callable[[str], tuple[dict[str, set[str]], set[str]]]
) -> None:
    for rule in alert_rules():
        used, grouping = promql(rule["expr"])
        assert used, rule["alert"]
        for name, labels in used.items():
            assert name in series, f"{rule['alert']}: {name} is not exported by telemetry.metrics"
            assert labels <= series[name], f"{rule['alert']}: {name} has no label(s) {labels - series[name]}"
        known = set().union(*(series[n] for n in used))
        assert grouping <= known, f"{rule['alert']}: groups by unknown labels {grouping - known}"


def test_scrape_jobs_are_the_ones_alerts_and_dashboards_select() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"learner", "rollout"} <= set(jobs)
    # The telemetry ports of docs/operations.md: 9400 learner, 9401 rollout.
    assert {sd["port"] for sd in jobs["learner"]["dns_sd_configs"]} == {9400}
    assert {sd["port"] for sd in jobs["rollout"]["dns_sd_configs"]} == {9401}
