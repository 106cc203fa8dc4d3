"""From logits to what the losses need: per-token log-probabilities and entropies, computed in row chunks.

Shapes: B sequences, T tokens, V vocabulary. A [B, T, V] float32 copy of bfloat16 logits, or the [B, T, V] softmax
that autograd would keep, can be larger than the model itself; here the softmax is formed one chunk of rows at a
time (in float32) and recomputed in the backward pass, so besides the logits and their gradient only [B, T]
results and one chunk's [rows, V] scratch are ever held.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from learner_node.algorithms.common import as_mask, check_shapes, compute_dtype, masked_mean

CHUNK_ELEMENTS = {"cpu": 1 << 22}
"""Scratch budget per chunk in elements, by device type. On CPU, 16 MiB chunks were faster than both much smaller
ones (each op's thread barrier then dominates on a busy machine) and much larger ones (out of cache); on an
accelerator, large chunks keep kernel launches few."""
DEFAULT_CHUNK_ELEMENTS = 1 << 26

_Kind = Literal["logprob", "entropy"]


class _TokenStatistic(torch.autograd.Function):
    """log p(token) or the entropy of each row of logits [N, V] -> [N], with a chunked, recomputing backward."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, token_ids: torch.Tensor, kind: _Kind, chunk_rows: int) -> torch.Tensor:
        out = torch.empty(logits.shape[0], dtype=compute_dtype(logits), device=logits.device)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk = logits[rows].to(out.dtype)
            if kind == "logprob":
                out[rows] = chunk.gather(-1, token_ids[rows, None]).squeeze(-1) - torch.logsumexp(chunk, dim=-1)
            else:
                # entr(p) = -p log p with entr(0) = 0: a -inf logit (a banned token) adds 0, not 0 * -inf = NaN.
                out[rows] = torch.special.entr(torch.softmax(chunk, dim=-1)).sum(-1)
        ctx.save_for_backward(logits, token_ids, out)
        ctx.kind, ctx.chunk_rows = kind, chunk_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        logits, token_ids, out = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            grad = grad_out[rows, None]
            chunk_grad = torch.softmax(logits[rows].to(out.dtype), dim=-1)  # p, then turned into the gradient in place
            if ctx.kind == "logprob":
                # d log p_y / dz_j = [j == y] - p_j
                chunk_grad.mul_(-grad).scatter_add_(-1, token_ids[rows, None], grad)
            else:
                # d H / dz_j = -p_j (log p_j + H); xlogy(0, 0) = 0 keeps banned tokens NaN-free here too
                p_log_p = torch.special.xlogy(chunk_grad, chunk_grad)
                chunk_grad.mul_(out[rows, None]).add_(p_log_p).mul_(-grad)
            grad_logits[rows] = chunk_grad
        return grad_logits, None, None, None


def _apply(logits: torch.Tensor, token_ids: torch.Tensor, kind: _Kind, chunk_rows: int | None) -> torch.Tensor:
    budget = CHUNK_ELEMENTS.get(logits.device.type, DEFAULT_CHUNK_ELEMENTS)
    rows = chunk_rows if chunk_rows is not None else max(1, budget // max(logits.shape[-1], 1))
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {rows}")
    flat_ids = token_ids.reshape(-1).long()
    flat = _TokenStatistic.apply(logits.reshape(-1, logits.shape[-1]), flat_ids, kind, rows)
    return flat.view(logits.shape[:-1])


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, chunk_rows: int | None = None) -> torch.Tensor:
    """log softmax(logits)[token_ids]: logits [B, T, V], token_ids [B, T] (each in [0, V)) -> [B, T].

    Equals `logits.log_softmax(-1).gather(-1, token_ids[..., None])[..., 0]` in float32 (float64 for float64
    logits), differentiable w.r.t. `logits`. `chunk_rows` (default: CHUNK_ELEMENTS[device type] // V) bounds the
    scratch memory.
    The logits must be aligned with the tokens they predict (shift the model output by one before calling).
    """
    check_shapes(logits.shape[:-1], token_ids=token_ids)
    return _apply(logits, token_ids, "logprob", chunk_rows)


def nucleus_logits(logits: torch.Tensor, token_ids: torch.Tensor, top_p: float) -> torch.Tensor:
    """The logits of the top-p nucleus, -inf elsewhere: logits [B, T, V], token_ids [B, T] -> [B, T, V].

    The rollout engines sample from the nucleus renormalised (transformers' TopPLogitsWarper rule: drop the least
    likely tokens whose cumulative probability stays <= 1 - top_p, always keep the most likely) and report the
    behaviour logprob under it; the learner must differentiate that same distribution, or on-policy importance
    weights are the nucleus mass (< 1) rather than 1. The sampled token `token_ids` is always kept: under newer
    weights it may have left the nucleus, and a finite logprob (the renormalised one over nucleus + token) keeps
    ratios finite. top_p >= 1 returns `logits` itself. The mask carries no gradient; kept logits keep theirs.
    """
    check_shapes(logits.shape[:-1], token_ids=token_ids)
    if top_p >= 1.0:
        return logits
    with torch.no_grad():
        drop = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)
        for b in range(logits.shape[0]):  # one sequence's [T, V] sort at a time bounds the scratch memory
            ascending, order = logits[b].float().sort(dim=-1)
            drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
            drop_sorted[:, -1] = False
            drop[b] = drop_sorted.scatter(-1, order, drop_sorted)
        drop.scatter_(-1, token_ids.long()[..., None], False)
    return logits.masked_fill(drop, float("-inf"))


def token_entropy(logits: torch.Tensor, *, chunk_rows: int | None = None) -> torch.Tensor:
    """Entropy of each next-token distribution: logits [B, T, V] -> [B, T], H = -sum_v p_v log p_v.

    Differentiable w.r.t. `logits`, chunked like `token_logprobs`.
    """
    placeholder_ids = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _apply(logits, placeholder_ids, "entropy", chunk_rows)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor, *, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean entropy over the trained tokens: logits [B, T, V], mask [B, T] -> scalar (0 for an empty mask).

    Differentiable, so it can serve as an entropy bonus (`loss - coef * entropy_from_logits(...)`).
    """
    check_shapes(logits.shape[:-1], mask=mask)
    return masked_mean(token_entropy(logits, chunk_rows=chunk_rows), as_mask(mask))
