"""The inference-engine interface that the rollout node, the HTTP server and the weight receiver program against.

An engine turns prompts (token ids) into samples. Every sample carries what the learner needs for off-policy
correction:

- `behavior_logprobs[t]`: log-probability of response token t under the distribution it was **actually sampled
  from**: the model's logits divided by the temperature, restricted by top-k then top-p, renormalised. This is the
  behaviour policy mu of the decoupled objective, so this is what goes into a trajectory's `behavior_logprobs`.
  With temperature 0 (greedy) the sampling distribution is a point mass and every value is 0.0.
- `model_logprobs[t]`: log-probability of the same token under the raw model (temperature 1, no top-k / top-p),
  for diagnostics and for learners that want the unprocessed policy; never the behaviour policy unless the sampling
  params are the identity (temperature 1, top_k off, top_p 1), where the two are equal.
- `version_ranges`: `(start, end, version)` triples covering response positions [start, end): the policy version
  whose weights produced the logits of those tokens. One triple unless weights changed mid-generation (the KV cache
  of earlier tokens is kept, as in PipelineRL's in-flight updates).

Threading contract (every implementation): `generate` may run in several threads at once; `load_weights`,
`update_weights`, `pause`, `resume` and `abort` may be called from any other thread while it does. A weight update
is applied between decode steps, atomically: a step sees either all old or all new weights, never a mix.

This module is torch-free (torch appears only in type hints), so the HTTP client engine and the rollout node's
settings can import it without loading torch.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from pydantic import Field, NonNegativeInt

from bus.schema import Sampling
from bus.settings import HubSource

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "abort"]
# (start, end, version): response tokens [start, end) were sampled from logits computed with weights `version`.
VersionRange = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated response. `T = len(response_ids)`; every per-token list has length T."""

    response_ids: list[int]  # (T,) sampled token ids, including the stop/eos token that ended the sample
    behavior_logprobs: list[float]  # (T,) log mu(token) under the processed distribution sampled from
    model_logprobs: list[float]  # (T,) log pi(token) under the raw model (temperature 1, no filtering)
    finish_reason: FinishReason  # stop: eos / stop id / stop string; length: max_new_tokens; abort: abort()
    version_ranges: list[VersionRange]  # covers [0, T) in order; empty only when T == 0
    policy_version: int  # version of the first token's weights (the oldest one used; staleness counts from it)
    text: str  # the decoded response, special tokens skipped (not trimmed at a stop string)
    matched_stop: int | str | None = None  # the stop token id or stop string that ended it, if any


def version_ranges(step_versions: Sequence[int]) -> list[VersionRange]:
    """[3, 3, 4, 4, 4] -> [(0, 2, 3), (2, 5, 4)]: runs of equal versions as (start, end, version)."""
    ranges: list[VersionRange] = []
    for t, version in enumerate(step_versions):
        if ranges and ranges[-1][2] == version:
            ranges[-1] = (ranges[-1][0], t + 1, version)
        else:
            ranges.append((t, t + 1, version))
    return ranges


def token_versions(ranges: Sequence[VersionRange]) -> list[int]:
    """[(0, 2, 3), (2, 5, 4)] -> [3, 3, 4, 4, 4]: the version of each token (the inverse of `version_ranges`)."""
    return [version for start, end, version in ranges for _ in range(start, end)]


def error_reason(exc: BaseException) -> str:
    """A low-cardinality label for ROLLOUT_ENGINE_ERRORS: the engine's own `reason` (the SGLang client's timeout,
    unreachable, http, protocol) or one read from the exception's type."""
    if isinstance(exc, ValueError):
        return "invalid"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason.isidentifier() and len(reason) <= 32:
        return reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, ConnectionError):
        return "unreachable"
    return "error"


def check_request(prompts: Sequence[Sequence[int]], sampling: Sampling, n: int) -> None:
    """The rules every engine applies to a generate call; raises ValueError naming the field and the rule.

    `bus.schema.Sampling` semantics: temperature 0 is greedy, top_k -1 (or 0) means no top-k, seed None is random.
    """
    _require(n >= 1, "n", "must be >= 1", n)
    _require(sampling.temperature >= 0, "sampling.temperature", "must be >= 0", sampling.temperature)
    _require(0 < sampling.top_p <= 1, "sampling.top_p", "must be in (0, 1]", sampling.top_p)
    _require(sampling.max_new_tokens >= 1, "sampling.max_new_tokens", "must be >= 1", sampling.max_new_tokens)
    stop_ok = all(isinstance(text, str) and text for text in sampling.stop)
    _require(stop_ok, "sampling.stop", "must hold non-empty strings", sampling.stop)
    ids_ok = all(isinstance(i, numbers.Integral) and i >= 0 for i in sampling.stop_token_ids)
    _require(ids_ok, "sampling.stop_token_ids", "must hold token ids >= 0", sampling.stop_token_ids)
    for i, prompt in enumerate(prompts):
        _require(len(prompt) > 0, f"prompts[{i}]", "must hold at least one token id", prompt)


def _require(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field}: {rule} (got {value!r})")


OnToken = Callable[[int, int, float], None]  # (row, token id, behaviour logprob): see Engine.generate


class WeightUpdate(abc.ABC):
    """A staged weight update: `add` tensors (in as many calls as there are buckets), then `commit` to make them live
    at once with the new version, or `discard` them. As a context manager it commits on a clean exit and discards on
    an exception, so a broadcast that breaks half-way never leaves a half-loaded model.

        with engine.update_weights(version=7) as update:
            for bucket in receive_buckets():
                update.add(bucket)  # iterable of (name, tensor); the engine copies, the buffers may be reused
    """

    def __init__(self, version: int) -> None:
        if version < 0:
            raise ValueError(f"version: must be >= 0 (got {version})")
        self.version = version

    @abc.abstractmethod
    def add(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stage tensors by parameter name (names of the model's `state_dict`); a wrong name or shape raises
        ValueError naming the tensor. Staging never touches the live weights."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Swap the staged tensors in between two decode steps and set the engine's version; returns once live.
        Raises TimeoutError if the engine cannot reach a step boundary in time (nothing is changed then)."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop the staged tensors; the live weights and version are unchanged."""

    def __enter__(self) -> WeightUpdate:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class Engine(abc.ABC):
    """Generates samples for batches of token-id prompts and takes new weights while it runs."""

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int = 1, on_token: OnToken | None = None
    ) -> list[list[Sample]]:
        """Sample `n` responses for each prompt. Returns `out[i][j]`: sample j of prompts[i]
        (`len(out) == len(prompts)`, `len(out[i]) == n`). Blocks while the engine is paused.
        Bad input raises ValueError naming the field and the rule.

        `on_token(row, token_id, behavior_logprob)`, when given, is called from the generating thread for every
        response token, in order per row (row `i * n + j` is sample j of prompts[i]), as early as the engine has it
        and at the latest before `generate` returns: what it was given is exactly the samples' tokens."""

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """The policy version of the live weights."""

    @abc.abstractmethod
    def pause(self) -> None:
        """Stop starting decode steps (returns at once; a step in progress finishes). Calls in flight keep their
        state and continue after `resume`; new calls wait. A pause that nobody lifts expires after the engine's
        pause timeout, so a peer that paused the engine and died cannot stall it forever."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Lift `pause`."""

    @abc.abstractmethod
    def abort(self) -> None:
        """End every call in flight at its next step boundary (paused ones at once): their unfinished samples
        return with the tokens so far and finish_reason "abort". Calls started after `abort` are unaffected."""

    @abc.abstractmethod
    def update_weights(self, version: int) -> WeightUpdate:
        """Begin a staged weight update that will set the engine to `version` when committed (see WeightUpdate)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load `(name, tensor)` pairs (all weights, or a subset) and switch to `version` atomically between decode
        steps; generation in flight keeps going and records the switch in its samples' `version_ranges`."""
        with self.update_weights(version) as update:
            update.add(named_tensors)

    @abc.abstractmethod
    def close(self) -> None:
        """End the calls in flight (as `abort` does) and release the engine's resources (connections, memory)."""


class TorchEngineConfig(HubSource):
    """The `[rollout.engine]`-style settings of the built-in PyTorch engine (torch-free, so settings load fast)."""

    model_path: str = Field(
        "runs/demo-model",
        min_length=1,
        max_length=4096,
        description="local HF checkpoint folder (model + tokenizer) or a Hub id",
    )
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$", description="torch device to run on: cpu, cuda, cuda:N or mps"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of weights and activations (sampling always runs in float32)"
    )
    max_batch_size: int = Field(
        256,
        ge=1,
        le=65536,
        description="most sequences (prompts x n) decoded together; bigger calls run in chunks of whole prompts",
    )
    eos_token_ids: list[NonNegativeInt] | None = Field(
        None, max_length=64, description="ids that end a sample; None: the checkpoint's eos ids; []: never (benchmarks)"
    )
    pause_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="a pause nobody lifts expires after this many seconds"
    )
    weight_swap_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="longest a weight commit waits for the decode step in progress"
    )
    num_threads: int | None = Field(
        None, ge=1, le=1024, description="torch intra-op threads of this process (None: torch's default, one per core)"
    )
