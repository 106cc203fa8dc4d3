"""The tiny demo model: a randomly initialised Llama-style causal LM with a character-level tokenizer made in code.

`build_demo_model(path, hidden_size=..., seed=0)` writes an HF-format folder (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja) that loads offline with
`AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`.

The vocabulary is one token per character ("\\n" and printable ASCII 32..126) after four special tokens, so every
digit and operator of the demo's arithmetic prompts ("3+4=" -> "7") is a single token and the answer ends with
`<|im_end|>`, the eos token. `tool_tokens` adds one token per named tool whose text is that tool's whole
no-argument call in the Hermes format (`<tool_call>{"name": "roll", "arguments": {}}</tool_call>`): a tool is one
action of the policy, as in ToolkenGPT (arXiv 2305.11554), so a random policy finds it by sampling, and the call it
writes is the text any Hermes tool-call parser reads. The defaults (~0.4M parameters) train with RL on two CPU
cores; the size knobs let a benchmark build a larger one (e.g. hidden_size=256, num_layers=6,
intermediate_size=768: ~4.7M parameters).

This module stays torch-free at import time (the `slipstream demo-model` command reads `DemoModelSpec` to build its
options before anything heavy is imported); torch, transformers and tokenizers are imported by the builder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from bus.settings import Section

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
# One token per character: newline, then printable ASCII (space .. tilde). Ids follow the special tokens.
CHARACTERS = ("\n", *(chr(code) for code in range(32, 127)))
VOCAB = {token: token_id for token_id, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
TOOL_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
# Qwen-style chat turns; the demo's plain prompts ("3+4=") do not need it, chat-style tasks do. `tools` are rendered
# as a system turn naming them (a tiny model gains nothing from their JSON schemas but a longer prompt).
CHAT_TEMPLATE = (
    "{% if tools %}"
    + BOS_TOKEN
    + "system\ntools: {{ tools | map(attribute='function.name') | join(', ') }}"
    + EOS_TOKEN
    + "\n{% endif %}"
    "{% for message in messages %}" + BOS_TOKEN + "{{ message['role'] }}\n{{ message['content'] }}" + EOS_TOKEN + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + BOS_TOKEN + "assistant\n{% endif %}"
)


class DemoModelSpec(Section):
    """The shape of the demo model; every field is a keyword of `build_demo_model` and a `demo-model` option."""

    hidden_size: int = Field(128, ge=8, le=4096, description="width of the residual stream")
    num_layers: int = Field(2, ge=1, le=64, description="number of decoder layers")
    # validate_default: the head checks below must also run when only hidden_size was given.
    num_heads: int = Field(
        4, ge=1, le=64, validate_default=True, description="attention heads (hidden_size must be a multiple)"
    )
    num_kv_heads: int = Field(
        2, ge=1, le=64, validate_default=True, description="key/value heads (a divisor of num_heads)"
    )
    intermediate_size: int = Field(384, ge=8, le=16384, description="width of the MLP's hidden layer")
    max_position_embeddings: int = Field(512, ge=16, le=32768, description="longest sequence (prompt + response)")
    tie_word_embeddings: bool = Field(True, description="share the input embedding with the output projection")
    init_std: float = Field(
        0.02, gt=0, le=1.0, description="std of the random weights (0.02 starts near uniform; larger is more peaked)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the random initialisation")
    tool_tokens: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="tools that each get one token, the text of its whole no-argument Hermes call "
        '(<tool_call>{"name": NAME, "arguments": {}}</tool_call>); names are identifiers',
    )
    vocab_size: int = Field(
        len(VOCAB),
        ge=len(VOCAB),
        le=262144,
        description=f"rows of the embedding and LM head: {len(VOCAB)} (the tokenizer's, plus one per tool token) or "
        "more, to give the model a real LM head's size (e.g. 151936, Qwen2's); the tokenizer never produces the extra "
        "ids and decodes them to ''",
    )

    @field_validator("tool_tokens")
    @classmethod
    def _tool_names(cls, names: list[str]) -> list[str]:
        bad = [name for name in names if not re.fullmatch(TOOL_NAME, name)]
        if bad:
            raise ValueError(f"tool names must match {TOOL_NAME} (got {bad})")
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be distinct (got {names})")
        return names

    @model_validator(mode="after")
    def _vocab_holds_the_tool_tokens(self) -> DemoModelSpec:
        # Left at its default, vocab_size grows by the tool tokens; a size asked for must hold them, or the
        # model would silently get other dimensions than the ones requested.
        needed = len(VOCAB) + len(self.tool_tokens)
        if "vocab_size" in self.model_fields_set and self.vocab_size < needed:
            raise ValueError(
                f"vocab_size: {self.vocab_size} < {needed}, the tokenizer's {len(VOCAB)} ids plus one per tool token"
            )
        return self

    @field_validator("num_heads")
    @classmethod
    def _heads_divide_width(cls, num_heads: int, info: ValidationInfo) -> int:
        hidden_size = info.data.get("hidden_size")
        if hidden_size is not None and (hidden_size % num_heads or (hidden_size // num_heads) % 2):
            raise ValueError(f"hidden_size ({hidden_size}) / num_heads must be an even whole number (rotary pairs)")
        return num_heads

    @field_validator("num_kv_heads")
    @classmethod
    def _kv_heads_divide_heads(cls, num_kv_heads: int, info: ValidationInfo) -> int:
        num_heads = info.data.get("num_heads")
        if num_heads is not None and num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads")
        return num_kv_heads


def build_demo_model(path: str | Path, **spec: Any) -> Path:
    """Write the demo model and tokenizer to `path` (created if missing; files already there are overwritten).

    `spec` holds `DemoModelSpec` fields (hidden_size=, num_layers=, ..., seed=); a bad value raises a
    `pydantic.ValidationError` naming the field and the rule. The same spec always gives the same weights.
    Returns the folder as a `Path`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    shape = DemoModelSpec(**spec)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer(shape.max_position_embeddings, shape.tool_tokens)
    config = LlamaConfig(
        vocab_size=max(shape.vocab_size, len(tokenizer)),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        initializer_range=shape.init_std,
        pad_token_id=VOCAB[PAD_TOKEN],
        bos_token_id=VOCAB[BOS_TOKEN],
        eos_token_id=VOCAB[EOS_TOKEN],
    )
    # fork_rng: the seed fixes this model's initialisation without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shape.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = VOCAB[PAD_TOKEN]
    # A progress bar for a 2 MB file is noise in `slipstream up`'s output; the caller's setting is put back.
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    _patch_tokenizer_config(folder / "tokenizer_config.json")
    return folder


def tool_call_text(name: str) -> str:
    """The Hermes call of tool `name` with no arguments: the text of its tool token."""
    return f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>'


def build_demo_tokenizer(model_max_length: int, tool_tokens: list[str] | tuple[str, ...] = ()) -> Any:
    """The character-level tokenizer as a `PreTrainedTokenizerFast` (left padding, chat template set), with one
    token per tool in `tool_tokens` (ids after the characters; not special, so decoding keeps their text)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(VOCAB, unk_token=UNK_TOKEN))
    # Every character is its own word, and decoding concatenates (no spaces inserted between tokens).
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.add_tokens([AddedToken(tool_call_text(name), special=False, normalized=False) for name in tool_tokens])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _patch_tokenizer_config(config_path: Path) -> None:
    # transformers 5 writes its own backend's class name; the classic name loads with transformers 4 and 5 alike.
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
