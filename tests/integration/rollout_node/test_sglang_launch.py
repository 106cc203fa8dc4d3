"""`SGLangEngine.launch`, the path a rollout node takes without `[rollout.sglang] url`: `python -m
sglang.launch_server` with the model, host, port, launch args and API key, as a child process in its own process
group, health-checked, and stopped by `close()`.

SGLang cannot run here, so `sglang.launch_server` is a stand-in on PYTHONPATH that takes the flags the client passes
(each also checked against SGLang's own flags by test_sglang_contract.py) and serves serve-engine's app.
"""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest

from bus.schema import Sampling
from rollout_node.engines.sglang import SGLangEngine, SGLangError
from rollout_node.server_config import SGLangConfig
from slipstream.demo_model import build_demo_model

REPO = Path(__file__).resolve().parents[3]
STAND_IN = '''
    """Stands in for SGLang's launch_server: the flags SGLangEngine passes, then serve-engine's app."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--tp-size", type=int, default=1)
    args = parser.parse_args()

    import uvicorn

    from rollout_node.engines.base import TorchEngineConfig
    from rollout_node.engines.torch_engine import TorchEngine
    from rollout_node.server import build_app

    engine = TorchEngine.from_config(TorchEngineConfig(model_path=args.model_path))
    app = build_app(engine, api_key=args.api_key, model_path=args.model_path, tokenizer=engine.tokenizer)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
'''


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "stand-in" / "sglang"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.syspath_prepend(str(package.parent))  # the client checks that sglang is importable
    monkeypatch.setenv("PYTHONPATH", f"{package.parent}:{REPO}")
    return package


def test_a_launched_server_is_health_checked_serves_with_its_key_and_is_stopped_by_close(
    stand_in: Path, tmp_path: Path
) -> None:
    model = build_demo_model(tmp_path / "model", hidden_size=32, intermediate_size=64)
    key = tmp_path / "key"
    key.write_text("sk-launch\n")
    config = SGLangConfig(model_path=str(model), port=0, launch_args=["--tp-size", "1"], api_key_file=str(key))
    engine = SGLangEngine.from_config(config)
    try:
        assert engine.process is not None and engine.process.poll() is None
        [[sample]] = engine.generate([[5, 6]], Sampling(temperature=0.0, max_new_tokens=3))
        assert len(sample.response_ids) == 3 and engine.n_ranks == 1
        host, port = engine.url.removeprefix("http://").rsplit(":", 1)
    finally:
        engine.close()
    assert engine.process.poll() is not None  # stopped with its process group
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass


def test_a_server_that_exits_while_starting_fails_the_launch_with_its_exit_code(stand_in: Path, tmp_path: Path) -> None:
    config = SGLangConfig(model_path=str(tmp_path), port=0, launch_args=["--no-such-flag"], api_key_env=None)
    with pytest.raises(SGLangError, match="exited with code 2 before answering /health") as caught:
        SGLangEngine.from_config(config)
    assert caught.value.reason == "unreachable"
