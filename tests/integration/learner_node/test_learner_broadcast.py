"""The learner's broadcast on a real Redis: a receiver joined through the store loads each published version (the
full weights gathered from FSDP2), every version is announced on the control stream, and an SGLang engine's Join
there makes the sender drive it over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bus.codec import decode, encode
from bus.config import BusConfig
from bus.schema import Heartbeat, Join, Leave, Weights
from bus.settings import LoraConfig
from bus.transport import setup_transport
from learner_node.broadcast import Broadcaster
from learner_node.config import LearnerConfig
from learner_node.evaluation import greedy_generate
from learner_node.lora import peft_config
from learner_node.model import full_state_dict, init_distributed, load_policy
from slipstream.demo_model import build_demo_model
from weight_broadcast.config import BroadcastConfig
from weight_broadcast.links import HttpLink


def control_messages(transport: Any, config: BusConfig) -> list[Any]:
    return [decode(d.data) for d in transport.read(config.stream("control"), "0", 1000, 0)]


def test_versions_reach_a_receiver_and_the_control_stream(tmp_path: Path, redis_server: Any) -> None:
    config = BusConfig(url=redis_server.url)
    transport = setup_transport(config)
    runtime = init_distributed(LearnerConfig())
    policy = load_policy(str(build_demo_model(tmp_path / "m")), runtime)
    broadcast = BroadcastConfig(master_port=0, timeout_s=20, join_poll_s=0.05)
    broadcaster = Broadcaster(broadcast, transport, runtime, node_id="learner", dtype=torch.bfloat16)
    engine = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("receiver_worker.py")), "engine-0", str(broadcaster.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    loads: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: loads.extend(json.loads(line) for line in engine.stdout), daemon=True)
    reader.start()
    try:
        broadcaster.publish(policy, 0, wait=True)  # staged: the engine gets version 0 when it joins
        deadline = time.monotonic() + 60
        while not loads and time.monotonic() < deadline:
            time.sleep(0.05)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(1.0)
        broadcaster.publish(policy, 1, wait=True)
        deadline = time.monotonic() + 20
        while (not loads or loads[-1]["version"] != 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        expected = {k: float(v.to(torch.bfloat16).double().sum()) for k, v in full_state_dict(policy).items()}
    finally:
        engine.stdin.close()
        engine.wait(timeout=30)
        broadcaster.close()
    assert [load["version"] for load in loads][0] == 0 and loads[-1]["version"] == 1
    assert broadcaster.delivered_version == 1
    assert loads[-1]["sums"] == expected and set(loads[-1]["dtypes"].values()) == {"bfloat16"}
    messages = control_messages(transport, config)
    assert [m.version for m in messages if isinstance(m, Weights)][-1] == 1
    kinds = [type(m) for m in messages if getattr(m, "node_id", None) == "learner"]
    assert kinds[0] is Join and kinds[-1] is Leave and set(kinds) <= {Join, Heartbeat, Leave}
    transport.close()


def test_a_lora_policy_reaches_a_torch_engine_as_merged_base_weights(tmp_path: Path) -> None:
    """The engine holds the base model and knows nothing of LoRA: it loads the merged weights under its own names and
    shapes (a wrong name or shape would raise there) and answers greedily as the learner's LoRA policy does."""
    model = build_demo_model(tmp_path / "m")
    runtime = init_distributed(LearnerConfig())
    policy = load_policy(str(model), runtime, adapters=peft_config(LoraConfig(rank=4, alpha=8)))
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = tokenizer.encode("max(3,8)=", add_special_tokens=False)

    torch.manual_seed(0)
    with torch.no_grad():  # trained adapters, as far as the engine can tell: B is 0 only before the first step
        for name, p in policy.named_parameters():  # before any forward: FSDP2 then holds the sharded parameters
            if ".lora_B." in name:
                p.normal_(std=0.5)

    def answer(model: torch.nn.Module) -> list[int]:
        [tokens] = greedy_generate(model, [prompt], runtime, max_new_tokens=6, eos_ids=[tokenizer.eos_token_id],
                                   pad_id=tokenizer.pad_token_id)  # fmt: skip
        return tokens

    lora_answer = answer(policy)
    assert lora_answer != answer(AutoModelForCausalLM.from_pretrained(model).eval())  # the engine must merge
    broadcaster = Broadcaster(BroadcastConfig(master_port=0, timeout_s=20, join_poll_s=0.05), None, runtime,
                              node_id="learner", dtype=torch.float32)  # fmt: skip
    argv = [sys.executable, str(Path(__file__).with_name("engine_worker.py")), "engine-0", str(broadcaster.port),
            str(model), ",".join(map(str, prompt))]  # fmt: skip
    engine = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        broadcaster.publish(policy, 1, wait=True)  # staged: the engine gets it when it joins
        line = engine.stdout.readline()
    finally:
        engine.stdin.close()
        engine.wait(timeout=30)
        broadcaster.close()
    load = json.loads(line)
    assert load["version"] == 1 and load["tokens"] == lora_answer
    base_names = AutoModelForCausalLM.from_pretrained(model).state_dict().keys()
    assert set(load["names"]) <= set(base_names) and not any("lora" in n for n in load["names"])


def test_an_sglang_join_on_the_control_stream_adds_an_http_link_with_the_engines_key(
    redis_server: Any, monkeypatch: Any, tmp_path: Path
) -> None:
    (tmp_path / "engine-key").write_text("sk-engines\n")
    config = BusConfig(url=redis_server.url)
    transport = setup_transport(config)
    stream = config.stream("control")
    engines = {
        "sglang-0": Join(
            "sglang-0", "rollout", address="http://10.0.0.5:30000", meta={"engine": "sglang", "n_ranks": 2}
        ),
        "torch-0": Join("torch-0", "rollout", address="10.0.0.6:9400", meta={"engine": "torch"}),
        "gone": Join("gone", "rollout", address="http://10.0.0.7:30000", meta={"engine": "sglang"}),
    }
    for event in [*engines.values(), Leave("gone", "rollout")]:
        transport.publish(stream, [encode(event)], retain=config.control_retain)
    runtime = init_distributed(LearnerConfig())
    broadcast = BroadcastConfig(master_port=0, join_poll_s=0.05, api_key_file=str(tmp_path / "engine-key"))
    broadcaster = Broadcaster(broadcast, transport, runtime, node_id="learner", dtype=torch.float32)
    added: list[HttpLink] = []
    monkeypatch.setattr(broadcaster.sender, "add_engine", added.append)
    try:
        deadline = time.monotonic() + 10
        while not added and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # a second round must not add it again
    finally:
        broadcaster.close()
        transport.close()
    assert [(link.name, link.url, link.n_ranks) for link in added] == [("sglang-0", "http://10.0.0.5:30000", 2)]
    assert added[0]._http.headers["authorization"] == "Bearer sk-engines"


def test_what_is_sent_is_a_copy_that_training_cannot_change(tmp_path: Path, monkeypatch: Any) -> None:
    runtime = init_distributed(LearnerConfig())
    policy = load_policy(str(build_demo_model(tmp_path / "m")), runtime)
    broadcaster = Broadcaster(BroadcastConfig(master_port=0, join_poll_s=0.05), None, runtime, node_id="learner",
                              dtype=torch.float32)  # fmt: skip
    sender = broadcaster.sender
    assert sender is not None
    sent: list[dict[str, torch.Tensor]] = []
    send_staged = sender.send_staged

    def send_and_keep() -> Any:  # the buckets sent, as views: they would change if they aliased the parameters
        report = send_staged()
        sent.append(dict(sender._staging.named()))  # type: ignore[union-attr]
        return report

    monkeypatch.setattr(sender, "send_staged", send_and_keep)
    try:
        broadcaster.publish(policy, 1, wait=True)
        before = {k: v.clone() for k, v in sent[0].items()}
        assert before.keys() == policy.state_dict().keys()
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(1.0)  # the next optimizer step, while the thread may still be sending version 1
    finally:
        broadcaster.close()
    assert all(torch.equal(sent[0][k], before[k]) for k in before)
