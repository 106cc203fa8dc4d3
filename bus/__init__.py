"""The wire: message schema and codec, transports, the consumer layer and the producer SDK.

Public names are loaded on first use (PEP 562), so `import bus.config` stays light for instant `--help`:

    from bus import Producer
    with Producer.connect("redis://localhost:6379/0") as producer:
        producer.send(producer.trajectory(prompt_ids=[1, 2], response_ids=[3], logprobs=[-0.5], reward=1.0))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "BusConfig": "bus.config",
    "Transport": "bus.transport",
    "Delivery": "bus.transport",
    "DeadLetter": "bus.transport",
    "BusError": "bus.transport",
    "BusUnavailable": "bus.transport",
    "BackpressureTimeout": "bus.transport",
    "setup_transport": "bus.transport",
    "MessageConsumer": "bus.consumer",
    "Received": "bus.consumer",
    "Dedup": "bus.dedup",
    "MemoryDedup": "bus.dedup",
    "RedisDedup": "bus.dedup",
    "Producer": "bus.producer",
    "EmbeddedRedis": "bus.embedded",
    "find_redis_server": "bus.embedded",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static type checkers see the real names; at run time __getattr__ loads them
    from bus.config import BusConfig  # noqa: F401
    from bus.consumer import MessageConsumer, Received  # noqa: F401
    from bus.dedup import Dedup, MemoryDedup, RedisDedup  # noqa: F401
    from bus.embedded import EmbeddedRedis, find_redis_server  # noqa: F401
    from bus.producer import Producer  # noqa: F401
    from bus.transport import (  # noqa: F401
        BackpressureTimeout,
        BusError,
        BusUnavailable,
        DeadLetter,
        Delivery,
        Transport,
        setup_transport,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value
