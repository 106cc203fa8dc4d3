"""Bucket layout of a weights update: planning, flat buffers, per-bucket checksums and announcement checks.

A layout groups the tensors by dtype and packs each dtype's tensors, in their given order, into buckets of at most
`bucket_bytes` (a bigger tensor travels alone). Bucket b is one contiguous buffer holding its tensors' bytes back to
back, exactly SGLang's `FlattenedTensorBucket` byte layout, so the same bucket can be received by SGLang
(`load_format="flattened_bucket"`) and by our `WeightReceiver`. Buckets travel as uint8 [bucket_bytes[b]].

Checksums (`Weights.checksum`, "<algorithm>:<digest of bucket 0>,<digest of bucket 1>,..."; "" = unverified):

- sum64: the bucket's bytes read as little-endian int64 words (the 0..7 tail bytes as one zero-padded word), summed
  modulo 2**64. Runs at memory speed on the buffer's own device (CPU or GPU, no copy) and catches any single
  corrupted word and any truncation; it misses swapped words and errors that cancel out.
- crc32: zlib's CRC-32 of the bytes. Catches reorderings and bursts too, but runs at ~2 GB/s per core on host
  memory (a GPU bucket is copied to the host first).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bus.codec import validate
from bus.schema import DTYPE_SIZES, MessageError, TensorSpec, Weights

CHECKSUM_ALGORITHMS = ("sum64", "crc32")
_WORD_MASK = 2**64 - 1


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a layout dtype name ("bfloat16" -> torch.bfloat16)."""
    if name not in DTYPE_SIZES:
        raise ValueError(f"dtype {name!r}: not one of {sorted(DTYPE_SIZES)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """The layout name of a torch dtype (torch.bfloat16 -> "bfloat16"); unsupported dtypes are an error."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise ValueError(f"dtype {dtype}: cannot be broadcast, supported: {sorted(DTYPE_SIZES)}")
    return name


def plan_layout(tensors: Sequence[TensorSpec], bucket_bytes: int) -> tuple[list[list[int]], list[int]]:
    """Bucket the tensors: returns (buckets, bucket_bytes) as `Weights` holds them.

    Dtypes come in order of first appearance, tensors keep their order within a dtype; a bucket is closed when the
    next tensor would take it past `bucket_bytes` (a tensor bigger than that gets a bucket of its own).
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: must be >= 1, got {bucket_bytes}")
    by_dtype: dict[str, list[int]] = {}
    for index, spec in enumerate(tensors):
        by_dtype.setdefault(spec.dtype, []).append(index)
    buckets: list[list[int]] = []
    sizes: list[int] = []
    for indices in by_dtype.values():
        current: list[int] = []
        size = 0
        for index in indices:
            nbytes = tensors[index].nbytes
            if current and size + nbytes > bucket_bytes:
                buckets.append(current)
                sizes.append(size)
                current, size = [], 0
            current.append(index)
            size += nbytes
        if current:
            buckets.append(current)
            sizes.append(size)
    return buckets, sizes


def validate_weights(weights: Weights) -> None:
    """Check that an announcement describes a usable layout (the codec's rules: names, dtypes, shapes, every tensor
    in one bucket of one dtype, bucket_bytes) and a usable checksum; raises `MessageError` naming field and rule."""
    validate(weights)
    parse_checksum(weights.checksum, len(weights.buckets))


def bucket_digest(wire: torch.Tensor, algorithm: str) -> str:
    """Digest of one bucket's bytes: `wire` is uint8 [bucket_bytes], on any device."""
    if algorithm == "sum64":
        whole = wire.numel() // 8 * 8
        total = int(wire[:whole].view(torch.int64).sum().item()) if whole else 0
        tail = wire[whole:]
        if tail.numel():
            total += int.from_bytes(bytes(tail.tolist()), "little")
        return f"{total & _WORD_MASK:016x}"
    if algorithm == "crc32":
        return f"{zlib.crc32(wire.cpu().numpy()):08x}"
    raise ValueError(f"checksum: unknown algorithm {algorithm!r}, expected one of {CHECKSUM_ALGORITHMS}")


def format_checksum(algorithm: str, digests: Sequence[str]) -> str:
    """The `Weights.checksum` string: "" for algorithm "none", else "<algorithm>:<d0>,<d1>,..."."""
    return "" if algorithm == "none" else f"{algorithm}:{','.join(digests)}"


def parse_checksum(checksum: str, n_buckets: int) -> tuple[str, list[str]]:
    """(algorithm, per-bucket digests) of a `Weights.checksum`; ("none", []) for ""."""
    if not checksum:
        return "none", []
    algorithm, sep, rest = checksum.partition(":")
    if not sep or algorithm not in CHECKSUM_ALGORITHMS:
        raise MessageError("checksum", f"expected '<algorithm>:<digests>' with algorithm in {CHECKSUM_ALGORITHMS}")
    digests = rest.split(",")
    if len(digests) != n_buckets:
        raise MessageError("checksum", f"has {len(digests)} digests for {n_buckets} buckets")
    return algorithm, digests


@dataclass(frozen=True, slots=True)
class Layout:
    """What a set of flat buffers is shaped for: the tensors and their buckets (a `Weights` minus the version)."""

    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]
    buckets: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, weights: Weights) -> Layout:
        """The layout an announcement describes."""
        return cls(
            tuple((t.name, t.dtype, tuple(t.shape)) for t in weights.tensors),
            tuple(tuple(bucket) for bucket in weights.buckets),
        )

    @classmethod
    def plan(cls, specs: Sequence[TensorSpec], bucket_bytes: int) -> Layout:
        """Bucket `specs` with `plan_layout`."""
        buckets, _ = plan_layout(specs, bucket_bytes)
        return cls(tuple((t.name, t.dtype, tuple(t.shape)) for t in specs), tuple(tuple(b) for b in buckets))

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(name, dtype, list(shape)) for name, dtype, shape in self.tensors]

    def weights(self, version: int, checksum: str, group: str) -> Weights:
        """The announcement of `version` in this layout."""
        specs = self.specs()
        return Weights(
            version,
            specs,
            [list(bucket) for bucket in self.buckets],
            [sum(specs[i].nbytes for i in bucket) for bucket in self.buckets],
            checksum,
            group,
        )


class FlatBuckets:
    """Preallocated flat buffers for one layout, and named views into them.

    buffers[b] is 1-D of bucket b's dtype with sum(numel) elements (allocated in that dtype, so every view is aligned
    for it); `wire(b)` is the same memory as uint8 [bucket_bytes[b]], the form that travels.
    """

    def __init__(self, layout: Layout, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.buffers: list[torch.Tensor] = []
        # views[i]: tensor i of the layout, shaped, inside its bucket's buffer
        self.views: list[torch.Tensor] = [torch.empty(0)] * len(layout.tensors)
        for bucket in layout.buckets:
            dtype = torch_dtype(layout.tensors[bucket[0]][1])
            numels = [math.prod(layout.tensors[i][2]) for i in bucket]
            buffer = torch.empty(sum(numels), dtype=dtype, device=device)
            offset = 0
            for index, numel in zip(bucket, numels, strict=True):
                self.views[index] = buffer[offset : offset + numel].view(layout.tensors[index][2])
                offset += numel
            self.buffers.append(buffer)

    def wire(self, bucket: int) -> torch.Tensor:
        """Bucket `bucket` as uint8 [bucket_bytes]: what is broadcast."""
        return self.buffers[bucket].view(torch.uint8)

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """(name, view) for every tensor, in layout order; the views share memory with the buffers."""
        return [(spec[0], view) for spec, view in zip(self.layout.tensors, self.views, strict=True)]

    def fill(self, bucket: int, sources: Sequence[torch.Tensor]) -> None:
        """Copy bucket `bucket`'s tensors from `sources` (all tensors in layout order, any device or strides)."""
        for index in self.layout.buckets[bucket]:
            self.views[index].copy_(sources[index])
