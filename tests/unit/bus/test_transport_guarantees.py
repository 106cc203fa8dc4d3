"""What each transport declares it guarantees (docs/wire-protocol.md's table), and the refusal that names `bus.type`
when a configuration needs a guarantee its transport lacks."""

from __future__ import annotations

import pytest

from bus.config import BusConfig
from bus.settings import ConfigError
from bus.transport import setup_transport
from bus.transport.base import Guarantees
from bus.transport.inproc import InProcTransport
from bus.transport.redis_streams import RedisTransport
from bus.transport.zmq import ZmqTransport


def test_each_transport_declares_the_guarantees_the_wire_protocol_table_gives() -> None:
    assert RedisTransport.guarantees == Guarantees(True, True, True, True, True)
    assert InProcTransport.guarantees == Guarantees(
        acks=True, redelivery=True, persistence=False, shared_groups=True, ledger=False
    )
    assert ZmqTransport.guarantees == Guarantees(False, False, False, False, False)


def test_only_a_transport_with_a_ledger_hands_one_out() -> None:
    transport = setup_transport(BusConfig(type="inproc", url="inproc://guarantees"))
    try:
        assert transport.ledger() is None
    finally:
        transport.close()


def test_a_missing_guarantee_is_refused_naming_the_transport_and_what_needs_it() -> None:
    needs = {"shared_groups": "2 learner ranks", "acks": "acked settling"}
    with pytest.raises(ConfigError, match=r"zmq does not guarantee shared_groups \(for 2 learner ranks\), acks \("):
        ZmqTransport.guarantees.require("zmq", needs)
    RedisTransport.guarantees.require("redis", {"shared_groups": "2 learner ranks", "ledger": "accounting"})
