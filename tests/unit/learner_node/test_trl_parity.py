"""Gradient parity of one Slipstream GRPO step with TRL's GRPOTrainer loss, on the tiny demo model in float64.

What is compared: for one fixed batch (three groups of four completions with uneven prompt and response lengths,
loss masks with holes, one group whose rewards are all equal) at fixed weights,

  Slipstream: the real `Trainer.step` (advantages from the rewards, micro-batches of 5 rows, per-micro-batch
              normalisers, backward, accumulation), gradients read just before AdamW's step (a step pre-hook on the
              optimizer; `max_grad_norm = None`, so clipping leaves them as they are), loss = its metric;
  TRL:        a real `GRPOTrainer` built on CPU (use_cpu, bf16 off; the policy is passed in as a float64 model),
              its own `_compute_loss(model, inputs)` on the whole batch as one TRL batch (per_device_train_batch_size
              = the batch, gradient_accumulation_steps = 1), `inputs` laid out as `_generate_and_score_completions`
              returns them in TRL 1.16 (prompt_ids/prompt_mask left-padded, completion_ids/completion_mask
              right-padded, advantages [B], num_items_in_batch, ref_per_token_logps when beta > 0, and tool_mask for
              the loss mask: TRL attends to the completion's masked tokens and leaves them out of the loss, as
              Slipstream does), advantages from the rewards by TRL's formula (`trl_advantages`), then `.backward()`.

must agree on the loss and on every parameter's gradient to 1e-5 relative (|g - g_trl| / |g_trl| per parameter).
Both models are float64; the residual (~5e-7 here) is TRL's fused LM head, which computes its log-softmax in float32
whatever the model's dtype (trl/kernels/chunked_logprob.py), and Slipstream's float32 storage of behaviour logprobs
and advantages in `Batch`. Correspondences:
loss_agg token-mean = loss_type "dapo" (divisor num_items_in_batch, the batch's trained tokens), seq-mean-token-mean
= "grpo", seq-mean-token-sum-norm = "dr_grpo" (divisor B * max_completion_length = B * max_new_tokens);
scale_rewards group / batch / none; beta > 0 (k3 KL to a reference model, the policy's weights plus noise, so that
the KL term has a gradient; TRL's reference logprobs come from TRL's own fused-LM-head forward) with TRL's
use_bias_correction_kl = False: TRL 1.16 defaults it to True, which multiplies the per-token KL by the (differentiable)
ratio, so even on-policy its KL gradient gains beta * kl_t * grad log pi_t, a term Slipstream does not have (on this
batch the gradients then differ by 10-14% relative); temperature 0.7 both sides.

Behaviour logprobs are the learner's own logprobs at the same weights, so the importance weight is 1. With
`ppo_epochs = 1` Slipstream's proximal logprobs are the training forward's own, detached (trainer.py docstring),
which is exactly what TRL uses when `old_per_token_logps` is absent: the ratio is 1 and clipping is inert. To
exercise the clipped branch (epsilon_high = 0.28, token and sequence level), the old logprobs are perturbed by
+-1 nat per token on both sides identically: TRL gets them as `old_per_token_logps`; Slipstream gets them as the
behaviour logprobs AND as the proximal logprobs (the trainer's `_pre_pass` is wrapped to set `micro.proximal` to
them, what the pre-pass computes when `ppo_epochs > 1`), so its importance weight stays 1 and its ratio is TRL's.
The test asserts that clipping actually happens (token level: on both sides).

The samples of the all-equal group have advantage 0: Slipstream does not run them (`skip_zero_advantage`, when
beta = 0) while TRL does; the normalisers must still count them for the gradients to agree. Every sequence trains
at least one token: for a sequence with none, TRL's "grpo" still counts it in its mean over sequences (0 / 1 for that
row, then divided by B) while Slipstream's seq-mean-token-mean divides by the sequences with trained tokens only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor

from bus.schema import Trajectory
from learner_node.batching import collate
from learner_node.config import LearnerConfig
from learner_node.groups import Unit
from learner_node.model import build_optimizer, build_scheduler, init_distributed, shard
from learner_node.trainer import Trainer
from slipstream.demo_model import PAD_TOKEN, VOCAB, build_demo_model

pytestmark = pytest.mark.usefixtures("float64_by_default")  # also makes TRL's nanstd Bessel factor float64

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAD = VOCAB[PAD_TOKEN]
GROUPS, SIZE, MAX_NEW_TOKENS, TEMPERATURE, MICRO_BATCH = 3, 4, 6, 0.7, 5
RTOL = 1e-5
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


# --- the two sides ---------------------------------------------------------------------------------------------
def load64(path: str | Path, trainable: bool = True) -> torch.nn.Module:
    """`learner_node.model.load_policy` in float64 (it loads float32 master weights): eval mode, no KV cache,
    FSDP2-sharded over this process's world (of one here)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64, local_files_only=True)
    model.config.use_cache = False
    model.eval()
    if not trainable:
        model.requires_grad_(False)
    return shard(model, init_distributed(LearnerConfig()))


def slipstream_trainer(policy_path: Path, reference_path: Path | None, **overrides: Any) -> Trainer:
    cfg = LearnerConfig(
        **{
            "lr": 1e-3,
            "max_grad_norm": None,
            "micro_batch_size": MICRO_BATCH,
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": TEMPERATURE,
            "num_generations": SIZE,
            **overrides,
        }
    )
    runtime = init_distributed(cfg)
    policy = load64(policy_path)
    reference = load64(reference_path, trainable=False) if cfg.beta > 0 else None
    optimizer = build_optimizer(cfg, [policy])
    return Trainer(cfg, runtime, policy, optimizer, build_scheduler(cfg, optimizer), reference=reference, pad_id=PAD)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def slipstream_step(
    trainer: Trainer, units: list[Unit], proximal_is_behaviour: bool = False
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """`trainer.step(units)` -> (metrics, {name: gradient}), the gradients read just before AdamW steps."""
    grads: dict[str, torch.Tensor] = {}

    def snapshot(*_: Any) -> None:
        grads.update({n: full(p.grad) for n, p in trainer.policy.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(snapshot)
    if proximal_is_behaviour:
        pre_pass = trainer._pre_pass

        def with_proximal(micros: list) -> None:
            pre_pass(micros)
            for micro in micros:  # what the pre-pass computes when ppo_epochs > 1: here the perturbed old logprobs
                micro.proximal = micro.batch.behavior_logprobs.double()

        trainer._pre_pass = with_proximal  # type: ignore[method-assign]
    metrics = trainer.step(units)
    return metrics, grads


def trl_advantages(rewards: torch.Tensor, scale_rewards: str, num_generations: int) -> torch.Tensor:
    """TRL 1.16 `_generate_and_score_completions` (multi_objective_aggregation = "sum_then_normalize", one reward
    function of weight 1): group mean; std of the group or of the batch (TRL's nanstd, Bessel-corrected); 1e-4."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    return advantages / (std + 1e-4) if scale_rewards != "none" else advantages


def trl_trainer(policy_path: Path, tmp_path: Path, **overrides: Any) -> Any:
    """A real GRPOTrainer on CPU around the float64 policy (the same weights as Slipstream's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = trl.GRPOConfig(
        **{
            "output_dir": str(tmp_path / "trl"),
            "use_cpu": True,
            "report_to": [],
            "bf16": False,
            "per_device_train_batch_size": GROUPS * SIZE,
            "gradient_accumulation_steps": 1,
            "num_generations": SIZE,
            "max_completion_length": MAX_NEW_TOKENS,
            "temperature": TEMPERATURE,
            "loss_type": "dapo",
            "beta": 0.0,
            "epsilon": 0.2,
            "epsilon_high": None,
            "scale_rewards": "group",
            "importance_sampling_level": "token",
            **overrides,
        }
    )
    model = AutoModelForCausalLM.from_pretrained(str(policy_path), dtype=torch.float64, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(policy_path))
    dataset = datasets.Dataset.from_dict({"prompt": ["3+4="] * (GROUPS * SIZE)})
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.model.train()  # mode "train", as in TRL's training loop (the demo model has no dropout)
    trainer.current_gradient_accumulation_steps = 1  # set by transformers' training loop
    return trainer


def trl_inputs(samples: list[Trajectory], advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch in the layout of TRL's `_generate_and_score_completions` output."""
    prompt_len = max(len(s.prompt_ids) for s in samples)
    length = max(len(s.response_ids) for s in samples)
    out = {k: torch.zeros(len(samples), n, dtype=torch.long) for k, n in
           [("prompt_ids", prompt_len), ("prompt_mask", prompt_len), ("completion_ids", length),
            ("completion_mask", length), ("tool_mask", length)]}  # fmt: skip
    out["prompt_ids"].fill_(PAD)
    out["completion_ids"].fill_(PAD)
    for i, s in enumerate(samples):
        p, t = len(s.prompt_ids), len(s.response_ids)
        out["prompt_ids"][i, prompt_len - p :] = torch.from_numpy(s.prompt_ids.astype(np.int64))
        out["prompt_mask"][i, prompt_len - p :] = 1
        out["completion_ids"][i, :t] = torch.from_numpy(s.response_ids.astype(np.int64))
        out["completion_mask"][i, :t] = 1
        out["tool_mask"][i, :t] = torch.from_numpy(s.loss_mask.astype(np.int64))
    out["advantages"] = advantages
    out["num_items_in_batch"] = (out["completion_mask"] * out["tool_mask"]).sum()
    return out


def padded(values: list[np.ndarray], length: int) -> torch.Tensor:
    out = torch.zeros(len(values), length, dtype=torch.float64)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.from_numpy(v.astype(np.float64))
    return out


def trl_step(trainer: Any, inputs: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --- the batch -------------------------------------------------------------------------------------------------
def make_units(seed: int = 0) -> list[Unit]:
    """Three groups of four; group 1's rewards are all equal (advantage 0). Every sequence trains >= 1 token."""
    rng = np.random.default_rng(seed)
    units = []
    for g in range(GROUPS):
        members = []
        for i in range(SIZE):
            response = rng.integers(4, 90, rng.integers(1, MAX_NEW_TOKENS + 1)).astype(np.int32)
            mask = (rng.random(len(response)) > 0.25).astype(np.uint8)
            mask[rng.integers(len(response))] = 1
            members.append(
                Trajectory(
                    id=f"t{g}-{i}",
                    group_id=f"g{g}",
                    producer="test",
                    prompt_ids=rng.integers(4, 90, rng.integers(2, 8)).astype(np.int32),
                    response_ids=response,
                    behavior_logprobs=np.zeros(len(response), np.float32),
                    loss_mask=mask,
                    reward=1.0 if g == 1 else float(rng.random()),
                )  # fmt: skip
            )
        units.append(Unit(f"g{g}", members))
    return units


def with_behaviour(trainer: Trainer, units: list[Unit], perturb: float = 0.0, seed: int = 1) -> list[Unit]:
    """The units with behaviour logprobs = the learner's own logprobs at the current weights (+ a uniform
    perturbation in [-perturb, perturb] per token)."""
    rng = np.random.default_rng(seed)
    samples = [s for u in units for s in u.samples]
    batch = collate(samples, pad_id=PAD)
    with torch.no_grad():
        logprobs, _, _ = trainer._logprobs(trainer.policy, batch)
    for i, s in enumerate(samples):
        t = len(s.response_ids)
        s.behavior_logprobs = (logprobs[i, :t].numpy() + rng.uniform(-perturb, perturb, t)).astype(np.float32)
    return units


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Peaked random weights: logprobs far from uniform, so the gradients have structure.
    return build_demo_model(tmp_path_factory.mktemp("policy"), hidden_size=64, intermediate_size=128, init_std=0.2)


@pytest.fixture(scope="module")
def reference_path(policy_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The policy's weights plus small noise: a KL of ~0.1 nat/token, with a gradient (equal weights have none)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(policy_path), dtype=torch.float32, local_files_only=True)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * param.std() * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    folder = tmp_path_factory.mktemp("reference")
    model.save_pretrained(folder)
    return folder


def trl_reference_logprobs(trainer: Any, reference_path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference logprobs as TRL computes them: the reference model with TRL's fused LM head at TRL's temperature,
    through `_get_per_token_logps_and_entropies`."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    reference = AutoModelForCausalLM.from_pretrained(str(reference_path), dtype=torch.float64, local_files_only=True)
    reference.eval()
    add_fused_lm_head(reference, temperature=trainer.temperature)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            reference, input_ids, attention, inputs["completion_ids"].shape[1]
        )
    return logps


def compare(
    policy_path: Path,
    reference_path: Path,
    tmp_path: Path,
    *,
    loss_agg: str = "token-mean",
    scale_rewards: str = "group",
    beta: float = 0.0,
    epsilon_high: float | None = None,
    level: str = "token",
    perturb: float = 0.0,
    bias_corrected_kl: bool = False,
) -> dict[str, float]:
    ours = slipstream_trainer(
        policy_path, reference_path if beta > 0 else None, loss_agg=loss_agg, scale_rewards=scale_rewards,
        beta=beta, epsilon_high=epsilon_high, importance_sampling_level=level,
    )  # fmt: skip
    units = with_behaviour(ours, make_units(), perturb)
    samples = [s for u in units for s in u.samples]
    theirs = trl_trainer(
        policy_path, tmp_path, loss_type=LOSS_TYPES[loss_agg], scale_rewards=scale_rewards, beta=beta,
        epsilon_high=epsilon_high, importance_sampling_level=level, use_bias_correction_kl=bias_corrected_kl,
    )  # fmt: skip
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    inputs = trl_inputs(samples, trl_advantages(rewards, scale_rewards, SIZE))
    if perturb:
        inputs["old_per_token_logps"] = padded(
            [s.behavior_logprobs for s in samples], inputs["completion_ids"].shape[1]
        )
    if beta > 0:
        inputs["ref_per_token_logps"] = trl_reference_logprobs(theirs, reference_path, inputs)

    trl_loss, trl_grads = trl_step(theirs, inputs)
    metrics, grads = slipstream_step(ours, units, proximal_is_behaviour=bool(perturb))

    # On-policy the surrogate is -mean(A) (~0 for centred advantages): 1e-7 absolute covers the float32 advantages.
    assert metrics["loss"] == pytest.approx(trl_loss, rel=RTOL, abs=1e-7), (metrics["loss"], trl_loss)
    assert grads.keys() == trl_grads.keys()
    errors = {
        name: float((grads[name] - theirs_grad).norm() / theirs_grad.norm().clamp(min=1e-30))
        for name, theirs_grad in trl_grads.items()
    }
    worst = sorted(errors.items(), key=lambda item: -item[1])[:4]
    assert worst[0][1] < RTOL, f"relative gradient errors |g - g_trl| / |g_trl|, worst: {worst}"
    assert sum(float(g.norm()) for g in trl_grads.values()) > 1e-3  # a real gradient, not two zeros agreeing
    return metrics


# --- the tests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_agg", list(LOSS_TYPES))
def test_step_matches_trl_loss_type(policy_path: Path, reference_path: Path, tmp_path: Path, loss_agg: str) -> None:
    compare(policy_path, reference_path, tmp_path, loss_agg=loss_agg)


@pytest.mark.parametrize("scale_rewards", ["batch", "none"])
def test_step_matches_trl_reward_scaling(
    policy_path: Path, reference_path: Path, tmp_path: Path, scale_rewards: str
) -> None:
    compare(policy_path, reference_path, tmp_path, scale_rewards=scale_rewards)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_step_matches_trl_with_kl_to_a_reference(
    policy_path: Path, reference_path: Path, tmp_path: Path, loss_agg: str
) -> None:
    metrics = compare(policy_path, reference_path, tmp_path, loss_agg=loss_agg, beta=0.1)
    assert metrics["kl"] > 1e-3  # the reference differs from the policy: the KL term has a gradient


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_step_matches_trl_when_the_ratio_is_clipped(
    policy_path: Path, reference_path: Path, tmp_path: Path, level: str
) -> None:
    metrics = compare(policy_path, reference_path, tmp_path, epsilon_high=0.28, level=level, perturb=1.0)
    if level == "token":
        assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0, metrics  # both clip sides are hit
    else:  # whole sequences clip: on this batch only upper-clipped ones (A > 0, ratio > 1.28)
        assert metrics["clip_frac_high"] > 0, metrics


def test_trl_advantages_match_slipstreams(policy_path: Path) -> None:
    """Slipstream's group advantages are TRL's (the flat group gives exactly 0 on both sides)."""
    from learner_node.trainer import group_advantage_values

    units = make_units()
    rewards = torch.tensor([s.reward for u in units for s in u.samples], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        ours = torch.tensor(group_advantage_values(units, LearnerConfig(scale_rewards=scale)), dtype=torch.float64)
        torch.testing.assert_close(ours.flatten(), trl_advantages(rewards, scale, SIZE), rtol=1e-12, atol=1e-12)


def test_trl_default_bias_corrected_kl_has_a_gradient_slipstream_lacks(
    policy_path: Path, reference_path: Path, tmp_path: Path
) -> None:
    """TRL 1.16's default use_bias_correction_kl = True weighs the per-token KL by the ratio: even on-policy (ratio
    1) the ratio's gradient adds beta * kl_t * grad log pi_t. Slipstream's k3 penalty has no such term, so only the
    gradients differ (the loss values agree, the ratio being 1)."""
    with pytest.raises(AssertionError, match="relative gradient errors"):
        compare(policy_path, reference_path, tmp_path, beta=0.1, bias_corrected_kl=True)
