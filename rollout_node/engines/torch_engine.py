"""TorchEngine: batched sampling with a KV cache from any local Hugging Face causal LM (CPU by default).

One `generate` call decodes all its prompts x n samples as one batch:

- Prompts are left padded; the attention mask hides the pads and position ids count real tokens only, so a padded
  row computes exactly what it would alone. The prompt is prefilled once and its cache repeated n times.
- Keys and values go into buffers sized for the whole call (`kv_cache.PreallocatedLayer`) instead of being
  concatenated every step; rows that finish (eos / stop id / stop string) are dropped from the batch and the cache,
  so finished samples cost no more compute.
- Weights are swapped only between decode steps (`step_gate.StepGate`): a step runs with all old or all new weights,
  and each token records the version of the step that produced its logits.

Speed against `transformers`' own `generate` is measured by `bench/engine.py`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from bus.schema import Sampling
from bus.settings import load_pretrained
from rollout_node.engines.base import (
    Engine,
    FinishReason,
    OnToken,
    Sample,
    TorchEngineConfig,
    WeightUpdate,
    check_request,
    version_ranges,
)
from rollout_node.engines.kv_cache import preallocated_cache
from rollout_node.engines.step_gate import StepGate

log = structlog.get_logger(__name__)

# Stop strings are searched in the decoded text of a row's last (longest stop string + this many) tokens: tokens of
# at least one character cover the string, the margin absorbs tokens that decode to nothing (skipped specials).
_STOP_WINDOW_MARGIN = 8


class TorchEngine(Engine):
    """The built-in engine: a transformers causal LM and its tokenizer, in this process.

        engine = TorchEngine.from_config(TorchEngineConfig(model_path="runs/demo-model"))
        [[sample]] = engine.generate([tokenizer.encode("3+4=")], Sampling(temperature=1.0, max_new_tokens=4))

    `model` may be any `PreTrainedModel` with a causal-LM head (its `state_dict` names are the weight names that
    `load_weights` accepts, tied aliases included); `tokenizer` decodes responses and stop strings. Built this way,
    the config's model_path, device and dtype are not used (the model's own are).
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any, config: TorchEngineConfig | None = None, version: int = 0
    ) -> None:
        self.config = config or TorchEngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.vocab_size: int = model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids: list[int] = self._eos_ids()
        if any(not 0 <= i < self.vocab_size for i in self.eos_token_ids):
            raise ValueError(f"eos_token_ids: ids must be in [0, {self.vocab_size}) (got {self.eos_token_ids})")
        pad = tokenizer.pad_token_id
        self._pad_id: int = pad if pad is not None else (self.eos_token_ids or [0])[0]
        self._context: int | None = getattr(model.config, "max_position_embeddings", None)
        # Live tensors by name, tied aliases included; an update copies into them in place.
        self._weights: dict[str, torch.Tensor] = model.state_dict(keep_vars=True)
        self._version = version
        self._gate = StepGate(self.config.pause_timeout_s)

    @classmethod
    def from_config(cls, config: TorchEngineConfig, version: int = 0) -> TorchEngine:
        """Load the checkpoint and tokenizer from `config.model_path` (a local folder, or a Hub id as
        `config.local_files_only` / `trust_remote_code` allow)."""
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        path, field = config.model_path, "model_path"
        model = load_pretrained(AutoModelForCausalLM, path, config, field, dtype=getattr(torch, config.dtype))
        model.to(config.device)
        tokenizer = load_pretrained(AutoTokenizer, path, config, field)
        log.info("torch engine loaded", model_path=config.model_path, device=config.device, version=version)
        return cls(model, tokenizer, config, version)

    # --- Engine interface ----------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def pause(self) -> None:
        self._gate.pause()

    def resume(self) -> None:
        self._gate.resume()

    def abort(self) -> None:
        self._gate.abort()

    def update_weights(self, version: int) -> WeightUpdate:
        return _StagedWeights(self, version)

    def close(self) -> None:
        self.abort()

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int = 1, on_token: OnToken | None = None
    ) -> list[list[Sample]]:
        self._check_request(prompts, sampling, n)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        abort_epoch = self._gate.abort_epoch
        prompts_per_chunk = max(1, self.config.max_batch_size // n)
        completions: list[list[Sample]] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), prompts_per_chunk):
                chunk = prompts[start : start + prompts_per_chunk]
                groups = self._generate_chunk(chunk, sampling, n, generator, abort_epoch, on_token, first_row=start * n)
                completions.extend(groups)
        return completions

    # --- decoding ------------------------------------------------------------------------------------------------

    def _generate_chunk(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        n: int,
        generator: torch.Generator,
        abort_epoch: int,
        on_token: OnToken | None,
        first_row: int,
    ) -> list[list[Sample]]:
        """Decode len(prompts) * n rows (row i*n + j is sample j of prompt i) until each stops or hits the limit;
        each step's tokens go to `on_token` when drawn, row r of this chunk as row `first_row + r` of the call."""
        width = max(len(p) for p in prompts)
        max_new = sampling.max_new_tokens
        capacity = width + max_new
        prompt_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        # (rows, capacity): 0 on left pads, 1 on prompt tokens and on every response slot (a finished row is dropped).
        mask = torch.ones((len(prompts), capacity), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            prompt_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, : width - len(prompt)] = 0
        prompt_ids, mask = prompt_ids.to(self.device), mask.to(self.device)
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)  # (P, width): pads sit at 0, masked anyway
        cache = preallocated_cache(self.model, capacity)
        rows = len(prompts) * n
        out = _Outputs(rows, max_new, self._version, self.device)
        stop_ids = torch.tensor(sorted({*self.eos_token_ids, *sampling.stop_token_ids}), device=self.device)

        logits, version = self._forward(prompt_ids, mask[:, :width], positions, cache, abort_epoch)
        if logits is None:
            return out.samples(self.tokenizer, n, torch.arange(rows), "abort")
        next_position = positions[:, -1:] + 1  # (A, 1)
        if n > 1:  # one prefill per prompt, then n copies of its cache
            logits, mask, next_position = (x.repeat_interleave(n, dim=0) for x in (logits, mask, next_position))
            cache.batch_repeat_interleave(n)
        active = torch.arange(rows, device=self.device)  # (A,) output row of each batch row still decoding
        for step in range(max_new):
            out.versions.append(version)
            token, behavior, model_logprob = sample_next(logits, sampling, generator)
            out.record(active, step, token, behavior, model_logprob)
            if on_token is not None:
                for row, token_id, logprob in zip(active.tolist(), token.tolist(), behavior.tolist(), strict=True):
                    on_token(first_row + row, token_id, logprob)
            finished = torch.isin(token, stop_ids)
            if finished.any():
                for row, stop_id in zip(active[finished].tolist(), token[finished].tolist(), strict=True):
                    out.finish(row, step + 1, "stop", stop_id)
            if sampling.stop:
                finished |= self._match_stop_strings(out, active, step, sampling.stop, finished)
            if step + 1 == max_new:
                break
            if finished.any():
                keep = (~finished).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                active, token, mask, next_position = active[keep], token[keep], mask[keep], next_position[keep]
            logits, version = self._forward(
                token[:, None], mask[:, : width + step + 1], next_position, cache, abort_epoch
            )
            if logits is None:
                return out.samples(self.tokenizer, n, active, "abort")
            next_position = next_position + 1
        return out.samples(self.tokenizer, n, active, "length")

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        abort_epoch: int,
    ) -> tuple[torch.Tensor | None, int]:
        """One model step: input_ids (A, S), attention_mask (A, K) over cache + input, position_ids (A, S).

        Returns the last position's logits (A, V) in float32 and the version of the weights that computed them;
        logits are None when `abort()` was called since the generate call began (the step is not run).
        """
        with self._gate.step(abort_epoch) as admitted:
            if not admitted:
                return None, self._version
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return output.logits[:, -1].float(), self._version

    def _match_stop_strings(
        self, out: _Outputs, active: torch.Tensor, step: int, stop: Sequence[str], finished: torch.Tensor
    ) -> torch.Tensor:
        """(A,) bool: rows not yet `finished` whose recent text now contains a stop string (those rows are ended)."""
        window = max(len(s) for s in stop) + _STOP_WINDOW_MARGIN
        recent = out.tokens[active, max(0, step + 1 - window) : step + 1].tolist()
        texts = self.tokenizer.batch_decode(recent, skip_special_tokens=True)
        hits = torch.zeros_like(finished)
        for i, (row, text, done) in enumerate(zip(active.tolist(), texts, finished.tolist(), strict=True)):
            matched = None if done else next((s for s in stop if s in text), None)
            if matched is not None:
                out.finish(row, step + 1, "stop", matched)
                hits[i] = True
        return hits

    # --- weights -------------------------------------------------------------------------------------------------

    def _swap_in(self, staged: dict[str, torch.Tensor], version: int) -> None:
        """Copy staged tensors into the live ones and set the version, with no decode step running."""
        started = time.monotonic()
        with self._gate.exclusive(self.config.weight_swap_timeout_s), torch.no_grad():
            for name, tensor in staged.items():
                self._weights[name].copy_(tensor)
            previous, self._version = self._version, version
        log.info(
            "weights swapped",
            version=version,
            previous_version=previous,
            tensors=len(staged),
            seconds=round(time.monotonic() - started, 4),
        )
        if version < previous:
            log.warning("weight version went backwards", version=version, previous_version=previous)

    # --- checks --------------------------------------------------------------------------------------------------

    def _eos_ids(self) -> list[int]:
        if self.config.eos_token_ids is not None:
            return list(self.config.eos_token_ids)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def _check_request(self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int) -> None:
        check_request(prompts, sampling, n)
        if any(i >= self.vocab_size for i in sampling.stop_token_ids):
            raise ValueError(
                f"sampling.stop_token_ids: ids must be < the vocabulary size {self.vocab_size} "
                f"(got {list(sampling.stop_token_ids)})"
            )
        for i, prompt in enumerate(prompts):
            if min(prompt) < 0 or max(prompt) >= self.vocab_size:
                bad = next(t for t in prompt if not 0 <= t < self.vocab_size)
                raise ValueError(f"prompts[{i}]: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
            if self._context is not None and len(prompt) + sampling.max_new_tokens > self._context:
                raise ValueError(
                    f"prompts[{i}]: {len(prompt)} tokens + sampling.max_new_tokens {sampling.max_new_tokens} exceed "
                    f"the model's context of {self._context} positions"
                )


def process_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The logits actually sampled from: logits (A, V) / temperature, then top-k, then top-p (tokens outside get
    -inf). Same rules as transformers' Temperature/TopK/TopP warpers: top-k keeps ties with the k-th value, top-p
    drops the least likely tokens whose cumulative probability stays <= 1 - top_p and always keeps the most likely.
    `sampling.temperature` must be > 0. Returns (A, V) float32."""
    processed = logits / sampling.temperature
    if 0 < sampling.top_k < processed.shape[-1]:
        kth_largest = processed.topk(sampling.top_k, dim=-1).values[:, -1:]
        processed = processed.masked_fill(processed < kth_largest, float("-inf"))
    if sampling.top_p < 1.0:
        ascending, order = processed.sort(dim=-1)
        tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = tail_mass <= 1.0 - sampling.top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        processed = processed.masked_fill(drop, float("-inf"))
    return processed


def sample_next(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row from logits (A, V) float32.

    Returns token (A,) int64, behaviour logprob (A,) (under the processed distribution it was drawn from; 0.0 when
    greedy) and model logprob (A,) (under the raw logits, temperature 1).
    """
    model_logprobs = logits.log_softmax(dim=-1)
    if sampling.temperature == 0:
        token = logits.argmax(dim=-1)
        return token, torch.zeros(token.shape, device=logits.device), model_logprobs.gather(-1, token[:, None])[:, 0]
    identity = sampling.temperature == 1.0 and sampling.top_k <= 0 and sampling.top_p >= 1.0
    behavior_logprobs = model_logprobs if identity else process_logits(logits, sampling).log_softmax(dim=-1)
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks token i with probability p_i, in one pass.
    race = torch.empty_like(behavior_logprobs).exponential_(generator=generator)
    race.clamp_(min=torch.finfo(race.dtype).tiny)  # a draw of exactly 0 would make 0/0 = NaN win the argmax
    token = (behavior_logprobs.exp() / race).argmax(dim=-1)
    picked = token[:, None]
    return token, behavior_logprobs.gather(-1, picked)[:, 0], model_logprobs.gather(-1, picked)[:, 0]


class _Outputs:
    """What one chunk produced, by output row (B rows = prompts x n), filled step by step."""

    def __init__(self, rows: int, max_new: int, start_version: int, device: torch.device) -> None:
        self.tokens = torch.zeros((rows, max_new), dtype=torch.long, device=device)  # (B, max_new)
        self.behavior = torch.zeros((rows, max_new), device=device)  # (B, max_new)
        self.model = torch.zeros((rows, max_new), device=device)  # (B, max_new)
        self.versions: list[int] = []  # version of the weights behind step t's logits (shared by every row)
        self.start_version = start_version
        self.ended: dict[int, tuple[int, FinishReason, int | str | None]] = {}  # row -> (length, reason, matched)

    def record(
        self, active: torch.Tensor, step: int, token: torch.Tensor, behavior: torch.Tensor, model: torch.Tensor
    ) -> None:
        """Store step `step` of the active rows: every argument is (A,)."""
        self.tokens[active, step] = token
        self.behavior[active, step] = behavior
        self.model[active, step] = model

    def finish(self, row: int, length: int, reason: FinishReason, matched: int | str | None = None) -> None:
        self.ended[row] = (length, reason, matched)

    def samples(self, tokenizer: Any, n: int, unfinished: torch.Tensor, reason: FinishReason) -> list[list[Sample]]:
        """Close the `unfinished` rows not ended yet with `reason` after the steps taken; group samples by prompt."""
        for row in unfinished.tolist():
            if row not in self.ended:
                self.finish(row, len(self.versions), reason)
        ids, behavior, model = self.tokens.tolist(), self.behavior.tolist(), self.model.tolist()
        lengths = [self.ended[row][0] for row in range(len(ids))]
        texts = tokenizer.batch_decode([ids[r][:length] for r, length in enumerate(lengths)], skip_special_tokens=True)
        samples = []
        for row, (length, reason_, matched) in sorted(self.ended.items()):
            ranges = version_ranges(self.versions[:length])
            samples.append(
                Sample(
                    response_ids=ids[row][:length],
                    behavior_logprobs=behavior[row][:length],
                    model_logprobs=model[row][:length],
                    finish_reason=reason_,
                    version_ranges=ranges,
                    policy_version=ranges[0][2] if ranges else self.start_version,
                    text=texts[row],
                    matched_stop=matched,
                )
            )
        return [samples[i : i + n] for i in range(0, len(samples), n)]


class _StagedWeights(WeightUpdate):
    """Tensors copied aside (checked against the model) until `commit` swaps them in between decode steps."""

    def __init__(self, engine: TorchEngine, version: int) -> None:
        super().__init__(version)
        self._engine = engine
        self._staged: dict[str, torch.Tensor] = {}
        self._closed = False

    def add(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._check_open()
        live = self._engine._weights
        for name, tensor in named_tensors:
            target = live.get(name)
            if target is None:
                raise ValueError(
                    f"weights[{name!r}]: not a tensor of this model (expected names like {next(iter(live))!r})"
                )
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"weights[{name!r}]: shape {tuple(tensor.shape)} does not match the model's {tuple(target.shape)}"
                )
            self._staged[name] = tensor.detach().to(device=target.device, dtype=target.dtype, copy=True)

    def commit(self) -> None:
        self._check_open()
        self._closed = True
        staged, self._staged = self._staged, {}
        self._engine._swap_in(staged, self.version)

    def discard(self) -> None:
        self._closed = True
        self._staged = {}

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"weight update to version {self.version}: already committed or discarded")
