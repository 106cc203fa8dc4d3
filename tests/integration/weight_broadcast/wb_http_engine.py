"""An SGLang-style engine for the weight-broadcast tests: `weight_routes` over an `HttpReceiver`, served by uvicorn.

    python wb_http_engine.py NAME HTTP_PORT TIMEOUT_S

Stands in for SGLang (which cannot run here) with the same routes; the generation-control routes only report that
they were called. Prints one JSON object per line on stdout: {"event": "paused" | "continued", "name"} and
{"event": "loaded", "name", "version", "tensors": {name: hex bytes}}. Runs until its stdin closes.
"""

from __future__ import annotations

import json
import runpy
import sys
import threading
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from telemetry.logs import configure_logging
from weight_broadcast.http_receiver import HttpReceiver, weight_routes

_engine = runpy.run_path(str(Path(__file__).with_name("wb_engine.py")))


def main(name: str, port: int, timeout_s: float) -> None:
    configure_logging("console", "warning")  # stderr: stdout carries the events
    model = _engine["tiny_model"](0)

    def emit(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, "name": name, **fields}), flush=True)

    def load(named: list[tuple[str, torch.Tensor]], version: int) -> None:
        model.load_state_dict(dict(named))
        emit("loaded", version=version, tensors=_engine["tensor_bytes"](model.state_dict()))

    app = FastAPI()
    app.include_router(weight_routes(HttpReceiver(load, timeout_s=timeout_s)))

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/pause_generation")
    def pause() -> dict[str, bool]:
        emit("paused")
        return {"success": True}

    @app.post("/continue_generation")
    def resume() -> dict[str, bool]:
        emit("continued")
        return {"success": True}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def stop_when_stdin_closes() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
