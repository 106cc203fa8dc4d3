"""An engine process for the weight-broadcast tests: a real `WeightReceiver` loading a small mixed-dtype model.

    python wb_engine.py NAME PORT TIMEOUT_S

Receives updates until its stdin closes, printing one JSON object per line on stdout:
{"event": "joined", "name", "group", "rank"}, {"event": "loaded", "name", "version", "tensors": {name: hex bytes}},
{"event": "refused", "name", "error"}. The tests load this file with runpy for `tiny_model` and `tensor_bytes`.
"""

from __future__ import annotations

import json
import sys
import threading

import torch

from telemetry.logs import configure_logging
from weight_broadcast.config import ReceiverConfig
from weight_broadcast.receiver import WeightReceiver, WeightVerificationError


def tiny_model(seed: int) -> torch.nn.Module:
    """float32 linear layers, bfloat16 embeddings and an int64 buffer: every bucket dtype kind at once."""
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(37, 8).to(torch.bfloat16)
    model.proj = torch.nn.Linear(8, 5)
    model.head = torch.nn.Linear(5, 3, bias=False)
    model.register_buffer("positions", torch.arange(11, dtype=torch.int64) * seed)
    return model


def tensor_bytes(named: dict[str, torch.Tensor]) -> dict[str, str]:
    """Every tensor's raw bytes (hex), for bit-exact comparison across processes."""
    return {
        name: t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex() for name, t in named.items()
    }


def main(name: str, port: int, timeout_s: float) -> None:
    configure_logging("console", "info")  # stderr: stdout carries the events
    model = tiny_model(seed=0)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    def emit(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, "name": name, **fields}), flush=True)

    def load(named: list[tuple[str, torch.Tensor]], version: int) -> None:
        model.load_state_dict(dict(named))  # copies: the receiver reuses its buffers
        emit("loaded", version=version, tensors=tensor_bytes(model.state_dict()))

    receiver = WeightReceiver(ReceiverConfig(master_port=port, name=name, timeout_s=timeout_s), load)
    receiver.connect()
    group = ""
    while not stop.is_set():
        try:
            receiver.step(0.1)
        except WeightVerificationError as exc:
            emit("refused", error=str(exc))
        if receiver.group and receiver.group != group:
            group = receiver.group
            emit("joined", group=group, rank=receiver.rank)
    receiver.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
