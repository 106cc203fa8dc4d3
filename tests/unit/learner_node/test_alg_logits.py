"""token_logprobs / token_entropy / entropy_from_logits: values and gradients of the chunked kernels."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TopPLogitsWarper

from learner_node.algorithms import entropy_from_logits, nucleus_logits, token_entropy, token_logprobs


def random_logits(dtype: torch.dtype = torch.float64, shape: tuple[int, int, int] = (3, 5, 7)) -> torch.Tensor:
    return (3 * torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).to(dtype)


def random_ids(shape: tuple[int, int], vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("chunk_rows", [None, 1, 4, 100])
def test_token_logprobs_value_and_gradient(chunk_rows: int | None) -> None:
    logits = random_logits().requires_grad_()
    ids = random_ids((3, 5), 7)
    weights = torch.randn(3, 5, dtype=torch.float64)
    got = token_logprobs(logits, ids, chunk_rows=chunk_rows)
    expected = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(got, expected)
    grad = torch.autograd.grad((got * weights).sum(), logits)[0]
    torch.testing.assert_close(grad, torch.autograd.grad((expected * weights).sum(), logits)[0])


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_token_entropy_value_and_gradient(chunk_rows: int | None) -> None:
    logits = random_logits().requires_grad_()
    weights = torch.randn(3, 5, dtype=torch.float64)
    got = token_entropy(logits, chunk_rows=chunk_rows)
    probs = logits.softmax(-1)
    expected = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(got, expected)
    grad = torch.autograd.grad((got * weights).sum(), logits)[0]
    torch.testing.assert_close(grad, torch.autograd.grad((expected * weights).sum(), logits)[0])
    uniform = token_entropy(torch.zeros(1, 1, 8))
    torch.testing.assert_close(uniform, torch.full((1, 1), math.log(8)))


def test_gradcheck() -> None:
    logits = random_logits(shape=(2, 3, 4)).requires_grad_()
    ids = random_ids((2, 3), 4)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, chunk_rows=2), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_rows=5), (logits,))
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, mask, chunk_rows=3), (logits,))


def test_low_precision_logits_give_float32_results_and_logit_dtype_gradients() -> None:
    logits = random_logits(torch.bfloat16).requires_grad_()
    ids = random_ids((3, 5), 7)
    got = token_logprobs(logits, ids)
    assert got.dtype == torch.float32 and token_entropy(logits).dtype == torch.float32
    expected = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(got, expected.float())  # the bf16 logits are exact; only float32 rounding remains
    got.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_banned_tokens_with_minus_inf_logits_do_not_make_nan() -> None:
    logits = random_logits(torch.float32).requires_grad_()
    banned = torch.zeros(7, dtype=torch.bool)
    banned[5:] = True
    masked_logits = logits.masked_fill(banned, -math.inf)
    ids = random_ids((3, 5), 5)
    logprobs, entropy = token_logprobs(masked_logits, ids), token_entropy(masked_logits)
    (logprobs.sum() + entropy.sum()).backward()
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[..., 5:] == 0)  # type: ignore[index]
    torch.testing.assert_close(entropy, token_entropy(logits[..., :5].detach()))


def test_entropy_from_logits_masks_and_empty_mask() -> None:
    logits = random_logits()
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(entropy_from_logits(logits, mask), token_entropy(logits)[mask.bool()].mean())
    assert entropy_from_logits(logits, torch.zeros_like(mask)) == 0
    with pytest.raises(ValueError, match="mask"):
        entropy_from_logits(logits, mask[:, :4])
    with pytest.raises(ValueError, match="token_ids"):
        token_logprobs(logits, torch.zeros(3, 4, dtype=torch.long))


def test_nucleus_logits_keep_the_top_p_nucleus_and_the_sampled_token() -> None:
    logits = torch.randn(3, 5, 50, requires_grad=True)
    tokens = logits.detach().argmin(-1)  # the least likely token: outside every nucleus, yet it was sampled
    kept = nucleus_logits(logits, tokens, 0.8)
    warped = TopPLogitsWarper(0.8)(None, logits.detach().reshape(15, 50).clone()).view(3, 5, 50)
    expected = warped.scatter(-1, tokens[..., None], logits.detach().gather(-1, tokens[..., None]))
    assert torch.equal(kept.detach(), expected)
    logprobs = token_logprobs(kept, tokens)
    assert torch.isfinite(logprobs).all()
    logprobs.sum().backward()
    grad = logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad[torch.isinf(kept.detach())] == 0).all()  # dropped tokens get no gradient
    assert nucleus_logits(logits, tokens, 1.0) is logits
