"""A real Prometheus loads Slipstream's rules, scrapes real telemetry servers and answers every dashboard query.

The default test scrapes `metrics_exerciser.py` (the real TelemetryServer with every metric moving) and requires data
from every panel. The slow test is the harness for the demo: point it at running nodes with
SLIPSTREAM_SCRAPE_TARGETS="learner=127.0.0.1:9400,rollout=127.0.0.1:9401" (e.g. while `make demo` runs), or let it
start `slipstream up --config configs/demo.toml` itself; it requires data from every panel not marked
quiet_when_healthy, and prints what each panel saw.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
WINDOW = "30s"  # stands in for Grafana's $__rate_interval: 30 samples at the tests' 1 s scrape interval


def panel_results(prometheus: Any, panels: list[tuple[str, Any]]) -> dict[str, list[float]]:
    """`dashboard / panel` -> the finite values all its queries return now (NaN from an empty histogram is no data)."""
    seen: dict[str, list[float]] = {}
    for board, panel in panels:
        values = seen.setdefault(f"{board} / {panel.title}", [])
        for expr, _ in panel.queries:
            for series in prometheus.query(expr.replace("$__rate_interval", WINDOW)):
                value = float(series["value"][1])
                if math.isfinite(value):
                    values.append(value)
    return seen


def wait_for_panels(prometheus: Any, panels: list[tuple[str, Any]], timeout_s: float) -> dict[str, list[float]]:
    """Poll until every given panel has data or `timeout_s` passes; the last results either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = panel_results(prometheus, panels)
        if all(seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(2)


@pytest.fixture
def exerciser() -> Iterator[int]:
    """metrics_exerciser.py in its own process (the metrics are process-global); yields its port."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("metrics_exerciser.py")), "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        for line in process.stdout:  # structlog lines come first; the exerciser says port=N when it listens
            if line.startswith("port="):
                yield int(line.removeprefix("port="))
                break
            assert time.monotonic() < deadline, "the exerciser did not start in 30 s"
        else:
            pytest.fail(f"the exerciser exited with {process.wait(timeout=5)}")
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_rules_load_and_every_panel_query_returns_data(
    start_prometheus: Callable[[dict[str, list[str]]], Any], exerciser: int, panels: list[tuple[str, Any]]
) -> None:
    target = f"127.0.0.1:{exerciser}"
    prometheus = start_prometheus({"learner": [target], "rollout": [target]})
    prometheus.wait_for('up{job="rollout"} == 1', timeout_s=30)
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} >= {"SlipstreamLearnerStuck", "SlipstreamNoTrajectories"}
    assert len(rules) == 9
    seen = wait_for_panels(prometheus, panels, timeout_s=60)
    assert [name for name, values in seen.items() if not values] == []
    # Everything moves and timestamps follow the clock, so no alert may fire; every rule evaluated cleanly.
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
    assert [rule["name"] for rule in rules if rule["state"] == "firing"] == []


def demo_targets() -> dict[str, list[str]]:
    spec = os.environ.get("SLIPSTREAM_SCRAPE_TARGETS", "learner=127.0.0.1:9400,rollout=127.0.0.1:9401")
    targets: dict[str, list[str]] = {}
    for item in spec.split(","):
        job, _, address = item.partition("=")
        targets.setdefault(job.strip(), []).append(address.strip())
    return targets


@pytest.fixture
def demo(built_commands: set[str]) -> Iterator[None]:
    """The demo to scrape: already running (SLIPSTREAM_SCRAPE_TARGETS set), or `slipstream up` started here."""
    if "SLIPSTREAM_SCRAPE_TARGETS" in os.environ:
        yield
        return
    if "up" not in built_commands or not (REPO / "configs/demo.toml").is_file():
        pytest.skip("`slipstream up` or configs/demo.toml is not there yet; set SLIPSTREAM_SCRAPE_TARGETS instead")
    process = subprocess.Popen(
        [sys.executable, "-m", "slipstream", "up", "--config", "configs/demo.toml"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.slow
def test_demo_fills_every_dashboard_panel(
    start_prometheus: Callable[[dict[str, list[str]]], Any], demo: None, panels: list[tuple[str, Any]]
) -> None:
    prometheus = start_prometheus(demo_targets())
    prometheus.wait_for('up{job="learner"} == 1', timeout_s=120)
    prometheus.wait_for('up{job="rollout"} == 1', timeout_s=120)
    required = [(board, panel) for board, panel in panels if not panel.quiet_when_healthy]
    seen = wait_for_panels(prometheus, required, timeout_s=float(os.environ.get("SLIPSTREAM_DEMO_WAIT_S", "300")))
    quiet = panel_results(prometheus, [(board, panel) for board, panel in panels if panel.quiet_when_healthy])
    for name, values in {**seen, **quiet}.items():
        print(f"{name}: {len(values)} series, last {values[-1] if values else 'no data'}")
    assert [name for name, values in seen.items() if not values] == []
