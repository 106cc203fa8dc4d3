"""Two CPU learner ranks (gloo, FSDP2): each holds half of the weights, they stay in lockstep through uneven shares,
and together they compute the same steps as a single rank on the whole batch, and the same gradients as TRL's
GRPOTrainer loss on one process."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM

from bus.embedded import free_port
from slipstream.demo_model import build_demo_model

WORKER = Path(__file__).with_name("ranks_worker.py")
PARITY_WORKER = Path(__file__).with_name("trl_parity_worker.py")
# The one-rank TRL reference (batch, GRPOTrainer, inputs) lives with the unit parity tests.
TRL_PARITY = Path(__file__).parents[2] / "unit" / "learner_node" / "test_trl_parity.py"


def run_ranks(model: Path, out: Path, world: int, worker: Path = WORKER, *args: str) -> list[dict]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), str(model), str(out / f"{world}-{rank}.json"), *args], env=env
            )
        )
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    return [json.loads((out / f"{world}-{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.timeout(300)
def test_two_ranks_shard_and_match_one_rank(tmp_path: Path) -> None:
    """The two ranks also checkpoint activations and cut micro-batches by a token budget (FSDP2 reshards after each
    block's forward with two ranks, so the recompute gathers again): neither may change a step."""
    model = build_demo_model(tmp_path / "model")
    two = run_ranks(model, tmp_path, 2, WORKER, "budgeted")
    [one] = run_ranks(model, tmp_path, 1)

    for result in two:
        assert result["world"] == 2
        # FSDP2 shards every parameter's first dimension over the two ranks: each holds about half.
        assert result["local_numel"] < 0.55 * result["total_numel"]
    assert one["local_numel"] == one["total_numel"]
    # Lockstep: both ranks took every step and report the same global metrics; the full weights gather on rank 0.
    assert two[0]["metrics"] == two[1]["metrics"] and len(two[0]["metrics"]) == 3
    assert two[1]["checksums"] == {} and len(two[0]["checksums"]) == len(one["checksums"])
    # Same batch, same result as one rank that trains it all (gradients summed over ranks, exact normalisers).
    for step_two, step_one in zip(two[0]["metrics"], one["metrics"], strict=True):
        for key in ("loss", "grad_norm", "kl", "entropy"):
            assert step_two[key] == pytest.approx(step_one[key], rel=1e-4, abs=1e-6), key
    for name, value in one["checksums"].items():
        assert two[0]["checksums"][name] == pytest.approx(value, rel=1e-5, abs=1e-4), name


@pytest.mark.timeout(300)
def test_two_ranks_train_lora_adapters_as_one_rank_does(tmp_path: Path) -> None:
    """LoRA under FSDP2: the adapters are sharded over the two ranks like any weight, the base stays frozen, and the
    merged weights the engines would get are one rank's. The KL reference is the policy with its adapters disabled:
    after the steps its logprobs are still the base model's, on either rank."""
    model = build_demo_model(tmp_path / "model")
    two = run_ranks(model, tmp_path, 2, WORKER, "lora")
    [one] = run_ranks(model, tmp_path, 1, WORKER, "lora")
    plain = AutoModelForCausalLM.from_pretrained(model)
    base = {k: float(v.double().sum()) for k, v in plain.state_dict().items()}

    # Trainable: the adapters only (a few % of the model here), each rank holding about half of them.
    assert one["total_numel"] < 0.2 * plain.num_parameters() and one["local_numel"] == one["total_numel"]
    assert all(r["local_numel"] < 0.55 * r["total_numel"] for r in two)
    assert two[0]["metrics"] == two[1]["metrics"] and two[1]["checksums"] == {}
    for step_two, step_one in zip(two[0]["metrics"], one["metrics"], strict=True):
        for key in ("loss", "grad_norm", "kl"):
            assert step_two[key] == pytest.approx(step_one[key], rel=1e-4, abs=1e-6), key
    assert two[0]["checksums"].keys() == base.keys()  # merged under the base model's names
    for name, value in one["checksums"].items():
        assert two[0]["checksums"][name] == pytest.approx(value, rel=1e-5, abs=1e-4), name
        if not name.endswith("proj.weight"):  # embedding and norms: frozen, no adapter
            assert value == base[name], name
    assert any(one["checksums"][n] != base[n] for n in base if n.endswith("proj.weight"))  # the adapters trained
    for result in [*two, one]:
        assert result["reference_to_base"] == 0 and result["policy_to_base"] > 1e-3
    assert all(step["kl"] > 0 for step in one["metrics"][1:])  # measured from the base, once the adapters moved


def trl_parity_helpers() -> ModuleType:
    """tests/unit/learner_node/test_trl_parity.py, loaded by path (the tests are not a package)."""
    spec = importlib.util.spec_from_file_location("trl_parity_helpers", TRL_PARITY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_two_ranks_give_trls_one_process_gradients(tmp_path: Path) -> None:
    """token-mean = TRL loss_type dapo, group scaling: FSDP2 on two gloo ranks (micro-batches of 2, uneven shares,
    the flat group skipped) gives the gradients of TRL's `_compute_loss` on the whole batch in one process."""
    pytest.importorskip("trl")
    parity = trl_parity_helpers()
    model = build_demo_model(tmp_path / "model", hidden_size=64, intermediate_size=128, init_std=0.2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        # One local rank only computes the behaviour logprobs at these weights (importance weight 1).
        units = parity.with_behaviour(parity.slipstream_trainer(model, None), parity.make_units())
        (tmp_path / "units.pkl").write_bytes(pickle.dumps(units))
        two = run_ranks(model, tmp_path, 2, PARITY_WORKER, str(tmp_path / "units.pkl"))
        samples = [s for u in units for s in u.samples]
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        inputs = parity.trl_inputs(samples, parity.trl_advantages(rewards, "group", parity.SIZE))
        trl_loss, trl_grads = parity.trl_step(parity.trl_trainer(model, tmp_path, loss_type="dapo"), inputs)
    finally:
        torch.set_default_dtype(previous)

    assert all(r["world"] == 2 and r["local_numel"] < 0.55 * r["total_numel"] for r in two)
    assert two[0]["metrics"] == two[1]["metrics"]
    assert two[0]["metrics"]["loss"] == pytest.approx(trl_loss, rel=1e-5, abs=1e-7)
    grads = torch.load(tmp_path / "2-0.json.grads.pt")
    assert grads.keys() == trl_grads.keys()
    errors = {name: float((grads[name] - g).norm() / g.norm()) for name, g in trl_grads.items()}
    assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda item: -item[1])[:4]
