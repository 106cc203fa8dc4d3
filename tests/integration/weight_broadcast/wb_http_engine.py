"""An SGLang-style engine for the weight-broadcast tests: `weight_routes` over an `HttpReceiver`, served by uvicorn.

    python wb_http_engine.py NAME HTTP_PORT TIMEOUT_S [TP_SIZE]

Stands in for SGLang (which cannot run here) with the same routes; the generation-control routes only report that
they were called. With TP_SIZE > 1 it is a front process and TP_SIZE worker processes (this script, one model each),
as SGLang's HTTP server and its TP schedulers: every weight request goes to all workers at once, and worker r joins
the group at `rank_offset + r` (sglang/srt/model_executor/model_runner_components/weight_updater.py). Prints one JSON
object per line on stdout: {"event": "paused" | "continued", "name"} and {"event": "loaded", "name", "version",
"tensors": {name: hex bytes}} (a worker's name is "NAME/tpR"). Runs until its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import runpy
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from telemetry.logs import configure_logging
from weight_broadcast.http_receiver import HttpReceiver, weight_routes

_engine = runpy.run_path(str(Path(__file__).with_name("wb_engine.py")))


WEIGHT_ROUTES = (
    "init_weights_update_group",
    "begin_weight_update",
    "update_weights_from_distributed",
    "end_weight_update",
    "destroy_weights_update_group",
)


def main(name: str, port: int, timeout_s: float, tp_size: int = 1) -> None:
    configure_logging("console", "warning")  # stderr: stdout carries the events

    def emit(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, "name": name, **fields}), flush=True)

    app = FastAPI()
    if tp_size == 1:
        model = _engine["tiny_model"](0)

        def load(named: list[tuple[str, torch.Tensor]], version: int) -> None:
            model.load_state_dict(dict(named))
            emit("loaded", version=version, tensors=_engine["tensor_bytes"](model.state_dict()))

        app.include_router(weight_routes(HttpReceiver(load, timeout_s=timeout_s)))
    else:
        _fan_out(app, [_worker(f"{name}/tp{r}", timeout_s) for r in range(tp_size)], timeout_s)

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/model_info")
    def model_info() -> dict[str, str]:
        return {"model_path": name}

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


def _worker(name: str, timeout_s: float) -> str:
    """Start one TP worker (this script, TP_SIZE 1) on a free port; its events are relayed to our stdout. Returns its
    URL. It exits when our stdin pipe to it closes, which our own exit (SIGKILL included) does."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, __file__, name, str(port), str(timeout_s)]
    worker = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def relay() -> None:
        assert worker.stdout is not None
        for line in worker.stdout:
            print(line, end="", flush=True)

    threading.Thread(target=relay, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).is_success:
                return url
        except httpx.HTTPError:
            threading.Event().wait(0.1)
    raise RuntimeError(f"worker {name} did not come up")


def _fan_out(app: FastAPI, workers: list[str], timeout_s: float) -> None:
    """The weight routes of a TP front: each request to every worker concurrently (a collective needs all of its
    ranks), worker r's init at rank_offset + r; the first failure is the answer."""
    pool = ThreadPoolExecutor(len(workers))

    def forward(route: str, body: dict[str, Any]) -> JSONResponse:
        def one(r: int) -> httpx.Response:
            sent = body | {"rank_offset": body["rank_offset"] + r} if route == WEIGHT_ROUTES[0] else body
            return httpx.post(f"{workers[r]}/{route}", json=sent, timeout=timeout_s + 30)

        replies = list(pool.map(one, range(len(workers))))
        failed = [reply for reply in replies if not reply.is_success]
        reply = failed[0] if failed else replies[0]
        return JSONResponse(reply.json(), status_code=reply.status_code)

    for route in WEIGHT_ROUTES:

        async def handler(request: Request, route: str = route) -> JSONResponse:
            body = await request.json()
            return await asyncio.get_running_loop().run_in_executor(None, forward, route, body)

        app.add_api_route(f"/{route}", handler, methods=["POST"])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), *(int(a) for a in sys.argv[4:5]))
