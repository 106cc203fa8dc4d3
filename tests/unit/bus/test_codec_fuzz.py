"""Fuzzing decode: whatever the bytes, it returns a valid message or raises MessageError, nothing else.

The default run is deterministic (derandomized hypothesis plus exhaustive truncation): about 13,300 decodes of
random bytes (2,000), corrupted valid encodings whole and truncated (7,500), valid messages with one field set to
a random msgpack value (1,000), random maps of each kind (300) and every truncation of every kind (2,515).
`-m slow` adds 100,000 random splices.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.codec import decode, encode, validate
from bus.schema import MessageError


def _examples() -> dict[str, Any]:
    """test_codec.examples(): loaded by path, since test modules are not importable under --import-mode=importlib."""
    spec = importlib.util.spec_from_file_location("_test_codec_examples", Path(__file__).with_name("test_codec.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.examples()


SEEDS: dict[str, bytes] = {kind: encode(msg) for kind, msg in _examples().items()}
FIELD_NAMES = sorted({key for data in SEEDS.values() for key in msgpack.unpackb(data)} | {"trajectories", "address"})

# Plain msgpack values, including the awkward ones: nan, huge ints, bytes of odd lengths, deep lists and maps.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=24)
)
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=5)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5), max_leaves=10
)
FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def assert_decodes_or_raises_message_error(data: bytes) -> None:
    """The decode contract: a MessageError of the documented form, or a message that is valid and re-encodes."""
    try:
        msg = decode(data)
    except MessageError as error:
        assert str(error) == f"{error.field}: {error.rule}"
        assert not error.rule.startswith("internal decoder error"), str(error)
        return
    validate(msg)
    assert type(decode(encode(msg))) is type(msg)


@settings(FUZZ, max_examples=2000)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    assert_decodes_or_raises_message_error(data)


FLIPS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


@settings(FUZZ, max_examples=1500)
@given(st.sampled_from(sorted(SEEDS)), FLIPS, st.lists(st.integers(0, 10**6), min_size=4, max_size=4))
def test_corrupted_valid_encodings(kind: str, flips: list[tuple[int, int]], cuts: list[int]) -> None:
    """Bytes overwritten in a valid encoding, then the result whole and cut at four places: five cases each."""
    data = bytearray(SEEDS[kind])
    for position, value in flips:
        data[position % len(data)] = value
    assert_decodes_or_raises_message_error(bytes(data))
    for cut in cuts:
        assert_decodes_or_raises_message_error(bytes(data[: cut % len(data)]))


@settings(FUZZ, max_examples=1000)
@given(st.sampled_from(sorted(SEEDS)), st.sampled_from(FIELD_NAMES), VALUES, st.booleans())
def test_valid_messages_with_one_field_replaced(kind: str, field: str, value: Any, in_member: bool) -> None:
    """Type confusion at every depth: any field of any kind (or of a group member) set to any msgpack value."""
    wire = msgpack.unpackb(SEEDS[kind])
    target = wire["trajectories"][0] if in_member and kind == "group" else wire
    target[field] = value
    assert_decodes_or_raises_message_error(msgpack.packb(wire))


@settings(FUZZ, max_examples=300)
@given(st.sampled_from(sorted(SEEDS)), st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=8))
def test_random_maps_of_a_kind(kind: str, fields: dict[str, Any]) -> None:
    assert_decodes_or_raises_message_error(msgpack.packb({**fields, "kind": kind, "v": 1}))


def test_every_truncation_of_every_kind() -> None:
    cases = 0
    for data in SEEDS.values():
        for end in range(len(data)):
            with pytest.raises(MessageError):
                decode(data[:end])
            cases += 1
    assert cases > 2000


@pytest.mark.slow
@settings(FUZZ, max_examples=100_000, derandomize=False)
@given(st.sampled_from(sorted(SEEDS)), st.binary(min_size=1, max_size=64), st.integers(0, 10**6))
def test_random_splices_long(kind: str, chunk: bytes, position: int) -> None:
    data = SEEDS[kind]
    position %= len(data)
    assert_decodes_or_raises_message_error(data[:position] + chunk + data[position + len(chunk) :])
