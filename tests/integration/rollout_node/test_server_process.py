"""`slipstream serve-engine` as a real process: the learner's WeightSender updates it over a real gloo group through
SGLang's HTTP routes (HttpLink), the served model changes with the version, and SIGKILL fails the client at once."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForCausalLM

from bus.embedded import free_port
from bus.schema import Sampling
from rollout_node.engines.base import Sample, TorchEngineConfig
from rollout_node.engines.sglang import SGLangEngine, SGLangError
from rollout_node.engines.torch_engine import TorchEngine
from rollout_node.server_config import SGLangConfig
from slipstream.demo_model import build_demo_model
from weight_broadcast.config import BroadcastConfig
from weight_broadcast.links import HttpLink
from weight_broadcast.sender import WeightSender

SPEC = {"hidden_size": 64, "intermediate_size": 128, "init_std": 0.3}
GREEDY = Sampling(temperature=0.0, max_new_tokens=12)


class ServeEngine:
    """A `slipstream serve-engine` process; `.url` once it printed it, `.kill()` sends SIGKILL."""

    def __init__(self, model_path: Path, folder: Path) -> None:
        self.telemetry_port = free_port()
        config = folder / "serve.toml"
        config.write_text(
            f'[serve_engine]\nport = 0\nweight_timeout_s = 10.0\n[serve_engine.engine]\nmodel_path = "{model_path}"\n'
            f'[telemetry]\nport = {self.telemetry_port}\nlog_format = "console"\nlog_level = "warning"\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "SLIPSTREAM_ENGINE_API_KEY"}  # no key: HttpLink sends none
        self.process = subprocess.Popen(
            [sys.executable, "-m", "slipstream", "serve-engine", "--config", str(config)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
        try:
            self.url = lines.get(timeout=120).strip()
        except queue.Empty:
            self.url = ""
        if not self.url.startswith("http://127.0.0.1:"):
            self.kill()
            raise AssertionError(f"serve-engine did not print its URL within 120 s (printed {self.url!r})")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    return build_demo_model(tmp_path / "v0", seed=3, **SPEC), build_demo_model(tmp_path / "v1", seed=4, **SPEC)


@pytest.fixture
def served(models: tuple[Path, Path], tmp_path: Path) -> Iterator[ServeEngine]:
    server = ServeEngine(models[0], tmp_path)
    yield server
    with contextlib.suppress(ProcessLookupError):
        server.kill()


def ids(completions: list[list[Sample]]) -> list[list[int]]:
    return [sample.response_ids for group in completions for sample in group]


def test_weights_over_gloo_change_the_served_model_and_a_killed_server_fails_the_client_at_once(
    served: ServeEngine, models: tuple[Path, Path]
) -> None:
    config = SGLangConfig(url=served.url, api_key_env=None, request_timeout_s=10, generate_timeout_s=60)
    client = SGLangEngine(served.url, config)
    reference = TorchEngine.from_config(TorchEngineConfig(model_path=str(models[1])))
    prompts = [reference.tokenizer.encode(text) for text in ("3+4=", "12+7=")]
    before = client.generate(prompts, GREEDY)

    # Buckets of at most 64 KiB: the model travels as many bucketed collectives.
    sender = WeightSender(BroadcastConfig(master_port=0, timeout_s=10, join_poll_s=0.05, bucket_mb=0.0625))
    try:
        sender.add_engine(HttpLink("serve", served.url))
        new_weights = AutoModelForCausalLM.from_pretrained(models[1], local_files_only=True).state_dict()
        report = sender.update(new_weights, version=1)
        assert report.delivered == ["serve"] and not report.failed, report.failed
    finally:
        sender.close()

    assert client.version == 1
    after = client.generate(prompts, GREEDY)
    assert ids(after) == ids(reference.generate(prompts, GREEDY)) != ids(before)
    assert all(s.policy_version == 1 and s.version_ranges == [(0, len(s.response_ids), 1)] for g in after for s in g)
    assert httpx.get(f"http://127.0.0.1:{served.telemetry_port}/healthz", timeout=10).json()["ready"] is True
    assert "slipstream_rollout_policy_version 1.0" in httpx.get(f"{served.url}/metrics", timeout=10).text

    # SIGKILL while a call is held in flight by a pause: the call fails with the route and the cause, not a hang.
    client.pause()
    failures: list[BaseException] = []

    def generate() -> None:
        try:
            client.generate(prompts, Sampling(max_new_tokens=64))
        except SGLangError as exc:
            failures.append(exc)

    in_flight = threading.Thread(target=generate)
    in_flight.start()
    in_flight.join(0.5)
    served.kill()
    in_flight.join(60)
    assert not in_flight.is_alive() and len(failures) == 1
    assert failures[0].route == "/generate" and failures[0].reason == "unreachable"  # type: ignore[attr-defined]
    with pytest.raises(SGLangError, match=rf"POST /generate: {served.url} unreachable") as refused:
        client.generate(prompts, GREEDY)
    assert refused.value.reason == "unreachable"
    client.close()
