"""The learner's settings: the `[learner]` section and `LearnerSettings`, the sections a learner node reads.

Torch-free and import-light (`slipstream learner --help` must stay instant). One TOML file holds every node's
sections; the learner reads [run] [model] [bus] [task] [learner] [broadcast] [telemetry]:

    [learner]
    algorithm = "grpo"          # grpo | ppo | dpo
    mode = "async"              # async | sync (admit one step's tasks, wait for them, train, broadcast, repeat)
    groups_per_step = 8
    num_generations = 8
    max_staleness = 2
    lr = 3e-3

Field names follow TRL where TRL has one (num_generations, beta, epsilon, epsilon_high, scale_rewards,
importance_sampling_level, max_grad_norm, warmup_steps, temperature, top_p, weight_decay, adam_*); loss aggregation
follows verl's `loss_agg_mode` names. TRL's GRPOConfig names for the other fields are accepted too (`TRL_ALIASES`,
e.g. `learning_rate` for `lr`, `loss_type = "dapo"` for `loss_agg = "token-mean"`), and the GRPOConfig names that
mean nothing here are refused with the reason (`TRL_REFUSED`); docs/learner.md "TRL GRPOConfig -> Slipstream".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from bus.config import BusConfig
from bus.settings import ModelConfig, NodeSettings, RunConfig, Section
from envs.config import TaskConfig
from telemetry.config import TelemetryConfig
from weight_broadcast.config import BroadcastConfig

Algorithm = Literal["grpo", "ppo", "dpo"]

# TRL GRPOConfig name -> the [learner] field it sets (the value as it is, except loss_type: TRL_LOSS_TYPES).
TRL_ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "num_iterations": "ppo_epochs",
    "max_completion_length": "max_new_tokens",
    "per_device_train_batch_size": "micro_batch_size",
    "loss_type": "loss_agg",
}
# TRL loss_type -> loss_agg. bnpo normalises by the tokens of TRL's local batch; token-mean here always by the whole
# step's tokens, the same as bnpo when one TRL step is one batch (one process, gradient_accumulation_steps = 1).
TRL_LOSS_TYPES: dict[str, str] = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
# TRL GRPOConfig names with no Slipstream equivalent, refused with the reason (any other unknown key is refused too,
# as a section forbids extra keys; these get a sentence that says what to set instead).
TRL_REFUSED: dict[str, str] = {
    "gradient_accumulation_steps": "Slipstream accumulates gradients over the micro-batches of one step: set "
    "groups_per_step (groups per optimizer step) and micro_batch_size (sequences per forward/backward)",
    "steps_per_generation": "rollouts are generated continuously, not as a batch reused over several steps: every "
    "step trains groups_per_step fresh groups, at most max_staleness versions old",
    "generation_batch_size": "a step trains groups_per_step groups of num_generations samples, and the rollout nodes "
    "batch their generation themselves: set groups_per_step",
    "use_vllm": "generation always runs on rollout nodes (slipstream rollout, or an SGLang server), never in the "
    "learner: remove it",
    "vllm_mode": "generation always runs on separate rollout nodes (like TRL's server mode): remove it",
    "vllm_importance_sampling_correction": "set importance_correction: false is 'none'; true is 'truncate' (or "
    "'mask') with importance_cap",
    "vllm_importance_sampling_mode": "set importance_correction ('truncate' or 'mask') and importance_sampling_level "
    "(which here applies to the clip ratio too, and takes the length-normalised mean of the log-ratios, where TRL's "
    "sequence modes sum them)",
    "vllm_importance_sampling_cap": "set importance_cap",
    "vllm_importance_sampling_clip_max": "set importance_cap",
    "vllm_importance_sampling_clip_min": "set importance_floor (importance_correction = 'mask'; 'truncate' has no "
    "lower bound)",
    "mask_truncated_completions": "Slipstream trains truncated completions with the reward their task gave them; "
    "there is no option to leave them out: remove it",
    "top_k": "the learner's tasks sample with temperature and top_p over the whole vocabulary (TRL's top_k = 0): "
    "remove it",
    "min_p": "the learner's tasks sample with temperature and top_p only: remove it",
    "repetition_penalty": "the learner's tasks sample with temperature and top_p only (no penalties): remove it",
    "lr_scheduler_type": "set lr_scheduler ('constant' or 'cosine' to min_lr_ratio * lr, both after warmup_steps)",
    "use_bias_correction_kl": "Slipstream's KL penalty (beta, kl_estimator) is not weighted by the ratio, which is "
    "TRL's use_bias_correction_kl = false (TRL's default true adds a gradient term): remove it",
    "delta": "set dual_clip = delta: for negative advantages it bounds the ratio the same way (when delta > 1 + "
    "epsilon_high)",
}


class LearnerConfig(Section):
    """What the learner trains, how it paces the rollouts, and when it evaluates, checkpoints and stops."""

    # --- the run ---------------------------------------------------------------------------------------------
    algorithm: Algorithm = Field(
        "grpo", description="grpo (group baselines), ppo (value head + GAE or V-trace) or dpo (preference pairs)"
    )
    mode: Literal["async", "sync"] = Field(
        "async",
        description="async: rollouts run ahead within max_staleness while the learner trains; sync: admit one "
        "step's tasks at version v, wait for all of them, train, broadcast, repeat (for comparison)",
    )
    nproc_per_node: int = Field(
        1, ge=1, le=64, description="learner ranks on this host; `slipstream learner` starts torchrun when > 1"
    )
    nnodes: int = Field(
        1, ge=1, le=4096, description="learner hosts; > 1 starts torchrun with c10d rendezvous at rdzv_endpoint"
    )
    rdzv_endpoint: str | None = Field(
        None,
        max_length=261,
        pattern=r"^[A-Za-z0-9.\-]+:\d{1,5}$",
        description="host:port of the torchrun rendezvous (learner host 0) when nnodes > 1",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda (NCCL, bf16 autocast) when a GPU is visible, else cpu (gloo, float32)"
    )
    num_threads: int | None = Field(
        None, ge=1, le=1024, description="torch intra-op threads (None: torch's default, one per core)"
    )
    max_steps: int = Field(1000, ge=1, le=10_000_000, description="optimizer steps before the run ends")
    target_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="end the run at the first eval whose accuracy reaches this (None: never)"
    )
    data_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="fail when no step could be taken for this long (rollouts gone?)"
    )
    collective_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="a learner rank that does not join a collective within this long is dead"
    )
    poll_ms: int = Field(
        100, ge=0, le=10_000, description="how long one poll of the trajectories stream waits between lockstep checks"
    )

    # --- batches and admission ---------------------------------------------------------------------------------
    tasks: Literal["dataset", "none"] = Field(
        "dataset",
        description="dataset: rank 0 publishes the task's prompts (admission) and the eval runs on them; none: no "
        "tasks and no eval, the learner trains only what external producers send (agents through the proxy, the "
        "producer SDK), grouped by group_id",
    )
    groups_per_step: int = Field(
        8, ge=1, le=100_000, description="groups (prompts; DPO: pairs) per optimizer step, over all ranks"
    )
    num_generations: int = Field(8, ge=1, le=1024, description="samples per prompt task (the task's n)")
    temperature: float = Field(
        1.0, gt=0, le=10, description="sampling temperature of the tasks; the learner divides its logits by it too"
    )
    top_p: float = Field(1.0, gt=0, le=1, description="top-p of the tasks' sampling")
    max_new_tokens: int = Field(
        64, ge=1, le=1_000_000, description="longest response of a task (and of eval); TRL: max_completion_length"
    )
    max_staleness: int = Field(
        2,
        ge=0,
        le=1000,
        description="policy versions a sample may lag the learner: admission paces tasks by it, and a sample "
        "that still arrives staler is dropped (reason 'stale')",
    )
    group_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="single trajectories wait this long for the rest of their group_id before training as a "
        "partial group (or being dropped as 'incomplete_group' below min_group_size)",
    )
    min_group_size: int = Field(
        2, ge=1, le=1024, description="smallest group trained (GRPO/online DPO need >= 2 for a baseline or a pair)"
    )
    micro_batch_size: int = Field(
        64,
        ge=1,
        le=100_000,
        description="sequences per forward/backward; gradients accumulate over the step's micro-batches (TRL: "
        "per_device_train_batch_size)",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each transformer block's activations in the backward instead of keeping them: less "
        "memory for long sequences and big models, about one more forward of compute",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=16,
        le=100_000_000,
        description="GRPO/PPO: also cut micro-batches by padded tokens (rows x longest prompt + longest response): "
        "samples are sorted by length either way, and each micro-batch stays within this budget as well as "
        "micro_batch_size rows (a longer sample goes alone). Same loss and gradient; bounded memory. None: "
        "micro_batch_size rows alone",
    )

    # --- optimizer ---------------------------------------------------------------------------------------------
    lr: float = Field(1e-6, gt=0, le=1.0, description="peak learning rate of AdamW (TRL: learning_rate)")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW decoupled weight decay")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    adam_epsilon: float = Field(1e-8, gt=0, le=1e-2, description="AdamW epsilon")
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, description="clip the global gradient norm (None: off)")
    lr_scheduler: Literal["constant", "cosine"] = Field(
        "constant", description="after warmup: constant, or cosine decay to min_lr_ratio * lr at max_steps"
    )
    warmup_steps: int = Field(0, ge=0, le=10_000_000, description="linear warmup from 0 over this many steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    bf16: bool = Field(
        True,
        description="bf16 compute on GPU: FSDP2 mixed precision (bf16 parameters in forward and backward, float32 "
        "gradient reduction and master weights) and bf16 autocast; CPU always runs float32",
    )

    # --- policy loss (GRPO and PPO) ----------------------------------------------------------------------------
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean",
        description="loss aggregation over the whole step's tokens (verl's loss_agg_mode). TRL: loss_type dapo or "
        "bnpo = token-mean (bnpo's local batch is the whole step when one step is one batch), grpo = "
        "seq-mean-token-mean, dr_grpo = seq-mean-token-sum-norm (divisor max_new_tokens)",
    )
    epsilon: float = Field(0.2, ge=0, le=1, description="lower clip of the ratio: 1 - epsilon")
    epsilon_high: float | None = Field(None, ge=0, le=10, description="upper clip 1 + epsilon_high (None: epsilon)")
    dual_clip: float | None = Field(None, gt=1, le=100, description="dual-clip bound c for negative advantages")
    importance_correction: Literal["truncate", "mask", "raw", "none"] = Field(
        "truncate",
        description="off-policy weight w = pi_prox/pi_behav: truncated at importance_cap (TIS), masked outside "
        "[importance_floor, importance_cap] (MIS/IcePop), raw (w unbounded: AReaL's decoupled PPO without a cap) or "
        "none (weight 1: no correction, TRL's vllm_importance_sampling_correction = false)",
    )
    importance_cap: float = Field(2.0, gt=0, le=1e6, description="upper bound of the importance weight")
    importance_floor: float = Field(0.0, ge=0, le=1, description="lower bound of the importance weight (mask only)")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="ratios per token, or per sequence (GSPO: length-normalised)"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="divide group-centred rewards by the group's std, the batch's std, or nothing (TRL's true / "
        "false are taken as group / none)",
    )
    advantage_estimator: Literal["grpo", "rloo"] = Field(
        "grpo", description="group baseline: the group mean (grpo) or the mean of the others (rloo)"
    )
    beta: float = Field(0.0, ge=0, le=100, description="KL coefficient to the frozen initial policy (0: no reference)")
    entropy_coef: float = Field(
        0.0, ge=0, le=10, description="weight of an entropy bonus on trained tokens (keeps a policy exploring; 0: off)"
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator when beta > 0")
    dynamic_sampling: bool = Field(
        False,
        description="GRPO: DAPO's dynamic sampling (arXiv 2503.14476): a group whose rewards are all equal is "
        "filtered before any step (settled as dropped:zero_variance) and the admission publishes another task in its "
        "place, so every step trains groups_per_step groups that carry a signal",
    )
    dynamic_sampling_max_batches: int = Field(
        8,
        ge=1,
        le=1000,
        description="filter at most this many times groups_per_step groups between two steps; past that the step "
        "takes zero-variance groups too (a policy that has solved or lost every prompt still steps and evaluates)",
    )
    skip_zero_advantage: bool = Field(
        True,
        description="GRPO with beta = 0 and entropy_coef = 0: do not run samples whose advantage is 0 (their gradient "
        "is exactly 0; the loss normaliser still counts them)",
    )
    ppo_epochs: int = Field(
        1,
        ge=1,
        le=100,
        description="optimizer updates per batch; > 1 recomputes the proximal logprobs in a no-grad pass first "
        "(TRL: num_iterations)",
    )

    # --- PPO critic --------------------------------------------------------------------------------------------
    advantage: Literal["gae", "vtrace"] = Field("gae", description="PPO advantage estimator")
    gamma: float = Field(1.0, ge=0, le=1, description="discount per token (PPO)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (PPO)")
    rho_bar: float = Field(1.0, gt=0, le=100, description="V-trace truncation of rho")
    c_bar: float = Field(1.0, gt=0, le=100, description="V-trace truncation of c")
    value_coef: float = Field(0.5, ge=0, le=100, description="weight of the value loss (PPO)")
    value_clip: float | None = Field(0.2, gt=0, le=100, description="PPO value clipping around the old values")

    # --- DPO ---------------------------------------------------------------------------------------------------
    dpo_source: Literal["online", "bus", "dataset"] = Field(
        "online",
        description="online: best-vs-worst pairs of scored groups; bus: `preference` messages on the trajectories "
        "stream; dataset: the task's preference rows (prompt/chosen/rejected), read by the learner itself",
    )
    dpo_beta: float = Field(0.1, gt=0, le=100, description="DPO temperature beta")
    dpo_loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="DPO loss variant")
    label_smoothing: float = Field(0.0, ge=0, le=0.5, description="conservative DPO label smoothing (sigmoid only)")

    # --- broadcast, eval, checkpoints ----------------------------------------------------------------------------
    broadcast_every: int = Field(1, ge=1, le=1_000_000, description="send the weights every this many steps")
    eval_every: int = Field(10, ge=0, le=1_000_000, description="greedy eval every this many steps (0: only at end)")
    eval_at_start: bool = Field(True, description="evaluate before the first step (the baseline accuracy)")
    eval_threshold: float = Field(
        1.0, ge=-1e6, le=1e6, description="an eval completion is correct when its total reward is >= this"
    )
    eval_batch_size: int = Field(64, ge=1, le=100_000, description="prompts per batched greedy generation, per rank")
    eval_limit: int = Field(0, ge=0, le=10_000_000, description="evaluate on the first N held-out rows (0: all)")
    checkpoint_every: int = Field(
        0, ge=0, le=1_000_000, description="checkpoint every this many steps (0: only at the end)"
    )
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="newest checkpoints kept on disk")
    export_hf: bool = Field(
        True,
        description="write an HF folder (save_pretrained, the source checkpoint's dtype) to <output_dir>/hf at the "
        "end, and into each checkpoint's folder (step-N/hf) at checkpoint_every",
    )
    export_max_shard_mb: int = Field(
        5000,
        ge=1,
        le=1_000_000,
        description="largest safetensors file of an HF export; bigger models get shards "
        "and an index (model.safetensors.index.json)",
    )
    dedup_ttl_s: float = Field(
        7 * 86_400.0, gt=0, le=365 * 86_400, description="trained ids are remembered this long (duplicate check)"
    )

    @model_validator(mode="before")
    @classmethod
    def _trl_names(cls, data: Any) -> Any:
        """TRL GRPOConfig names -> Slipstream's (TRL_ALIASES); the TRL names that mean nothing here are refused."""
        return from_trl_names(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _consistent(self) -> LearnerConfig:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"rdzv_endpoint: required when nnodes > 1 (got nnodes={self.nnodes})")
        if self.num_generations < self.min_group_size and self.algorithm != "dpo":
            raise ValueError(
                f"num_generations ({self.num_generations}) must be >= min_group_size ({self.min_group_size})"
            )
        needs_pairs = self.algorithm == "grpo" or (self.algorithm == "dpo" and self.dpo_source == "online")
        if needs_pairs and self.min_group_size < 2:
            raise ValueError("min_group_size: must be >= 2 for grpo and online dpo (a baseline or a pair needs two)")
        if self.tasks == "none" and self.target_accuracy is not None:
            raise ValueError("target_accuracy: never reached with tasks = 'none' (there is no eval): leave it out")
        if self.importance_floor >= self.importance_cap:
            raise ValueError(f"importance_floor ({self.importance_floor}) must be < importance_cap")
        return self


def from_trl_names(data: dict[str, Any]) -> dict[str, Any]:
    """A [learner] table with TRL's GRPOConfig names rewritten to Slipstream's; ValueError names the field."""
    refused = [name for name in data if name in TRL_REFUSED]
    if refused:
        raise ValueError("; ".join(f"{name}: TRL's GRPOConfig setting, not used by Slipstream: {TRL_REFUSED[name]}"
                                   for name in refused))  # fmt: skip
    out = dict(data)
    for alias, name in TRL_ALIASES.items():
        if alias not in out:
            continue
        if name in out:
            raise ValueError(f"{alias} and {name}: both given, but {alias} is TRL's name for {name}: set one of them")
        value = out.pop(alias)
        if alias == "loss_type":
            if not isinstance(value, str) or value not in TRL_LOSS_TYPES:
                accepted = ", ".join(f"{k!r} (loss_agg {v!r})" for k, v in TRL_LOSS_TYPES.items())
                raise ValueError(
                    f"loss_type: {value!r} is not accepted; accepted: {accepted} (TRL's cispo, sapo, luspo and vespo "
                    "are other losses, which Slipstream does not implement)"
                )
            value = TRL_LOSS_TYPES[value]
        out[name] = value
    if isinstance(out.get("scale_rewards"), bool):  # TRL also takes true / false for "group" / "none"
        out["scale_rewards"] = "group" if out["scale_rewards"] else "none"
    return out


class LearnerSettings(NodeSettings):
    """Every section a learner node reads (the TOML file may hold other nodes' sections too)."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    bus: BusConfig = BusConfig()
    task: TaskConfig = TaskConfig()
    learner: LearnerConfig = LearnerConfig()
    broadcast: BroadcastConfig = BroadcastConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> LearnerSettings:
        # A single trajectory buffered past the lease would be claimed by another rank: it would train twice.
        if self.learner.group_timeout_s * 1000 >= self.bus.lease_ms:
            raise ValueError(
                f"learner.group_timeout_s ({self.learner.group_timeout_s}) must be shorter than bus.lease_ms "
                f"({self.bus.lease_ms} ms): a buffered trajectory would be re-delivered to another rank"
            )
        return self
