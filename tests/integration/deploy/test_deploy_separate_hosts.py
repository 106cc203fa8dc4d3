"""Nodes on separate hosts that share nothing but two addresses: the Redis URL and the learner's broadcast address.

Each "host" is its own network namespace (where `ip netns` works, i.e. as root), joined to the others by a bridge on
a private subnet that exists only inside those namespaces; otherwise each host is a separate working directory and
environment on this machine's loopback. As on a real host, the machine's name resolves to the host's own address
inside its namespace (`/etc/netns/<name>/hosts`, which `ip netns exec` mounts over /etc/hosts): gloo binds the
address the host name resolves to, and torchrun decides by it which host holds the rendezvous store, so a name
resolving to 127.0.0.1 in every namespace would make hosts that cannot reach each other's groups or store. Every
host writes its own copy of the demo model. This is the recipe of docs/operations.md ("Separate hosts"), run for
real: the learner trains on what the remote rollout node generates, and the rollout node receives its weights over
the network.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bus.embedded import find_redis_server, free_port

REPO = Path(__file__).resolve().parents[3]
SUBNET_PREFIX = "10.231.0."  # private; its addresses are configured inside the test's own namespaces only
NETNS_ETC = Path("/etc/netns")  # files `ip netns exec NAME` mounts over /etc inside namespace NAME


@dataclass
class Host:
    """One machine: an address, a command prefix that runs a process there, a private working directory."""

    address: str
    wrap: list[str]
    workdir: Path


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"slp{os.getpid()}probe"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=30).returncode != 0:
        return False
    ip("netns", "del", probe)
    return True


@pytest.fixture
def make_hosts(tmp_path: Path) -> Iterator[Callable[[int], list[Host]]]:
    """`make_hosts(n)`: n hosts on one private network (namespaces and a bridge), or on loopback without netns."""
    namespaces: list[str] = []

    def make(count: int) -> list[Host]:
        tag = f"slp{os.getpid() % 100000}"
        dirs = [tmp_path / f"host{i}" for i in range(count)]
        for path in dirs:
            path.mkdir()
            (path / "configs").symlink_to(REPO / "configs")
        if not netns_usable():
            return [Host("127.0.0.1", [], path) for path in dirs]
        switch = f"{tag}sw"
        ip("netns", "add", switch)
        namespaces.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        hosts = []
        for i, path in enumerate(dirs):
            name, nic, port = f"{tag}h{i}", f"{tag}n{i}", f"{tag}p{i}"
            ip("netns", "add", name)
            namespaces.append(name)
            address = f"{SUBNET_PREFIX}{i + 1}"
            (NETNS_ETC / name).mkdir(parents=True)
            (NETNS_ETC / name / "hosts").write_text(f"127.0.0.1 localhost\n{address} {socket.gethostname()}\n")
            ip("link", "add", nic, "type", "veth", "peer", "name", port)
            ip("link", "set", nic, "netns", name)
            ip("link", "set", port, "netns", switch)
            ip("-n", switch, "link", "set", port, "master", "br0")
            ip("-n", switch, "link", "set", port, "up")
            ip("-n", name, "addr", "add", f"{address}/24", "dev", nic)
            ip("-n", name, "link", "set", nic, "up")
            ip("-n", name, "link", "set", "lo", "up")
            hosts.append(Host(address, ["ip", "netns", "exec", name], path))
        return hosts

    yield make
    for name in reversed(namespaces):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


@pytest.fixture
def redis_on() -> Iterator[Callable[[Host], str]]:
    """`redis_on(host)`: a redis-server (AOF on) listening on the host's address; returns its URL."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(host: Host) -> str:
        port = free_port()
        processes.append(
            subprocess.Popen(
                [
                    *host.wrap,
                    find_redis_server(),
                    "--port",
                    str(port),
                    "--bind",
                    host.address,
                    "--protected-mode",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--dir",
                    str(host.workdir),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        ping = [*host.wrap, "redis-cli", "-h", host.address, "-p", str(port), "ping"]
        for _ in range(100):
            if subprocess.run(ping, capture_output=True, text=True, timeout=10).stdout.strip() == "PONG":
                return f"redis://{host.address}:{port}/0"
            time.sleep(0.1)
        pytest.fail("redis-server did not answer PING in 10 s")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def write_demo_model(host: Host) -> None:
    subprocess.run(
        [sys.executable, "-m", "slipstream", "demo-model", "runs/demo-model"],
        cwd=host.workdir,
        check=True,
        capture_output=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("learner_hosts", [1, 2], ids=["one-learner-host", "torchrun-two-learner-hosts"])
def test_learner_and_rollout_on_separate_hosts(
    learner_hosts: int,
    make_hosts: Callable[[int], list[Host]],
    redis_on: Callable[[Host], str],
    built_commands: set[str],
    start_node: Callable[..., Any],
    node_env: Callable[..., dict[str, str]],
) -> None:
    absent = sorted({"learner", "rollout", "demo-model"} - built_commands)
    if absent:
        pytest.skip(f"slipstream subcommand(s) not built yet: {absent}")
    *learners, rollout_host = make_hosts(learner_hosts + 1)
    bus_url = redis_on(learners[0])  # Redis beside the first learner host, as in docs/operations.md
    broadcast = learners[0].address  # learner rank 0's host
    for host in (*learners, rollout_host):
        write_demo_model(host)

    rendezvous = f"{broadcast}:{free_port()}"
    learner_nodes = []
    for host in learners:
        port = free_port()
        env = node_env(
            {},
            SLIPSTREAM_BUS__URL=bus_url,
            SLIPSTREAM_BROADCAST__MASTER_ADDR=broadcast,
            SLIPSTREAM_TELEMETRY__PORT=str(port),
            # torchrun (--local-addr) ranks nodes by address; namespaces share one host name, so give each its
            # own address: the first learner host (10.231.0.1) is then node 0, holding rank 0 and the broadcast.
            PET_LOCAL_ADDR=host.address,
        )
        argv = ["learner", "--config", "configs/demo.toml"]
        if learner_hosts > 1:
            argv += ["--learner.nnodes", str(learner_hosts), "--learner.rdzv_endpoint", rendezvous]
        learner_nodes.append(start_node(argv, env, host.workdir, port, host.wrap))
    port = free_port()
    env = node_env(
        {}, SLIPSTREAM_BUS__URL=bus_url, SLIPSTREAM_WEIGHTS__MASTER_ADDR=broadcast, SLIPSTREAM_TELEMETRY__PORT=str(port)
    )
    rollout = start_node(
        ["rollout", "--config", "configs/demo.toml"], env, rollout_host.workdir, port, rollout_host.wrap
    )

    leader = learner_nodes[0]
    leader.wait(
        "learner steps on remote trajectories", lambda: (leader.metric("slipstream_learner_step") or 0) >= 2, 300
    )
    rollout.wait(
        "rollout node generates with weights broadcast from the learner host",
        lambda: (rollout.metric("slipstream_rollout_policy_version") or 0) >= 1,
        300,
    )
    assert (rollout.metric("slipstream_rollout_samples_generated_total") or 0) > 0


def test_hosts_share_only_the_network_addresses(
    make_hosts: Callable[[int], list[Host]], redis_on: Callable[[Host], str]
) -> None:
    # The harness itself: a second host reaches the first one's Redis by address, and (in namespaces) not through
    # its own loopback, so nothing in the slow test above can pass by sharing this machine's network by accident.
    server, client = make_hosts(2)
    url = redis_on(server)
    port = url.rsplit(":", 1)[1].split("/")[0]
    remote = [*client.wrap, "redis-cli", "-h", server.address, "-p", port, "ping"]
    assert subprocess.run(remote, capture_output=True, text=True, timeout=30).stdout.strip() == "PONG"
    if client.wrap:
        local = [*client.wrap, "redis-cli", "-h", "127.0.0.1", "-p", port, "ping"]
        assert "PONG" not in subprocess.run(local, capture_output=True, text=True, timeout=30).stdout
