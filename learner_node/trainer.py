"""One optimizer step on a batch that every rank agreed on: advantages, micro-batches, losses, accumulation,
clipping, AdamW, schedule.

Every rank gets the same list of units (the step's batch) and trains its contiguous share. Because every rank sees
the whole batch, the normalisers are global and exact: each micro-batch's loss is scaled by its share of the step's
tokens (token-mean), sequences (seq-mean-token-mean), rows (seq-mean-token-sum-norm) or pairs (DPO), times the world
size (FSDP averages gradients over ranks), so the summed gradient is the gradient of the whole batch's loss however it
was cut. Every rank runs the same number of forward/backward passes (FSDP's collectives pair up): a rank with fewer
rows runs placeholder passes that weigh 0.

The proximal policy of the decoupled objective is the weights before this step. With one update per batch
(`ppo_epochs = 1`) they are exactly the weights of the training forward, so their logprobs are that forward's,
detached: no extra pass. A no-grad pass runs first only when something needs it: PPO (old values, target logprobs),
`ppo_epochs > 1` (proximal logprobs), `beta > 0` (reference logprobs), DPO (reference logprobs not in the message).
A LoRA policy is its own reference: the policy's forward with its adapters disabled (`lora.adapters_disabled`).

GRPO samples whose advantage is exactly 0 (every sample of a group scored the same) add nothing to the gradient when
there is no KL or entropy term: they are not run (`skip_zero_advantage`; `zero_advantage_skipped_frac` says how many),
and the token-mean metrics (entropy, clip fractions, importance weights) cover the samples that were.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from bus.schema import Trajectory
from learner_node.algorithms import (
    aggregate_loss,
    dpo_loss,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    nucleus_logits,
    online_dpo_pairs,
    policy_loss,
    token_entropy,
    token_logprobs,
    value_loss,
    vtrace,
)
from learner_node.batching import (
    Batch,
    collate,
    padded_tokens,
    placeholder,
    plan_micro_batches,
    preference_rows,
    split_micro_batches,
)
from learner_node.config import LearnerConfig
from learner_node.groups import Unit
from learner_node.lora import adapters_disabled, is_lora
from learner_node.model import Runtime, forward

MAX_METRICS = ("importance_weight_max",)  # reduced with MAX over micro-batches and ranks, the rest are means
# Aggregated like the loss (weighted by the loss normaliser's share); other metrics are token means (DPO: pair means).
LOSS_METRICS = ("loss", "policy_loss", "value_loss", "kl")

Pair = tuple[Trajectory, Trajectory, float | None, float | None]  # chosen, rejected, reference logps (or None)


@dataclass
class _Micro:
    """One micro-batch of this rank: its tensors, its share of the step's loss normaliser (`weight`) and of the
    step's trained tokens (`token_weight`; DPO: of its pairs), and the pre-pass results [B, T]."""

    batch: Batch
    weight: float
    token_weight: float
    ref_given: torch.Tensor | None = None  # DPO: [2P] reference logps from the messages (NaN where absent)
    proximal: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def share(count: int, world: int, rank: int) -> slice:
    """Rank `rank`'s contiguous part of `count` items split as evenly as possible over `world` ranks."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def trained_tokens(sample: Trajectory) -> int:
    """Response tokens of `sample` that the loss covers."""
    return len(sample.response_ids) if sample.loss_mask is None else int((sample.loss_mask != 0).sum())


def group_advantage_values(units: Sequence[Unit], cfg: LearnerConfig) -> list[list[float]]:
    """GRPO/RLOO advantages per unit and member. Groups are stacked by size so each `group_advantages` call sees
    equal groups ("batch" scaling then uses the std of all groups of that size: the whole batch when sizes agree);
    a unit of one sample carries no baseline and gets 0."""
    out: list[list[float]] = [[0.0] * len(u.samples) for u in units]
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, unit in enumerate(units):
        if len(unit.samples) >= 2:
            by_size[len(unit.samples)].append(i)
    for size, members in by_size.items():
        rewards = torch.tensor([s.reward for i in members for s in units[i].samples], dtype=torch.float64)
        values = group_advantages(rewards, size, cfg.scale_rewards, cfg.advantage_estimator).view(-1, size)
        for row, i in enumerate(members):
            out[i] = values[row].tolist()
    return out


def pairs_of(unit: Unit) -> list[Pair]:
    """DPO pairs of a unit: its preference message, or best-vs-worst of its scored group (online DPO)."""
    if unit.pair is not None:
        chosen, rejected = preference_rows(unit.pair)
        return [(chosen, rejected, unit.pair.ref_chosen_logp, unit.pair.ref_rejected_logp)]
    if len(unit.samples) < 2:
        return []
    rewards = torch.tensor([s.reward for s in unit.samples], dtype=torch.float64)
    chosen, rejected = online_dpo_pairs(rewards, len(unit.samples))
    pairs = zip(chosen.tolist(), rejected.tolist(), strict=True)
    return [(unit.samples[c], unit.samples[r], None, None) for c, r in pairs]


class Trainer:
    """Owns the optimizer step (see the module docstring). Every rank calls `step` with the same units."""

    def __init__(
        self,
        cfg: LearnerConfig,
        runtime: Runtime,
        policy: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        value_head: nn.Module | None = None,
        reference: nn.Module | None = None,
        pad_id: int = 0,
    ) -> None:
        if cfg.algorithm == "ppo" and value_head is None:
            raise ValueError("algorithm 'ppo' needs a value head")
        if (cfg.beta > 0 or cfg.algorithm == "dpo") and reference is None and not is_lora(policy):
            raise ValueError("beta > 0 and algorithm 'dpo' need a reference model (a LoRA policy is its own)")
        self.cfg, self.runtime = cfg, runtime
        self.policy, self.value_head, self.reference = policy, value_head, reference
        self.optimizer, self.scheduler, self.pad_id = optimizer, scheduler, pad_id
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    # --- the step ------------------------------------------------------------------------------------------------
    def step(self, units: Sequence[Unit]) -> dict[str, float]:
        """One optimizer step on `units` (the same list on every rank); returns the step's metrics (global)."""
        cfg, world = self.cfg, self.runtime.world
        mine = share(len(units), world, self.runtime.rank)
        skipped = padding_efficiency = 0.0
        if cfg.algorithm == "dpo":
            pairs = [pairs_of(u) for u in units]
            rows_per_rank = [sum(len(p) for p in pairs[share(len(units), world, r)]) for r in range(world)]
            micros = self._dpo_micros([p for unit_pairs in pairs[mine] for p in unit_pairs], rows_per_rank)
        else:
            rows = self._policy_rows(units)
            per_rank = [[row for r in rows[share(len(units), world, rank)] for row in r] for rank in range(world)]
            lengths = [[(len(s.prompt_ids), len(s.response_ids)) for s, _ in part] for part in per_rank]
            plans = [plan_micro_batches(part, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch) for part in lengths]
            count = max(1, *(len(plan) for plan in plans))  # every rank runs as many passes
            plan = plans[self.runtime.rank] + [[]] * (count - len(plans[self.runtime.rank]))
            tokens = sum(trained_tokens(s) for r in rows for s, _ in r)
            micros = self._policy_micros(per_rank[self.runtime.rank], plan, self._normaliser(units), tokens)
            total = sum(len(u.samples) for u in units)
            skipped = (total - sum(len(part) for part in per_rank)) / max(total, 1)
            padded = sum(padded_tokens(part, plan) for part, plan in zip(lengths, plans, strict=True))
            padding_efficiency = sum(p + t for part in lengths for p, t in part) / max(padded, 1)
        self._pre_pass(micros)
        for _ in range(cfg.ppo_epochs):
            sums: dict[str, float] = defaultdict(float)
            maxima: dict[str, float] = defaultdict(float)
            for micro in micros:
                loss, metrics = self._loss(micro)
                (loss * (micro.weight * world)).backward()
                for key, value in metrics.items():
                    if key in LOSS_METRICS:
                        sums[key] += float(value) * micro.weight
                    elif key not in MAX_METRICS:
                        sums[key] += float(value) * micro.token_weight
                    elif micro.weight:
                        maxima[key] = max(maxima[key], float(value))
            grad_norm = self._optimizer_step()
            applied = math.isfinite(grad_norm)
            if not applied:  # the weights did not move: a later epoch would give the same non-finite gradient
                break
        out = self._reduce(sums, maxima)
        if applied:
            self.scheduler.step()
        out.update(grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0], nonfinite_gradient=float(not applied))
        if cfg.algorithm == "grpo":
            out["zero_advantage_skipped_frac"] = skipped
        if cfg.algorithm != "dpo":
            out["padding_efficiency"] = padding_efficiency
        return out

    def _policy_rows(self, units: Sequence[Unit]) -> list[list[tuple[Trajectory, float]]]:
        """(sample, GRPO advantage) per unit, in order (PPO: advantage 0, computed later from values). With
        `skip_zero_advantage`, GRPO rows whose advantage is 0 are left out: with no KL and no entropy term their loss
        and gradient are exactly 0, and the normaliser still counts them, so the step's gradient is unchanged."""
        cfg = self.cfg
        if cfg.algorithm != "grpo":
            return [[(s, 0.0) for s in u.samples] for u in units]
        advantages = group_advantage_values(units, cfg)
        skip = cfg.skip_zero_advantage and cfg.beta == 0 and cfg.entropy_coef == 0
        return [
            [(s, a) for s, a in zip(u.samples, values, strict=True) if not (skip and a == 0.0)]
            for u, values in zip(units, advantages, strict=True)
        ]

    # --- micro-batches -------------------------------------------------------------------------------------------
    def _normaliser(self, units: Sequence[Unit]) -> float:
        """The step's divisor for the configured aggregation, over all ranks' samples."""
        samples = [s for u in units for s in u.samples]
        if self.cfg.loss_agg == "token-mean":
            return float(sum(trained_tokens(s) for s in samples))
        if self.cfg.loss_agg == "seq-mean-token-mean":
            return float(sum(1 for s in samples if trained_tokens(s) > 0))
        return float(len(samples))

    def _micro_count(self, rows_per_rank: list[int], rows_per_item: int = 1) -> int:
        size = max(1, self.cfg.micro_batch_size // rows_per_item)
        return max(1, *(-(-rows // size) for rows in rows_per_rank))

    def _policy_micros(
        self, rows: list[tuple[Trajectory, float]], plan: list[list[int]], normaliser: float, tokens: int
    ) -> list[_Micro]:
        """This rank's micro-batches: `rows` (sample, advantage) cut as `plan` says (an empty entry: a placeholder
        pass that weighs 0)."""
        micros = []
        for indices in plan:
            samples = [rows[i][0] for i in indices] or [placeholder(self.pad_id)]
            batch = collate(samples, [rows[i][1] for i in indices] or [0.0], self.pad_id).to(self.runtime.device)
            if not indices:
                weight = 0.0
            elif self.cfg.loss_agg == "token-mean":
                weight = float(batch.mask.sum())
            elif self.cfg.loss_agg == "seq-mean-token-mean":
                weight = float((batch.mask.sum(-1) > 0).sum())
            else:
                weight = float(len(samples))
            token_weight = float(batch.mask.sum()) / max(tokens, 1) if indices else 0.0
            micros.append(_Micro(batch, weight / max(normaliser, 1.0), token_weight))
        return micros

    def _dpo_micros(self, pairs: list[Pair], pairs_per_rank: list[int]) -> list[_Micro]:
        total = max(1, sum(pairs_per_rank))
        micros = []
        size = max(1, self.cfg.micro_batch_size // 2)
        for part in split_micro_batches(len(pairs), size, self._micro_count(pairs_per_rank, 2)):
            chunk = pairs[part]
            if chunk:
                rows = [row for chosen, rejected, _, _ in chunk for row in (chosen, rejected)]
                refs = [float("nan") if ref is None else ref for _, _, c, r in chunk for ref in (c, r)]
            else:
                rows, refs = [placeholder(self.pad_id)] * 2, [0.0, 0.0]
            batch = collate(rows, pad_id=self.pad_id).to(self.runtime.device)
            given = torch.tensor(refs, dtype=torch.float32, device=self.runtime.device)
            micros.append(_Micro(batch, len(chunk) / total, len(chunk) / total, ref_given=given))
        return micros

    # --- passes --------------------------------------------------------------------------------------------------
    def _logprobs(self, model: nn.Module, batch: Batch, value_head: nn.Module | None = None) -> tuple:
        temperature = 1.0 if self.cfg.algorithm == "dpo" else self.cfg.temperature
        logits, values = forward(model, batch, self.runtime, temperature=temperature, value_head=value_head)
        if self.cfg.algorithm != "dpo":  # the distribution the rollouts sampled from: top-p's nucleus too
            logits = nucleus_logits(logits, batch.response_ids, self.cfg.top_p)
        return token_logprobs(logits, batch.response_ids), logits, values

    def _reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """The reference model's token logprobs: the model given, or a LoRA policy's base (its adapters disabled)."""
        if self.reference is not None:
            return self._logprobs(self.reference, batch)[0]
        with adapters_disabled(self.policy):
            return self._logprobs(self.policy, batch)[0]

    @torch.no_grad()
    def _pre_pass(self, micros: list[_Micro]) -> None:
        cfg = self.cfg
        needs_policy = cfg.algorithm == "ppo" or cfg.ppo_epochs > 1
        missing_refs = any(bool(m.ref_given.isnan().any()) for m in micros if m.ref_given is not None)
        needs_reference = cfg.beta > 0 or missing_refs
        for micro in micros:
            if needs_policy:
                micro.proximal, _, micro.old_values = self._logprobs(self.policy, micro.batch, self.value_head)
            if needs_reference:
                micro.reference = self._reference_logprobs(micro.batch)
        if cfg.algorithm == "ppo":
            self._ppo_targets(micros)

    def _ppo_targets(self, micros: list[_Micro]) -> None:
        """GAE or V-trace per micro-batch from the pre-pass, then advantages whitened over the whole step."""
        cfg = self.cfg
        for micro in micros:
            batch = micro.batch
            # The sequence's reward arrives with its last trained token.
            last = (batch.mask.cumsum(-1) == batch.mask.sum(-1, keepdim=True)) & batch.mask
            rewards = torch.where(last, batch.rewards[:, None], torch.zeros_like(batch.behavior_logprobs))
            if cfg.advantage == "gae":
                micro.advantages, micro.returns = gae(rewards, micro.old_values, batch.mask, cfg.gamma, cfg.lam)
            else:
                bootstrap = torch.zeros(batch.mask.shape[0], device=batch.mask.device)
                micro.returns, micro.advantages = vtrace(
                    batch.behavior_logprobs, micro.proximal, rewards, micro.old_values, bootstrap, batch.mask,
                    cfg.gamma, cfg.rho_bar, cfg.c_bar,
                )  # fmt: skip
        stats = torch.zeros(3, dtype=torch.float64, device=self.runtime.device)
        for micro in micros:
            if micro.weight:
                masked = micro.advantages[micro.batch.mask].double()
                stats += torch.stack([masked.sum(), masked.square().sum(), masked.new_tensor(masked.numel())])
        if self.runtime.world > 1:
            dist.all_reduce(stats)
        count = stats[2].clamp(min=1)
        mean = stats[0] / count
        std = (stats[1] / count - mean.square()).clamp(min=0).sqrt()
        for micro in micros:
            micro.advantages = ((micro.advantages - mean) / (std + 1e-8)).float() * micro.batch.mask

    def _loss(self, micro: _Micro) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, batch = self.cfg, micro.batch
        value_head = self.value_head if cfg.algorithm == "ppo" else None
        logprobs, logits, values = self._logprobs(self.policy, batch, value_head)
        if cfg.algorithm == "dpo":
            sequence = (logprobs * batch.mask).sum(-1)
            ref = micro.ref_given
            if micro.reference is not None:
                ref = torch.where(ref.isnan(), (micro.reference * batch.mask).sum(-1), ref)
            return dpo_loss(
                sequence[0::2], sequence[1::2], ref[0::2], ref[1::2],
                beta=cfg.dpo_beta, loss_type=cfg.dpo_loss_type, label_smoothing=cfg.label_smoothing,
            )  # fmt: skip
        proximal = micro.proximal if micro.proximal is not None else logprobs.detach()
        advantages = micro.advantages if micro.advantages is not None else batch.advantages
        entropy = token_entropy(logits) if cfg.entropy_coef > 0 else None  # [B, T], differentiable, for the bonus
        loss, metrics = policy_loss(
            logprobs, proximal, batch.behavior_logprobs, advantages, batch.mask,
            epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, dual_clip=cfg.dual_clip,
            importance_correction=cfg.importance_correction, importance_cap=cfg.importance_cap,
            importance_floor=cfg.importance_floor, importance_sampling_level=cfg.importance_sampling_level,
            loss_agg=cfg.loss_agg, max_tokens=cfg.max_new_tokens, logits=logits if entropy is None else None,
        )  # fmt: skip
        if entropy is not None:  # computed once: the bonus and the reported metric
            metrics["entropy"] = masked_mean(entropy.detach(), batch.mask)
            # A bonus, so minus: a prompt whose samples all agree gives GRPO nothing to compare; this keeps them apart.
            loss = loss - cfg.entropy_coef * aggregate_loss(entropy, batch.mask, cfg.loss_agg, cfg.max_new_tokens)
        metrics["policy_loss"] = metrics.pop("loss")
        del metrics["tokens"]  # a count, not a mean: the node counts the step's tokens itself
        if cfg.beta > 0:
            kl = aggregate_loss(kl_penalty(logprobs, micro.reference, cfg.kl_estimator), batch.mask, cfg.loss_agg,
                                cfg.max_new_tokens)  # fmt: skip
            loss = loss + cfg.beta * kl
            metrics["kl"] = kl.detach()
        if values is not None:
            critic, value_metrics = value_loss(
                values, micro.old_values, micro.returns, batch.mask, cfg.value_clip,
                loss_agg=cfg.loss_agg, max_tokens=cfg.max_new_tokens,
            )  # fmt: skip
            loss = loss + cfg.value_coef * critic
            metrics.update({("value_loss" if k == "loss" else k): v for k, v in value_metrics.items()})
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _optimizer_step(self) -> float:
        """Clip and apply the gradient; returns its norm. A non-finite norm (the same on every rank: it is the global
        norm) applies nothing: one NaN step would make every later weight NaN, so the weights stay as they were."""
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norm = float(norm)
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _reduce(self, sums: dict[str, float], maxima: dict[str, float]) -> dict[str, float]:
        """Weighted sums -> global means (weights already sum to 1 over all ranks), maxima -> global maxima."""
        keys, max_keys = sorted(sums), sorted(maxima)
        device = self.runtime.device
        packed = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
        packed_max = torch.tensor([maxima[k] for k in max_keys], dtype=torch.float64, device=device)
        if self.runtime.world > 1:
            dist.all_reduce(packed)
            if max_keys:
                dist.all_reduce(packed_max, op=dist.ReduceOp.MAX)
        return dict(zip(keys + max_keys, packed.tolist() + packed_max.tolist(), strict=True))
