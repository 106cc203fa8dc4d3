"""Each algorithm's shipped config (configs/grpo.toml, ppo.toml, dpo.toml) runs end to end: `slipstream up` with a
learner and a rollout node as processes against a real Redis, for a few optimizer steps."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from bus.embedded import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "dpo"])
def test_algorithm_config_trains_through_the_whole_system(algorithm: str, redis_server, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "slipstream", "up", "--config", f"configs/{algorithm}.toml",
        "--bus.url", redis_server.url,
        "--telemetry.port", str(free_port(2)),  # P and P + 1 (rollout-0's): the config's may be taken
        "--run.output_dir", str(tmp_path / "run"),
        "--model.path", str(tmp_path / "model"),
        "--up.build_demo_model", "true",
        "--up.timeout_s", "150",
        "--learner.max_steps", "3",
        "--learner.eval_every", "0",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"done: exit=0 steps=3 ", out.stdout), out.stdout[-2000:]
    accounting = {
        k.decode(): int(v) for k, v in redis.Redis.from_url(redis_server.url).hgetall("slipstream:accounting").items()
    }
    assert accounting["trained"] > 0, accounting
