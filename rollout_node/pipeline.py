"""The rollout node's tasks, from poll to ack: take, generate, score, publish, settle (`TaskPipeline`).

- generation workers (`rollout.generation_workers`): take up to `tasks_per_call` tasks from the `rollout` consumer
  group on the tasks stream (consumer = node id, so a restarted node re-reads its own pending tasks; expired leases
  of dead nodes are claimed by the consumer), wait (bounded) for the engine to reach the tasks' `min_version`,
  generate n samples per task (one engine call per sampling setting; with a multi-turn environment, n episodes
  through `envs.run_episode`), and hand the tasks to a bounded queue.
- scorer: scores each task's samples with the task's rewards and publishes ONE Group (group id = task id, trajectory
  ids `<task id>:<sample index>`) together with the task's ack, in one transaction that first checks the node still
  holds the task (`Publisher.publish_result`): a node killed at any point never leaves a published group whose task
  is redelivered, and a node back from a pause longer than the lease drops its result for the node that claimed the
  task. Were a copy published anyway (a claim racing that check), it has the same ids and the learner drops it.

A failed engine call is counted (ROLLOUT_ENGINE_ERRORS) and its tasks requeued; a task the engine rejects as
invalid, or that failed `bus.max_deliveries` times on this node, is dead-lettered. The node itself never dies of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from msgspec.structs import replace

from bus.consumer import MessageConsumer, Received
from bus.schema import MessageError, Task
from envs import PolicyTurn, PromptRow, RewardSet, make_environment, render_prompt, run_episode
from envs.render import uses_chat_template
from envs.rows import PROMPT_MESSAGES, Prompt, check_messages
from rollout_node.config import RolloutSettings
from rollout_node.engines.base import Engine, Sample, error_reason
from rollout_node.trajectories import Completion, Publisher, episode_versions, score_group
from telemetry.metrics import ROLLOUT_ENGINE_ERRORS, ROLLOUT_GENERATION_DURATION, ROLLOUT_TASKS_CONSUMED

log = structlog.get_logger(__name__)

POLL_BLOCK_MS = 250  # how long one poll waits for tasks before the loop looks at the stop flag again
VERSION_POLL_S = 0.05  # how often a task waiting for its min_version looks at the engine's version
FAILURES_KEPT = 10_000  # task ids whose engine failures on this node are remembered
Spawn = Callable[[Callable[[], None], str], threading.Thread]  # starts a thread the node joins when it closes


@dataclass
class Job:
    """A task in hand: its bus entry, the prompt as token ids [P], the row its rewards read, and its samples."""

    received: Received
    task: Task
    prompt_ids: list[int]
    row: PromptRow
    completions: list[Completion] = field(default_factory=list)


class TaskPipeline:
    """The tasks this node holds and the threads that carry them from the tasks stream to the trajectories stream.

    `stop_taking` set: workers take no more tasks; `closing` set: the node is closing (nothing waits any longer);
    `touch_bus()` records a successful bus call (the node's readiness reads it)."""

    def __init__(
        self,
        settings: RolloutSettings,
        node_id: str,
        engine: Engine,
        tokenizer: Any,
        rewards: RewardSet,
        consumer: MessageConsumer,
        publisher: Publisher,
        stop_taking: threading.Event,
        closing: threading.Event,
        touch_bus: Callable[[], None],
    ) -> None:
        self.settings, self.config, self.node_id = settings, settings.rollout, node_id
        self.engine, self.tokenizer, self.rewards = engine, tokenizer, rewards
        self.consumer, self.publisher = consumer, publisher
        self._stop_taking, self._closing, self._touch_bus = stop_taking, closing, touch_bus
        self._lock = threading.Lock()  # the tasks in hand (the consumer is safe to poll while others settle)
        self._in_hand: dict[str, Job | Received] = {}  # entry id -> what this node holds
        self._failures: OrderedDict[str, int] = OrderedDict()  # task id -> engine failures here
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=self.config.queue_size)
        self._workers: list[threading.Thread] = []
        self._scorer: threading.Thread | None = None

    @property
    def tasks_in_hand(self) -> int:
        """Tasks taken and not yet acked, dead-lettered or requeued."""
        return len(self._in_hand)

    def start(self, spawn: Spawn) -> None:
        """Start the scorer and the generation workers (with `spawn`)."""
        self._scorer = spawn(self._scoring_loop, "scorer")
        for i in range(self.config.generation_workers):
            self._workers.append(spawn(self._generation_loop, f"generation-{i}"))

    def settle_in_hand(self) -> list[str]:
        """Let generation end (aborting it after `shutdown_timeout_s`), publish what was generated, requeue the
        rest; returns the entry ids requeued."""
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in self._workers):
            log.info("shutdown: aborting the generation in flight; its tasks are requeued")
            self.engine.abort()
            for worker in self._workers:
                worker.join(timeout=self.settings.bus.socket_timeout_s)
        if self._scorer is not None:
            with contextlib.suppress(queue.Full):  # a scorer stuck on the bus gets no sentinel: its tasks are released
                self._queue.put(None, timeout=self.settings.bus.socket_timeout_s)  # publish what is queued, then end
            self._scorer.join(timeout=max(0.0, deadline - time.monotonic()) + self.settings.bus.socket_timeout_s)
        with self._lock:
            left = list(self._in_hand)
        self._release(left, "shutdown")
        return left

    # --- taking tasks --------------------------------------------------------------------------------------------
    def _generation_loop(self) -> None:
        while not self._stop_taking.is_set():
            try:
                jobs = self._take()
                if jobs and self._wait_for_version(jobs):
                    self._generate(jobs)
            except Exception:  # the bus gave up reconnecting, or a bug: log it, keep the node alive
                log.exception("generation loop error")
                self._stop_taking.wait(self.config.engine_retry_s)

    def _take(self) -> list[Job]:
        """Poll up to `tasks_per_call` tasks and turn them into jobs; a task whose prompt cannot be used is
        dead-lettered with the reason."""
        if self._stop_taking.is_set():
            return []
        # The poll waits outside the lock: the scorer settles (acks with their groups) the tasks before these
        # meanwhile, so the last groups of a batch are not held up by a wait for the next batch's tasks.
        block_ms = min(self.settings.bus.block_ms, POLL_BLOCK_MS)
        received = self.consumer.poll(count=self.config.tasks_per_call, block_ms=block_ms)
        self._touch_bus()
        with self._lock:
            self._in_hand.update((r.entry_id, r) for r in received)
        if self._stop_taking.is_set():  # the node began to stop during the poll: the next node gets these now
            self._release([r.entry_id for r in received], "shutdown")
            return []
        ROLLOUT_TASKS_CONSUMED.inc(len(received))
        jobs = []
        for r in received:
            try:
                jobs.append(self._job(r))
            except ValueError as exc:
                self._settle(r.entry_id, "nack", f"prompt: {exc}")
        return jobs

    def _job(self, received: Received) -> Job:
        """Tokenize the task's prompt: text is rendered per `[task.format]` (chat template or plain), ids are used as
        they are. Raises ValueError when the prompt cannot be rendered."""
        task = received.message
        assert isinstance(task, Task)
        fmt = self.settings.task.format
        meta = dict(task.meta)
        messages = meta.pop(PROMPT_MESSAGES, None)  # a conversation the learner rendered to the ids: for the rewards
        row_prompt: Prompt
        if isinstance(task.prompt, str):
            text = render_prompt(task.prompt, fmt, self.tokenizer)
            # The template holds its special tokens already.
            templated = uses_chat_template(fmt, self.tokenizer, task.prompt)
            prompt_ids = list(self.tokenizer.encode(text, add_special_tokens=not templated))
            row_prompt = task.prompt
        else:
            prompt_ids = [int(t) for t in task.prompt]
            decoded = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
            row_prompt = decoded if messages is None else check_messages(messages, f"meta.{PROMPT_MESSAGES}")
        if not prompt_ids:
            raise ValueError("renders to no tokens")
        job = Job(received, task, prompt_ids, PromptRow(task.id, row_prompt, meta))
        with self._lock:
            if received.entry_id in self._in_hand:
                self._in_hand[received.entry_id] = job
        return job

    def _wait_for_version(self, jobs: list[Job]) -> bool:
        """Wait up to `min_version_wait_s` for the engine to reach the jobs' highest min_version, then go on anyway.
        False when the node began stopping while waiting (the jobs are released then, not run)."""
        needed = max(job.task.min_version for job in jobs)
        deadline = time.monotonic() + self.config.min_version_wait_s
        while self.engine.version < needed and time.monotonic() < deadline:
            if self._stop_taking.wait(VERSION_POLL_S):
                self._release([job.received.entry_id for job in jobs], "stopping")
                return False
        if self.engine.version < needed:
            log.warning("running tasks below their min_version", min_version=needed, version=self.engine.version)
        return True

    # --- generating ----------------------------------------------------------------------------------------------
    def _generate(self, jobs: list[Job]) -> None:
        """Generate every job's samples (one engine call per sampling setting and n), then queue or release them."""
        call = self._episodes if self.settings.task.environment else self._single_turn
        calls: dict[str, list[Job]] = {}
        for job in jobs:
            calls.setdefault(f"{job.task.n}|{job.task.sampling!r}", []).append(job)
        for batch in calls.values():
            self._run_call(batch, call)
        for job in jobs:
            if not job.completions:
                continue  # its call failed: already requeued or dead-lettered
            if any(c.aborted for c in job.completions):
                self._settle(job.received.entry_id, "requeue", "aborted")
            else:
                self._hand_over(job)

    def _hand_over(self, job: Job) -> None:
        """Queue a generated job for the scorer, waiting while the queue is full (released if the node closes)."""
        while not self._closing.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(job, timeout=0.5)
                return
        self._settle(job.received.entry_id, "requeue", "closing")

    def _run_call(self, batch: list[Job], call: Callable[[list[Job]], None]) -> None:
        """Run `call(batch)` (which fills each job's completions); on failure count it and requeue or dead-letter.
        A batch the engine rejects as invalid is retried one task at a time, so one bad task costs only itself."""
        started = time.monotonic()
        try:
            call(batch)
        except Exception as exc:
            if isinstance(exc, ValueError) and len(batch) > 1:
                for job in batch:
                    self._run_call([job], call)
                return
            self._engine_failed(batch, exc)
            return
        elapsed = time.monotonic() - started
        for _ in batch:
            ROLLOUT_GENERATION_DURATION.observe(elapsed)

    def _single_turn(self, batch: list[Job]) -> None:
        task = batch[0].task
        results = self.engine.generate([job.prompt_ids for job in batch], task.sampling, task.n)
        for job, samples in zip(batch, results, strict=True):
            job.completions = [Completion.of(s) for s in samples]

    def _episodes(self, batch: list[Job]) -> None:
        """n episodes per job, all concurrently (an SGLang server batches them; the torch engine takes turns)."""

        async def run_all() -> list[Completion]:
            return list(await asyncio.gather(*(self._episode(job, i) for job in batch for i in range(job.task.n))))

        completions, n = asyncio.run(run_all()), batch[0].task.n
        for k, job in enumerate(batch):
            job.completions = completions[k * n : (k + 1) * n]

    async def _episode(self, job: Job, index: int) -> Completion:
        """One multi-turn episode: the environment's text gets logprob 0 and loss_mask 0."""
        engine, environment = self.engine, make_environment(self.settings.task.environment)
        assert environment is not None
        sampling = replace(job.task.sampling, stop=[*job.task.sampling.stop, *environment.stop])
        turns: list[Sample] = []

        async def generate(ids: list[int]) -> PolicyTurn:
            seed = None if sampling.seed is None else (sampling.seed + 64 * index + len(turns)) % 2**63
            [[sample]] = await asyncio.to_thread(engine.generate, [ids], replace(sampling, seed=seed), 1)
            turns.append(sample)
            finish = "stop" if sample.finish_reason == "stop" else "length"  # length or abort end the episode
            return PolicyTurn(sample.response_ids, sample.behavior_logprobs, sample.text, finish)

        episode = await run_episode(
            environment, job.row, job.prompt_ids, generate, self.tokenizer, self.settings.task.max_turns
        )
        aborted = any(turn.finish_reason == "abort" for turn in turns)
        return Completion(
            episode.response_ids,
            episode.logprobs,
            episode.loss_mask,
            episode_versions(episode.loss_mask, turns),
            episode.text,
            "abort" if aborted else episode.finish_reason,
        )

    def _engine_failed(self, batch: list[Job], exc: Exception) -> None:
        """Count the failure; dead-letter tasks the engine called invalid or that failed too often here, requeue
        the rest (another node, or this one later, runs them)."""
        reason = error_reason(exc)
        ROLLOUT_ENGINE_ERRORS.labels(reason).inc()
        log.warning("engine call failed", reason=reason, tasks=len(batch), error=repr(exc))
        limit = self.settings.bus.max_deliveries
        for job in batch:
            failures = self._failures.pop(job.task.id, 0) + 1
            self._failures[job.task.id] = failures
            while len(self._failures) > FAILURES_KEPT:
                self._failures.popitem(last=False)
            if isinstance(exc, ValueError) or failures >= limit:
                self._settle(job.received.entry_id, "nack", f"engine ({reason}, {failures} failures here): {exc}")
            else:
                self._settle(job.received.entry_id, "requeue", reason)
        if not isinstance(exc, ValueError):  # the engine, not the task, is at fault: give it a moment
            self._stop_taking.wait(self.config.engine_retry_s)

    # --- scoring and publishing ----------------------------------------------------------------------------------
    def _scoring_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                group = score_group(job.task, job.row, job.prompt_ids, job.completions, self.rewards, self.node_id)
            except Exception as exc:  # a malformed sample or result: the task cannot be used as it is
                log.exception("building the group failed", task_id=job.task.id)
                self._settle(job.received.entry_id, "nack", f"group: {exc}")
                continue
            try:
                published = self.publisher.publish_result(group, job.received, self.consumer)
                self._touch_bus()
            except MessageError as exc:  # e.g. longer than bus.max_tokens: the learner could not take it either
                self._settle(job.received.entry_id, "nack", f"group.{exc}")
                continue
            except Exception:
                log.exception("publishing failed; releasing the task", task_id=job.task.id)
                self._settle(job.received.entry_id, "requeue", "publish failed")
                continue
            if not published:  # its lease expired while this node was slow or paused, and another node claimed it
                log.warning("result dropped: task claimed by another node", task_id=job.task.id)
            self._settle(job.received.entry_id, "forget", "published" if published else "claimed by another node")

    # --- settling tasks ------------------------------------------------------------------------------------------
    def _settle(self, entry_id: str, action: str, reason: str) -> None:
        """nack (dead-letter with `reason`), requeue, or forget (acked with its group, or held by another node now)
        a task in hand; a task already settled is left alone (e.g. released by a shutdown while its generation was
        still running)."""
        with self._lock:
            held = self._in_hand.pop(entry_id, None)
            if held is None:
                return
            received = held.received if isinstance(held, Job) else held
            try:
                if action == "forget":
                    self.consumer.forget(received)
                elif action == "nack":
                    self.consumer.nack(received, reason)
                elif self.consumer.requeue(received) is None:
                    action = "left to the node that claimed it"  # its lease expired here: requeued, it would run twice
                self._touch_bus()
            except Exception as exc:  # the bus is gone: the entry stays pending and its lease brings it back
                log.warning("could not settle a task", action=action, entry_id=entry_id, error=str(exc))
                return
        if action != "forget":
            log.info("task settled", action=action, entry_id=entry_id, reason=reason)

    def _release(self, entry_ids: list[str], reason: str) -> None:
        for entry_id in entry_ids:
            self._settle(entry_id, "requeue", reason)
