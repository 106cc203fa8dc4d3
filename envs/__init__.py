"""Tasks: prompt datasets and formats, built-in tasks, reward functions, multi-turn environments.

Torch-free and free of Slipstream imports; tokenizers come in as objects with the Hugging Face tokenizer interface.
"""

from envs.config import ArithmeticConfig, FormatConfig, ReverseConfig, TaskConfig
from envs.dataset import PromptDataset
from envs.multiturn import CalculatorEnv, Environment, EnvReply, Episode, PolicyTurn, make_environment, run_episode
from envs.render import render_completion, render_preference, render_prompt
from envs.rewards import (
    ExactMatch,
    FormatTags,
    LengthPenalty,
    MathAnswer,
    NumericCloseness,
    Reward,
    RewardSpec,
    UserFunction,
)
from envs.rows import PromptRow, row_from_record
from envs.scoring import RewardSet, ScoreResult
from envs.sources import build_dataset, load_rows

__all__ = [
    "ArithmeticConfig",
    "CalculatorEnv",
    "EnvReply",
    "Environment",
    "Episode",
    "ExactMatch",
    "NumericCloseness",
    "FormatConfig",
    "FormatTags",
    "LengthPenalty",
    "MathAnswer",
    "PolicyTurn",
    "PromptDataset",
    "PromptRow",
    "ReverseConfig",
    "Reward",
    "RewardSet",
    "RewardSpec",
    "ScoreResult",
    "TaskConfig",
    "UserFunction",
    "build_dataset",
    "load_rows",
    "make_environment",
    "render_completion",
    "render_preference",
    "render_prompt",
    "row_from_record",
    "run_episode",
]
