"""Load and soak through a real redis-server: producer processes (each with the Producer SDK) into one process that
runs a learner's ingestion path without the training step (`bench.soak`: MessageConsumer + GroupAssembler +
Ledger.settle + scan_dead, as learner_node does them; the learner has no train-less mode to run instead).

- 50,000 trajectories (1,000,000 in the slow variant) from 4 producers: every trajectory is consumed and counted
  once; backpressure engages (producers wait, the stream never holds more than max_stream_length plus one batch per
  producer, its memory stays bounded); the RSS of the ingest process and of every producer stays flat, and so does
  Redis's memory besides the dedup set and the settle tokens (both bounded by design); the length and pending gauges
  agree with XLEN and XPENDING at every refresh and, scraped from /metrics, at the end. Throughput and how well it
  holds are recorded (`record_property`) and measured by `slipstream bench soak`, not asserted.
- 64 producer processes (simulated agents) competing for a small stream: none starves (every group consumed), and
  over consecutive windows of consumed groups, taken once the stream first filled and while every producer still had
  groups to send, each one's share stays within a bound of the fair share.

Redis runs with production durability (appendfsync everysec): the shared `redis_server` fixture fsyncs before every
reply, for crash tests, which would make these measure the disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import bench.soak as soak_bench
from bench.soak import MiB, SoakResult, SoakSpec, group_payload, run_soak
from bus.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server

RSS_FLAT = 32 * MiB  # growth allowed from the second quarter of a run to its last (allocator noise, warm caches)
PRODUCERS = 64
GROUPS_EACH = 384
WINDOW = 32 * PRODUCERS  # consumed groups per fairness window: a fair share of 32 each


def need_redis_server(require_service: Callable[[bool, str], None]) -> None:
    """Skip without a redis-server binary (fail under CI=true)."""
    try:
        find_redis_server()
    except EmbeddedRedisError as exc:
        require_service(False, str(exc))


@pytest.fixture
def bus_redis(tmp_path: Path, require_service: Callable[[bool, str], None]) -> Iterator[EmbeddedRedis]:
    """A real redis-server on a free port, appendfsync everysec."""
    need_redis_server(require_service)
    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        yield server


def assert_soak_held(result: SoakResult) -> None:
    spec = result.spec
    assert result.accounting == {"trained": spec.trajectories}
    assert result.consumed_by_producer == result.sent_by_producer  # every group consumed once, none lost

    assert result.backpressure_wait_s > 0, "the producers never waited: backpressure was not exercised"
    assert result.longest_stream <= spec.stream_bound
    # What the bound of entries can take in Redis (twice their wire bytes: the stream's own overhead is far less).
    stream_bytes = max(s["stream"] for s in result.redis_memory)
    assert stream_bytes <= 2 * spec.stream_bound * len(group_payload(spec)), f"the stream took {stream_bytes} bytes"

    for name in result.rss.keys() - {"redis"}:
        assert result.growth(name) < RSS_FLAT, f"{name}: RSS grew {result.growth(name) / MiB:.1f} MiB"
    # Redis's own RSS grows with the dedup set (to its max_size ids) and the settle tokens (a day's worth) by design.
    assert result.redis_other_growth() < RSS_FLAT, f"Redis grew {result.redis_other_growth() / MiB:.1f} MiB"

    # The gauges were read in the ingest process right after each refresh, then XLEN/XPENDING. Only that process
    # delivers and acks (pending is exact, nothing more is trimmable), while producers append in between: at most the
    # entries after the newest one just before the refresh (a loaded machine can deschedule the ingest for many
    # batches, so a bound of one batch per producer failed in CI).
    assert result.gauge_checks and any(pending for *_, pending, _ in result.gauge_checks)
    for length, xlen, appended, pending, xpending in result.gauge_checks:
        assert pending == xpending
        assert 0 <= xlen - length <= appended
    assert result.final_gauges == result.final_redis == (0, 0)


def record(result: SoakResult, record_property: Callable[[str, object], None]) -> None:
    for key, value in result.summary().items():
        record_property(key, value)


@pytest.mark.timeout(180)
def test_50k_trajectories_flow_with_backpressure_flat_memory_and_honest_gauges(
    bus_redis: EmbeddedRedis, record_property: Callable[[str, object], None]
) -> None:
    spec = SoakSpec(producers=4, trajectories=50_000, max_stream_length=1_000, stats_interval_s=0.25, timeout_s=150)
    result = run_soak(bus_redis.url, spec, bus_redis.process.pid)
    record(result, record_property)
    assert_soak_held(result)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_1m_trajectories_flow_with_backpressure_flat_memory_and_honest_gauges(
    bus_redis: EmbeddedRedis, record_property: Callable[[str, object], None]
) -> None:
    spec = SoakSpec(producers=4, trajectories=1_000_000, max_stream_length=2_000, timeout_s=1500)
    result = run_soak(bus_redis.url, spec, bus_redis.process.pid)
    record(result, record_property)
    assert_soak_held(result)


@pytest.mark.timeout(240)
def test_64_producer_processes_are_all_served_and_share_the_consumer_fairly(
    bus_redis: EmbeddedRedis, record_property: Callable[[str, object], None]
) -> None:
    spec = SoakSpec(
        producers=PRODUCERS,
        trajectories=PRODUCERS * GROUPS_EACH * 2,
        group_size=2,
        tokens=4,  # light producers: 64 processes share two cores
        max_stream_length=256,  # a fraction of what they send: they wait for room all along
        publish_batch=1,
        consume_batch=64,
        stats_interval_s=0.25,
        timeout_s=200,
    )
    result = run_soak(bus_redis.url, spec, bus_redis.process.pid)
    assert result.consumed_by_producer == result.sent_by_producer == [GROUPS_EACH] * PRODUCERS
    assert result.accounting == {"trained": spec.trajectories}
    assert result.backpressure_wait_s > 0 and result.longest_stream <= spec.stream_bound

    # The first window is the empty stream filling while 64 processes wake on two cores: whoever wakes first sends
    # freely until the stream is full (up to 3x its share, measured). Contention for a full stream is what is judged.
    windows = np.array(result.window_shares(WINDOW)[1:])
    fair = WINDOW / PRODUCERS
    # While everyone competes (until the first producer is done) there are at least two more whole windows: a producer
    # served ahead of the others would finish early and cut that phase short.
    assert len(windows) >= 2, f"only {len(windows)} windows after the first before the first producer was done"
    assert windows.min() >= fair / 4, f"a producer got {windows.min()} of {WINDOW} groups (fair: {fair:.0f})"
    assert windows.max() <= 3 * fair, f"a producer got {windows.max()} of {WINDOW} groups (fair: {fair:.0f})"
    jain = windows.sum(axis=1) ** 2 / (PRODUCERS * (windows.astype(float) ** 2).sum(axis=1))
    record_property("windows", len(windows))
    record_property("share_min_max_per_window", (int(windows.min()), int(windows.max()), fair))
    record_property("jain_index_min", round(float(jain.min()), 3))
    record_property("backpressure_wait_s", round(result.backpressure_wait_s, 1))


@pytest.mark.timeout(120)
def test_the_soak_bench_prints_one_json_object_with_its_ratio_to_raw_redis(
    capsys: pytest.CaptureFixture[str], require_service: Callable[[bool, str], None]
) -> None:
    need_redis_server(require_service)
    assert soak_bench.main(["--trajectories", "3200", "--producers", "2", "--max-stream-length", "100", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["trajectories"] == 3200 and figures["accounting"] == {"trained": 3200}
    assert figures["raw_trajectories_per_s"] > 0 and figures["ratio"] > 0
    assert figures["longest_stream"] <= figures["stream_bound"]
