"""The opt-in Redis ACL deployments run for real: a redis-server >= 7 started with the very arguments of
deploy/compose.acl.yml and of deploy/k8s-acl/'s patch, its health check / readiness probe run as written, and each
node's settings from those files logging in. Only what a container would change is changed: the secret mount paths
become files of the test's folder, and the server listens on a free port."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bus.acl import render, user_names, write_passwords
from bus.config import BusConfig
from bus.embedded import free_port
from bus.transport import BusError, setup_transport

REPO = Path(__file__).resolve().parents[3]
Require = Callable[[bool, str], None]


@dataclass
class Deployment:
    """What one deployment file set says about Redis and its clients."""

    redis_args: list[str]  # after "redis-server"
    probe: str  # a shell command: exit 0 means healthy
    mounts: dict[str, str]  # Redis' container: a path inside it -> the file of the test's secrets folder it is
    logins: dict[str, tuple[str, str]]  # node -> (SLIPSTREAM_BUS__USERNAME, the secrets file its password file is)


def from_compose() -> Deployment:
    override = yaml.safe_load((REPO / "deploy" / "compose.acl.yml").read_text())
    redis = override["services"]["redis"]
    files = {f"/run/secrets/{name}": Path(s["file"]).name for name, s in override["secrets"].items()}
    probe = redis["healthcheck"]["test"][1].replace("$$", "$")  # compose's escape of a literal $
    logins = {}
    for node in ("learner", "rollout"):
        env = override["services"][node]["environment"]
        logins[node] = (env["SLIPSTREAM_BUS__USERNAME"], files[env["SLIPSTREAM_BUS__PASSWORD_FILE"]])
    return Deployment(redis["command"][1:], probe, files, logins)


def from_k8s() -> Deployment:
    folder = REPO / "deploy" / "k8s-acl"
    base = yaml.safe_load((REPO / "deploy" / "k8s" / "redis.yaml").read_text().split("---")[1])
    args = list(base["spec"]["template"]["spec"]["containers"][0]["args"])
    ops = yaml.safe_load((folder / "redis.patch.yaml").read_text())
    args += [op["value"] for op in ops if op["path"].endswith("/args/-")]
    [command] = [op["value"] for op in ops if op["path"].endswith("/readinessProbe/exec/command")]
    assert command[:2] == ["sh", "-c"]
    mounts = {"/etc/redis/acl/users.acl": "users.acl", "/etc/redis/status/password": "status"}
    logins = {}
    for node in ("learner", "rollout"):
        patch = yaml.safe_load((folder / f"{node}.patch.yaml").read_text())
        env = {op["value"]["name"]: op["value"]["value"] for op in patch if "/env/" in op["path"]}
        [secret] = [op["value"]["secret"]["secretName"] for op in patch if op["path"].endswith("/volumes/-")]
        logins[node] = (env["SLIPSTREAM_BUS__USERNAME"], secret.removeprefix("slipstream-redis-"))  # a file each
    return Deployment(args[1:], command[2], mounts, logins)


@dataclass
class Running:
    deployment: Deployment
    port: int
    secrets: Path

    def local(self, text: str) -> str:
        """`text` with the container's secret paths replaced by the test's files."""
        for inside, name in sorted(self.deployment.mounts.items(), key=lambda item: -len(item[0])):
            text = text.replace(inside, str(self.secrets / name))
        return text

    def probe(self) -> subprocess.CompletedProcess[str]:
        command = self.local(self.deployment.probe).replace("redis-cli", f"redis-cli -p {self.port}")
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)

    def bus(self, node: str, password_file: str | None = None) -> BusConfig:
        username, secret = self.deployment.logins[node]
        url = f"redis://127.0.0.1:{self.port}/0"
        return BusConfig(url=url, username=username, password_file=password_file or str(self.secrets / secret))


@pytest.fixture(params=["compose", "k8s"])
def running(request: pytest.FixtureRequest, tmp_path: Path, redis7: str, require_service: Require) -> Iterator[Running]:
    binary = redis7
    require_service(shutil.which("redis-cli") is not None, "redis-cli: not found")
    deployment = from_compose() if request.param == "compose" else from_k8s()
    secrets = tmp_path / "secrets"
    write_passwords(secrets, user_names())  # the commands the files' headers give
    (secrets / "users.acl").write_text(render(BusConfig(), secrets))
    port = free_port()
    server = Running(deployment, port, secrets)
    args = [server.local(arg) for arg in deployment.redis_args]
    process = subprocess.Popen(
        [binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while server.probe().returncode != 0:
            assert process.poll() is None, f"redis-server exited with {process.returncode}: {args}"
            assert time.monotonic() < deadline, f"the probe never passed: {server.probe()}"
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_probe_passes_as_status_and_fails_on_a_wrong_password(running: Running) -> None:
    assert running.probe().returncode == 0
    (running.secrets / "status").write_text("not-the-status-password-at-all\n")
    assert running.probe().returncode != 0


def test_the_default_user_is_off(running: Running) -> None:
    out = subprocess.run(["redis-cli", "-p", str(running.port), "ping"], capture_output=True, text=True, timeout=30)
    assert "NOAUTH" in out.stdout + out.stderr  # and redis-cli still exits 0: why the probe greps for PONG


@pytest.mark.parametrize("node", ["learner", "rollout"])
def test_each_node_logs_in_with_the_settings_the_files_give_it(running: Running, node: str) -> None:
    with setup_transport(running.bus(node)) as transport:
        assert transport.length("slipstream:tasks") == 0  # a key both roles may use


def test_a_node_with_another_roles_password_is_refused(running: Running) -> None:
    refused = pytest.raises(BusError, match="username/password: Redis at .* refused them")
    with setup_transport(running.bus("learner", str(running.secrets / "rollout"))) as transport, refused:
        transport.length("slipstream:tasks")
