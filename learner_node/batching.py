"""From trajectories to padded tensors: prompts left-padded, responses right-padded, so responses line up.

Shapes: B sequences, P the longest prompt, T the longest response, L = P + T. Row i of `input_ids` is

    [pad] * (P - P_i) + prompt_i + response_i + [pad] * (T - T_i)

so every response starts at column P, and the logits that predict response token t sit at column P - 1 + t for
every row (`response_logits`). Position ids count real tokens only (a left-padded row computes what it would
alone), and the attention mask hides every pad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from bus.schema import Preference, Trajectory


@dataclass
class Batch:
    """One micro-batch of B sequences.

    input_ids, attention_mask, position_ids: int64 [B, L]. response_ids: int64 [B, T] (0 past a row's end).
    mask: bool [B, T], 1 on the response tokens trained on (real tokens whose loss_mask is 1).
    behavior_logprobs: float32 [B, T], 0 past a row's end. versions: int64 [B, T], the policy version of each
    response token (from version_ranges, else policy_version). rewards, advantages: float32 [B].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    behavior_logprobs: torch.Tensor
    versions: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor

    @property
    def response_length(self) -> int:
        """T: the width of the response columns."""
        return self.response_ids.shape[1]

    @property
    def tokens(self) -> int:
        """Real (non-pad) tokens, prompt and response: what a forward pass processes usefully."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on `device`."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


def token_versions(trajectory: Trajectory) -> np.ndarray:
    """The policy version of each response token: int64 [T], from version_ranges, else policy_version."""
    length = len(trajectory.response_ids)
    versions = np.full(length, trajectory.policy_version, dtype=np.int64)
    for start, end, version in trajectory.version_ranges or ():
        versions[start:end] = version
    return versions


def collate(samples: Sequence[Trajectory], advantages: Sequence[float] | None = None, pad_id: int = 0) -> Batch:
    """Pad `samples` (B >= 1) into a `Batch`; `advantages` [B] (default zeros) ride along with them."""
    if not samples:
        raise ValueError("collate: needs at least one sample")
    if advantages is not None and len(advantages) != len(samples):
        raise ValueError(f"advantages: {len(advantages)} values for {len(samples)} samples")
    size = len(samples)
    prompt_len = max(len(s.prompt_ids) for s in samples)
    response_len = max(len(s.response_ids) for s in samples)
    input_ids = np.full((size, prompt_len + response_len), pad_id, dtype=np.int64)
    attention = np.zeros((size, prompt_len + response_len), dtype=np.int64)
    response_ids = np.zeros((size, response_len), dtype=np.int64)
    mask = np.zeros((size, response_len), dtype=bool)
    behavior = np.zeros((size, response_len), dtype=np.float32)
    versions = np.zeros((size, response_len), dtype=np.int64)
    for i, s in enumerate(samples):
        p, t = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, prompt_len - p : prompt_len] = s.prompt_ids
        input_ids[i, prompt_len : prompt_len + t] = s.response_ids
        attention[i, prompt_len - p : prompt_len + t] = 1
        response_ids[i, :t] = s.response_ids
        mask[i, :t] = True if s.loss_mask is None else np.asarray(s.loss_mask) != 0
        behavior[i, :t] = s.behavior_logprobs
        versions[i, :t] = token_versions(s)
    attention_t = torch.from_numpy(attention)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=attention_t,
        # Positions count real tokens: the first prompt token of every row is position 0, whatever its padding.
        position_ids=(attention_t.cumsum(-1) - 1).clamp(min=0),
        response_ids=torch.from_numpy(response_ids),
        mask=torch.from_numpy(mask),
        behavior_logprobs=torch.from_numpy(behavior),
        versions=torch.from_numpy(versions),
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
        advantages=torch.tensor(list(advantages) if advantages is not None else [0.0] * size, dtype=torch.float32),
    )


def response_logits(outputs: torch.Tensor, response_length: int) -> torch.Tensor:
    """The positions that predict the response tokens, from the model outputs of the last `response_length + 1`
    columns (`logits_to_keep=T + 1`): [B, T + 1, ...] -> [B, T, ...]. Works for logits and hidden states alike."""
    return outputs[:, -response_length - 1 : -1]


def plan_micro_batches(lengths: Sequence[tuple[int, int]], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Rows (by index) of each micro-batch for samples of `lengths` (prompt P_i, response T_i).

    Rows sorted longest first, each micro-batch filled while its rows stay within `max_rows` and, with `max_tokens`,
    its padded size, rows x (max P + max T), within `max_tokens`: similar lengths pad each other little (in arrival
    order, 9-token responses were padded to the 40 of their micro-batch's longest, and two thirds of a step's
    compute was padding). A row longer than the budget goes alone. The plan changes only how the step is cut: the
    loss normalisers are the step's, so the loss and gradient are the same for any plan.
    """
    budget = math.inf if max_tokens is None else max_tokens
    plan: list[list[int]] = []
    width = prompt = response = 0
    for i in sorted(range(len(lengths)), key=lambda i: (-(lengths[i][0] + lengths[i][1]), i)):
        p, t = lengths[i]
        width = max(prompt, p) + max(response, t)
        if not plan or len(plan[-1]) >= max_rows or (len(plan[-1]) + 1) * width > budget:
            plan.append([])
            prompt = response = 0
        plan[-1].append(i)
        prompt, response = max(prompt, p), max(response, t)
    return plan


def padded_tokens(lengths: Sequence[tuple[int, int]], plan: Sequence[Sequence[int]]) -> int:
    """Token slots the micro-batches of `plan` take once padded: rows x (longest prompt + longest response)."""
    return sum(
        len(rows) * (max(lengths[i][0] for i in rows) + max(lengths[i][1] for i in rows)) for rows in plan if rows
    )


def split_micro_batches(count: int, size: int, batches: int) -> list[slice]:
    """`count` rows cut into exactly `batches` consecutive slices of at most `size` rows; slices past the rows are
    empty. Every rank runs the same number of forward/backward passes (FSDP's collectives pair up), so a rank with
    fewer rows runs empty passes (see `placeholder`)."""
    if batches * size < count:
        raise ValueError(f"{batches} micro-batches of {size} cannot hold {count} rows")
    return [slice(min(i * size, count), min((i + 1) * size, count)) for i in range(batches)]


def placeholder(pad_id: int = 0) -> Trajectory:
    """A one-token sample with nothing to train on: what a rank forwards when it has no rows left in a pass."""
    return Trajectory(
        id="placeholder",
        group_id="placeholder",
        producer="learner",
        prompt_ids=np.array([pad_id], dtype=np.int32),
        response_ids=np.array([pad_id], dtype=np.int32),
        behavior_logprobs=np.zeros(1, dtype=np.float32),
        loss_mask=np.zeros(1, dtype=np.uint8),
    )


def preference_rows(pair: Preference) -> tuple[Trajectory, Trajectory]:
    """A DPO pair as two samples (chosen, rejected) sharing the prompt, for `collate`."""

    def row(kind: str, response: np.ndarray) -> Trajectory:
        return Trajectory(
            id=f"{pair.id}:{kind}",
            group_id=pair.id,
            producer=pair.producer,
            prompt_ids=pair.prompt_ids,
            response_ids=response,
            behavior_logprobs=np.zeros(len(response), dtype=np.float32),
        )

    return row("chosen", pair.chosen_ids), row("rejected", pair.rejected_ids)
