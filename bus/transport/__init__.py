"""Transports move byte payloads between nodes; `setup_transport(config)` picks one by `config.type`."""

from __future__ import annotations

from bus.config import BusConfig
from bus.transport.base import (
    BackpressureTimeout,
    BusError,
    BusUnavailable,
    DeadLetter,
    Delivery,
    Transport,
)


def setup_transport(config: BusConfig, url: str | None = None) -> Transport:
    """The transport named by `config.type`, at `url` (default `config.url`, or `config.zmq_endpoint` for zmq).

    Imports only the chosen backend, so a zmq-only node never loads redis-py and vice versa.
    """
    if config.type == "redis":
        from bus.transport.redis_streams import RedisTransport

        return RedisTransport(config, url)
    if config.type == "zmq":
        from bus.transport.zmq import ZmqTransport

        return ZmqTransport(config, url)
    from bus.transport.inproc import InProcTransport

    return InProcTransport(config, url)


__all__ = [
    "BackpressureTimeout",
    "BusError",
    "BusUnavailable",
    "DeadLetter",
    "Delivery",
    "Transport",
    "setup_transport",
]
