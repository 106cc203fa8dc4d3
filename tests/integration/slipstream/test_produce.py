"""`slipstream produce`: JSONL and synthetic trajectories reach a consumer; a bad line names its line and field."""

import json
import subprocess
import sys
from pathlib import Path

from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.schema import Group, Trajectory
from bus.transport import setup_transport


def produce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slipstream", "produce", *args], capture_output=True, text=True)


def received(url: str) -> list:
    config = BusConfig(url=url)
    transport = setup_transport(config)
    consumer = MessageConsumer(transport, config.stream("trajectories"), "learner", "learner-0")
    messages = [r.message for r in consumer.poll(count=1000, block_ms=200)]
    transport.close()
    return messages


def test_jsonl_lines_sharing_a_group_id_arrive_as_one_group(redis_server, tmp_path: Path) -> None:
    rows = [
        {
            "prompt_ids": [1, 2],
            "response_ids": [3, 4],
            "behavior_logprobs": [-0.5, -0.1],
            "reward": 1.0,
            "group_id": "g",
        },
        {"prompt_ids": [1, 2], "response_ids": [5], "behavior_logprobs": [-2.0], "reward": 0.0, "group_id": "g"},
        {"prompt_ids": [7], "response_ids": [8, 9], "behavior_logprobs": [-1.0, -1.0], "reward": 0.5},
    ]
    rows[0]["group_id"] = rows[1]["group_id"] = "g"
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = produce("--url", redis_server.url, "--jsonl", str(path))
    assert out.returncode == 0, out.stderr
    assert "sent 3 trajectories in 2 messages" in out.stdout
    messages = received(redis_server.url)
    group = next(m for m in messages if isinstance(m, Group))
    assert [t.reward for t in group.trajectories] == [1.0, 0.0]
    single = next(m for m in messages if isinstance(m, Trajectory))
    assert single.response_ids.tolist() == [8, 9]


def test_a_bad_line_is_named_and_nothing_is_sent(redis_server, tmp_path: Path) -> None:
    good = {"prompt_ids": [1], "response_ids": [2], "behavior_logprobs": [-0.1], "reward": 1.0}
    bad = {"prompt_ids": [1], "response_ids": [2, 3], "behavior_logprobs": [-0.1], "reward": 1.0}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    out = produce("--url", redis_server.url, "--jsonl", str(path))
    assert out.returncode != 0
    assert f"{path}:2: response_ids" in out.stderr
    assert received(redis_server.url) == []


def test_synthetic_groups(redis_server) -> None:
    out = produce("--url", redis_server.url, "--synthetic", "10", "--group-size", "4", "--tokens", "16")
    assert out.returncode == 0, out.stderr
    messages = received(redis_server.url)
    assert [len(m.trajectories) for m in messages] == [4, 4, 2]
    assert all(len(t.response_ids) == 16 for m in messages for t in m.trajectories)
