"""Reward functions. Each is a config model (its fields are its options) that is also the function itself, called with
TRL's signature `reward(completions: list[str], **columns) -> list[float]` where every dataset column arrives as a
list aligned with `completions` (e.g. `ground_truth=["7", "12"]`).

In TOML a reward is picked by `function`: a built-in name or a user function's import path:

    [[task.rewards]]
    function = "math"                     # built-ins: exact_match, numeric_closeness, math, format, length_penalty,
                                          # reward_model (a learned one: path = a sequence-classification model)
    weight = 1.0
    [[task.rewards]]
    function = "my_project.rewards:brevity"
    kwargs = { target = 20 }              # passed to the user function on every call
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, field_validator, model_validator

from envs.answers import Extract, extract_answer, fallback_equivalent, math_equivalent, on_main_thread
from envs.plugins import IMPORT_PATH, import_object

log = structlog.get_logger(__name__)

RewardFn = Callable[..., list[float]]
DEFAULT_FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


class Reward(BaseModel):
    """Options every reward shares; subclasses implement `__call__`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    function: str = Field(description="a built-in reward's name or a user function's 'package.module:function'")
    weight: float = Field(1.0, ge=-100.0, le=100.0, description="multiplier of this reward in the weighted total")
    name: str = Field(
        "",
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="label in ScoreResult.named, logs and metrics; '' = the function's name",
    )

    @property
    def label(self) -> str:
        return self.name or self.function.rpartition(":")[2]

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        raise NotImplementedError


def _golds(ground_truth: list[Any] | None, size: int, reward: str) -> list[list[str]]:
    """Per completion, the accepted answers as strings (a ground truth may be one value or a list of them)."""
    if ground_truth is None:
        raise ValueError(f"{reward}: needs a ground truth column (ground_truth, answer or solution)")
    if len(ground_truth) != size:
        raise ValueError(f"{reward}: {len(ground_truth)} ground truths for {size} completions")
    golds = []
    for i, truth in enumerate(ground_truth):
        if truth is None:
            raise ValueError(f"{reward}: completion {i} has no ground truth")
        golds.append([str(t) for t in truth] if isinstance(truth, list) else [str(truth)])
    return golds


class ExactMatch(Reward):
    """1.0 when the extracted answer equals a ground truth after the chosen normalisation, else 0.0."""

    function: Literal["exact_match"] = "exact_match"
    extract: Extract = Field("full", description="compare the full completion, its first line, or its last <answer>")
    normalize_whitespace: bool = Field(True, description="strip the ends and collapse inner runs of whitespace")
    ignore_case: bool = Field(False, description="compare case-insensitively (str.casefold)")

    def _normal(self, text: str) -> str:
        text = " ".join(text.split()) if self.normalize_whitespace else text
        return text.casefold() if self.ignore_case else text

    def __call__(self, completions: list[str], ground_truth: list[Any] | None = None, **_: Any) -> list[float]:
        scores = []
        for completion, golds in zip(completions, _golds(ground_truth, len(completions), self.label), strict=True):
            answer = extract_answer(completion, self.extract)
            hit = answer is not None and self._normal(answer) in {self._normal(g) for g in golds}
            scores.append(1.0 if hit else 0.0)
        return scores


class NumericCloseness(Reward):
    """Partial credit for a number near the ground truth: max(0, 1 - |answer - truth| / scale); 0.0 when the
    extracted answer is not a number. A dense signal for small arithmetic tasks, where an exact-match reward alone is
    too sparse for a random policy to find (the policy still has to reach the exact answer to get full credit)."""

    function: Literal["numeric_closeness"] = "numeric_closeness"
    extract: Extract = Field("full", description="compare the full completion, its first line, or its last <answer>")
    scale: float = Field(5.0, gt=0, le=1e12, description="distance at which the credit reaches 0")

    def __call__(self, completions: list[str], ground_truth: list[Any] | None = None, **_: Any) -> list[float]:
        scores = []
        for completion, golds in zip(completions, _golds(ground_truth, len(completions), self.label), strict=True):
            answer = _number(extract_answer(completion, self.extract))
            targets = [t for t in map(_number, golds) if t is not None]
            best = (
                max((1.0 - abs(answer - t) / self.scale for t in targets), default=0.0) if answer is not None else 0.0
            )
            scores.append(max(0.0, best))
        return scores


def _number(text: Any) -> float | None:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class MathAnswer(Reward):
    """1.0 when the answer is mathematically equal to a ground truth ("1/2" = "0.5" = "\\frac{1}{2}"), else 0.0.

    Uses math_verify on the main thread (its timeouts are SIGALRM alarms); elsewhere, and when math_verify times
    out or fails, the sympy-free `envs.answers.fallback_equivalent`.
    """

    function: Literal["math"] = "math"
    extract: Extract = Field("full", description="search the full completion, its first line, or its last <answer>")
    timeout_s: int = Field(5, ge=1, le=60, description="math_verify time limit per parse and per verify, seconds")

    def _equal(self, answer: str, gold: str) -> bool:
        if not on_main_thread():
            return fallback_equivalent(answer, gold)
        try:
            return math_equivalent(answer, gold, self.timeout_s)
        except Exception as exc:  # math_verify raises its own and sympy's errors: all of them mean "use the fallback"
            log.debug("math_verify_fallback", error=f"{type(exc).__name__}: {exc}")
            return fallback_equivalent(answer, gold)

    def __call__(self, completions: list[str], ground_truth: list[Any] | None = None, **_: Any) -> list[float]:
        scores = []
        for completion, golds in zip(completions, _golds(ground_truth, len(completions), self.label), strict=True):
            answer = extract_answer(completion, self.extract)
            hit = answer is not None and any(self._equal(answer, g) for g in golds)
            scores.append(1.0 if hit else 0.0)
        return scores


class FormatTags(Reward):
    """1.0 when the completion matches `pattern` (re.match, DOTALL), else 0.0; by default
    `<think>...</think><answer>...</answer>` with only whitespace around the tags."""

    function: Literal["format"] = "format"
    pattern: str = Field(DEFAULT_FORMAT_PATTERN, min_length=1, max_length=10_000, description="regex, DOTALL")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return pattern

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        regex = re.compile(self.pattern, re.DOTALL)
        return [1.0 if regex.match(c) else 0.0 for c in completions]


class LengthPenalty(Reward):
    """DAPO's soft overlong punishment (TRL's option names) on the completion's token count L, from the
    `completion_ids` column: with M = max_completion_length and C = soft_punish_cache, 0 while L <= M - C, then
    falling linearly to -1 at L = M, and -1 beyond."""

    function: Literal["length_penalty"] = "length_penalty"
    max_completion_length: int = Field(512, ge=1, le=1_048_576, description="tokens at and beyond which it is -1")
    soft_punish_cache: int = Field(128, ge=0, le=1_048_576, description="tokens of linear ramp before the maximum")

    @model_validator(mode="after")
    def _ramp_fits(self) -> LengthPenalty:
        if self.soft_punish_cache > self.max_completion_length:
            raise ValueError(
                f"soft_punish_cache ({self.soft_punish_cache}) must be <= "
                f"max_completion_length ({self.max_completion_length})"
            )
        return self

    def __call__(self, completions: list[str], completion_ids: list[list[int]] | None = None, **_: Any) -> list[float]:
        if completion_ids is None or len(completion_ids) != len(completions):
            raise ValueError(f"{self.label}: needs completion_ids, one token id list per completion")
        free = self.max_completion_length - self.soft_punish_cache
        scores = []
        for ids in completion_ids:
            if len(ids) <= free:
                scores.append(0.0)
            elif len(ids) <= self.max_completion_length:
                scores.append((free - len(ids)) / self.soft_punish_cache)
            else:
                scores.append(-1.0)
        return scores


class RewardModel(Reward):
    """A learned reward: an HF `AutoModelForSequenceClassification` (a local folder or a Hub id) scores each
    (prompt, completion) pair, in batches, on `device`. The score is the logit `label_index`, then `normalize`:
    "none", "sigmoid" (into (0, 1)), or "batch" (standardised over the call's completions: zero mean, unit spread,
    a group-relative signal). A text prompt is joined to its completion; a conversation gets the completion as the
    assistant's turn, through the reward model's chat template when it has one. The model loads on first use; a call
    longer than `timeout_s` raises TimeoutError (the task scores 0 and counts a reward error, as any failing reward).
    """

    function: Literal["reward_model"] = "reward_model"
    path: str = Field(min_length=1, max_length=4096, description="local HF sequence-classification folder or Hub id")
    local_files_only: bool = Field(False, description="never reach the Hugging Face Hub (the local cache only)")
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$", description="torch device of the reward model")
    batch_size: int = Field(16, ge=1, le=4096, description="pairs per forward pass")
    max_length: int = Field(1024, ge=8, le=131072, description="tokens per pair; longer ones keep their end")
    label_index: int = Field(0, ge=0, le=1023, description="which output logit is the score")
    normalize: Literal["none", "sigmoid", "batch"] = Field("none", description="how the logit becomes the reward")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="longest one call may take")
    _loaded: Any = PrivateAttr(None)
    _pool: Any = PrivateAttr(None)

    def __call__(self, completions: list[str], prompts: list[Any] | None = None, **_: Any) -> list[float]:
        from concurrent.futures import ThreadPoolExecutor

        if prompts is None or len(prompts) != len(completions):
            raise ValueError(f"{self.label}: needs prompts, one per completion")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="reward-model")
        try:
            logits = self._pool.submit(self._logits, prompts, completions).result(timeout=self.timeout_s)
        except TimeoutError:  # concurrent.futures' own since Python 3.11
            raise TimeoutError(f"{self.label}: scoring {len(completions)} pairs took over {self.timeout_s}s") from None
        if self.normalize == "sigmoid":
            return [1.0 / (1.0 + math.exp(-v)) for v in logits]
        if self.normalize == "batch" and len(logits) > 1:
            mean = sum(logits) / len(logits)
            spread = math.sqrt(sum((v - mean) ** 2 for v in logits) / len(logits))
            return [(v - mean) / spread if spread > 1e-8 else 0.0 for v in logits]
        return logits

    def _load(self) -> Any:
        if self._loaded is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            options = {"local_files_only": self.local_files_only, "trust_remote_code": self.trust_remote_code}
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.path, **options)
                model = AutoModelForSequenceClassification.from_pretrained(self.path, **options)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"{self.label}.path: cannot load {self.path!r} (local_files_only={self.local_files_only}, "
                    f"trust_remote_code={self.trust_remote_code}): {exc}"
                ) from exc
            tokenizer.truncation_side = "left"  # keep the completion, which is at the end
            self._loaded = (tokenizer, model.to(self.device).eval())
        return self._loaded

    def _logits(self, prompts: list[Any], completions: list[str]) -> list[float]:
        import torch

        tokenizer, model = self._load()
        texts = [self._pair(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                  truncation=True, max_length=self.max_length).to(self.device)  # fmt: skip
                scores += model(**batch).logits[:, self.label_index].float().tolist()
        return scores

    @staticmethod
    def _pair(tokenizer: Any, prompt: Any, completion: str) -> str:
        if isinstance(prompt, list):  # a conversation: the completion is the assistant's turn
            messages = [*prompt, {"role": "assistant", "content": completion}]
            if getattr(tokenizer, "chat_template", None):
                return str(tokenizer.apply_chat_template(messages, tokenize=False))
            return "\n".join(str(m.get("content", "")) for m in messages)
        return f"{prompt}{completion}"


BUILTIN_REWARDS: dict[str, type[Reward]] = {
    "exact_match": ExactMatch,
    "numeric_closeness": NumericCloseness,
    "math": MathAnswer,
    "format": FormatTags,
    "length_penalty": LengthPenalty,
    "reward_model": RewardModel,
}


class UserFunction(Reward):
    """A function with TRL's reward signature, named by import path; `kwargs` are added to every call (and win over
    dataset columns of the same name). The function is imported on first use or by `load()`."""

    function: str = Field(description="import path 'package.module:function'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for every call")
    _fn: RewardFn | None = PrivateAttr(None)

    @field_validator("function")
    @classmethod
    def _is_import_path(cls, function: str) -> str:
        if not IMPORT_PATH.fullmatch(function):
            builtins = ", ".join(BUILTIN_REWARDS)
            raise ValueError(f"{function!r} is neither a built-in reward ({builtins}) nor 'package.module:function'")
        return function

    def load(self) -> RewardFn:
        if self._fn is None:
            fn = import_object(self.function)
            if not callable(fn):
                raise ValueError(f"{self.function!r}: is not callable")
            self._fn = fn
        return self._fn

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        # By keyword, as TRL calls them: a function may take (prompts, completions, ...) in any order.
        return self.load()(completions=completions, **{**kwargs, **self.kwargs})


def _reward_kind(value: Any) -> str:
    function = value.get("function") if isinstance(value, dict) else getattr(value, "function", None)
    return function if function in BUILTIN_REWARDS else "user"


RewardSpec = Annotated[
    Annotated[ExactMatch, Tag("exact_match")]
    | Annotated[NumericCloseness, Tag("numeric_closeness")]
    | Annotated[MathAnswer, Tag("math")]
    | Annotated[FormatTags, Tag("format")]
    | Annotated[LengthPenalty, Tag("length_penalty")]
    | Annotated[RewardModel, Tag("reward_model")]
    | Annotated[UserFunction, Tag("user")],
    Discriminator(_reward_kind),
]
