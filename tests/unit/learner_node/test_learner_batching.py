"""Collation: left-padded prompts, right-padded responses, masks and positions against a hand-computed case; the
padded batch gives every row the logprobs it has alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from bus.schema import Preference, Trajectory
from learner_node.algorithms import token_logprobs
from learner_node.batching import (
    collate,
    padded_tokens,
    placeholder,
    plan_micro_batches,
    preference_rows,
    response_logits,
    split_micro_batches,
)
from slipstream.demo_model import build_demo_model


def sample(prompt: list[int], response: list[int], **kw: object) -> Trajectory:
    return Trajectory(
        id=f"t{prompt}{response}",
        group_id="g",
        producer="test",
        prompt_ids=np.array(prompt, dtype=np.int32),
        response_ids=np.array(response, dtype=np.int32),
        behavior_logprobs=np.array(kw.pop("logprobs", [-0.5] * len(response)), dtype=np.float32),
        **kw,  # type: ignore[arg-type]
    )


def test_collate_matches_a_hand_computed_batch() -> None:
    a = sample([5, 6], [7, 8, 9], logprobs=[-0.1, -0.2, -0.3], loss_mask=np.array([1, 0, 1], np.uint8),
               reward=1.0, policy_version=3)  # fmt: skip
    b = sample([10, 11, 12], [13], logprobs=[-0.5], reward=0.0, policy_version=4, version_ranges=[(0, 1, 5)])
    batch = collate([a, b], advantages=[0.5, -0.5])

    assert batch.input_ids.tolist() == [[0, 5, 6, 7, 8, 9], [10, 11, 12, 13, 0, 0]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 3, 3]]
    assert batch.response_ids.tolist() == [[7, 8, 9], [13, 0, 0]]
    assert batch.mask.tolist() == [[True, False, True], [True, False, False]]
    assert torch.allclose(batch.behavior_logprobs, torch.tensor([[-0.1, -0.2, -0.3], [-0.5, 0.0, 0.0]]))
    assert batch.versions.tolist() == [[3, 3, 3], [5, 0, 0]]  # version_ranges win over policy_version
    assert batch.rewards.tolist() == [1.0, 0.0]
    assert batch.advantages.tolist() == [0.5, -0.5]
    assert (batch.response_length, batch.tokens) == (3, 9)


def test_response_logits_are_the_columns_before_each_response_token() -> None:
    columns = torch.arange(6).view(1, 6, 1).expand(2, 6, 1)  # positions 0..5, as if logits_to_keep kept them all
    assert response_logits(columns, 3)[0, :, 0].tolist() == [2, 3, 4]  # L=6, T=3: predicted from P-1 .. P+T-2


def test_padding_leaves_each_rows_logprobs_unchanged(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(build_demo_model(tmp_path / "m"))
    rows = [sample([20, 21, 22, 23], [30, 31]), sample([40], [41, 42, 43, 44]), sample([50, 51], [52])]
    batch = collate(rows)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        padded = token_logprobs(response_logits(out.logits, batch.response_length), batch.response_ids)
        for i, row in enumerate(rows):
            ids = torch.tensor([[*row.prompt_ids, *row.response_ids]])
            alone = model(input_ids=ids).logits[:, len(row.prompt_ids) - 1 : -1]
            expected = token_logprobs(alone, torch.tensor([row.response_ids.tolist()]))[0]
            assert padded[i, : len(row.response_ids)] == pytest.approx(expected, abs=1e-5)


def test_collate_rejects_what_it_cannot_batch() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        collate([])
    with pytest.raises(ValueError, match="advantages: 1 values for 2 samples"):
        collate([sample([1], [2]), sample([1], [2])], advantages=[0.0])


def test_micro_batch_slices_cover_every_row_once_in_a_fixed_count() -> None:
    slices = split_micro_batches(5, 2, 4)
    assert [list(range(10))[s] for s in slices] == [[0, 1], [2, 3], [4], []]
    with pytest.raises(ValueError, match="cannot hold"):
        split_micro_batches(5, 2, 2)


def test_placeholder_and_preference_rows() -> None:
    empty = collate([placeholder(pad_id=3)])
    assert empty.mask.sum() == 0 and empty.input_ids.tolist() == [[3, 3]]
    pair = Preference("p1", "agent", np.array([1, 2], np.int32), np.array([3], np.int32), np.array([4, 5], np.int32))
    chosen, rejected = preference_rows(pair)
    assert (chosen.response_ids.tolist(), rejected.response_ids.tolist()) == ([3], [4, 5])
    assert chosen.prompt_ids.tolist() == rejected.prompt_ids.tolist() == [1, 2]


def test_plans_sort_by_length_and_keep_each_micro_batch_within_budget_and_rows() -> None:
    rng = np.random.default_rng(0)
    lengths = [(int(rng.integers(1, 30)), int(rng.integers(1, 60))) for _ in range(40)] + [(50, 100)]  # one too long
    plan = plan_micro_batches(lengths, max_rows=8, max_tokens=200)
    assert sorted(i for rows in plan for i in rows) == list(range(len(lengths)))  # every row once
    assert all(len(rows) <= 8 for rows in plan)
    for rows in plan:
        if rows != [40]:
            assert padded_tokens(lengths, [rows]) <= 200, rows
    assert [40] in plan  # longer than the budget alone: alone
    rows_only = plan_micro_batches(lengths, max_rows=8, max_tokens=None)  # sorted too, cut by rows alone
    by_length = sorted(range(41), key=lambda i: -sum(lengths[i]))
    assert rows_only == [by_length[i : i + 8] for i in range(0, 41, 8)]
    arrival = [list(range(i, min(i + 8, 41))) for i in range(0, 41, 8)]
    assert padded_tokens(lengths, plan) < padded_tokens(lengths, rows_only) < padded_tokens(lengths, arrival)
