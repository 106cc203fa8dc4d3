"""What decoding one message may cost in memory: a small multiple of its size, whatever its shape (bus.decode_budget).

Each case decodes one message in a fresh interpreter and reports the growth of its peak RSS (ru_maxrss) during the
decode: the payload is built as bytes first, so that only the decode's own objects are measured. Before the budget,
15 MB of nested empty arrays peaked at ~930 MB (64x) and took ~7 s.
"""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack
import numpy as np
import pytest

from bus.codec import decode, encode, member_count
from bus.decode_budget import MAX_AMPLIFICATION
from bus.schema import Group, MessageError, Trajectory, new_id

PEAK_BOUND = MAX_AMPLIFICATION + 4  # the budget, plus the last container built before its hook refused it

# Builds a hostile message of ~SIZE bytes as bytes (a map whose `meta` is arrays of 100,000 ELEMENTs each),
# decodes it and prints {"peak": RSS growth in bytes, "size": ..., "error": the refusal or null}.
_MEASURE = r"""
import json, resource, struct, sys
from bus.codec import decode
from bus.schema import MessageError
element, size = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
inner = 100_000
outer = size // (inner * len(element))
array = lambda n: b"\xdd" + struct.pack(">I", n)
data = b"\x83\xa4kind\xa5group\xa1v\x01\xa4meta" + array(outer) + (array(inner) + element * inner) * outer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode(data)
    error = None
except MessageError as exc:
    error = str(exc)
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"peak": peak, "size": len(data), "error": error}))
"""

SHAPES = {  # msgpack element -> what the decode must come to
    "empty arrays": ("90", "data: decodes to over"),  # a list each: 64 bytes per wire byte
    "empty maps": ("80", "data: decodes to over"),  # a dict each: 72 per byte
    "2-character strings": ("a26162", "data: decodes to over"),  # 59 bytes per 3
    "small ints": ("01", "trajectories: required field missing"),  # a pointer each (cached objects): 8x, within
    "floats": ("cb3fe0000000000000", "trajectories: required field missing"),  # 32 bytes per 9
    "uint32 ints": ("ce00011170", "trajectories: required field missing"),  # 36 bytes per 5
}


def measure(element_hex: str, size: int) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, element_hex, str(size)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("shape", SHAPES)
def test_decoding_any_shape_peaks_at_a_small_multiple_of_the_message_size(shape: str) -> None:
    element, outcome = SHAPES[shape]
    size = 15_000_000 if shape == "empty arrays" else 6_000_000  # the reported 15.7 MB case, and the rest smaller
    result = measure(element, size)
    assert str(result["error"]).startswith(outcome), result
    assert result["peak"] <= PEAK_BOUND * result["size"], f"{shape}: {result['peak'] / result['size']:.1f}x"


def _group(members: int, tokens: int) -> Group:
    gid = new_id()
    trajectories = [
        Trajectory(new_id(), gid, "p", np.arange(3, dtype=np.int32), np.arange(tokens, dtype=np.int32) + 5,
                   np.full(tokens, -1.0, np.float32), reward=1.0)
        for _ in range(members)
    ]  # fmt: skip
    return Group(gid, "p", trajectories)


@pytest.mark.parametrize(("members", "tokens", "plain"), [(1024, 3, False), (64, 4096, False), (64, 2000, True)])
def test_valid_large_groups_decode_within_the_budget(members: int, tokens: int, plain: bool) -> None:
    # The largest estimates of valid messages: many three-token members (7.4x), and arrays as plain msgpack (4.9x).
    data = encode(_group(members, tokens))
    if plain:
        wire = msgpack.unpackb(data, raw=False)
        for member in wire["trajectories"]:
            member["response_ids"] = list(range(70_000, 70_000 + tokens))
            member["behavior_logprobs"] = [-1.0] * tokens
        data = msgpack.packb(wire)
    assert len(data) > 131_072  # over small_message_bytes: decoded with the budget's hooks
    assert len(decode(data).trajectories) == members


def test_member_count_walks_a_group_without_building_it() -> None:
    data = encode(_group(5, 3))
    assert member_count(data) == 5
    assert member_count(data[:-1]) is None  # truncated
    assert member_count(data + b"\x00") is None  # trailing bytes
    assert member_count(msgpack.packb({"kind": "group", "trajectories": "x"})) is None
    assert member_count(b"\xc1") is None
    with pytest.raises(MessageError, match="not valid msgpack"):
        decode(data[:-1])
