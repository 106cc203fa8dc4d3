"""`slipstream bench broadcast` end to end on a small model: one JSON object with both ratios."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_broadcast_bench_prints_one_json_object_with_its_ratios() -> None:
    argv = ["bench", "broadcast", "--mb", "4", "--tensors", "24", "--repeats", "2", "--json"]
    out = subprocess.run([sys.executable, "-m", "slipstream", *argv], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    [line] = out.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["tensors"] == 24 and 3.9 * 2**20 < report["bytes"] < 4.1 * 2**20
    assert report["broadcast_ratio"] > 0 and report["snapshot_s"] > 0
    # The snapshot is extra time: counting it can only lower the ratio (medians of the same rounds).
    assert report["broadcast_ratio_with_snapshot"] < report["broadcast_ratio"]
