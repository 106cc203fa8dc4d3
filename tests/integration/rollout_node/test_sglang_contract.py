"""The client's requests and serve-engine's answers held to SGLang's own schemas, and the pins that must agree with
SGLang's own requirements.

SGLang cannot be installed here (CUDA), and its request classes do not import on a CPU machine; its generated
`sglang/api/v1/api_types.py` needs only msgspec. `make` downloads the wheel the `gpu` extra pins into
.venv/sglang-wheel, and these tests load that file from it: `decode_GenerateRequest` is SGLang's own check of a
/generate body (unknown sampling keys, wrong types refused), the response decoders its reading of the answers.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement

from bus.schema import Sampling
from rollout_node.engines.base import TorchEngineConfig
from rollout_node.engines.sglang import SGLangEngine, SGLangRequestError, launch_command
from rollout_node.engines.torch_engine import TorchEngine
from rollout_node.server import build_app
from rollout_node.server_config import SGLangConfig
from slipstream.demo_model import build_demo_model
from telemetry.http import ServerHandle, serve_in_thread
from tests.conftest import require
from tests.integration.rollout_node.test_sglang_gpu import LAUNCH_ARGS

REPO = Path(__file__).resolve().parents[3]
WHEEL_DIR = Path(sys.prefix) / "sglang-wheel"
SAMPLINGS = [  # what a rollout node sends: every field the client maps, one at a time and together
    Sampling(max_new_tokens=4),
    Sampling(temperature=0.0, max_new_tokens=3),
    Sampling(temperature=0.7, top_k=5, max_new_tokens=4),
    Sampling(temperature=1.0, top_p=0.9, max_new_tokens=4),
    Sampling(max_new_tokens=6, stop=["=", "\n"], stop_token_ids=[2], seed=11),
]


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    wheels = sorted(WHEEL_DIR.glob("sglang-*.whl"))
    require(bool(wheels), f"no SGLang wheel in {WHEEL_DIR} (`make .venv/.test-tools` downloads it)")
    return zipfile.ZipFile(wheels[-1])


@pytest.fixture(scope="module")
def api(wheel: zipfile.ZipFile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """SGLang's sglang.api.v1.api_types, loaded from the wheel (registered while the tests use it)."""
    path = tmp_path_factory.mktemp("sglang") / "api_types.py"
    path.write_bytes(wheel.read("sglang/api/v1/api_types.py"))
    spec = importlib.util.spec_from_file_location("sglang_api_types", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # msgspec resolves the annotations through the module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def requirements(wheel: zipfile.ZipFile) -> dict[str, Requirement]:
    """The wheel's unconditional Requires-Dist, by project name."""
    metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    message = Parser().parsestr(wheel.read(metadata).decode())
    found = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
    pinned = {r.name.lower(): r for r in found if r.marker is None}
    return pinned | {"sglang": Requirement(f"sglang=={message['Version']}")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    model = build_demo_model(tmp_path_factory.mktemp("demo"), hidden_size=32, intermediate_size=64, init_std=0.3)
    engine = TorchEngine.from_config(TorchEngineConfig(model_path=str(model)))
    handle = serve_in_thread(build_app(engine, model_path=str(model), tokenizer=engine.tokenizer))
    yield handle
    handle.stop()


class Recorder:
    """Every request body and JSON answer of one client, by route."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.answers: list[tuple[str, Any]] = []

    def request(self, request: httpx.Request) -> None:
        self.requests.append((request.url.path, json.loads(request.content) if request.content else None))

    def response(self, response: httpx.Response) -> None:
        response.read()
        self.answers.append((response.request.url.path, response.json() if response.content else None))


@pytest.fixture
def client(server: ServerHandle) -> Iterator[tuple[SGLangEngine, Recorder]]:
    engine = SGLangEngine(server.url, SGLangConfig(url=server.url, api_key_env=None))
    recorder = Recorder()
    engine._http.event_hooks = {"request": [recorder.request], "response": [recorder.response]}
    yield engine, recorder
    engine.close()


def test_the_gpu_extra_pins_the_wheel_read_and_the_cuda_image_installs_the_torch_it_needs(
    requirements: dict[str, Requirement],
) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["gpu"] == [str(requirements["sglang"])]
    [torch_pin] = [spec.version for spec in requirements["torch"].specifier if spec.operator == "=="]
    dockerfile = (REPO / "deploy" / "Dockerfile.cuda").read_text()
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_pin)}$", dockerfile, re.MULTILINE), torch_pin
    ours = {Requirement(d).name.lower(): Requirement(d) for d in project["dependencies"]}
    for name in ("torch", "transformers"):  # SGLang's pin must satisfy our own range, or pip cannot install both
        [pin] = [spec.version for spec in requirements[name].specifier if spec.operator == "=="]
        assert ours[name].specifier.contains(pin), (name, pin, str(ours[name]))


def test_every_generate_body_the_client_sends_is_one_sglang_accepts(
    client: tuple[SGLangEngine, Recorder], api: ModuleType
) -> None:
    engine, recorder = client
    for sampling in SAMPLINGS:
        for n in (1, 3):
            engine.generate([[5, 6, 7], [8]], sampling, n=n)
    # What the client sends a --enable-deterministic-inference server: a request and a seed per sample. serve-engine
    # takes one sampling setting per call and refuses it; SGLang's decoder below is the judge of the body.
    engine.deterministic = True
    with pytest.raises(SGLangRequestError, match="sampling_params: a list needs one entry per prompt, all equal"):
        engine.generate([[5, 6, 7], [8]], SAMPLINGS[0], n=3)
    bodies = [body for route, body in recorder.requests if route == "/generate"]
    assert len(bodies) == 2 * len(SAMPLINGS) + 1
    for body in bodies:
        request = api.decode_GenerateRequest(body)  # raises JsonContractError naming what SGLang refuses
        assert request.input_ids == body["input_ids"] and request.return_logprob is True
        params = request.sampling_params if isinstance(request.sampling_params, list) else [request.sampling_params]
        assert all(p.no_stop_trim is True and p.top_k != 0 for p in params)
    seeds = [p["sampling_seed"] for p in bodies[-1]["sampling_params"]]
    assert len(seeds) == 6 and len(set(seeds[:3])) == 3 and all(p["n"] == 1 for p in bodies[-1]["sampling_params"])


def test_serve_engines_answers_read_as_sglangs_responses(
    client: tuple[SGLangEngine, Recorder], api: ModuleType, server: ServerHandle
) -> None:
    engine, recorder = client
    engine.generate([[5, 6], [7]], Sampling(temperature=0.0, max_new_tokens=3))
    engine.generate([[7]], Sampling(max_new_tokens=3))
    outputs = [output for route, answer in recorder.answers if route == "/generate" for output in answer]
    assert len(outputs) == 3
    for output in outputs:
        decoded = api.decode_GenerateResponse(output)
        assert decoded.output_ids == output["output_ids"]
        assert [entry.token_id for entry in decoded.meta_info.output_token_logprobs] == output["output_ids"]
        assert decoded.meta_info.finish_reason is not None and decoded.meta_info.weight_version == "0"
    with httpx.Client(base_url=server.url) as http:
        model_info = api.decode_GetModelInfoResponse(http.get("/model_info").json())
        server_info = api.decode_GetServerInfoResponse(http.get("/server_info").json())
    assert model_info.weight_version == "0" and server_info.model_path == model_info.model_path != ""


def test_every_flag_the_client_launches_sglang_with_is_one_of_sglangs_server_args(wheel: zipfile.ZipFile) -> None:
    # ServerArgs' fields (sglang/srt/arg_groups/fields/*.py, `name: A[type, help]`) become `--name-with-dashes`
    # (arg_groups/arg_utils.py `_field_to_cli_name`).
    fields = {
        match.group(1)
        for name in wheel.namelist()
        if re.fullmatch(r"sglang/srt/arg_groups/fields/\w+\.py", name)
        for match in re.finditer(r"^    (\w+): A\[", wheel.read(name).decode(), re.MULTILINE)
    }
    known = {"--" + field.replace("_", "-") for field in fields}
    assert {"--model-path", "--tp-size", "--api-key"} <= known  # the reading itself works
    config = SGLangConfig(model_path="/models/policy", launch_args=LAUNCH_ARGS, api_key_env=None)
    flags = [arg for arg in launch_command(config, 30000) if arg.startswith("--")] + ["--api-key"]
    assert [flag for flag in flags if flag not in known] == []
