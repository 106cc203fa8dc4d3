"""Fixtures for the live deployment tests: a real Prometheus with Slipstream's rules, scraping given targets.

Helpers shared with the unit tests (tool lookup, the dashboards source) live in tests/unit/deploy/conftest.py and
are loaded from there by path (a conftest cannot be imported by name).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


def _load_unit_helpers() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "slipstream_deploy_unit_helpers", REPO / "tests/unit/deploy/conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = _load_unit_helpers()
require_tool: Callable[[str], str] = helpers.require_tool
load_dashboards_source: Callable[[], ModuleType] = helpers.load_dashboards_source


class Prometheus:
    """A running `prometheus` process with deploy/prometheus/alerts.yml loaded; query it with `.query(expr)`."""

    def __init__(self, url: str, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.process = process

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector result of `expr` now (an error from Prometheus fails the calling test)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def wait_for(self, expr: str, timeout_s: float) -> list[dict[str, Any]]:
        """Poll `expr` until it returns a series, failing after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not (result := self.query(expr)):
            assert time.monotonic() < deadline, f"no data for {expr} within {timeout_s}s"
            time.sleep(0.5)
        return result


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, list[str]]], Prometheus]]:
    """Start Prometheus (1 s scrape and rule interval) scraping `{job: [host:port, ...]}` with Slipstream's alerts."""
    binary = require_tool("prometheus")
    from bus.embedded import free_port

    processes: list[subprocess.Popen[bytes]] = []

    def start(targets: dict[str, list[str]]) -> Prometheus:
        config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        config["scrape_configs"] = [{"job_name": job, "static_configs": [{"targets": t}]} for job, t in targets.items()]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        (tmp_path / "alerts.yml").write_text((REPO / "deploy/prometheus/alerts.yml").read_text())
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        prometheus = Prometheus(f"http://127.0.0.1:{port}", process)
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return prometheus
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready in 30 s"
            time.sleep(0.2)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def panels() -> list[tuple[str, Any]]:
    """(dashboard title, `Panel`) for every panel of deploy/grafana/dashboards.py."""
    source = load_dashboards_source()
    return [(board.title, panel) for board in source.DASHBOARDS for panel in board.panels]


@pytest.fixture(scope="session")
def built_commands() -> set[str]:
    """The `slipstream` subcommands this install has (others are listed in slipstream.cli.COMMANDS, not built yet)."""
    import argparse

    from slipstream.cli import build_parser

    actions = build_parser()._actions  # noqa: SLF001 (argparse has no public accessor for subcommands)
    return set(next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices)  # noqa: SLF001


_FETCH = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())\n"
    "except urllib.error.HTTPError as e:\n"
    "    print(e.code); print(e.read().decode())\n"
)


class NodeProcess:
    """A `slipstream ARGV` node started as a plain process, optionally inside a network namespace (`wrap`, e.g.
    `["ip", "netns", "exec", "hostA"]`), whose /metrics and /healthz are read from where it runs."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, telemetry_port: int, wrap: list[str]) -> None:
        self.argv = argv
        self.wrap = wrap
        self.telemetry_port = telemetry_port
        self.log_path = cwd / f"{argv[0]}-{telemetry_port}.log"
        self.process = subprocess.Popen(
            [*wrap, sys.executable, "-m", "slipstream", *argv],
            env=env,
            cwd=cwd,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def fetch(self, path: str) -> tuple[int, str] | None:
        """(HTTP status, body) of GET `path` on the node's telemetry port, or None while nothing answers."""
        url = f"http://127.0.0.1:{self.telemetry_port}{path}"
        result = subprocess.run(
            [*self.wrap, sys.executable, "-c", _FETCH, url], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            return None
        status, _, body = result.stdout.partition("\n")
        return int(status), body

    def metric(self, name: str) -> float | None:
        """The value of an unlabelled metric as the node exports it now, or None if unavailable."""
        answer = self.fetch("/metrics")
        if answer is None or answer[0] != 200:
            return None
        line = next((line for line in answer[1].splitlines() if line.startswith(name + " ")), None)
        return float(line.split()[1]) if line else None

    def wait(self, what: str, ready: Callable[[], bool], timeout_s: float) -> None:
        """Poll `ready()` each second until true; fail with the node's log if it exits or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.process.poll() is None, f"slipstream {' '.join(self.argv)} exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s\n{self.log_tail()}"
            time.sleep(1)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s: a node must not outlive its test."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
def start_node() -> Iterator[Callable[..., NodeProcess]]:
    """Start `NodeProcess`es (same arguments); every one is stopped at the end of the test, last started first."""
    nodes: list[NodeProcess] = []

    def start(
        argv: list[str], env: dict[str, str], cwd: Path, telemetry_port: int, wrap: list[str] = ()
    ) -> NodeProcess:
        nodes.append(NodeProcess(argv, env, cwd, telemetry_port, list(wrap)))
        return nodes[-1]

    yield start
    for node in reversed(nodes):
        node.stop()


def node_environment(service_env: dict[str, Any], **replace: str) -> dict[str, str]:
    """This process's environment plus a service's SLIPSTREAM_* settings, with values in `replace` substituted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIPSTREAM_")}
    env.update({key: str(value) for key, value in service_env.items()})
    env.update(replace)
    return env


@pytest.fixture(scope="session")
def node_env() -> Callable[..., dict[str, str]]:
    """`node_environment`."""
    return node_environment
