"""An engine for test_learner_broadcast.py: a `WeightReceiver` that reports each loaded version on stdout.

    python receiver_worker.py NAME PORT        (runs until stdin closes)

Prints one JSON object per load: {"version": v, "sums": {tensor name: float64 sum}, "dtypes": {name: dtype}}.
"""

from __future__ import annotations

import json
import sys
import threading

import torch

from telemetry.logs import configure_logging
from weight_broadcast.config import ReceiverConfig
from weight_broadcast.receiver import WeightReceiver


def main(name: str, port: int) -> None:
    configure_logging("console", "warning")  # stderr: stdout carries the loads
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    def load(named: list[tuple[str, torch.Tensor]], version: int) -> None:
        sums = {k: float(v.double().sum()) for k, v in named}
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in named}
        print(json.dumps({"version": version, "sums": sums, "dtypes": dtypes}), flush=True)

    receiver = WeightReceiver(ReceiverConfig(master_port=port, name=name, timeout_s=10), load)
    receiver.connect()
    receiver.run(stop, poll_s=0.05)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
