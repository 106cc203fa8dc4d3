"""`slipstream bench soak`: many trajectories through Redis into one process doing a learner's ingestion, vs raw Redis.

Producer PROCESSES (the Producer SDK: validated, encoded, pipelined, waiting while the stream is full) send groups to
the trajectories stream; one ingest PROCESS does with them what a learner rank does, minus the training step:
`MessageConsumer` (decode, validate, dedup) -> `GroupAssembler` -> `split_trained`/`drop_repeats` -> `Ledger.settle`
(acks, dedup marks and accounting counts in one MULTI per step of `groups_per_step` groups) -> `Ledger.scan_dead`.
The raw baseline moves the same number of equal-sized payloads with plain redis-py (pipelined XADD, XREADGROUP +
XACK), one producer and one consumer process, in the same run.

Besides throughput (and its ratio to raw) it reports what a soak must show: throughput held (last 10% against
first 10%), the RSS of every process over time (ingest, Redis, each producer), the stream's longest length against
`max_stream_length` (backpressure instead of Redis growing), the producers' backpressure wait, the length and pending
gauges against XLEN/XPENDING at every refresh and at the end (scraped from the ingest's /metrics), and how the
consumption was shared among producers over windows of consumed groups (fairness).

    slipstream bench soak --trajectories 1000000 --json
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import httpx
import numpy as np
import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench._report import print_report
from bus.codec import encode
from bus.config import BusConfig
from bus.consumer import MessageConsumer
from bus.dedup import RedisDedup
from bus.embedded import EmbeddedRedis
from bus.producer import Producer
from bus.schema import Group, Trajectory
from bus.transport import setup_transport
from learner_node.accounting import Ledger
from learner_node.groups import GroupAssembler, Unit, drop_repeats, split_trained
from telemetry.logs import configure_logging
from telemetry.metrics import REGISTRY
from telemetry.server import TelemetryServer

GROUP, CONSUMER = "learner", "learner-0"  # the learner's consumer group and rank-0 consumer names
PROMPT_TOKENS = 32
# Children are forked (fast to start, imports inherited); the parent starts no thread before the last fork.
_CTX = mp.get_context("fork")
MiB = 2**20


HELP = {
    "producers": "producer processes",
    "trajectories": "trajectories in all (a multiple of --group-size)",
    "group_size": "trajectories per group (one stream entry)",
    "tokens": "response tokens per trajectory (prompts have 32)",
    "max_stream_length": "bus.max_stream_length: producers wait while the stream holds this many groups",
    "publish_batch": "groups per publish (bus.publish_batch)",
    "consume_batch": "entries per poll (bus.consume_batch)",
    "groups_per_step": "groups settled per step (learner.groups_per_step)",
    "stats_interval_s": "how often the ingest refreshes and checks the length and pending gauges",
    "timeout_s": "give up waiting for a process after this long",
}


@dataclass
class SoakSpec:
    """One soak run (fields: `HELP`). Counts are trajectories; streams hold groups of `group_size` (one entry each)."""

    producers: int = 4
    trajectories: int = 50_000
    group_size: int = 8
    tokens: int = 16
    max_stream_length: int = 2_000
    publish_batch: int = 16
    consume_batch: int = 256
    groups_per_step: int = 8
    stats_interval_s: float = 0.5
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("producers", "trajectories", "group_size", "tokens", "max_stream_length", "publish_batch",
                     "consume_batch", "groups_per_step"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.group_size < 2:
            raise ValueError(f"group_size: must be >= 2 (a learner trains groups of 2 or more), got {self.group_size}")
        if self.trajectories % self.group_size:
            raise ValueError(f"trajectories: {self.trajectories} must be a multiple of group_size ({self.group_size})")

    @property
    def groups(self) -> int:
        return self.trajectories // self.group_size

    def share(self, producer: int) -> int:
        """Groups producer number `producer` sends (an even split; the first ones send the remainder)."""
        return self.groups // self.producers + (1 if producer < self.groups % self.producers else 0)

    @property
    def stream_bound(self) -> int:
        """The most entries the stream may hold: the limit plus one batch per producer appended before it saw it."""
        return self.max_stream_length + self.producers * self.publish_batch


def quarter_growth(samples: list[int]) -> int:
    """How much a series grew from its second quarter (warmed up) to its last: the maxima of both (0 below 4)."""
    if len(samples) < 4:
        return 0
    quarter = len(samples) // 4
    return max(samples[-quarter:]) - max(samples[quarter : 2 * quarter])


@dataclass
class SoakResult:
    """What a run measured (see the module docstring); `rss` maps a process to its samples (bytes, in order)."""

    spec: SoakSpec
    seconds: float = 0.0
    throughput: float = 0.0  # trajectories per second, first consumed to last settled
    throughput_first_10pct: float = 0.0
    throughput_last_10pct: float = 0.0
    consumed_by_producer: list[int] = field(default_factory=list)  # groups
    order: list[int] = field(default_factory=list)  # the producer of each consumed group, in consumption order
    sent_by_producer: list[int] = field(default_factory=list)  # groups
    backpressure_wait_s: float = 0.0
    longest_stream: int = 0
    # At each refresh: (length gauge, XLEN, entries producers appended from just before the refresh to that XLEN,
    # pending gauge, XPENDING), the gauges read right after being set.
    gauge_checks: list[tuple[float, int, int, float, int]] = field(default_factory=list)
    final_gauges: tuple[float, float] = (0.0, 0.0)  # (length, pending) scraped from the ingest's /metrics at the end
    final_redis: tuple[int, int] = (0, 0)  # (XLEN, XPENDING) at the same moment
    accounting: dict[str, int] = field(default_factory=dict)
    rss: dict[str, list[int]] = field(default_factory=dict)
    redis_memory: list[dict[str, int]] = field(default_factory=list)  # samples of `_redis_memory`
    settle_token_bytes: int = 0  # one settle token key (Ledger.settle writes one per step; they expire after a day)
    dedup_id_bytes: float = 0.0  # Redis memory per id of the dedup set
    raw_throughput: float | None = None

    @property
    def throughput_held(self) -> float:
        """Throughput over the last 10% of the trajectories divided by that over the first 10%."""
        return self.throughput_last_10pct / max(self.throughput_first_10pct, 1e-9)

    def growth(self, name: str) -> int:
        """How much `name`'s RSS grew (`quarter_growth`)."""
        return quarter_growth(self.rss[name])

    def redis_other_growth(self) -> int:
        """Growth of Redis's used memory from the second quarter of the samples to the last, besides the dedup set
        (it grows to its max_size ids by design) and the settle tokens (one key per step, expiring after a day)."""

        def other(sample: dict[str, int]) -> int:
            tokens = sample["keys"] * self.settle_token_bytes  # nearly every key is a token
            return int(sample["used_memory"] - sample["dedup_ids"] * self.dedup_id_bytes - tokens)

        return quarter_growth([other(s) for s in self.redis_memory])

    def window_shares(self, window: int) -> list[list[int]]:
        """Groups consumed per producer in consecutive windows of `window` consumed groups, counted while every
        producer still had groups to come (so each could have been served in each window)."""
        remaining = list(self.sent_by_producer)
        windows: list[list[int]] = []
        current = [0] * len(remaining)
        for producer in self.order:
            remaining[producer] -= 1
            current[producer] += 1
            if not remaining[producer]:
                break  # from here on not everyone competes
            if sum(current) == window:
                windows.append(current)
                current = [0] * len(remaining)
        return windows

    def summary(self) -> dict[str, Any]:
        """Flat figures for printing (no per-sample lists)."""
        rss_mib = {name: round(max(samples) / MiB, 1) for name, samples in self.rss.items() if samples}
        used = [s["used_memory"] for s in self.redis_memory] or [0]
        return {
            "trajectories": self.spec.trajectories,
            "producers": self.spec.producers,
            "seconds": round(self.seconds, 2),
            "trajectories_per_s": round(self.throughput, 1),
            "raw_trajectories_per_s": None if self.raw_throughput is None else round(self.raw_throughput, 1),
            "ratio": None if self.raw_throughput is None else round(self.throughput / self.raw_throughput, 3),
            "throughput_held": round(self.throughput_held, 3),
            "longest_stream": self.longest_stream,
            "stream_bound": self.spec.stream_bound,
            "backpressure_wait_s": round(self.backpressure_wait_s, 2),
            "ingest_rss_growth_mib": round(self.growth("ingest") / MiB, 1),
            "redis_rss_growth_mib": round(self.growth("redis") / MiB, 1) if self.rss.get("redis") else None,
            "max_producer_rss_growth_mib": round(
                max(self.growth(n) for n in self.rss if n.startswith("producer")) / MiB, 1
            ),
            "rss_max_mib": {k: v for k, v in rss_mib.items() if not k.startswith("producer-")},
            "redis_used_memory_mib": (round(used[0] / MiB, 1), round(max(used) / MiB, 1)),
            "redis_dedup_ids_max": max((s["dedup_ids"] for s in self.redis_memory), default=0),
            "redis_dedup_bytes_per_id": round(self.dedup_id_bytes, 1),
            "redis_stream_mib_max": round(max((s["stream"] for s in self.redis_memory), default=0) / MiB, 2),
            "redis_other_growth_mib": round(self.redis_other_growth() / MiB, 1),
            "accounting": self.accounting,
        }


# --- the processes ---------------------------------------------------------------------------------------------------
def _config(url: str, spec: SoakSpec) -> BusConfig:
    return BusConfig(
        url=url,
        max_stream_length=spec.max_stream_length,
        publish_batch=spec.publish_batch,
        consume_batch=spec.consume_batch,
        block_ms=100,
        stats_interval_s=spec.stats_interval_s,
        backpressure_timeout_s=spec.timeout_s,
    )


def _produce(url: str, spec: SoakSpec, index: int, ready: Queue, start: Event, report: Queue) -> None:
    """One producer: its share of the groups through the Producer SDK, a publish batch at a time; says `ready` once
    its groups are built and waits for `start`, so that all producers begin sending together."""
    transport = setup_transport(_config(url, spec))
    stream = transport.config.stream("trajectories")
    producer = Producer(transport, stream, f"producer-{index}")
    waited = _backpressure_wait(stream)  # forked: the counter starts where the parent's was
    rng = np.random.default_rng(index)
    prompt = rng.integers(0, 32_000, PROMPT_TOKENS, dtype=np.int32)
    response = rng.integers(0, 32_000, spec.tokens, dtype=np.int32)
    logprobs = -rng.random(spec.tokens, dtype=np.float32)
    groups = spec.share(index)

    def group() -> Group:
        members = [
            producer.trajectory(prompt_ids=prompt, response_ids=response, logprobs=logprobs, reward=j % 2)
            for j in range(spec.group_size)
        ]
        return producer.group(members)

    # Built before the start (the SDK validates each): what is measured and compared among producers is the sending.
    batches = [[group() for _ in range(min(spec.publish_batch, groups - first))]
               for first in range(0, groups, spec.publish_batch)]  # fmt: skip
    longest = 0
    ready.put({"index": index})
    start.wait()
    for batch in batches:
        producer.send_many(batch)
        longest = max(longest, transport.length(stream))
    report.put({"index": index, "groups": groups, "waited": _backpressure_wait(stream) - waited, "longest": longest})
    transport.close()


def _backpressure_wait(stream: str) -> float:
    labels = {"stream": stream}
    return REGISTRY.get_sample_value("slipstream_bus_backpressure_wait_seconds_total", labels) or 0.0


def _last_id(client: redis.Redis, stream: str) -> str:
    """The id of the newest entry the stream ever took (XINFO STREAM `last-generated-id`, Redis 6.2 as well)."""
    last = client.xinfo_stream(stream)["last-generated-id"]
    return last.decode() if isinstance(last, bytes) else str(last)


def _appended_since(client: redis.Redis, stream: str, last: str) -> int:
    """How many entries came after `last`: none of them is delivered, so none trimmed, while the ingest checks."""
    return len(client.xrange(stream, min=f"({last}"))


def _ingest(url: str, spec: SoakSpec, ready: Queue, report: Queue, finish: Event) -> None:
    """A learner rank's ingestion without the training step, until every group is settled; serves /metrics."""
    transport = setup_transport(_config(url, spec))
    stream = transport.config.stream("trajectories")
    dedup = RedisDedup(transport, f"{transport.config.prefix}dedup:learner")
    consumer = MessageConsumer(transport, stream, GROUP, CONSUMER, kinds=(Group, Trajectory), dedup=dedup)
    ledger = Ledger(transport, consumer, dedup)
    assembler = GroupAssembler(spec.group_size, 2, 30.0)
    telemetry = TelemetryServer().start()
    probe = redis.Redis.from_url(url)  # an independent view of what the gauges claim
    ready.put(telemetry.port)
    units: list[Unit] = []
    settled = 0
    timeline: list[tuple[float, int]] = []
    order: list[int] = []
    checks: list[tuple[float, int, int, float, int]] = []
    next_check = time.monotonic()
    while settled < spec.trajectories:
        # As the learner's loop: no waiting for new entries while a step's groups are at hand, one step per poll.
        received = consumer.poll(block_ms=0 if len(units) >= spec.groups_per_step else None)
        assembler.add(received)
        units += assembler.take()[0]
        if len(units) >= spec.groups_per_step or (units and not received):
            step, units = units[: spec.groups_per_step], units[spec.groups_per_step :]
            step, copies = split_trained(step, dedup.seen)
            step, repeats = drop_repeats(step)
            ledger.release(copies + repeats)
            settled += ledger.settle(step).get("trained", 0)
            ledger.scan_dead()
            timeline.append((time.monotonic(), settled))
            order += [int(u.received[0].message.producer.rpartition("-")[2]) for u in step]  # type: ignore[union-attr]
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + spec.stats_interval_s
            last = _last_id(probe, stream)
            consumer.refresh_stats()
            length, pending = _gauges(stream)
            xlen = probe.xlen(stream)
            appended = _appended_since(probe, stream, last)  # what producers added from before the refresh
            checks.append((length, xlen, appended, pending, int(probe.xpending(stream, GROUP)["pending"])))
    consumer.refresh_stats()
    report.put({"timeline": timeline, "order": order, "checks": checks})
    finish.wait(spec.timeout_s)
    telemetry.stop()
    transport.close()


def _gauges(stream: str) -> tuple[float, float]:
    length = REGISTRY.get_sample_value("slipstream_bus_stream_length", {"stream": stream}) or 0.0
    pending = REGISTRY.get_sample_value("slipstream_bus_pending_messages", {"stream": stream, "group": GROUP}) or 0.0
    return length, pending


class RssSampler:
    """Samples the resident set size (bytes) of processes every `interval_s` in a daemon thread until `stop()`, and
    with each round the figures `extra()` returns, if given (kept in `extras`)."""

    def __init__(
        self, pids: dict[str, int], interval_s: float = 0.25, extra: Callable[[], dict[str, int]] | None = None
    ) -> None:
        self.rss: dict[str, list[int]] = {name: [] for name in pids}
        self.extras: list[dict[str, int]] = []
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._extra, self._interval_s = extra, interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            for name, proc in self._procs.items():
                with contextlib.suppress(psutil.Error):  # it exited: whoever waits on it says so
                    self.rss[name].append(proc.memory_info().rss)
            if self._extra is not None:
                self.extras.append(self._extra())
            self._done.wait(self._interval_s)

    def stop(self) -> dict[str, list[int]]:
        """Stop sampling; returns the RSS samples by process."""
        self._done.set()
        self._thread.join(timeout=10)
        return self.rss


def _redis_memory(client: redis.Redis, stream: str, dedup_key: str) -> Callable[[], dict[str, int]]:
    """What Redis holds, cheaply: used_memory, its keys (DBSIZE), the dedup set's ids (ZCARD), the stream's bytes."""

    def sample() -> dict[str, int]:
        pipe = client.pipeline(transaction=False)
        pipe.info("memory")
        pipe.dbsize()
        pipe.zcard(dedup_key)
        pipe.memory_usage(stream)
        info, keys, ids, stream_bytes = pipe.execute()
        return {"used_memory": int(info["used_memory"]), "keys": keys, "dedup_ids": ids, "stream": stream_bytes or 0}

    return sample


def run_soak(url: str, spec: SoakSpec, redis_pid: int | None = None) -> SoakResult:
    """One soak on the Redis at `url` (its slipstream:* keys are used; start from an empty one)."""
    result = SoakResult(spec)
    ready, report, done, producers_ready = _CTX.Queue(), _CTX.Queue(), _CTX.Queue(), _CTX.Queue()
    start, finish = _CTX.Event(), _CTX.Event()
    ingest = _CTX.Process(target=_ingest, args=(url, spec, ready, report, finish), daemon=True)
    ingest.start()
    port = ready.get(timeout=60)
    producers = [
        _CTX.Process(target=_produce, args=(url, spec, i, producers_ready, start, done), daemon=True)
        for i in range(spec.producers)
    ]
    for process in producers:
        process.start()
    client = redis.Redis.from_url(url)
    config = _config(url, spec)
    pids = {"ingest": ingest.pid} | {f"producer-{i}": p.pid for i, p in enumerate(producers)}
    if redis_pid is not None:
        pids["redis"] = redis_pid
    stream, dedup_key = config.stream("trajectories"), f"{config.prefix}dedup:learner"
    sampler = RssSampler(pids, extra=_redis_memory(client, stream, dedup_key))
    everyone = [ingest, *producers]
    try:
        # 64 processes take seconds to connect and build their groups on two cores: the first ready must not start
        # ahead of the others, or it is served ahead of them (the fairness windows measure the bus, not the start).
        _receive(producers_ready, len(producers), everyone, spec.timeout_s)
        started = time.monotonic()
        start.set()
        sent = sorted(_receive(done, len(producers), everyone, spec.timeout_s), key=lambda r: r["index"])
        [ingested] = _receive(report, 1, everyone, spec.timeout_s)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        result.final_gauges = _scraped(metrics, stream)
        result.final_redis = (client.xlen(stream), int(client.xpending(stream, GROUP)["pending"]))
    finally:
        sampler.stop()
        finish.set()
        for process in [ingest, *producers]:
            process.join(10)
            if process.is_alive():
                process.kill()
    timeline = ingested["timeline"]
    result.seconds = timeline[-1][0] - started
    result.throughput = spec.trajectories / max(result.seconds, 1e-9)
    result.throughput_first_10pct, result.throughput_last_10pct = _rate(timeline, 0.0, 0.1), _rate(timeline, 0.9, 1.0)
    result.order, result.gauge_checks = ingested["order"], [tuple(c) for c in ingested["checks"]]  # type: ignore[misc]
    result.sent_by_producer = [r["groups"] for r in sent]
    result.consumed_by_producer = np.bincount(result.order, minlength=spec.producers).tolist()
    result.backpressure_wait_s = sum(r["waited"] for r in sent)
    result.longest_stream = max(r["longest"] for r in sent)
    result.accounting = {k.decode(): int(v) for k, v in client.hgetall(f"{config.prefix}accounting").items()}
    result.rss, result.redis_memory = sampler.rss, sampler.extras
    token = next(client.scan_iter(f"{config.prefix}accounting:settled:*", count=1000), None)
    result.settle_token_bytes = int(client.memory_usage(token) or 0) if token else 0
    ids = int(client.zcard(dedup_key))  # measured once exactly (SAMPLES 0 walks the whole set)
    result.dedup_id_bytes = int(client.memory_usage(dedup_key, samples=0) or 0) / max(ids, 1)
    client.close()
    return result


def _receive(reports: Queue, count: int, processes: list[BaseProcess], timeout_s: float) -> list[dict[str, Any]]:
    """`count` reports from `reports`; raises as soon as one of `processes` died (failed) or after `timeout_s`."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:
        try:
            out.append(reports.get(timeout=0.5))
        except queue.Empty:
            failed = [p for p in processes if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"soak process {failed[0].name} failed (exit code {failed[0].exitcode})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"soak: {count - len(out)} reports missing after {timeout_s}s") from None
    return out


def _scraped(text: str, stream: str) -> tuple[float, float]:
    """(stream length, pending) gauges of `stream` in a /metrics text."""
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("stream") == stream and s.labels.get("group", GROUP) == GROUP
    }
    return values["slipstream_bus_stream_length"], values["slipstream_bus_pending_messages"]


def _rate(timeline: list[tuple[float, int]], low: float, high: float) -> float:
    """Trajectories per second between the moments the settled count passed `low` and `high` of the total."""
    total = timeline[-1][1]
    times = [t for t, n in timeline]
    counts = [n for t, n in timeline]
    begin = int(np.searchsorted(counts, low * total, side="right"))
    end = int(np.searchsorted(counts, high * total, side="left"))
    begin, end = min(begin, len(timeline) - 1), min(end, len(timeline) - 1)
    if end <= begin:
        return 0.0
    return (counts[end] - counts[begin]) / max(times[end] - times[begin], 1e-9)


# --- the raw baseline ------------------------------------------------------------------------------------------------
def _raw_produce(url: str, payload: bytes, entries: int, batch: int, start: Event) -> None:
    client = redis.Redis.from_url(url)
    start.wait()
    for first in range(0, entries, batch):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, entries - first)):
            pipe.xadd("raw:trajectories", {"data": payload})
        pipe.execute()


def _raw_consume(url: str, entries: int, batch: int, ready: Event, done: Queue) -> None:
    client = redis.Redis.from_url(url)
    client.xgroup_create("raw:trajectories", "raw", id="0", mkstream=True)
    ready.set()
    got = 0
    while got < entries:
        response = client.xreadgroup("raw", "c", {"raw:trajectories": ">"}, count=batch, block=1000)
        ids = [entry_id for entry_id, _ in response[0][1]] if response else []
        if ids:
            client.xack("raw:trajectories", "raw", *ids)
            got += len(ids)
    done.put(time.monotonic())


def group_payload(spec: SoakSpec) -> bytes:
    """The wire bytes of one group the size of the producers' (`spec.group_size` members of `spec.tokens` tokens)."""
    rng = np.random.default_rng(0)
    members = [
        Trajectory(
            id=f"raw-{j}",
            group_id="raw",
            producer="raw",
            prompt_ids=rng.integers(0, 32_000, PROMPT_TOKENS, dtype=np.int32),
            response_ids=rng.integers(0, 32_000, spec.tokens, dtype=np.int32),
            behavior_logprobs=-rng.random(spec.tokens, dtype=np.float32),
        )
        for j in range(spec.group_size)
    ]
    return encode(Group(id="raw", producer="raw", trajectories=members))


def raw_throughput(url: str, spec: SoakSpec) -> float:
    """Trajectories per second that plain redis-py moves as groups of the same size, one producer, one consumer."""
    payload = group_payload(spec)
    ready, start, done = _CTX.Event(), _CTX.Event(), _CTX.Queue()
    consumer = _CTX.Process(target=_raw_consume, args=(url, spec.groups, spec.consume_batch, ready, done), daemon=True)
    producer = _CTX.Process(
        target=_raw_produce, args=(url, payload, spec.groups, spec.publish_batch, start), daemon=True
    )
    consumer.start()
    producer.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("raw consumer did not get ready in 60 s")
        began = time.monotonic()
        start.set()
        seconds = done.get(timeout=spec.timeout_s) - began
    finally:
        for process in (producer, consumer):
            process.join(10)
            if process.is_alive():
                process.kill()
    redis.Redis.from_url(url).delete("raw:trajectories")
    return spec.trajectories / seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slipstream bench soak", description=__doc__.splitlines()[0])
    defaults = SoakSpec()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=HELP[name])
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        spec = SoakSpec(**{name: getattr(args, name) for name in asdict(defaults)})
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging("json", "warning", node_id="bench-soak")
    with contextlib.redirect_stdout(sys.stderr), EmbeddedRedis() as server:
        assert server.process is not None
        result = run_soak(server.url, spec, server.process.pid)
        result.raw_throughput = raw_throughput(server.url, spec)
    figures = result.summary()
    print_report(figures, args.json, key_width=30)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
