"""Direct preference optimisation losses and online pair building.

Shapes: B preference pairs; every log-probability is summed over a response's trained tokens (one number per
sequence, e.g. `(token_logprobs(...) * mask).sum(-1)`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from learner_node.algorithms.common import Metrics, check_choice, check_range, check_shapes, compute_dtype

DPOLossType = Literal["sigmoid", "ipo", "hinge"]


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Preference loss over B pairs, all inputs [B] -> (loss scalar, metrics). The reference logps are constants.

    With the implicit rewards rho_c = beta (chosen - ref_chosen), rho_r = beta (rejected - ref_rejected) and the
    margin m = (chosen - ref_chosen) - (rejected - ref_rejected), the per-pair loss is:
      sigmoid (DPO, arXiv 2305.18290): -(1 - ls) log sigmoid(beta m) - ls log sigmoid(-beta m)
                                       (ls = label_smoothing > 0: conservative DPO, cDPO)
      ipo     (arXiv 2310.12036):      (m - 1 / (2 beta))^2   (IPO is defined on length-averaged logps: pass those)
      hinge   (SLiC, arXiv 2305.10425): max(0, 1 - beta m)
    and the loss is the mean over pairs (0 for B = 0).
    Metrics: loss, rewards_chosen (mean rho_c), rewards_rejected (mean rho_r), reward_margin (mean rho_c - rho_r),
    reward_accuracy (fraction of pairs with rho_c > rho_r).
    """
    check_choice("loss_type", loss_type, ("sigmoid", "ipo", "hinge"))
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    check_range("label_smoothing", label_smoothing, low=0.0, high=0.5)
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, got loss_type={loss_type!r}")
    if chosen_logps.dim() != 1:
        raise ValueError(f"chosen_logps must have shape [B], got {tuple(chosen_logps.shape)}")
    check_shapes(
        chosen_logps.shape,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    dtype = compute_dtype(chosen_logps)
    chosen_log_ratio = chosen_logps.to(dtype) - ref_chosen_logps.detach().to(dtype)
    rejected_log_ratio = rejected_logps.to(dtype) - ref_rejected_logps.detach().to(dtype)
    margin = chosen_log_ratio - rejected_log_ratio
    if loss_type == "sigmoid":
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        per_pair = (margin - 1 / (2 * beta)).square()
    else:
        per_pair = torch.relu(1 - beta * margin)
    pairs = max(chosen_logps.shape[0], 1)
    loss = per_pair.sum() / pairs

    with torch.no_grad():
        rewards_chosen, rewards_rejected = beta * chosen_log_ratio, beta * rejected_log_ratio
        metrics: Metrics = {
            "loss": loss.detach(),
            "rewards_chosen": rewards_chosen.sum() / pairs,
            "rewards_rejected": rewards_rejected.sum() / pairs,
            "reward_margin": (rewards_chosen - rewards_rejected).sum() / pairs,
            "reward_accuracy": (rewards_chosen > rewards_rejected).to(dtype).sum() / pairs,
        }
    return loss, metrics


@torch.no_grad()
def online_dpo_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-versus-worst pairs from scored groups: rewards [B] -> (chosen_index [P], rejected_index [P]).

    rewards: [B], B = num_groups * G, the G samples of a group adjacent. For each group whose rewards are not all
    equal, the chosen sample is its highest-reward one and the rejected its lowest (the first on ties); a flat group
    has no preference and yields no pair, so P <= num_groups. Indices are into the batch (int64).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a pair needs two samples), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards length {rewards.numel()} must be a multiple of group_size {group_size}")
    grouped = rewards.view(-1, group_size)
    best, chosen = grouped.max(dim=1)
    worst, rejected = grouped.min(dim=1)
    offsets = torch.arange(grouped.shape[0], device=rewards.device) * group_size
    informative = best > worst
    return (chosen + offsets)[informative], (rejected + offsets)[informative]
