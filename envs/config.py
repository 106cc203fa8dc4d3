"""Task configuration: where prompts come from, how they are rendered, how completions are rewarded.

A plain pydantic model (envs imports nothing of ours, so not `bus.settings.Section`), unknown keys are errors.
Nodes embed it as their `[task]` section; learner and rollout nodes read the same section of one TOML file:

    [task]
    source = "jsonl"
    path = "data/train.jsonl"
    eval_fraction = 0.05
    [task.format]
    chat_template = "on"
    system_prompt = "Answer with a number."
    [[task.rewards]]
    function = "math"
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from envs.multiturn import BUILTIN_ENVIRONMENTS
from envs.plugins import IMPORT_PATH
from envs.rewards import ExactMatch, RewardSpec

SYNTHETIC_SOURCES = ("arithmetic", "reverse")
TRAIN_SPLIT = "train"  # eval_split value meaning "evaluate on the training rows"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ArithmeticConfig(_Model):
    """The `arithmetic` task: prompts "a<op>b=" with answer the result, e.g. "3+4=" -> "7", "max(3,8)=" -> "8"."""

    ops: list[Literal["+", "-", "*", "max", "min"]] = Field(
        ["+"], min_length=1, max_length=5, description="operators to draw from (max and min read 'max(3,8)=')"
    )
    min_operand: int = Field(0, ge=0, le=99, description="smallest operand")
    max_operand: int = Field(9, ge=0, le=99, description="largest operand (9 = single digits)")
    allow_negative: bool = Field(True, description="keep subtractions whose result is negative")
    max_result: int | None = Field(
        None, ge=0, le=10_000, description="keep only problems whose result is at most this (9: one-digit answers)"
    )

    @model_validator(mode="after")
    def _range(self) -> ArithmeticConfig:
        if self.min_operand > self.max_operand:
            raise ValueError(f"min_operand ({self.min_operand}) must be <= max_operand ({self.max_operand})")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops {self.ops}: each operator at most once")
        return self


class ReverseConfig(_Model):
    """The `reverse` task: prompts "rev <digits>=" with answer the digits reversed, e.g. "rev 123=" -> "321"."""

    min_length: int = Field(2, ge=1, le=5, description="fewest digits")
    max_length: int = Field(3, ge=1, le=5, description="most digits")

    @model_validator(mode="after")
    def _range(self) -> ReverseConfig:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must be <= max_length ({self.max_length})")
        return self


class FormatConfig(_Model):
    """How a prompt becomes the text given to the model."""

    system_prompt: str = Field("", max_length=100_000, description="system message (chat) or text prefix (plain)")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto",
        description="render with the tokenizer's chat template: 'auto' (TRL's rule) = conversational prompts when "
        "the tokenizer has one, text prompts as they are; 'on' = every prompt, text as one user message; "
        "'off' = text prompts as they are (conversational prompts then fail)",
    )
    max_prompt_length: int = Field(
        1024, ge=1, le=1_048_576, description="rows whose rendered prompt is longer are dropped (needs a tokenizer)"
    )


class TaskConfig(_Model):
    """A task: prompt source and splits, prompt format, rewards, optional multi-turn environment."""

    source: Literal["arithmetic", "reverse", "jsonl", "hf"] = Field(
        "arithmetic", description="built-in synthetic task, a JSONL file, or a local HF datasets file/directory"
    )
    path: str = Field("", max_length=4096, description="file or directory of a jsonl/hf source")
    split: str = Field("train", min_length=1, max_length=128, description="split of a saved HF DatasetDict")
    eval_path: str = Field("", max_length=4096, description="held-out rows in their own file ('' = carve them out)")
    eval_split: str = Field(
        "",
        max_length=128,
        description="held-out split of the HF source ('' = carve them out); 'train' (any source) evaluates on the "
        "training rows themselves, for tasks whose held-out rows measure memorisation rather than RL",
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, le=0.9, description="share of rows held out for evaluation when no eval_path/eval_split is set"
    )
    max_rows: int = Field(
        0,
        ge=0,
        le=100_000_000,
        description="keep at most this many rows (files: the first; synthetic: a seeded "
        "sample), before the eval split; 0 = all",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds the synthetic sample, the eval split and shuffling")
    shuffle: bool = Field(True, description="shuffle the train split each epoch (eval keeps its order)")
    balance: Literal["none", "answer"] = Field(
        "none",
        description="train draw: 'answer' serves every distinct ground truth equally often (skewed answers otherwise "
        "teach a policy learning from reward alone to guess the most common one)",
    )
    epochs: int = Field(0, ge=0, le=1_000_000, description="passes over the train split; 0 = repeat forever")
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig, description="source='arithmetic' options")
    reverse: ReverseConfig = Field(default_factory=ReverseConfig, description="source='reverse' options")
    format: FormatConfig = Field(default_factory=FormatConfig, description="prompt rendering")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [ExactMatch()], min_length=1, max_length=32, description="weighted reward functions"
    )
    environment: str = Field(
        "", max_length=512, description="multi-turn environment: '' (single turn), 'calculator' or 'package.mod:Class'"
    )
    max_turns: int = Field(4, ge=1, le=64, description="policy turns per episode in a multi-turn environment")

    @field_validator("environment")
    @classmethod
    def _known_environment(cls, environment: str) -> str:
        if environment and environment not in BUILTIN_ENVIRONMENTS and not IMPORT_PATH.fullmatch(environment):
            builtins = ", ".join(BUILTIN_ENVIRONMENTS)
            raise ValueError(f"{environment!r} is neither a built-in environment ({builtins}) nor 'package.mod:Class'")
        return environment

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        synthetic = self.source in SYNTHETIC_SOURCES
        if synthetic and (self.path or self.eval_path):
            raise ValueError(f"path/eval_path: not used by the synthetic source {self.source!r}")
        if not synthetic and not self.path:
            raise ValueError(f"path: required for source={self.source!r}")
        if self.eval_split not in ("", TRAIN_SPLIT) and self.source != "hf":
            raise ValueError(f"eval_split: only 'train' or '' unless source='hf' (got {self.eval_split!r})")
        if self.eval_split == TRAIN_SPLIT and self.eval_path:
            raise ValueError("eval_split: 'train' evaluates on the training rows; it cannot be combined with eval_path")
        labels = [r.label for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"rewards: labels {labels} repeat; give one of them a distinct `name`")
        return self
