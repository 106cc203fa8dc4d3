"""The rollout node: tasks from the bus -> engine -> rewards -> one `Group` per task on the trajectories stream.

    node = RolloutNode(settings)     # settings: rollout_node.config.RolloutSettings
    node.start()                     # engine, bus, Join, threads, telemetry (and the agent proxy if configured)
    node.serve()                     # until request_stop() (SIGTERM/SIGINT under run_node)
    node.shutdown()                  # finish or release the tasks in hand, Leave

Threads and their jobs:

- generation workers (`rollout.generation_workers`): take up to `tasks_per_call` tasks from the `rollout` consumer
  group on the tasks stream (consumer = node id, so a restarted node re-reads its own pending tasks; expired leases
  of dead nodes are claimed by the consumer), wait (bounded) for the engine to reach the tasks' `min_version`,
  generate n samples per task (one engine call per sampling setting; with a multi-turn environment, n episodes
  through `envs.run_episode`), and hand the tasks to a bounded queue.
- scorer: scores each task's samples with the task's rewards, publishes ONE Group (group id = task id, trajectory
  ids `<task id>:<sample index>`), then acks the task. Ack after publish is at-least-once: a task redelivered after
  its group went out yields the same ids, and the learner drops the copy.
- weights (torch engine): a `WeightReceiver` in the learner's broadcast group; each update is staged and swapped
  between decode steps, so generation in flight records the switch in its samples' version_ranges.
- heartbeat: Join on start, Heartbeat every `heartbeat_interval_s`, Leave on exit (control stream).

A failed engine call is counted (ROLLOUT_ENGINE_ERRORS) and its tasks requeued; a task the engine rejects as
invalid, or that failed `bus.max_deliveries` times on this node, is dead-lettered. The node itself never dies of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from bus.codec import MAX_NAME_CHARS, encode
from bus.consumer import MessageConsumer, Received
from bus.schema import Group, Heartbeat, Join, Leave, MessageError, NodeEvent, Task, Trajectory
from bus.transport import Transport, setup_transport
from bus.transport.redis_streams import RedisTransport
from envs import PolicyTurn, PromptRow, RewardSet, make_environment, render_prompt, run_episode
from envs.render import uses_chat_template
from rollout_node.config import RolloutSettings
from rollout_node.engines.base import Engine, Sample, VersionRange
from rollout_node.engines.torch_engine import version_ranges
from telemetry.logs import set_policy_version
from telemetry.metrics import (
    ROLLOUT_ENGINE_ERRORS,
    ROLLOUT_GENERATION_DURATION,
    ROLLOUT_HEARTBEATS_SENT,
    ROLLOUT_POLICY_VERSION,
    ROLLOUT_REWARD,
    ROLLOUT_REWARD_ERRORS,
    ROLLOUT_SAMPLES_GENERATED,
    ROLLOUT_TASKS_CONSUMED,
    ROLLOUT_TOKENS_GENERATED,
    TRAJECTORIES_PUBLISHED,
)
from telemetry.node import start_node_telemetry

log = structlog.get_logger(__name__)

POLL_BLOCK_MS = 250  # a poll holds the consumer lock this long at most, so acks from the scorer are not held up
VERSION_POLL_S = 0.05  # how often a task waiting for its min_version looks at the engine's version
FAILURES_KEPT = 10_000  # task ids whose engine failures on this node are remembered
CLOSE_JOIN_S = 2.0  # at shutdown, how long background threads (weights, heartbeat) get to notice and end


class Publisher:
    """Puts groups and trajectories on the trajectories stream and counts what went out: TRAJECTORIES_PUBLISHED and,
    on Redis, HINCRBY `<prefix>accounting` `published` by the number of trajectories (docs/rollout.md, accounting).

    The count follows the XADD in a second round trip: a crash in between leaves trajectories published but not
    counted, which shows as trained + dropped exceeding published. Thread-safe (the transport is)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.stream = transport.config.stream("trajectories")
        self.accounting_key = transport.config.prefix + "accounting"

    def publish(self, messages: Sequence[Group | Trajectory]) -> list[str]:
        """Validate and encode every message (a `MessageError` names the field; nothing is sent then), publish them
        in one round trip (waiting while the stream is full) and count their trajectories. Returns the entry ids."""
        limits = self.transport.config.limits()
        payloads = [encode(m, limits=limits) for m in messages]
        entry_ids = self.transport.publish(self.stream, payloads)
        count = sum(len(m.trajectories) if isinstance(m, Group) else 1 for m in messages)
        transport = self.transport
        if isinstance(transport, RedisTransport):
            transport.retrying(lambda: transport.client.hincrby(self.accounting_key, "published", count))
        TRAJECTORIES_PUBLISHED.inc(count)
        return entry_ids


@dataclass(frozen=True)
class Completion:
    """One sample in trajectory form. response_ids [T], logprobs [T] (behaviour policy, 0.0 on environment tokens),
    loss_mask [T] (0 on environment tokens) or None (all 1); version_ranges cover [0, T) in order."""

    response_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int] | None
    version_ranges: list[VersionRange]
    text: str
    finish_reason: str

    @classmethod
    def of(cls, sample: Sample) -> Completion:
        return cls(
            sample.response_ids,
            sample.behavior_logprobs,
            None,
            sample.version_ranges,
            sample.text,
            sample.finish_reason,
        )

    @property
    def aborted(self) -> bool:
        """Cut short by `Engine.abort` (shutdown, or the engine dropped it): the task is run again, not published."""
        return self.finish_reason == "abort" or not self.response_ids


@dataclass
class Job:
    """A task in hand: its bus entry, the prompt as token ids [P], the row its rewards read, and its samples."""

    received: Received
    task: Task
    prompt_ids: list[int]
    row: PromptRow
    completions: list[Completion] = field(default_factory=list)


def trajectory_id(task_id: str, index: int) -> str:
    """`<task id>:<index>`, the same for every delivery of a task (a sha256 of the task id when that is too long)."""
    suffix = f":{index}"
    if len(task_id) + len(suffix) > MAX_NAME_CHARS:
        task_id = hashlib.sha256(task_id.encode()).hexdigest()
    return task_id + suffix


def episode_versions(loss_mask: Sequence[int], turns: Sequence[Sample]) -> list[VersionRange]:
    """Version ranges of an episode's response: policy tokens (loss_mask 1) take their turn's versions in order,
    environment tokens the version of the policy token before them."""
    policy_versions = [v for turn in turns for start, end, v in turn.version_ranges for _ in range(start, end)]
    versions, taken = [], 0
    for mask in loss_mask:
        if mask:
            versions.append(policy_versions[taken])
            taken += 1
        else:
            versions.append(versions[-1] if versions else policy_versions[0])
    return version_ranges(versions)


def error_reason(exc: BaseException) -> str:
    """A low-cardinality label for ROLLOUT_ENGINE_ERRORS: the engine's own `reason` (the SGLang client's timeout,
    unreachable, http, protocol) or one read from the exception's type."""
    if isinstance(exc, ValueError):
        return "invalid"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason.isidentifier() and len(reason) <= 32:
        return reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, ConnectionError):
        return "unreachable"
    return "error"


def build_engine(settings: RolloutSettings) -> Engine:
    """The engine `rollout.engine` names (imported only now: torch or the SGLang client)."""
    if settings.rollout.engine == "torch":
        from rollout_node.engines.torch_engine import TorchEngine

        return TorchEngine.from_config(settings.torch_engine_config())
    from rollout_node.engines.sglang import SGLangEngine

    return SGLangEngine.from_config(settings.sglang_config())


def load_tokenizer(engine: Engine, model_path: str) -> Any:
    """The engine's tokenizer when it has one, else the checkpoint's (local files only)."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, local_files_only=True)


class RolloutNode:
    """One rollout node (see the module docstring). `engine`/`tokenizer` may be given (tests, embedding)."""

    def __init__(self, settings: RolloutSettings, engine: Engine | None = None, tokenizer: Any = None) -> None:
        self.settings, self.config = settings, settings.rollout
        self.node_id = self.config.resolved_node_id()
        self.engine, self.tokenizer = engine, tokenizer
        self.rewards = RewardSet.from_config(settings.task)  # a wrong reward path fails here, before anything runs
        self._stop = threading.Event()  # serve() returns
        self._stop_taking = threading.Event()  # workers take no more tasks
        self._closing = threading.Event()  # background threads (weights, heartbeat) end
        self._updating = threading.Event()  # a weight update is being loaded (the proxy answers 503 meanwhile)
        self._lock = threading.Lock()  # the consumer (not thread-safe) and the tasks in hand
        self._in_hand: dict[str, Job | Received] = {}  # entry id -> what this node holds
        self._failures: OrderedDict[str, int] = OrderedDict()  # task id -> engine failures here
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=self.config.queue_size)
        self._workers: list[threading.Thread] = []
        self._scorer: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._bus_contact = 0.0  # monotonic time of the last successful bus call
        self._version = 0  # the engine's version when last looked at
        self._telemetry: Any = None
        self._proxy: Any = None
        self.transport: Transport | None = None
        self.publisher: Publisher  # set by start(), with the consumer
        self.consumer: MessageConsumer

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> RolloutNode:
        """Serve telemetry, load the engine, join the bus, announce, start every thread. Returns self."""
        self._telemetry = start_node_telemetry(
            self.settings.telemetry, role="rollout", node_id=self.node_id, readiness=self.readiness
        )
        log.info("rollout node starting", engine=self.config.engine, telemetry_port=self._telemetry.port)
        if self.engine is None:
            self.engine = build_engine(self.settings)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.engine, self.settings.model.path)
        self._note_version(self.engine.version)
        bus = self.settings.bus
        self.transport = setup_transport(bus)
        self.publisher = Publisher(self.transport)
        self.consumer = MessageConsumer(self.transport, bus.stream("tasks"), "rollout", self.node_id, kinds=(Task,))
        self._touch_bus()
        if self.config.proxy_port is not None:
            self._start_proxy()
        self._announce(self._join())
        if self.config.engine == "torch" and self.config.receive_weights:
            self._spawn(self._receive_weights, "weights")
        self._spawn(self._heartbeats, "heartbeat")
        self._scorer = self._spawn(self._scoring_loop, "scorer")
        for i in range(self.config.generation_workers):
            self._workers.append(self._spawn(self._generation_loop, f"generation-{i}"))
        log.info("rollout node started", node_id=self.node_id, version=self.engine.version)
        return self

    def serve(self) -> None:
        """Block until `request_stop()`."""
        while not self._stop.wait(1.0):
            pass

    def request_stop(self) -> None:
        """Stop taking tasks and let `serve` return (safe from a signal handler)."""
        self._stop_taking.set()
        self._stop.set()

    def shutdown(self) -> None:
        """Finish the tasks in hand within `shutdown_timeout_s`, abort and requeue the rest, publish Leave, close.
        Also cleans up after a `start` that failed half-way."""
        self.request_stop()
        if self._proxy is not None:
            self._proxy.stop()
        left = self._settle_in_hand() if self.transport is not None else []
        if self.transport is not None:
            self._announce(Leave(self.node_id, "rollout", self._version_now()))
        self._closing.set()
        for thread in self._threads:
            thread.join(timeout=CLOSE_JOIN_S)
        if self.engine is not None:
            self.engine.close()
        if self.transport is not None:
            self.transport.close()
        if self._telemetry is not None:
            self._telemetry.stop()
        log.info("rollout node stopped", released=len(left))

    def _settle_in_hand(self) -> list[str]:
        """Let generation end (aborting it after `shutdown_timeout_s`), publish what was generated, requeue the
        rest; returns the entry ids requeued."""
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in self._workers) and self.engine is not None:
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

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the engine is loaded, the bus answered recently and the node is not stopping."""
        fresh_s = 2 * self.config.heartbeat_interval_s + self.settings.bus.socket_timeout_s
        bus_ok = time.monotonic() - self._bus_contact < fresh_s
        details = {
            "engine": "loaded" if self.engine is not None else "loading",
            "bus": "ok" if bus_ok else "unreachable",
            "stopping": self._stop_taking.is_set(),
            "tasks_in_hand": len(self._in_hand),
        }
        return self.engine is not None and bus_ok and not self._stop_taking.is_set(), details

    def updating(self) -> bool:
        """Whether new weights are being loaded into the engine right now."""
        return self._updating.is_set()

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
        with self._lock:
            if self._stop_taking.is_set():
                return []
            block_ms = min(self.settings.bus.block_ms, POLL_BLOCK_MS)
            received = self.consumer.poll(count=self.config.tasks_per_call, block_ms=block_ms)
            self._touch_bus()
            for r in received:
                self._in_hand[r.entry_id] = r
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
        if isinstance(task.prompt, str):
            text = render_prompt(task.prompt, fmt, self.tokenizer)
            templated = uses_chat_template(fmt, self.tokenizer)  # the template holds its special tokens already
            prompt_ids = list(self.tokenizer.encode(text, add_special_tokens=not templated))
            row_prompt = task.prompt
        else:
            prompt_ids = [int(t) for t in task.prompt]
            row_prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        if not prompt_ids:
            raise ValueError("renders to no tokens")
        job = Job(received, task, prompt_ids, PromptRow(task.id, row_prompt, dict(task.meta)))
        with self._lock:
            if received.entry_id in self._in_hand:
                self._in_hand[received.entry_id] = job
        return job

    def _wait_for_version(self, jobs: list[Job]) -> bool:
        """Wait up to `min_version_wait_s` for the engine to reach the jobs' highest min_version, then go on anyway.
        False when the node began stopping while waiting (the jobs are released then, not run)."""
        assert self.engine is not None
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
        assert self.engine is not None
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
        assert self.engine is not None
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
                group = self._group(job)
            except Exception as exc:  # a malformed sample or result: the task cannot be used as it is
                log.exception("building the group failed", task_id=job.task.id)
                self._settle(job.received.entry_id, "nack", f"group: {exc}")
                continue
            try:
                self.publisher.publish([group])
                self._touch_bus()
            except MessageError as exc:  # e.g. longer than bus.max_tokens: the learner could not take it either
                self._settle(job.received.entry_id, "nack", f"group.{exc}")
                continue
            except Exception:
                log.exception("publishing failed; releasing the task", task_id=job.task.id)
                self._settle(job.received.entry_id, "requeue", "publish failed")
                continue
            self._settle(job.received.entry_id, "ack", "published")

    def _group(self, job: Job) -> Group:
        """Score the job's completions and build its Group (metrics counted here)."""
        task, completions = job.task, job.completions
        result = self.rewards.score(
            [c.text for c in completions], [job.row] * len(completions), [c.response_ids for c in completions]
        )
        for label, failed in result.errors.items():
            if failed:
                ROLLOUT_REWARD_ERRORS.labels(label).inc()
        prompt_ids = np.asarray(job.prompt_ids, dtype=np.int32)
        trajectories = []
        for i, c in enumerate(completions):
            trajectories.append(
                Trajectory(
                    id=trajectory_id(task.id, i),
                    group_id=task.id,
                    producer=self.node_id,
                    prompt_ids=prompt_ids,
                    response_ids=np.asarray(c.response_ids, dtype=np.int32),
                    behavior_logprobs=np.asarray(c.logprobs, dtype=np.float32),
                    loss_mask=None if c.loss_mask is None else np.asarray(c.loss_mask, dtype=np.uint8),
                    reward=result.total[i],
                    rewards={label: scores[i] for label, scores in result.named.items()},
                    policy_version=c.version_ranges[0][2],
                    version_ranges=c.version_ranges if len(c.version_ranges) > 1 else None,
                    finish_reason=c.finish_reason,
                )
            )
            ROLLOUT_REWARD.observe(result.total[i])
            ROLLOUT_TOKENS_GENERATED.inc(sum(c.loss_mask) if c.loss_mask is not None else len(c.response_ids))
        ROLLOUT_SAMPLES_GENERATED.inc(len(trajectories))
        return Group(id=task.id, producer=self.node_id, trajectories=trajectories, task_id=task.id)

    # --- settling tasks ------------------------------------------------------------------------------------------
    def _settle(self, entry_id: str, action: str, reason: str) -> None:
        """ack, nack (dead-letter with `reason`) or requeue a task in hand; a task already settled is left alone
        (e.g. released by a shutdown while its generation was still running)."""
        with self._lock:
            held = self._in_hand.pop(entry_id, None)
            if held is None:
                return
            received = held.received if isinstance(held, Job) else held
            try:
                if action == "ack":
                    self.consumer.ack(received)
                elif action == "nack":
                    self.consumer.nack(received, reason)
                else:
                    self.consumer.requeue(received)
                self._touch_bus()
            except Exception as exc:  # the bus is gone: the entry stays pending and its lease brings it back
                log.warning("could not settle a task", action=action, entry_id=entry_id, error=str(exc))
                return
        if action != "ack":
            log.info("task " + ("dead-lettered" if action == "nack" else "requeued"), entry_id=entry_id, reason=reason)

    def _release(self, entry_ids: list[str], reason: str) -> None:
        for entry_id in entry_ids:
            self._settle(entry_id, "requeue", reason)

    # --- weights, heartbeats, proxy ------------------------------------------------------------------------------
    def _receive_weights(self) -> None:
        """Join the learner's broadcast group (retrying until it is there) and load every update it sends."""
        from weight_broadcast.receiver import WeightReceiver

        config = self.settings.weights
        if config.name is None:
            config = config.model_copy(update={"name": self.node_id})
        receiver = WeightReceiver(config, load=self._load_weights)
        while not self._closing.is_set():
            try:
                receiver.connect()
                break
            except Exception as exc:
                log.warning("learner's weight broadcast unreachable; retrying", error=str(exc))
                self._closing.wait(1.0)
        else:
            return
        receiver.run(self._closing, poll_s=0.5)
        receiver.close()

    def _load_weights(self, named_tensors: list[Any], version: int) -> None:
        """The receiver's load: the engine stages the tensors and swaps them in between decode steps."""
        assert self.engine is not None
        self._updating.set()
        try:
            self.engine.load_weights(named_tensors, version)
        finally:
            self._updating.clear()
        self._note_version(version)

    def _heartbeats(self) -> None:
        while not self._closing.wait(self.config.heartbeat_interval_s):
            version = self._version_now()
            self._note_version(version)
            if self._announce(Heartbeat(self.node_id, "rollout", version)):
                ROLLOUT_HEARTBEATS_SENT.inc()

    def _join(self) -> Join:
        assert self.engine is not None
        address = self.config.engine_url or getattr(self.engine, "url", None)
        meta: dict[str, Any] = {"engine": self.config.engine, "n_ranks": int(getattr(self.engine, "n_ranks", 1))}
        if self._proxy is not None:
            meta["proxy"] = self._proxy.url
        return Join(self.node_id, "rollout", self.engine.version, meta=meta, address=address)

    def _announce(self, event: NodeEvent) -> bool:
        """Publish a node event on the control stream; a bus failure is logged, never raised."""
        assert self.transport is not None
        bus = self.settings.bus
        try:
            self.transport.publish(bus.stream("control"), [encode(event)], retain=bus.control_retain)
        except Exception as exc:
            log.warning("control message not sent", kind=type(event).__name__, error=str(exc))
            return False
        self._touch_bus()
        return True

    def _start_proxy(self) -> None:
        from rollout_node.proxy import AgentProxy

        assert self.engine is not None
        model_name = Path(self.settings.model.path).name or "slipstream"
        producer = f"{self.node_id}:proxy"
        self._proxy = AgentProxy(
            self.config, self.engine, self.tokenizer, self.publisher.publish, self.updating, producer, model_name
        ).start()

    # --- helpers -------------------------------------------------------------------------------------------------
    def _spawn(self, target: Any, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _touch_bus(self) -> None:
        self._bus_contact = time.monotonic()

    def _version_now(self) -> int:
        try:
            return self.engine.version if self.engine is not None else self._version
        except Exception:  # a remote engine that does not answer: report the last version seen
            return self._version

    def _note_version(self, version: int) -> None:
        self._version = version
        ROLLOUT_POLICY_VERSION.set(version)
        set_policy_version(version)


def run_node(settings: RolloutSettings) -> int:
    """`slipstream rollout`: start, serve until SIGTERM/SIGINT, shut down cleanly; returns the exit status (0).
    A second signal aborts the generation in flight at once (its tasks are requeued)."""
    node = RolloutNode(settings)
    signals = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal signals
        signals += 1
        log.info("signal received, stopping", signal=signal.Signals(signum).name)
        node.request_stop()
        if signals > 1 and node.engine is not None:
            node.engine.abort()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        node.start()
    except Exception:
        log.exception("rollout node failed to start")
        node.shutdown()
        return 1
    node.serve()
    node.shutdown()
    return 0
