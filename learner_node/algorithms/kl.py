"""Per-token KL estimators between the current policy and a reference (Schulman, http://joschu.net/blog/kl-approx.html).

Shapes: B sequences, T response tokens.
"""

from __future__ import annotations

from typing import Literal

import torch

from learner_node.algorithms.common import check_choice, check_shapes, compute_dtype

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi: [B, T], [B, T] -> [B, T].

    With x = log pi_ref(y_t) - log pi(y_t) (the log ratio, never exponentiated before it is formed):
      k1 = -x                  unbiased, high variance, can be negative
      k2 = x^2 / 2             biased, low variance, >= 0
      k3 = exp(x) - 1 - x      unbiased, low variance, >= 0 (the GRPO paper's choice)
    Gradients flow into both arguments; detach `ref_logprobs` for a frozen reference. Masking and aggregation are
    the caller's (e.g. `aggregate_loss`). k3 is finite for |x| < 88 nats in float32.
    """
    check_choice("estimator", estimator, ("k1", "k2", "k3"))
    check_shapes(logprobs.shape, ref_logprobs=ref_logprobs)
    dtype = compute_dtype(logprobs)
    log_ratio = ref_logprobs.to(dtype) - logprobs.to(dtype)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # expm1 keeps k3 accurate (and >= 0) when x is tiny, where exp(x) - 1 would cancel.
    return torch.expm1(log_ratio) - log_ratio
