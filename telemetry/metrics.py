"""Every Slipstream metric, defined once, on one isolated registry (never the global default one).

Names: `slipstream_` prefix, base units (seconds, bytes), `_total` for counters; labels stay low-cardinality.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

# --- bus -------------------------------------------------------------------------------------------------------
BUS_MESSAGES = Counter(
    "slipstream_bus_messages_total",
    "Messages by stream and event: published, consumed, acked, redelivered, dead_lettered, duplicate.",
    ["stream", "event"],
    registry=REGISTRY,
)
BUS_RECONNECTS = Counter(
    "slipstream_bus_reconnects_total", "Reconnections to the bus after a lost connection.", ["transport"],
    registry=REGISTRY,
)
BUS_STREAM_LENGTH = Gauge(
    "slipstream_bus_stream_length", "Entries in a stream, as last observed.", ["stream"], registry=REGISTRY
)
BUS_PENDING = Gauge(
    "slipstream_bus_pending_messages", "Delivered but not yet acked entries of a consumer group (lag).",
    ["stream", "group"], registry=REGISTRY,
)
BUS_BACKPRESSURE_WAIT = Counter(
    "slipstream_bus_backpressure_wait_seconds_total", "Time producers waited because a stream was full.",
    ["stream"], registry=REGISTRY,
)
