"""Each CPU-profile service of docker-compose.yml, run as a plain process with the service's own command and
environment (and the image's), parses its config and starts: a real Redis, real ports, /healthz answering ready.

Only the addresses change: Redis and the broadcast host become this machine's, ports become free ones.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bus.embedded import free_port

REPO = Path(__file__).resolve().parents[3]
SERVICES: dict[str, dict[str, Any]] = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
CPU_SERVICES = ["demo-model", "learner", "rollout"]  # in the order compose starts them (depends_on)


def image_environment() -> dict[str, str]:
    """The SLIPSTREAM_* settings deploy/Dockerfile bakes into the image."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    return dict(re.findall(r"\b(SLIPSTREAM_\w+)=(\S+)", text))


def test_cpu_services_parse_their_config_and_become_healthy(
    tmp_path: Path,
    redis_server: Any,
    built_commands: set[str],
    start_node: Callable[..., Any],
    node_env: Callable[..., dict[str, str]],
) -> None:
    absent = sorted({SERVICES[name]["command"][0] for name in CPU_SERVICES} - built_commands)
    if absent:
        pytest.skip(f"slipstream subcommand(s) not built yet: {absent}")
    # The image's working directory: the repository's configs/, and runs/ for the demo model and checkpoints.
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "configs").symlink_to(REPO / "configs")
    broadcast_port = free_port()
    addresses = {
        "SLIPSTREAM_BUS__URL": redis_server.url,
        "SLIPSTREAM_TELEMETRY__HOST": "127.0.0.1",
        "SLIPSTREAM_BROADCAST__MASTER_ADDR": "127.0.0.1",
        "SLIPSTREAM_WEIGHTS__MASTER_ADDR": "127.0.0.1",
        "SLIPSTREAM_BROADCAST__MASTER_PORT": str(broadcast_port),
        "SLIPSTREAM_WEIGHTS__MASTER_PORT": str(broadcast_port),
    }

    def environment(name: str, **more: str) -> dict[str, str]:
        return node_env({**image_environment(), **SERVICES[name].get("environment", {})}, **addresses, **more)

    demo_model = subprocess.run(
        [sys.executable, "-m", "slipstream", *SERVICES["demo-model"]["command"]],
        env=environment("demo-model"),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo_model.returncode == 0, demo_model.stdout + demo_model.stderr
    assert (workdir / SERVICES["demo-model"]["command"][1] / "config.json").is_file()

    nodes = []
    for name in ("learner", "rollout"):
        port = free_port()
        node = start_node(
            SERVICES[name]["command"], environment(name, SLIPSTREAM_TELEMETRY__PORT=str(port)), workdir, port
        )
        # What compose's healthcheck asks, so what `depends_on: service_healthy` waits for before the next service.
        node.wait(f"{name} /healthz ready", lambda node=node: (node.fetch("/healthz") or (0,))[0] == 200, 240)
        nodes.append(node)
    assert all(node.process.poll() is None for node in nodes)
