"""Redis ACL users per role, against a real redis-server >= 7 started with the rendered deploy/redis ACL file.

Each role does what Slipstream's code does through Slipstream's own classes (Producer, MessageConsumer, RedisDedup, the
transport's claim/trim/dead-letter/requeue paths, `slipstream status`), and every other command tried is refused with
NOPERM. TLS: the same users over rediss:// with a CA made by openssl in the test.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis
from redis.exceptions import NoPermissionError

from bus.acl import render, user_names, write_passwords
from bus.codec import encode
from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.dedup import RedisDedup
from bus.embedded import free_port
from bus.producer import Producer
from bus.schema import Heartbeat, Join, Task, Trajectory, new_id
from bus.transport import BusError, BusUnavailable, setup_transport
from bus.transport.redis_streams import RedisTransport
from learner_node.accounting import Ledger
from learner_node.groups import Unit
from slipstream.commands.status import collect

Require = Callable[[bool, str], None]
AGENT = "producer-agent"  # one external agent's credential (the template's producer* users)
TASKS, TRAJ, CONTROL, DEAD = (f"slipstream:{s}" for s in ("tasks", "trajectories", "control", "dead"))

# Commands no role but admin may run. Each is refused before it runs, so none of them harms the server.
ADMIN_ONLY: list[tuple[str, ...]] = [
    ("FLUSHALL",),
    ("CONFIG", "GET", "*"),
    ("KEYS", "*"),
    ("ACL", "LIST"),
    ("CLIENT", "LIST"),
    ("CLIENT", "KILL", "ID", "999999"),
    ("CLIENT", "TRACKING", "ON", "BCAST"),
    ("INFO",),
    ("SLOWLOG", "GET"),
    ("SWAPDB", "0", "1"),
    ("SCRIPT", "FLUSH"),
    ("EVAL", "return 1", "0"),
    ("FUNCTION", "LIST"),
    ("PUBLISH", "news", "x"),
    ("SET", "slipstream:other", "x"),
    ("DEL", TASKS),
    ("UNLINK", TRAJ),
    ("XDEL", TRAJ, "1-1"),
    ("XGROUP", "DESTROY", TRAJ, "learner"),
    ("XSETID", TRAJ, "1-1"),
]
FORBIDDEN: dict[str, list[tuple[str, ...]]] = {
    AGENT: [
        ("XREADGROUP", "GROUP", "rollout", "agent", "STREAMS", TASKS, ">"),
        ("XREADGROUP", "GROUP", "learner", "agent", "STREAMS", TRAJ, ">"),
        ("XRANGE", TASKS, "-", "+"),
        ("XRANGE", TRAJ, "-", "+"),
        ("XREAD", "STREAMS", TRAJ, "0"),
        ("XINFO", "GROUPS", TRAJ),
        ("XPENDING", TRAJ, "learner"),
        ("XGROUP", "CREATE", TRAJ, "mine", "$", "MKSTREAM"),
        ("XTRIM", TRAJ, "MAXLEN", "0"),
        ("XADD", TASKS, "*", "data", "x"),
        ("XADD", CONTROL, "*", "data", "x"),
        ("XADD", DEAD, "*", "data", "x"),
        ("XADD", "elsewhere", "*", "data", "x"),
        ("HINCRBY", "slipstream:accounting", "published", "1"),
        ("ZADD", "slipstream:dedup:learner", "1", "x"),
        ("SCRIPT", "LOAD", "return 1"),
        ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "1", TRAJ),
    ],
    "rollout": [
        ("XREADGROUP", "GROUP", "learner", "rollout-0", "STREAMS", TRAJ, ">"),
        ("XRANGE", TRAJ, "-", "+"),
        ("XREAD", "STREAMS", TRAJ, "0"),
        ("XACK", TRAJ, "learner", "1-1"),
        ("XCLAIM", TRAJ, "learner", "rollout-0", "0", "1-1"),
        ("XGROUP", "CREATE", TRAJ, "mine", "$"),
        ("XTRIM", TRAJ, "MAXLEN", "0"),
        ("ZMSCORE", "slipstream:dedup:learner", "x"),
        ("ZADD", "slipstream:dedup:learner", "1", "x"),
        ("HGETALL", "slipstream:accounting"),
        ("XRANGE", DEAD, "-", "+"),
    ],
    "learner": [  # commands it has, on keys where it does not need them
        ("XREADGROUP", "GROUP", "rollout", "learner-0", "STREAMS", TASKS, ">"),
        ("XACK", TASKS, "rollout", "1-1"),
        ("XRANGE", TASKS, "-", "+"),
        ("SET", "slipstream:dedup:learner", "x"),
        ("ZADD", "slipstream:accounting", "1", "x"),
    ],
    "status": [
        ("XADD", TRAJ, "*", "data", "x"),
        ("XREADGROUP", "GROUP", "learner", "status", "STREAMS", TRAJ, ">"),  # moves entries to pending: a write
        ("XACK", TRAJ, "learner", "1-1"),
        ("XCLAIM", TRAJ, "learner", "status", "0", "1-1"),
        ("XGROUP", "CREATE", TRAJ, "mine", "$"),
        ("XTRIM", TRAJ, "MAXLEN", "0"),
        ("HINCRBY", "slipstream:accounting", "published", "1"),
        ("ZADD", "slipstream:dedup:learner", "1", "x"),
        ("SCRIPT", "LOAD", "return 1"),
        ("XREAD", "STREAMS", "elsewhere", "0"),
    ],
}


@dataclass
class AclServer:
    """A running redis-server with the rendered ACL file; `secrets/<user>` holds each user's password."""

    url: str
    secrets: Path
    tls_ca_file: str | None
    closing: ExitStack

    def config(self, user: str | None, **fields: Any) -> BusConfig:
        """The [bus] config of `user` (None: no credentials at all)."""
        login = {"username": user, "password_file": str(self.secrets / user)} if user else {}
        return BusConfig(url=self.url, tls_ca_file=self.tls_ca_file, **login, **fields)

    def transport(self, user: str | None, **fields: Any) -> RedisTransport:
        """A transport logged in as `user`, closed when the server stops."""
        transport = setup_transport(self.config(user, **fields))
        return cast(RedisTransport, self.closing.enter_context(transport))

    def producer(self, **fields: Any) -> Producer:
        """The producer SDK as an external agent connects it: by URL, user name and password file."""
        login = {"username": AGENT, "password_file": str(self.secrets / AGENT), "tls_ca_file": self.tls_ca_file}
        return self.closing.enter_context(Producer.connect(self.url, producer_name="agent-1", **login, **fields))


@contextmanager
def serving(binary: str, tmp: Path, bus: BusConfig, tls: Path | None = None) -> Iterator[AclServer]:
    """redis-server with `--aclfile` rendered for `bus`; over TLS only (no plain port) when `tls` holds certificates."""
    secrets = tmp / "secrets"
    write_passwords(secrets, [*user_names(), AGENT])
    acl = tmp / "users.acl"
    acl.write_text(render(bus, secrets))
    port = free_port()
    args = [binary, "--bind", "127.0.0.1", "--aclfile", str(acl), "--dir", str(tmp), "--logfile", "redis.log",
            "--save", "", "--appendonly", "no", "--port", "0" if tls else str(port)]  # fmt: skip
    if tls:
        files = {"--tls-cert-file": "server.crt", "--tls-key-file": "server.key", "--tls-ca-cert-file": "ca.crt"}
        args += ["--tls-port", str(port), "--tls-auth-clients", "no"]
        args += [part for flag, name in files.items() for part in (flag, str(tls / name))]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheme = "rediss" if tls else "redis"
    server = AclServer(f"{scheme}://127.0.0.1:{port}/0", secrets, str(tls / "ca.crt") if tls else None, ExitStack())
    try:
        admin = server.transport("admin").client
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError):
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (tmp / "redis.log").read_text() if (tmp / "redis.log").exists() else "(no log)"
                    hint = " (is this redis-server built with TLS?)" if tls else ""
                    pytest.fail(f"redis-server with the ACL file did not come up{hint}: {log[-2000:]}")
                time.sleep(0.02)
        yield server
    finally:
        server.closing.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def acl_server(redis7: str, tmp_path: Path) -> Iterator[AclServer]:
    with serving(redis7, tmp_path, BusConfig()) as server:
        yield server


def not_refused(client: redis.Redis, commands: list[tuple[str, ...]]) -> list[str]:
    """The commands of `commands` that Redis did NOT refuse with NOPERM, with what happened instead."""
    ran = []
    for command in commands:
        try:
            reply = client.execute_command(*command)
        except NoPermissionError:
            continue
        except redis.ResponseError as exc:
            reply = f"error {exc}"  # it got past the ACL check and failed on its own
        ran.append(f"{' '.join(command)} -> {reply!r}")
    return ran


def task() -> Task:
    return Task(id=new_id(), prompt=np.array([1, 2, 3], np.int32), n=2)


def test_a_round_trip_with_every_role_on_its_own_credential(acl_server: AclServer) -> None:
    learner, rollout = acl_server.transport("learner"), acl_server.transport("rollout")
    accounting = "slipstream:accounting"
    # Learner: admission publishes a task, and its Join goes on the control stream.
    learner.publish(TASKS, [encode(task())])
    learner.publish(CONTROL, [encode(Join(node_id="learner-0", role="learner"))], retain=100)
    # Rollout: takes the task, publishes its group, counts it, says it is alive, reads control, acks the task.
    tasks = MessageConsumer(rollout, TASKS, "rollout", "rollout-0", kinds=(Task,))
    [received] = tasks.poll(block_ms=0)
    agent = acl_server.producer()
    trajectories = [agent.trajectory(prompt_ids=[1, 2, 3], response_ids=[4], logprobs=[-0.5], reward=r) for r in (0, 1)]
    group = agent.group(trajectories, task_id=received.id)
    rollout.publish(TRAJ, [encode(group)])
    rollout.retrying(lambda: rollout.client.hincrby(accounting, "published", 2))
    rollout.publish(CONTROL, [encode(Heartbeat(node_id="rollout-0", role="rollout", version=1))], retain=100)
    assert [d.entry_id for d in rollout.read(CONTROL, "0", 10, 0)][:1] == [learner.read(CONTROL, "0", 1, 0)[0].entry_id]
    tasks.ack(received)
    tasks.refresh_stats()  # the trim script, as the rollout user
    # External agent: one more trajectory through the SDK.
    single = agent.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-0.1], reward=1.0)
    agent.send(single)
    # Learner: consumes both, marks them trained (dedup) and counts them.
    dedup = RedisDedup(learner, "slipstream:dedup:learner")
    consumer = MessageConsumer(learner, TRAJ, "learner", "learner-0", dedup=dedup)
    got = consumer.poll(block_ms=0)
    assert [r.id for r in got] == [group.id, single.id]
    consumer.ack(got)
    learner.retrying(lambda: learner.client.hincrby(accounting, "trained", 3))
    consumer.refresh_stats()
    assert dedup.seen([group.id, single.id, "never-sent"]) == [True, True, False]
    # Monitoring: `slipstream status` sees all of it through the read-only user.
    status = collect(acl_server.config("status"), dead=5)
    assert status["streams"]["tasks"] == {"length": 0, "groups": {"rollout": {"pending": 0, "consumers": 1}}}
    assert status["streams"]["trajectories"] == {"length": 0, "groups": {"learner": {"pending": 0, "consumers": 1}}}
    assert status["accounting"] == {"published": 2, "trained": 3}
    assert set(status["nodes"]) == {"learner-0", "rollout-0"} and status["dead_letters"] == []


def test_the_learner_ledger_settles_and_counts_on_the_learner_credential(acl_server: AclServer) -> None:
    """learner_node's accounting: MULTI with dedup marks, XACK and the guarded HINCRBY script; WATCH + XRANGE of the
    dead stream + MULTI for the dropped counts; HGETALL; XINFO/XPENDING/XRANGE for the in-flight count; tasks
    published with the admission state and the batch token (WATCH + GET, then MULTI with XADD, HSET and SET)."""
    learner = acl_server.transport("learner")
    agent = acl_server.producer()
    kept, late = (agent.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-0.1], reward=1.0) for _ in range(2))
    agent.send_many([kept, late])
    dedup = RedisDedup(learner, "slipstream:dedup:learner")
    consumer = MessageConsumer(learner, TRAJ, "learner", "learner-0", dedup=dedup)
    ledger = Ledger(learner, consumer, dedup)
    first, second = consumer.poll(block_ms=0)
    assert ledger.in_flight() == 2
    ledger.settle([Unit.of(kept.id, [kept], [first])])
    ledger.drop([Unit.of(late.id, [late], [second])], "stale", "3 versions behind")
    assert ledger.scan_dead() == {"dropped:stale": 1}
    assert ledger.totals() == {"trained": 1, "dropped:stale": 1}
    assert ledger.in_flight() == 0 and dedup.seen([kept.id, late.id]) == [True, False]
    ledger.publish_tasks(TASKS, [Task(id="run:abc:0:0", prompt="1+1=", n=2)], {"nonce": "abc", "published": 1})
    assert ledger.admission_state() == {"nonce": "abc", "published": "1"} and learner.length(TASKS) == 1


@pytest.mark.parametrize(("role", "stream", "writer"), [("learner", TRAJ, "rollout"), ("rollout", TASKS, "learner")])
def test_consumer_recovery_paths_work_on_the_consumers_own_credential(
    acl_server: AclServer, role: str, stream: str, writer: str
) -> None:
    """Lease claims, nack, requeue, trim: each is a different command mix (XPENDING IDLE + XCLAIM, MULTI with XADD dead
    + XACK, MULTI with XADD + XACK, EVALSHA / SCRIPT LOAD and the trim script's own commands)."""
    fields = {"lease_ms": 10, "claim_interval_s": 0.001}
    acl_server.transport(writer).publish(stream, [encode(task()) for _ in range(4)])
    crashed = MessageConsumer(acl_server.transport(role, **fields), stream, role, f"{role}-crashed")
    assert len(crashed.poll(count=2, block_ms=0)) == 2  # and never acked: its consumer "died"
    live_transport = acl_server.transport(role, **fields)
    live = MessageConsumer(live_transport, stream, role, f"{role}-0")
    time.sleep(0.05)  # the crashed consumer's lease (10 ms) runs out
    got = live.poll(count=10, block_ms=0)
    got += live.poll(count=10, block_ms=0)  # the claimed ones and the new ones may come in one poll or two
    assert sorted(r.deliveries > 1 for r in got) == [False, False, True, True]  # two claimed, two new
    claimed, new = [r for r in got if r.deliveries > 1], [r for r in got if r.deliveries == 1]
    live.ack(claimed[0])
    live.nack(new[0], "too stale")
    live.requeue(new[1])
    other = MessageConsumer(acl_server.transport(role, **fields), stream, role, f"{role}-1")
    time.sleep(0.05)
    again = other.poll(count=10, block_ms=0)  # claims claimed[1] from live ...
    again += other.poll(count=10, block_ms=0)  # ... and reads the requeued copy (in the same poll or the next)
    assert sorted(r.id for r in again) == sorted([claimed[1].id, new[1].id])
    other.ack(again)
    assert live_transport.pending(stream, role) == 0
    assert live_transport.trim(stream) == 0  # everything delivered and acked: trimmed away
    assert [d.reason for d in acl_server.transport("status").dead_letters()] == ["too stale"]


def test_the_learner_waits_for_room_on_the_tasks_stream_and_trims_what_rollout_acked(acl_server: AclServer) -> None:
    learner = acl_server.transport("learner", max_stream_length=2, backpressure_timeout_s=30)
    learner.publish(TASKS, [encode(task()), encode(task())])
    rollout = MessageConsumer(acl_server.transport("rollout"), TASKS, "rollout", "rollout-0")
    rollout.ack(rollout.poll(block_ms=0))
    learner.publish(TASKS, [encode(task())])  # full: the learner trims the acked tasks (script) and goes on
    assert learner.length(TASKS) == 1


def test_producer_and_rollout_wait_for_room_without_trimming_rights(acl_server: AclServer) -> None:
    agent = acl_server.producer(max_stream_length=2, backpressure_timeout_s=30)
    rollout = acl_server.transport("rollout", max_stream_length=2, backpressure_timeout_s=30)
    learner = MessageConsumer(acl_server.transport("learner"), TRAJ, "learner", "learner-0")

    def two() -> list[Trajectory]:
        return [agent.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-0.1], reward=1.0) for _ in range(2)]

    agent.send_many(two())  # the stream is full for the agent ...
    rollout.publish(TRAJ, [encode(t) for t in two()])  # ... and for the rollout node
    learner.ack(learner.poll(block_ms=0))
    learner.refresh_stats()  # the consumer trims: that is the room the publishers wait for
    agent.send(two()[0])  # both must wait for room by watching XLEN, without trimming themselves
    rollout.publish(TRAJ, [encode(two()[0])])
    assert learner.transport.length(TRAJ) == 2


@pytest.mark.parametrize("role", list(FORBIDDEN))
def test_each_role_is_refused_everything_it_does_not_need(acl_server: AclServer, role: str) -> None:
    client = acl_server.transport(role).client
    assert not_refused(client, FORBIDDEN[role] + ADMIN_ONLY) == []
    assert client.ping()  # the connection itself is fine


def test_admin_only_does_admin_things_and_nobody_logs_in_without_a_password(acl_server: AclServer) -> None:
    admin = acl_server.transport("admin").client
    assert len(not_refused(admin, [("CONFIG", "GET", "maxmemory"), ("ACL", "LIST"), ("KEYS", "*")])) == 3
    listed = " ".join(str(rule) for rule in admin.acl_list())
    assert all(p.read_text().strip() not in listed for p in acl_server.secrets.iterdir())  # hashes only
    with pytest.raises(BusError, match="username/password: Redis at .* refused them"):
        acl_server.transport(None).publish(TRAJ, [b"x"])  # the default user is off
    wrong = acl_server.secrets / "wrong"
    wrong.write_text("not-the-password-at-all\n")
    for user in ("learner", "default", "nobody"):
        transport = setup_transport(BusConfig(url=acl_server.url, username=user, password_file=str(wrong)))
        with pytest.raises(BusError, match="username/password: Redis at .* refused them"):
            transport.length(TRAJ)
        transport.close()


def test_keys_of_another_prefix_and_glob_characters_stay_out_of_reach(redis7: str, tmp_path: Path) -> None:
    bus = BusConfig(prefix="run*1:")
    with serving(redis7, tmp_path, bus) as server:
        agent = server.producer(prefix="run*1:")
        agent.send(agent.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-0.1], reward=1.0))
        client = agent.transport.client  # type: ignore[attr-defined]
        assert not_refused(client, [("XADD", key, "*", "data", "x") for key in ("runX1:trajectories", TRAJ)]) == []
        assert server.transport("status", prefix="run*1:").length(bus.stream("trajectories")) == 1


@pytest.fixture
def certificates(tmp_path: Path, require_service: Require) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (EC P-256, valid one day)."""
    openssl = shutil.which("openssl")
    require_service(openssl is not None, "openssl: not found (the TLS test makes its certificates with it)")
    folder = tmp_path / "tls"
    folder.mkdir()
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=slipstream-test-ca"],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.crt", "-days", "1", "-extfile", "san.ext"],
    ):  # fmt: skip
        subprocess.run([cast(str, openssl), *command], cwd=folder, check=True, capture_output=True, timeout=30)
    return folder


def test_tls_carries_the_same_users_and_an_unverified_server_is_refused(
    redis7: str, tmp_path: Path, certificates: Path
) -> None:
    with serving(redis7, tmp_path, BusConfig(), tls=certificates) as server:
        agent = server.producer()
        sent = agent.trajectory(prompt_ids=[1], response_ids=[2], logprobs=[-0.1], reward=1.0)
        agent.send(sent)
        consumer = MessageConsumer(server.transport("learner"), TRAJ, "learner", "learner-0")
        assert [r.id for r in consumer.poll(block_ms=0)] == [sent.id]
        assert not_refused(agent.transport.client, [("XRANGE", TRAJ, "-", "+")]) == []  # type: ignore[attr-defined]
        # Without the CA, the client cannot verify the server's certificate and never sends a password to it.
        unverified = BusConfig(url=server.url, username=AGENT, password_file=str(server.secrets / AGENT),
                               reconnect_min_s=0.01, reconnect_max_s=0.05, reconnect_timeout_s=0.3)  # fmt: skip
        transport = setup_transport(unverified)
        with pytest.raises(BusUnavailable, match="certificate verify failed"):
            transport.length(TRAJ)
        transport.close()
