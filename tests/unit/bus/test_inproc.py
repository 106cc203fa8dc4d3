"""In-process transport specifics (its Redis-shared semantics are in tests/integration/bus/test_transport_semantics):
named buses, concurrent consumers, clear errors."""

from __future__ import annotations

import threading

import pytest

from bus.config import BusConfig
from bus.transport import BusError, Transport, setup_transport


def inproc(name: str, **overrides: object) -> Transport:
    return setup_transport(BusConfig(type="inproc", url=f"inproc://{name}", **overrides))


def test_same_name_shares_a_bus_and_other_names_are_isolated(request: pytest.FixtureRequest) -> None:
    a, b, other = inproc(request.node.name), inproc(request.node.name), inproc(request.node.name + "-other")
    a.publish("s", [b"x"])
    assert b.length("s") == 1
    assert other.length("s") == 0


def test_concurrent_consumers_each_get_disjoint_entries_and_together_all(request: pytest.FixtureRequest) -> None:
    producer = inproc(request.node.name)
    producer.ensure_group("s", "g")
    sent = [str(i).encode() for i in range(2000)]
    got: list[list[bytes]] = [[] for _ in range(4)]

    def work(k: int) -> None:
        consumer = inproc(request.node.name)
        while True:
            batch = consumer.consume("s", "g", f"c{k}", 7, 200)
            if not batch:
                return
            got[k] += [d.data for d in batch]
            consumer.ack("s", "g", [d.entry_id for d in batch])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for start in range(0, len(sent), 100):
        producer.publish("s", sent[start : start + 100])
    for thread in threads:
        thread.join(30)
    everything = [x for part in got for x in part]
    assert sorted(everything) == sorted(sent)  # none lost, none twice
    assert producer.pending("s", "g") == 0
    assert producer.trim("s") == 0


def test_errors_name_what_is_wrong(request: pytest.FixtureRequest) -> None:
    t = inproc(request.node.name)
    with pytest.raises(BusError, match="no consumer group 'nope' on stream 's'"):
        t.consume("s", "nope", "c", 1, 0)
    t.ensure_group("s", "g")
    with pytest.raises(BusError, match="entry_id: 'garbage' is not an in-process entry id"):
        t.ack("s", "g", ["garbage"])
    with pytest.raises(BusError, match="url: the inproc transport needs inproc://NAME"):
        setup_transport(BusConfig(type="inproc", url="redis://localhost"))
