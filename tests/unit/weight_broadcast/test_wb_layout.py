"""Bucket layout: planning, flat buffers (bit-exact round trips), checksums, announcement checks."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from bus.schema import MessageError, TensorSpec, Weights
from weight_broadcast.layout import (
    FlatBuckets,
    Layout,
    bucket_digest,
    dtype_name,
    format_checksum,
    parse_checksum,
    plan_layout,
    validate_weights,
)


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every kind a model carries: float32 and bfloat16 weights, an int64 buffer, a bool mask, a scalar, an empty."""
    generator = torch.Generator().manual_seed(1)
    return {
        "embed": torch.randn(7, 3, generator=generator).to(torch.bfloat16),
        "w1": torch.randn(5, 4, generator=generator),
        "positions": torch.arange(9, dtype=torch.int64) * -3,
        "b1": torch.randn(5, generator=generator),
        "norm": torch.randn(3, generator=generator).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(2.5),
        "unused": torch.empty(0, 4),
        "w2": torch.randn(4, 5, generator=generator).t(),  # non-contiguous source
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, dtype_name(t.dtype), list(t.shape)) for name, t in tensors.items()]


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_plan_groups_by_dtype_in_order_and_respects_the_bucket_size() -> None:
    specs = [
        TensorSpec("a", "float32", [10]),  # 40 bytes
        TensorSpec("b", "bfloat16", [10]),  # 20
        TensorSpec("c", "float32", [5]),  # 20
        TensorSpec("d", "float32", [30]),  # 120: bigger than a bucket, travels alone
        TensorSpec("e", "float32", [2]),  # 8
    ]
    buckets, sizes = plan_layout(specs, bucket_bytes=64)
    assert buckets == [[0, 2], [3], [4], [1]]
    assert sizes == [60, 120, 8, 20]
    assert plan_layout(specs, bucket_bytes=10**9) == ([[0, 2, 3, 4], [1]], [188, 20])


def test_flat_buckets_carry_mixed_dtypes_bit_exactly() -> None:
    tensors = mixed_tensors()
    layout = Layout.plan(specs_of(tensors), bucket_bytes=48)
    sent = FlatBuckets(layout)
    for b in range(len(layout.buckets)):
        sent.fill(b, list(tensors.values()))
    received = FlatBuckets(Layout.of(layout.weights(1, "", "g")))
    for b in range(len(layout.buckets)):  # what travels: each bucket as bytes
        assert received.wire(b).dtype == torch.uint8
        received.wire(b).copy_(sent.wire(b))
    named = received.named()
    assert [name for name, _ in named] == list(tensors)
    for (name, got), want in zip(named, tensors.values(), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert raw(got) == raw(want), name
    assert {layout.tensors[bucket[0]][1] for bucket in layout.buckets} == {"bfloat16", "float32", "int64", "bool"}


def test_a_view_shares_memory_with_its_bucket() -> None:
    tensors = mixed_tensors()
    buffers = FlatBuckets(Layout.plan(specs_of(tensors), bucket_bytes=1 << 20))
    buffers.wire(0).fill_(0)
    name, view = buffers.named()[0]
    buffers.wire(0)[:2].fill_(0xFF)  # the first two bytes of bucket 0 belong to its first tensor
    assert name == "embed" and raw(view)[:2] == b"\xff\xff"


def _sum64_reference(data: bytes) -> int:
    padded = data + b"\0" * (-len(data) % 8)
    return sum(int.from_bytes(padded[i : i + 8], "little", signed=True) for i in range(0, len(padded), 8)) % 2**64


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=300), flip=st.integers(min_value=0), bit=st.integers(0, 7))
def test_sum64_matches_its_definition_and_catches_any_single_bit_flip(data: bytes, flip: int, bit: int) -> None:
    wire = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    digest = bucket_digest(wire, "sum64")
    assert digest == f"{_sum64_reference(data):016x}"
    if data:
        corrupted = bytearray(data)
        corrupted[flip % len(data)] ^= 1 << bit
        assert bucket_digest(torch.frombuffer(corrupted, dtype=torch.uint8), "sum64") != digest


def test_sum64_wraps_modulo_2_pow_64() -> None:
    wire = torch.tensor([2**62] * 5, dtype=torch.int64).view(torch.uint8)
    assert bucket_digest(wire, "sum64") == f"{(5 * 2**62) % 2**64:016x}"


def test_crc32_catches_swapped_words_that_sum64_misses() -> None:
    """The documented trade-off: sum64 is order-blind, crc32 is not."""
    words = torch.arange(1, 9, dtype=torch.int64)
    swapped = words[[1, 0, *range(2, 8)]]
    assert bucket_digest(words.view(torch.uint8), "sum64") == bucket_digest(swapped.view(torch.uint8), "sum64")
    assert bucket_digest(words.view(torch.uint8), "crc32") != bucket_digest(swapped.view(torch.uint8), "crc32")
    assert bucket_digest(words.view(torch.uint8), "crc32") == f"{zlib.crc32(words.numpy().tobytes()):08x}"


def test_checksum_strings_round_trip() -> None:
    assert parse_checksum(format_checksum("sum64", ["0a", "0b"]), 2) == ("sum64", ["0a", "0b"])
    assert format_checksum("none", []) == "" and parse_checksum("", 3) == ("none", [])
    with pytest.raises(ValueError, match="unknown algorithm 'md5'"):
        bucket_digest(torch.zeros(1, dtype=torch.uint8), "md5")


def valid_weights() -> Weights:
    return Layout.plan(specs_of(mixed_tensors()), bucket_bytes=48).weights(3, "", "g-1")


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        (lambda w: replace(w, tensors=[w.tensors[0], *w.tensors[:-1]]), "tensors[1].name", "duplicate"),
        (lambda w: replace(w, buckets=[w.buckets[0] + w.buckets[0], *w.buckets[1:]]), "buckets[0]", "already in"),
        (
            lambda w: replace(w, bucket_bytes=[w.bucket_bytes[0] + 1, *w.bucket_bytes[1:]]),
            "bucket_bytes[0]",
            "bytes of the bucket",
        ),
        (lambda w: replace(w, checksum="sum64:00"), "checksum", "digests for"),
        (lambda w: replace(w, checksum="md5:00"), "checksum", "algorithm"),
    ],
)
def test_unusable_announcements_name_the_field_and_the_rule(
    change: Callable[[Weights], Weights], field: str, rule: str
) -> None:
    """The layout rules are the codec's (bus.codec.validate); the checksum's are this package's."""
    validate_weights(valid_weights())
    with pytest.raises(MessageError) as error:
        validate_weights(change(valid_weights()))
    assert error.value.field == field
    assert rule in error.value.rule


def test_unsupported_dtypes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="complex64"):
        dtype_name(torch.complex64)
