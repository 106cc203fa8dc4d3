"""The learner's mathematics as pure torch functions: tensors in, `(loss, metrics)` or tensors out.

No bus, no model, no I/O. Shapes: B sequences, T response tokens, V vocabulary, G samples per group; `mask` is
[B, T] with 1 on trained tokens. docs/algorithms.md gives every formula and which settings make which algorithm.
"""

from learner_node.algorithms.advantages import gae, group_advantages, vtrace
from learner_node.algorithms.common import LOSS_AGG_MODES, LossAgg, Metrics, aggregate_loss, masked_mean
from learner_node.algorithms.dpo import dpo_loss, online_dpo_pairs
from learner_node.algorithms.kl import kl_penalty
from learner_node.algorithms.logits import entropy_from_logits, nucleus_logits, token_entropy, token_logprobs
from learner_node.algorithms.policy import policy_loss
from learner_node.algorithms.value import value_loss

__all__ = [
    "LOSS_AGG_MODES",
    "LossAgg",
    "Metrics",
    "aggregate_loss",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "nucleus_logits",
    "online_dpo_pairs",
    "policy_loss",
    "token_entropy",
    "token_logprobs",
    "value_loss",
    "vtrace",
]
