"""The learner node: every rank consumes, the ranks agree on each step's batch, train, settle, broadcast.

One loop per rank (all ranks in lockstep; rank 0 also admits tasks and reports):

1. rank 0 publishes tasks within the admission capacity (`admission.py`; none with `learner.tasks = "none"`, where
   only external producers' trajectories are trained);
2. every rank polls its consumer (`learner-<rank>` in group `learner`), assembles groups (`groups.py`) and drops
   what is too stale (policy version lag > max_staleness) or incomplete to the dead stream;
3. the ranks exchange how many groups each holds; once they hold `groups_per_step` together, each hands in a quota
   (its oldest groups), the groups are all-gathered, copies of one message are removed, and every rank trains its
   even share of the same batch (`trainer.py`);
4. each rank settles the entries it consumed (`accounting.py`: acks, dedup marks and counts in one transaction);
5. every `broadcast_every` steps the weights go to the engines (`broadcast.py`; rank 0 sends in the background in
   async mode, and waits in sync mode); evals and checkpoints at their intervals.

Progress goes to structlog events on rank 0: "train_step" per step, "eval" per evaluation and "summary" at the end
(JSON lines on stderr under SLIPSTREAM_LOG_FORMAT=json: `slipstream up` renders them); the metrics of the first two
also go to TensorBoard / wandb when `[telemetry.tracking]` turns them on (`telemetry/tracking.py`).
"""

from __future__ import annotations

import dataclasses
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoTokenizer

from bus.consumer import MessageConsumer
from bus.dedup import Dedup, MemoryDedup, RedisDedup
from bus.schema import Group, Preference, Sampling, Trajectory
from bus.settings import load_pretrained
from bus.transport import setup_transport
from envs.config import TRAIN_SPLIT
from envs.render import render_preference
from envs.rows import PromptRow
from envs.sources import build_dataset
from learner_node.accounting import FILTERED, Ledger
from learner_node.admission import Admission
from learner_node.broadcast import Broadcaster
from learner_node.checkpoint import Checkpointer, export_hf
from learner_node.config import LearnerSettings
from learner_node.evaluation import Evaluator, prompt_token_ids
from learner_node.groups import GroupAssembler, Unit, drop_repeats, split_trained, zero_variance
from learner_node.lora import peft_config
from learner_node.model import (
    build_optimizer,
    build_scheduler,
    build_value_head,
    init_distributed,
    load_policy,
)
from learner_node.trainer import Trainer
from telemetry import metrics as m
from telemetry.logs import configure_logging, set_policy_version
from telemetry.node import start_node_telemetry
from telemetry.tracking import NullTracker, Tracker, setup_tracking

log = structlog.get_logger(__name__)

# A rank holds at most this many steps' worth of groups (read, not trained yet); the rest waits unread on the stream.
# Two keep the next step's batch ready while one is formed; more would only age in memory and hold entries whose
# lease can run out.
READY_STEPS = 2


class StopRun(Exception):
    """Raised on every rank at once when the ranks agreed to end the run early: a stop signal or the data ran out
    (`failed` False), or no step was possible for data_timeout_s (`failed` True)."""

    def __init__(self, reason: str, *, failed: bool) -> None:
        super().__init__(reason)
        self.failed = failed


class LearnerNode:
    """One rank of the learner (see the module docstring). Build it, `run()` it; every rank must do the same."""

    def __init__(self, settings: LearnerSettings, *, resume: bool = False) -> None:
        self.settings, cfg = settings, settings.learner
        self.cfg = cfg
        self.runtime = runtime = init_distributed(cfg)
        self.rank, self.world = runtime.rank, runtime.world
        if cfg.groups_per_step < self.world:
            raise ValueError(f"learner.groups_per_step ({cfg.groups_per_step}) must be >= the ranks ({self.world})")
        self.node_id = f"learner-{self.rank}"
        self.started = time.monotonic()
        self.telemetry = None
        self.tracker: Tracker = NullTracker()
        if self.rank == 0:
            self.telemetry = start_node_telemetry(
                settings.telemetry, role="learner", node_id=self.node_id, readiness=self._readiness
            )
            self.tracker = setup_tracking(
                settings.telemetry.tracking,
                run_name=settings.run.name,
                run_dir=settings.run.output_dir,
                hparams=settings.model_dump(mode="json"),
            )
        else:
            configure_logging(settings.telemetry.log_format, settings.telemetry.log_level, node_id=self.node_id)
        seed = settings.run.seed + self.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.tokenizer = load_pretrained(AutoTokenizer, settings.model.path, settings.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.step = self.version = 0
        self.stop = threading.Event()
        self.eval_accuracy: float | None = None
        self.dropped: Counter[str] = Counter()  # rank 0: trajectories dropped so far, by reason
        self._last_progress = time.monotonic()
        self._freed = 0  # admission tasks dropped on this rank since the last exchange
        self._filtered = 0  # groups dynamic sampling filtered on this rank since the last step
        self.nonfinite_steps = 0  # steps skipped because their gradient was not finite
        self.broadcast_version = 0  # the newest version handed to the broadcast: new tasks' min_version
        self._checkpointed = -1  # the step of the newest checkpoint written by this run

        self._build_model()
        self._build_bus()
        self.broadcaster = Broadcaster(
            settings.broadcast,
            self.transport,
            runtime,
            node_id="learner",
            dtype=getattr(torch, settings.model.dtype),
        )
        # learner.tasks = "none": no task prompts, so nothing to evaluate on (and no eval split to tokenize).
        self.evaluator = (
            Evaluator(
                settings.task,
                self.tokenizer,
                runtime,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.eval_batch_size,
                threshold=cfg.eval_threshold,
                limit=cfg.eval_limit,
            )
            if cfg.tasks == "dataset"
            else None
        )
        # What the eval measures: held-out rows, or the training prompts themselves (task.eval_split = "train").
        self.eval_split = "train" if settings.task.eval_split == TRAIN_SPLIT else "heldout"
        self.checkpointer = Checkpointer(Path(settings.run.output_dir) / "checkpoints", runtime, cfg.keep_checkpoints)
        self._start_admission(resume, self._resume() if resume else None)

    # --- construction --------------------------------------------------------------------------------------------
    def _build_model(self) -> None:
        cfg, path = self.cfg, self.settings.model.path
        source = self.settings.model
        lora = self.settings.model.lora
        self.policy = load_policy(
            path, self.runtime, activation_checkpointing=cfg.activation_checkpointing, source=source,
            adapters=peft_config(lora) if lora is not None else None,
        )  # fmt: skip
        self.value_head = build_value_head(self.policy, self.runtime) if cfg.algorithm == "ppo" else None
        # A LoRA policy's frozen base is the reference (its adapters disabled, lora.adapters_disabled): no copy.
        needs_reference = (cfg.beta > 0 or cfg.algorithm == "dpo") and lora is None
        self.reference = load_policy(path, self.runtime, trainable=False, source=source) if needs_reference else None
        trained = {"policy": self.policy} | ({"value_head": self.value_head} if self.value_head is not None else {})
        self.trained = nn.ModuleDict(trained)  # one module for the checkpoint's state dict helpers
        self.optimizer = build_optimizer(cfg, list(trained.values()))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.trainer = Trainer(
            cfg,
            self.runtime,
            self.policy,
            self.optimizer,
            self.scheduler,
            value_head=self.value_head,
            reference=self.reference,
            pad_id=self.pad_id,
        )

    def _build_bus(self) -> None:
        settings, cfg = self.settings, self.cfg
        self.transport = setup_transport(settings.bus)
        self.from_dataset = cfg.algorithm == "dpo" and cfg.dpo_source == "dataset"
        dedup: Dedup
        if self.runtime.world > 1:  # every rank reads the trajectories group
            self.transport.guarantees.require(
                settings.bus.type, {"shared_groups": f"{self.runtime.world} learner ranks reading one group"}
            )
        store = self.transport.ledger()
        if store is not None:
            dedup = RedisDedup(store, f"{settings.bus.prefix}dedup:learner", ttl_s=cfg.dedup_ttl_s)
        else:
            dedup = MemoryDedup()
        self.dedup = dedup
        # Token ids and lengths the model cannot take are refused at the door (dead-lettered with the rule), never
        # handed to the embedding: one hostile id would otherwise kill every learner that reads it.
        limits = settings.bus.limits()
        model_config = self.policy.config
        vocab = min(v for v in (limits.vocab_size, model_config.vocab_size) if v is not None)
        max_tokens = min(limits.max_tokens, getattr(model_config, "max_position_embeddings", limits.max_tokens))
        wanted_preferences = cfg.algorithm == "dpo" and cfg.dpo_source == "bus"
        self.consumer = MessageConsumer(
            self.transport,
            settings.bus.stream("trajectories"),
            "learner",
            self.node_id,
            limits=dataclasses.replace(limits, vocab_size=vocab, max_tokens=max_tokens),
            kinds=(Preference,) if wanted_preferences else (Group, Trajectory),
            dedup=dedup,
        )
        admission_key = f"{settings.bus.prefix}admission:{settings.run.name}"
        self.ledger = Ledger(self.transport, self.consumer, dedup, admission_key)
        self.assembler = GroupAssembler(
            cfg.num_generations, cfg.min_group_size, cfg.group_timeout_s, capacity=READY_STEPS * cfg.groups_per_step
        )
        self.ready: list[Unit] = []
        self.admission: Admission | None = None
        self.dataset = build_dataset(settings.task, "train", self.tokenizer)
        if self.rank == 0 and not self.from_dataset and cfg.tasks == "dataset":
            tasks_stream = settings.bus.stream("tasks")
            self.admission = Admission(
                self.dataset,
                lambda tasks, state: self.ledger.publish_tasks(tasks_stream, tasks, state),
                self._task_prompt,
                run_name=settings.run.name,
                groups_per_step=cfg.groups_per_step,
                max_staleness=0 if cfg.mode == "sync" else cfg.max_staleness,
                n=cfg.num_generations,
                sampling=Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens),
            )

    def _task_prompt(self, row: PromptRow) -> str | np.ndarray:
        """Text prompts travel as text (the rollout node renders them); conversations as the token ids only the
        learner's rendering can give."""
        if isinstance(row.prompt, str):
            return row.prompt
        return np.array(prompt_token_ids(row.prompt, self.settings.task.format, self.tokenizer), dtype=np.int32)

    def _start_admission(self, resume: bool, checkpoint: dict[str, Any] | None) -> None:
        """Rank 0: continue the admission where it stopped (the Redis hash, else the checkpoint), or start fresh;
        then every rank learns the run's task id prefix (to count the tasks among what it settles)."""
        if self.admission is not None:
            saved = self.ledger.admission_state() if resume else None
            saved = saved or (checkpoint or {}).get("admission")
            if saved:
                self.admission.load_state_dict(saved)
            else:
                self.ledger.reset_admission()
        prefix = [self.admission.id_prefix if self.admission is not None else ""]
        if self.world > 1:
            dist.broadcast_object_list(prefix, src=0)
        self.task_prefix = prefix[0]

    def _resume(self) -> dict[str, Any] | None:
        """Load the newest checkpoint; returns its run state (None when there is no checkpoint yet)."""
        path = self.checkpointer.latest()
        if path is None:
            log.warning("resume asked for, but there is no checkpoint yet: starting fresh")
            return None
        state = self.checkpointer.load(path, self.trained, self.optimizer)
        self.step, self.version = state["step"], state["version"]
        self.scheduler.load_state_dict(state["scheduler"])
        if self.from_dataset:
            self.dataset.load_state_dict(state["dataset"])
        log.info("resumed", step=self.step, version=self.version, path=str(path))
        return state

    # --- the run -------------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train until max_steps, the target accuracy, a stop signal or the data timeout; returns an exit code."""
        cfg = self.cfg
        self._install_signals()
        code = 0
        try:
            set_policy_version(self.version)
            self.broadcaster.publish(self.policy, self.version, wait=True)
            self.broadcast_version = self.version
            if cfg.eval_at_start and self.step == 0:
                self._evaluate()
            while self.step < cfg.max_steps and not self._target_reached():
                units = self._next_batch()
                self._train(units)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._evaluate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self._checkpoint()
            if not self._target_reached() and (not cfg.eval_every or self.step % cfg.eval_every):
                self._evaluate()
        except StopRun as exc:
            log.warning("run stopped", reason=str(exc), step=self.step)
            code = 1 if exc.failed else 0
        self._checkpoint(export=False)  # the run's export goes to <output_dir>/hf
        if cfg.export_hf:
            self._export(self._out("hf"))
        self._summary()
        self.close()
        return code

    def _target_reached(self) -> bool:
        target = self.cfg.target_accuracy
        return target is not None and self.eval_accuracy is not None and self.eval_accuracy >= target

    def _next_batch(self) -> list[Unit]:
        """Poll and exchange until the ranks together hold a step's batch; returns it (the same on every rank)."""
        cfg = self.cfg
        while True:
            if self.admission is not None:
                self.admission.pump(self.broadcast_version)
            if not self.from_dataset:
                self._collect(block_ms=0 if len(self.ready) >= cfg.groups_per_step else cfg.poll_ms)
            admission = self.admission
            status = self._gather(
                {
                    "ready": len(self.ready),
                    "stop": self.stop.is_set(),
                    "freed": self._freed,
                    "idle": time.monotonic() - self._last_progress,
                    "exhausted": admission is not None and admission.exhausted and not admission.in_flight(),
                }
            )
            self._freed = 0
            if admission is not None:
                admission.record(trained=0, dropped=sum(s["freed"] for s in status))
            if any(s["stop"] for s in status):
                raise StopRun("stop signal", failed=False)
            counts = [s["ready"] for s in status]
            if self.from_dataset:
                return self._dataset_units()
            if sum(counts) >= cfg.groups_per_step:
                return self._exchange(counts)
            if status[0]["exhausted"]:
                raise StopRun("the task's dataset is exhausted and every task is settled", failed=False)
            if status[0]["idle"] > cfg.data_timeout_s:
                raise StopRun(f"no step possible for {cfg.data_timeout_s:.0f}s (learner.data_timeout_s)", failed=True)

    def _collect(self, block_ms: int) -> None:
        """Poll once (not while the groups held fill the assembler's capacity), assemble groups, drop what is
        incomplete or too stale."""
        ready, incomplete = self.assembler.collect(self.consumer, len(self.ready), block_ms)
        if incomplete:
            self._drop(incomplete, "incomplete_group", f"fewer than min_group_size ({self.cfg.min_group_size})")
        self.ready += ready
        # No policy this learner published produced a version above its own: a producer's bug, or weights lost to
        # a restart from an older checkpoint. Its staleness would read as 0 or negative, so refuse it by name.
        future = [u for u in self.ready if u.pair is None and u.max_version > self.version]
        if future:
            self.ready = [u for u in self.ready if u not in future]
            self._drop(future, "future_version", f"policy version above the learner's version {self.version}")
        limit = self.cfg.max_staleness
        stale = [u for u in self.ready if u.pair is None and self.version - u.min_version > limit]
        if stale:
            self.ready = [u for u in self.ready if u not in stale]
            self._drop(stale, "stale", f"policy version lag > max_staleness ({limit}) at version {self.version}")
        if self._filtering():
            flat = [u for u in self.ready if u.pair is None and zero_variance(u)]
            if flat:
                self.ready = [u for u in self.ready if u not in flat]
                self._filter(flat)

    def _filtering(self) -> bool:
        """Dynamic sampling is on and has not yet filtered its bound of groups since the last step."""
        cfg = self.cfg
        bound = cfg.dynamic_sampling_max_batches * cfg.groups_per_step
        return cfg.dynamic_sampling and cfg.algorithm == "grpo" and self._filtered < bound

    def _filter(self, units: list[Unit]) -> None:
        """Settle zero-variance groups as dropped:zero_variance (acked, marked, counted; no dead letter: they are
        well-formed, only useless to GRPO) and free their admission slots, so that other tasks take their place."""
        tasks = sum(1 for u in units if self._is_task(u))
        counts = self.ledger.settle(units, tasks=tasks, outcome=f"dropped:{FILTERED}")
        filtered = counts.get(f"dropped:{FILTERED}", 0)
        self.dropped[f"dropped:{FILTERED}"] += filtered
        m.LEARNER_DROPPED_SAMPLES.labels(reason=FILTERED).inc(filtered)
        self._freed += tasks
        self._filtered += len(units)

    def _drop(self, units: list[Unit], reason: str, detail: str) -> None:
        self.ledger.drop(units, reason, detail)
        self._freed += sum(1 for u in units if self._is_task(u))
        log.info("dropped", reason=reason, units=len(units), trajectories=sum(u.size for u in units))

    def _exchange(self, counts: list[int]) -> list[Unit]:
        """Each rank hands in its quota of groups; all-gather; remove copies; every rank gets the same batch."""
        quota = _quotas(counts, self.cfg.groups_per_step)[self.rank]
        mine, self.ready = self.ready[:quota], self.ready[quota:]
        mine, copies = split_trained(mine, self.dedup.seen)
        self.ledger.release(copies)
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, [u.stripped() for u in mine])
            gathered[self.rank] = mine  # this rank's own units keep their entries, to settle and to release
            units = [u for part in gathered for u in part]
        else:
            units = mine
        units, repeats = drop_repeats(units)
        self.ledger.release(repeats)
        return units

    def _dataset_units(self) -> list[Unit]:
        """DPO from the task's preference rows: every rank draws the same rows (same seed, same position)."""
        units = []
        for _ in range(self.cfg.groups_per_step):
            row = next(self.dataset, None)
            if row is None:
                raise StopRun("the preference dataset is exhausted", failed=False)
            prompt, chosen, rejected = render_preference(row, self.settings.task.format, self.tokenizer)
            eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

            def ids(text: str, end: list[int]) -> np.ndarray:
                return np.array(self.tokenizer.encode(text, add_special_tokens=False) + end, dtype=np.int32)

            pair = Preference(row.id, "dataset", ids(prompt, []), ids(chosen, eos), ids(rejected, eos))
            units.append(Unit(row.id, [], pair=pair))
        return units

    def _train(self, units: list[Unit]) -> None:
        started = time.monotonic()
        metrics = self.trainer.step(units)
        self._filtered = 0
        mine = [u for u in units if u.received]
        if metrics.pop("nonfinite_gradient"):
            self._refuse_nonfinite(mine, metrics)
            return
        counts = self.ledger.settle(mine, tasks=sum(1 for u in mine if self._is_task(u)))
        self.step += 1
        self.version += 1
        seconds = time.monotonic() - started
        self._last_progress = time.monotonic()
        set_policy_version(self.version)
        if self.step % self.cfg.broadcast_every == 0:
            self.broadcaster.publish(self.policy, self.version, wait=self.cfg.mode == "sync")
            self.broadcast_version = self.version
        if self.admission is not None:
            self.admission.record(trained=sum(1 for u in units if self._is_task(u)), dropped=0)
        if self.rank == 0:
            self._report(units, metrics, seconds, counts)

    def _refuse_nonfinite(self, mine: list[Unit], metrics: dict[str, float]) -> None:
        """A step whose gradient was NaN or infinite applied nothing (Trainer._optimizer_step): its messages go to the
        dead stream with the reason, the step and the version stay, and /healthz and an alert say so."""
        self.nonfinite_steps += 1
        m.LEARNER_NONFINITE_STEPS.inc()
        detail = f"loss {metrics.get('loss')} grad_norm {metrics.get('grad_norm')} at step {self.step + 1}; not applied"
        self._drop(mine, "nonfinite_gradient", detail)
        self._last_progress = time.monotonic()
        log.error("non-finite gradient: step skipped, batch dead-lettered", step=self.step + 1,
                  loss=metrics.get("loss"), grad_norm=metrics.get("grad_norm"), units=len(mine))  # fmt: skip

    def _report(self, units: list[Unit], metrics: dict[str, float], seconds: float, counts: dict[str, int]) -> None:
        """Metrics and the "train_step" line (rank 0; the batch is global, so these numbers are too)."""
        samples = [s for u in units for s in u.samples]
        rewards = np.array([s.reward for s in samples] or [0.0])
        lengths = np.array([len(s.response_ids) for s in samples] or [0])
        lags = staleness(self.version - 1, samples)
        tokens = sum(_tokens(u) for u in units)
        loss_tokens = sum(len(s.response_ids) if s.loss_mask is None else int(s.loss_mask.sum()) for s in samples)
        duplicates = sum(u.duplicates for u in units)
        self.dropped.update(self.ledger.scan_dead(self.task_prefix))
        if duplicates:
            self.dropped["dropped:duplicate"] += duplicates
            m.LEARNER_DROPPED_SAMPLES.labels(reason="duplicate").inc(duplicates)
        trained = sum(u.size for u in units) - duplicates
        m.LEARNER_TRAINED_SAMPLES.inc(trained)
        m.LEARNER_TRAINED_TOKENS.inc(loss_tokens)
        m.LEARNER_STEP.set(self.step)
        m.LEARNER_POLICY_VERSION.set(self.version)
        m.LEARNER_TOKENS_PER_SECOND.set(tokens / max(seconds, 1e-9))
        m.LEARNER_LOSS.set(metrics.get("loss", 0.0))
        m.LEARNER_REWARD_MEAN.set(float(rewards.mean()))
        m.LEARNER_REWARD_STD.set(float(rewards.std()))
        m.LEARNER_KL.set(metrics.get("kl", metrics.get("approx_kl", 0.0)))
        m.LEARNER_ENTROPY.set(metrics.get("entropy", 0.0))
        m.LEARNER_CLIP_RATIO.labels(side="low").set(metrics.get("clip_frac_low", 0.0))
        m.LEARNER_CLIP_RATIO.labels(side="high").set(metrics.get("clip_frac_high", 0.0))
        m.LEARNER_IMPORTANCE_WEIGHT_MEAN.set(metrics.get("importance_weight_mean", 1.0))
        m.LEARNER_IMPORTANCE_WEIGHT_MAX.set(metrics.get("importance_weight_max", 1.0))
        m.LEARNER_MASKED_TOKENS_RATIO.set(metrics.get("importance_masked_frac", 0.0))
        for lag in lags:
            m.LEARNER_STALENESS.observe(float(lag))
        m.LEARNER_STEP_DURATION.observe(seconds)
        m.LEARNER_LAST_STEP_TIMESTAMP.set(time.time())
        self._emit(
            "train_step",
            step=self.step,
            version=self.version,
            reward_mean=round(float(rewards.mean()), 4),
            reward_std=round(float(rewards.std()), 4),
            completion_length_mean=round(float(lengths.mean()), 2),
            completion_length_min=int(lengths.min()),
            completion_length_max=int(lengths.max()),
            loss=round(metrics.get("loss", 0.0), 5),
            staleness_mean=round(float(lags.mean()), 3),
            staleness_max=int(lags.max()),
            tokens_per_s=round(tokens / max(seconds, 1e-9), 1),
            loss_tokens=loss_tokens,
            samples=trained,
            dropped=sum(self.dropped.values()),
            elapsed=round(time.monotonic() - self.started, 2),
            step_s=round(seconds, 3),
            **{k: round(v, 5) for k, v in metrics.items() if k != "loss"},
            **({"settled": counts} if counts else {}),
        )

    def _is_task(self, unit: Unit) -> bool:
        """Whether `unit` answers one of this run's admission tasks."""
        return bool(self.task_prefix) and (unit.task_id or "").startswith(self.task_prefix)

    def _evaluate(self) -> None:
        if self.evaluator is None:
            return
        result = self.evaluator.evaluate(self.policy)
        self.eval_accuracy = result["eval_accuracy"]
        if self.rank == 0:
            m.LEARNER_EVAL_ACCURACY.set(self.eval_accuracy)
            self._emit("eval", step=self.step, version=self.version, elapsed=round(time.monotonic() - self.started, 2),
                       eval_split=self.eval_split, **{k: round(v, 4) for k, v in result.items()})  # fmt: skip

    def _emit(self, event: str, **fields: Any) -> None:
        """A progress event (rank 0): its log line, which `slipstream up` renders, and its metrics to the trackers."""
        log.info(event, **fields)
        self.tracker.record(event, fields, step=self.step)

    def _checkpoint(self, export: bool = True) -> None:
        """Save a checkpoint of this step, with its HF export (`export_hf`) unless `export` is false."""
        if self._checkpointed == self.step:
            return
        self._checkpointed = self.step
        state = {
            "step": self.step,
            "version": self.version,
            "scheduler": self.scheduler.state_dict(),
            "admission": self.admission.state_dict() if self.admission is not None else None,
            "dataset": self.dataset.state_dict(),
        }
        path = self.checkpointer.save(self.step, self.trained, self.optimizer, state)
        if export and self.cfg.export_hf:
            self._export(path / "hf")

    def _export(self, out: Path) -> None:
        lora = self.settings.model.lora
        merged = lora is not None and lora.export_merged
        max_shard_mb = self.cfg.export_max_shard_mb
        export_hf(self.policy, self.tokenizer, out, self.runtime, max_shard_mb=max_shard_mb, merged=merged)

    def _summary(self) -> None:
        if self.rank != 0:
            return
        self.dropped.update(self.ledger.scan_dead(self.task_prefix))
        accounting, in_flight = self.ledger.snapshot()  # producers may still publish while the learner stops
        published = accounting.get("published")
        settled = accounting.get("trained", 0) + sum(v for k, v in accounting.items() if k.startswith("dropped:"))
        log.info(
            "summary",
            eval_accuracy=self.eval_accuracy,
            steps=self.step,
            version=self.version,
            elapsed_s=round(time.monotonic() - self.started, 2),
            accounting=accounting,
            in_flight=in_flight,
            balanced=None if published is None or in_flight is None else published == settled + in_flight,
        )

    def _out(self, name: str) -> Path:
        return Path(self.settings.run.output_dir) / name

    # --- plumbing ------------------------------------------------------------------------------------------------
    def _gather(self, status: dict[str, Any]) -> list[dict[str, Any]]:
        if self.world == 1:
            return [status]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, status)
        return gathered

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        return True, {
            "step": self.step,
            "policy_version": self.version,
            "eval_accuracy": self.eval_accuracy,
            "nonfinite_steps_skipped": self.nonfinite_steps,
        }

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())

    def close(self) -> None:
        """Release the broadcast, the bus, the telemetry server and the process group."""
        self.broadcaster.close()
        self.transport.close()
        self.tracker.close()
        if self.telemetry is not None:
            self.telemetry.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def staleness(version: int, samples: list[Trajectory]) -> np.ndarray:
    """Policy versions each sample lags `version` (the weights that trained it), int64 [B] ([1] zero when empty).
    Never negative: a sample of a version the learner has not reached (one generated before the learner resumed
    from an older checkpoint) is as fresh as can be, and a negative lag would pull the reported mean below the truth."""
    return np.array([max(0, version - s.min_policy_version) for s in samples] or [0], dtype=np.int64)


def _tokens(unit: Unit) -> int:
    """Tokens a unit puts through the model: prompt and response of each member, or of both sides of a pair."""
    if unit.pair is not None:
        return 2 * len(unit.pair.prompt_ids) + len(unit.pair.chosen_ids) + len(unit.pair.rejected_ids)
    return sum(len(s.prompt_ids) + len(s.response_ids) for s in unit.samples)


def _quotas(counts: list[int], total: int) -> list[int]:
    """How many groups each rank hands in so that they add up to `total` (sum(counts) >= total): an even share
    first, the rest from the ranks that hold more, in rank order."""
    even = total // len(counts)
    quotas = [min(c, even) for c in counts]
    rest = total - sum(quotas)
    for rank, count in enumerate(counts):
        extra = min(rest, count - quotas[rank])
        quotas[rank] += extra
        rest -= extra
    return quotas
