"""Two CPU learner ranks (gloo, FSDP2): each holds half of the weights, they stay in lockstep through uneven shares,
and together they compute the same steps as a single rank on the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bus.embedded import free_port
from slipstream.demo_model import build_demo_model

WORKER = Path(__file__).with_name("ranks_worker.py")


def run_ranks(model: Path, out: Path, world: int) -> list[dict]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen([sys.executable, str(WORKER), str(model), str(out / f"{world}-{rank}.json")], env=env)
        )
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    return [json.loads((out / f"{world}-{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.timeout(300)
def test_two_ranks_shard_and_match_one_rank(tmp_path: Path) -> None:
    model = build_demo_model(tmp_path / "model")
    two = run_ranks(model, tmp_path, 2)
    [one] = run_ranks(model, tmp_path, 1)

    for result in two:
        assert result["world"] == 2
        # FSDP2 shards every parameter's first dimension over the two ranks: each holds about half.
        assert result["local_numel"] < 0.55 * result["total_numel"]
    assert one["local_numel"] == one["total_numel"]
    # Lockstep: both ranks took every step and report the same global metrics; the full weights gather on rank 0.
    assert two[0]["metrics"] == two[1]["metrics"] and len(two[0]["metrics"]) == 3
    assert two[1]["checksums"] == {} and len(two[0]["checksums"]) == len(one["checksums"])
    # Same batch, same result as one rank that trains it all (gradients summed over ranks, exact normalisers).
    for step_two, step_one in zip(two[0]["metrics"], one["metrics"], strict=True):
        for key in ("loss", "grad_norm", "kl", "entropy"):
            assert step_two[key] == pytest.approx(step_one[key], rel=1e-4, abs=1e-6), key
    for name, value in one["checksums"].items():
        assert two[0]["checksums"][name] == pytest.approx(value, rel=1e-5, abs=1e-4), name
