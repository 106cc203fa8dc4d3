"""Serve `telemetry.metrics.REGISTRY` on the real TelemetryServer with every metric moving, for Prometheus to scrape.

    python tests/integration/deploy/metrics_exerciser.py [SECONDS]

Prints `port=N` once listening, then updates every metric (every label value the dashboards and alerts select on)
five times a second, and exits by itself after SECONDS (default 120) so that it can never be left running.
"""

from __future__ import annotations

import itertools
import sys
import time

from prometheus_client import Counter, Gauge, Histogram

from telemetry.metrics import LEARNER_NONFINITE_STEPS, REGISTRY, set_node_info
from telemetry.server import TelemetryServer

# The label values the bus and nodes write and the queries select; any other label gets one value.
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "event": ("published", "consumed", "acked", "redelivered", "dead_lettered", "duplicate"),
    "stream": ("slipstream:tasks", "slipstream:trajectories"),
    "side": ("low", "high"),
    "reason": ("stale", "timeout"),
}


def children(collector: Counter | Gauge | Histogram) -> list[Counter | Gauge | Histogram]:
    """The collector itself when unlabelled, else one child per combination of label values."""
    names = collector._labelnames  # noqa: SLF001 (no public way to list a wrapper's label names)
    if not names:
        return [collector]
    values = [LABEL_VALUES.get(name, ("exercised",)) for name in names]
    return [collector.labels(*combination) for combination in itertools.product(*values)]


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 120.0
    collectors = [c for c in set(REGISTRY._collector_to_names) if isinstance(c, Counter | Gauge | Histogram)]  # noqa: SLF001
    # Counters that count only faults stay still: any increase of one fires its alert (SlipstreamNonFiniteGradient).
    still = {LEARNER_NONFINITE_STEPS}
    metrics = [child for collector in collectors if collector not in still for child in children(collector)]
    set_node_info("exerciser-0", "exerciser")
    with TelemetryServer("127.0.0.1", 0) as server:
        print(f"port={server.port}", flush=True)
        deadline = time.monotonic() + seconds
        tick = 0
        while time.monotonic() < deadline:
            tick += 1
            for metric in metrics:
                if isinstance(metric, Counter):
                    metric.inc()
                elif isinstance(metric, Gauge):
                    # Timestamps follow the clock (no alert on a fresh step); everything else moves in (0, 1].
                    metric.set(time.time() if "timestamp" in metric._name else 0.1 + (tick % 9) / 10)  # noqa: SLF001
                else:
                    metric.observe((tick % 5) * 0.25)
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
