"""A torch engine for test_learner_broadcast.py: the base model in a `TorchEngine`, its weights replaced by each
version a `WeightReceiver` gets, and its greedy answer to a prompt after each load on stdout.

    python engine_worker.py NAME PORT MODEL_PATH PROMPT_IDS        (PROMPT_IDS: comma-separated; until stdin closes)

Prints one JSON object per load: {"version": v, "tokens": greedy response ids (cut at eos), "names": tensors loaded}.
"""

from __future__ import annotations

import json
import sys
import threading

import torch

from bus.schema import Sampling
from rollout_node.engines.base import TorchEngineConfig
from rollout_node.engines.torch_engine import TorchEngine
from telemetry.logs import configure_logging
from weight_broadcast.config import ReceiverConfig
from weight_broadcast.receiver import WeightReceiver


def main(name: str, port: int, model_path: str, prompt: list[int]) -> None:
    configure_logging("console", "warning")  # stderr: stdout carries the loads
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    engine = TorchEngine.from_config(TorchEngineConfig(model_path=model_path))
    greedy = Sampling(temperature=0.0, max_new_tokens=6)

    def load(named: list[tuple[str, torch.Tensor]], version: int) -> None:
        engine.load_weights(named, version)  # names and shapes must be the engine model's own, or it raises
        [[sample]] = engine.generate([prompt], greedy)
        tokens = sample.response_ids[:-1] if sample.finish_reason == "stop" else sample.response_ids
        print(json.dumps({"version": version, "tokens": tokens, "names": [k for k, _ in named]}), flush=True)

    receiver = WeightReceiver(ReceiverConfig(master_port=port, name=name, timeout_s=10), load)
    receiver.connect()
    receiver.run(stop, poll_s=0.05)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], [int(t) for t in sys.argv[4].split(",")])
