"""A real SGLang server, launched by SGLangEngine on the demo model: generation, the probed logprob mode against the
model's own forward pass, pause / resume and the version label. Needs a CUDA GPU and `sglang` (`-m gpu`)."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bus.schema import Sampling
from rollout_node.engines.sglang import SGLangEngine
from rollout_node.server_config import SGLangConfig
from slipstream.demo_model import build_demo_model

pytestmark = pytest.mark.gpu


LAUNCH_ARGS = [  # checked against SGLang's own flags by test_sglang_contract.py
    *("--mem-fraction-static", "0.3", "--disable-cuda-graph", "--dtype", "float32"),
    *("--attention-backend", "torch_native", "--sampling-backend", "pytorch"),  # any head size, fp32
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head_dim 64 (256 / 4): a size every SGLang attention backend supports.
    return build_demo_model(tmp_path_factory.mktemp("demo"), hidden_size=256, num_heads=4, num_kv_heads=2, init_std=0.3)


@pytest.fixture(scope="module")
def launched() -> Iterator[list[SGLangEngine]]:
    """The server of this module, launched by the first test that finds a GPU and sglang (`engine`)."""
    engines: list[SGLangEngine] = []
    yield engines
    for engine in engines:
        engine.close()


@pytest.fixture
def engine(
    launched: list[SGLangEngine], model_path: Path, require_service: Callable[[bool, str], None]
) -> SGLangEngine:
    require_service(importlib.util.find_spec("sglang") is not None, "sglang is not installed")
    require_service(torch.cuda.is_available(), "no CUDA GPU")
    if not launched:
        config = SGLangConfig(
            model_path=str(model_path),
            port=0,
            launch_args=LAUNCH_ARGS,
            startup_timeout_s=900,
        )
        launched.append(SGLangEngine.from_config(config))
    return launched[0]


def test_samples_carry_the_logprobs_of_their_sampling_distribution(engine: SGLangEngine, model_path: Path) -> None:
    assert engine.logprob_semantics == "temperature_scaled"  # SGLang's default, probed
    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).cuda().eval()
    prompt = [5, 6, 7, 8]
    for sampling in (
        Sampling(temperature=0.7, max_new_tokens=16),
        Sampling(temperature=1.0, top_k=8, max_new_tokens=16),
    ):
        samples = engine.generate([prompt], sampling, n=4)[0]
        assert len(samples) == 4 and len({tuple(s.response_ids) for s in samples}) > 1
        for sample in samples:
            ids = torch.tensor([prompt + sample.response_ids], device="cuda")
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / sampling.temperature
            if sampling.top_k > 0:
                kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(sample.response_ids, device="cuda")[:, None])
            torch.testing.assert_close(torch.tensor(sample.behavior_logprobs), expected[:, 0].cpu(), atol=2e-3, rtol=0)


def test_pause_holds_a_call_until_resume_and_the_version_label_is_read_back(engine: SGLangEngine) -> None:
    engine.pause()
    done = threading.Event()
    call = threading.Thread(target=lambda: (engine.generate([[5, 6]], Sampling(max_new_tokens=8)), done.set()))
    call.start()
    call.join(1.0)
    assert not done.is_set()
    engine.resume()
    call.join(120)
    assert done.is_set()
    engine.update_weight_version(3)
    assert engine.version == 3
    [[sample]] = engine.generate([[5, 6]], Sampling(max_new_tokens=4))
    assert sample.policy_version == 3
