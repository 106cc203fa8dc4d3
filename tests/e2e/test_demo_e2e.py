"""The whole system through real processes and a real Redis: the model learns, and every published trajectory is
accounted for.

`slipstream up` runs the learner and a rollout node as separate processes against the test's redis-server, on the
demo's config, until the held-out greedy accuracy reaches 0.5 (the learner stops there) or 240 steps. Checked: the
accuracy climbed from chance (~0.1) to 0.5 at least, and, from the accounting hash and what is left on the trajectories
stream, published == trained + sum(dropped by reason) + still on the stream (undelivered or pending).
"""

import re
import subprocess
import sys
from pathlib import Path

import redis

from bus.codec import decode
from bus.embedded import free_port
from bus.schema import Group

REPO = Path(__file__).resolve().parents[2]


def trajectories_left(client: redis.Redis, stream: str, group: str) -> int:
    """Trajectories in entries the learner group has not acked: undelivered ones and pending ones."""
    info = {g["name"].decode(): g for g in client.xinfo_groups(stream)} if client.exists(stream) else {}
    if group not in info:
        entries = client.xrange(stream)
    else:
        last = info[group]["last-delivered-id"].decode()
        pending = {e["message_id"] for e in client.xpending_range(stream, group, "-", "+", 100_000)}
        entries = [(i, f) for i, f in client.xrange(stream) if i in pending or _after(i.decode(), last)]
    return sum(_count(fields[b"data"]) for _, fields in entries)


def _after(entry_id: str, last: str) -> bool:
    return tuple(map(int, entry_id.split("-"))) > tuple(map(int, last.split("-")))


def _count(data: bytes) -> int:
    message = decode(data)
    return len(message.trajectories) if isinstance(message, Group) else 1


def test_demo_learns_and_accounts_for_every_trajectory(redis_server, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "slipstream", "up", "--config", "configs/demo.toml",
        "--bus.url", redis_server.url,
        "--telemetry.port", str(free_port(2)),  # P and P + 1 (rollout-0's): the config's may be taken
        "--run.output_dir", str(tmp_path / "run"),
        "--model.path", str(tmp_path / "model"),
        "--up.timeout_s", "240",
        "--learner.max_steps", "240",  # runs reach 0.5 by step ~100-120 (0.9, the demo's own target, by ~180)
        "--learner.target_accuracy", "0.5",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=285)
    last = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    done = re.search(r"steps=\d+ eval_accuracy_start=([\d.]+) eval_accuracy=([\d.]+) elapsed_s=[\d.]+$", last)
    assert done, last
    start, end = map(float, done.groups())
    assert end >= 0.5 and end >= start + 0.4, out.stdout[-3000:]  # a random policy scores ~0.1

    client = redis.Redis.from_url(redis_server.url)
    accounting = {k.decode(): int(v) for k, v in client.hgetall("slipstream:accounting").items()}
    dropped = sum(v for k, v in accounting.items() if k.startswith("dropped:"))
    left = trajectories_left(client, "slipstream:trajectories", "learner")
    assert accounting["trained"] > 0
    assert accounting["published"] == accounting["trained"] + dropped + left, (accounting, left)
