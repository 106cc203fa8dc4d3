"""The demo model folder: loads offline with Auto*, tokenizes arithmetic one character per token, is reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from slipstream.cli import main as cli_main
from slipstream.demo_model import build_demo_model, tool_call_text


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_folder_loads_with_auto_classes_offline(demo_path: Path) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in demo_path.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(demo_path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(demo_path, local_files_only=True)
    assert 200_000 <= model.num_parameters() <= 1_000_000  # small enough to train with RL on two CPU cores
    assert model.config.vocab_size == len(tokenizer)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<|im_start|>", "<|im_end|>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    logits = model(**tokenizer(["3+4=", "12*3="], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 5, len(tokenizer)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("text", ["3+4=", "9-2=", "7*8=", "12+34=", "rev 123=", "3+4=7"])
def test_arithmetic_round_trips_one_token_per_character(demo_path: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_path, local_files_only=True)
    ids = tokenizer.encode(text)
    assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert [tokenizer.decode([i]) for i in ids] == list(text)
    # The answer is followed by eos, which decoding can skip.
    answer = ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(answer, skip_special_tokens=True) == text
    assert tokenizer.decode(answer) == text + "<|im_end|>"


def test_chat_template_renders_turns(demo_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_path, local_files_only=True)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "3+4="}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_a_tool_token_is_one_whole_hermes_call_and_tools_are_rendered(tmp_path: Path) -> None:
    path = build_demo_model(tmp_path / "tools", tool_tokens=["draw_number", "roll"])
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert model.config.vocab_size == len(tokenizer) == 102  # the characters' 100, one row per tool
    call = tool_call_text("draw_number")
    assert call == '<tool_call>{"name": "draw_number", "arguments": {}}</tool_call>'
    ids = tokenizer.encode("a" + call + "7", add_special_tokens=False)
    assert len(ids) == 3 and tokenizer.decode(ids, skip_special_tokens=True) == "a" + call + "7"  # not special
    assert tokenizer.encode("3+4=", add_special_tokens=False) == AutoTokenizer.from_pretrained(
        build_demo_model(tmp_path / "plain", num_layers=1)
    ).encode("3+4=", add_special_tokens=False)  # the characters keep their ids
    tools = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("draw_number", "roll")]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools, tokenize=False)
    assert text == "<|im_start|>system\ntools: draw_number, roll<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(ValidationError, match="tool names must match"):
        build_demo_model(tmp_path / "bad", tool_tokens=["draw number"])
    with pytest.raises(ValidationError, match=r"vocab_size: 100 < 102"):  # asked for, so not silently grown
        build_demo_model(tmp_path / "small", tool_tokens=["draw_number", "roll"], vocab_size=100)
    assert (
        AutoModelForCausalLM.from_pretrained(
            build_demo_model(tmp_path / "wide", num_layers=1, tool_tokens=["roll"], vocab_size=128)
        ).config.vocab_size
        == 128
    )
    assert cli_main(["demo-model", str(tmp_path / "cli"), "--num-layers", "1", "--tool-tokens", "roll"]) == 0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "cli")) == 101
    # the flag given, even at the default's value, is asked for: refused by name rather than grown
    assert cli_main(["demo-model", str(tmp_path / "cli2"), "--tool-tokens", "roll", "--vocab-size", "100"]) != 0


def test_same_seed_same_weights_and_size_knobs(tmp_path: Path) -> None:
    first = load_file(build_demo_model(tmp_path / "a", seed=7) / "model.safetensors")
    again = load_file(build_demo_model(tmp_path / "b", seed=7) / "model.safetensors")
    other = load_file(build_demo_model(tmp_path / "c", seed=8) / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    big = build_demo_model(tmp_path / "big", hidden_size=256, num_layers=6, intermediate_size=768)
    assert AutoModelForCausalLM.from_pretrained(big).num_parameters() >= 4_000_000  # the bench's size


@pytest.mark.parametrize(
    ("spec", "field"),
    [({"hidden_size": 66}, "num_heads"), ({"num_kv_heads": 3}, "num_kv_heads"), ({"num_layers": 0}, "num_layers")],
)
def test_bad_shapes_name_the_field(tmp_path: Path, spec: dict[str, int], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        build_demo_model(tmp_path, **spec)
    assert not (tmp_path / "model.safetensors").exists()


def test_demo_model_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo-model", str(tmp_path / "m"), "--hidden-size", "64", "--num-layers", "1"]) == 0
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "m").config
    assert (config.hidden_size, config.num_hidden_layers) == (64, 1)
    assert cli_main(["demo-model", str(tmp_path / "bad"), "--hidden-size", "66"]) == 2
    assert "num_heads" in capsys.readouterr().err
