"""Multi-turn tool use end to end: `slipstream up` on configs/agent-tools.toml (a learner without tasks, a rollout
node with the agent proxy, examples/agent_tool_loop.py on the plain `openai` client with tools and streaming) against
the test's redis-server, for a few steps. Checked on what crossed the bus and what the learner trained:

- every trajectory is an episode of the agent through the proxy; its loss_mask is 1 on what the model wrote and 0
  on exactly the tool results and the chat template between turns (with logprob 0 there);
- the learner trained the agent's episodes, and the tokens its loss counted are exactly the masked-in tokens of the
  trajectories it trained (the dedup set), fewer than their response tokens.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import redis
from transformers import AutoTokenizer

from bus.codec import decode
from bus.embedded import free_port
from bus.schema import Trajectory
from slipstream.demo_model import tool_call_text

REPO = Path(__file__).resolve().parents[2]
# What the model did not write between two of its replies: the end of its turn when it did not end it itself, a tool
# turn per call (a digit, or an error) and the template's opening of the next assistant turn.
TOOL_TURN = r"<\|im_start\|>tool\n(\d|error: [^<]*)<\|im_end\|>\n"
BETWEEN_TURNS = re.compile(rf"(<\|im_end\|>)?\n({TOOL_TURN})+<\|im_start\|>assistant\n")


def runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(value, start, end) of each maximal run of equal values."""
    edges = [0, *(np.flatnonzero(np.diff(mask)) + 1).tolist(), len(mask)]
    return [(int(mask[a]), a, b) for a, b in zip(edges, edges[1:], strict=False)]


def test_the_agent_is_trained_through_the_proxy_on_its_own_tokens_only(redis_server, tmp_path: Path) -> None:
    model = tmp_path / "model"
    command = [
        sys.executable, "-m", "slipstream", "up", "--config", "configs/agent-tools.toml",
        "--bus.url", redis_server.url,
        "--telemetry.port", str(free_port(2)),  # the learner's and rollout-0's
        "--run.output_dir", str(tmp_path / "run"),
        "--model.path", str(model),
        "--up.timeout_s", "150",
        "--learner.max_steps", "3",
        "--learner.max_staleness", "50",  # nothing dropped as stale: the trained set is the dedup set
        "--bus.stats_interval_s", "3600",  # acked entries are not trimmed in the run: every trained one is read below
    ]  # fmt: skip
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"done: exit=0 steps=3 ", out.stdout), out.stdout[-2000:]
    assert "agent started against http://127.0.0.1:" in out.stdout

    tokenizer = AutoTokenizer.from_pretrained(model)
    client = redis.Redis.from_url(redis_server.url)
    trajectories = {t.id: t for t in (decode(f[b"data"]) for _, f in client.xrange("slipstream:trajectories"))}
    assert trajectories and all(isinstance(t, Trajectory) for t in trajectories.values())
    called = 0
    for traj in trajectories.values():
        assert traj.producer == "rollout-0:proxy" and traj.group_id.startswith("agent-") and "session" in traj.meta
        mask, logprobs = traj.loss_mask, traj.behavior_logprobs
        assert mask[0] == 1 and np.all(logprobs[mask == 0] == 0.0)
        for value, start, end in runs(mask):
            text = tokenizer.decode(traj.response_ids[start:end], skip_special_tokens=False)
            if value == 0:
                assert BETWEEN_TURNS.fullmatch(text), text  # only the tool's result and the template are masked out
        written = tokenizer.decode(traj.response_ids[mask == 1], skip_special_tokens=False)
        masked = tokenizer.decode(traj.response_ids[mask == 0], skip_special_tokens=False)
        assert traj.rewards["called"] == float(tool_call_text("draw_number") in written)
        drawn = traj.meta["drawn"]
        if drawn is not None:  # the call is in a reply (trained), the digit the model saw in a tool turn (masked out)
            called += 1
            assert f"tool\n{drawn}<|im_end|>" in masked
    assert called > 0  # a random policy calls the tool in a few percent of its replies: 3 steps see some

    accounting = {k.decode(): int(v) for k, v in client.hgetall("slipstream:accounting").items()}
    assert accounting["trained"] > 0 and not [k for k in accounting if k.startswith("dropped:")], accounting
    trained = [trajectories[i.decode()] for i in client.zrange("slipstream:dedup:learner", 0, -1)]
    assert len(trained) == accounting["trained"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "logs" / "learner.log").read_text().splitlines()
             if line.startswith("{") and '"train_step"' in line]  # fmt: skip
    assert len(steps) == 3
    loss_tokens = sum(s["loss_tokens"] for s in steps)
    assert loss_tokens == sum(int(t.loss_mask.sum()) for t in trained)
    assert loss_tokens < sum(len(t.response_ids) for t in trained)
