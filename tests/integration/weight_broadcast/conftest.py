"""Harness of the weight-broadcast integration tests: learner rank 0 (`WeightSender`) in the test process, engines
in subprocesses (`wb_engine.py` on the store, `wb_http_engine.py` behind SGLang's HTTP routes) that report what they
load as JSON lines, and SIGKILL to crash them."""

from __future__ import annotations

import contextlib
import gc
import json
import queue
import runpy
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bus.schema import Weights
from weight_broadcast.config import BroadcastConfig
from weight_broadcast.sender import WeightSender

HERE = Path(__file__).parent
TIMEOUT_S = 2.0
Event = dict[str, Any]
_engine = runpy.run_path(str(HERE / "wb_engine.py"))
tiny_model: Callable[[int], torch.nn.Module] = _engine["tiny_model"]
tensor_bytes: Callable[[dict[str, torch.Tensor]], dict[str, str]] = _engine["tensor_bytes"]


class Cluster:
    """A sender here, engine processes there, and every event the engines reported."""

    timeout_s = TIMEOUT_S
    tiny_model = staticmethod(tiny_model)  # the engines' model: tiny_model(seed) -> nn.Module
    tensor_bytes = staticmethod(tensor_bytes)  # {name: tensor} -> {name: hex of its bytes}

    def __init__(self, rejoin_after_s: float) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.engines: dict[str, subprocess.Popen[str]] = {}
        self.seen: list[Event] = []
        self.announced: list[Weights] = []
        # Buckets of at most 512 bytes: the tiny model travels as several buckets of one dtype each.
        config = BroadcastConfig(
            master_port=0, timeout_s=TIMEOUT_S, join_poll_s=0.05, bucket_mb=512 / 2**20, rejoin_after_s=rejoin_after_s
        )
        self.sender = WeightSender(config, announce=self.announced.append).start()

    def restart_sender(self) -> None:
        """Stop the sender, its store with it, and start a new one on the same port: a restarted learner."""
        config = self.sender.config.model_copy(update={"master_port": self.sender.port})
        self.sender.close()
        del self.sender
        gc.collect()  # the store stops when the last reference goes
        self.sender = WeightSender(config, announce=self.announced.append).start()

    def start_engine(self, name: str) -> None:
        """A `WeightReceiver` engine that finds the learner through the store."""
        self._spawn(name, [str(HERE / "wb_engine.py"), name, str(self.sender.port), str(TIMEOUT_S)])

    def start_http_engine(self, name: str, port: int, tp_size: int = 1) -> str:
        """An engine with SGLang's HTTP routes on `port` (`tp_size` workers); returns its URL once it answers
        /health."""
        self._spawn(name, [str(HERE / "wb_http_engine.py"), name, str(port), str(TIMEOUT_S), str(tp_size)])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).is_success:
                    return url
            if time.monotonic() > deadline or self.engines[name].poll() is not None:
                raise AssertionError(f"engine {name} did not come up on {url}")
            time.sleep(0.1)

    def _spawn(self, name: str, argv: list[str]) -> None:
        engine = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, args=(engine,), daemon=True).start()
        self.engines[name] = engine

    def _read(self, engine: subprocess.Popen[str]) -> None:
        assert engine.stdout is not None
        for line in engine.stdout:
            self.events.put(json.loads(line))

    def kill(self, name: str) -> None:
        engine = self.engines.pop(name)
        engine.kill()  # SIGKILL: no goodbye, its sockets are closed by the kernel
        engine.wait(timeout=10)

    def wait_for(self, done: Callable[[list[Event]], bool], timeout_s: float = 60) -> None:
        """Collect events until `done(all events so far)`; every wait is bounded."""
        deadline = time.monotonic() + timeout_s
        while not done(self.seen):
            if time.monotonic() > deadline:
                summary = [{k: v for k, v in e.items() if k != "tensors"} for e in self.seen]
                raise AssertionError(f"engines did not get there in {timeout_s}s; events: {summary}")
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.events.get(timeout=0.1))

    def loaded(self, version: int) -> dict[str, dict[str, str]]:
        """Engines that loaded `version` -> the bytes of their model's tensors after loading it."""
        return {e["name"]: e["tensors"] for e in self.seen if e["event"] == "loaded" and e["version"] == version}

    def wait_loaded(self, names: set[str], version: int) -> dict[str, dict[str, str]]:
        self.wait_for(lambda _: names <= set(self.loaded(version)))
        return self.loaded(version)

    def close(self) -> None:
        for engine in self.engines.values():  # a store engine stops when its stdin closes
            with contextlib.suppress(OSError):
                engine.stdin.close()  # type: ignore[union-attr]
        for engine in self.engines.values():
            try:
                engine.wait(timeout=10)
            except subprocess.TimeoutExpired:
                engine.kill()
                engine.wait(timeout=10)
        self.sender.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(rejoin_after_s=0.5)
    yield cluster
    cluster.close()


@pytest.fixture
def http_port() -> int:
    """A free localhost TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
