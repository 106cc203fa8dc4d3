"""Codec throughput: Slipstream encode + decode (both validating) against raw msgpack, in the same run.

The message is one trajectory: prompt int32 [128], response int32 [tokens], behaviour logprobs float32 [tokens].
- raw: `msgpack.packb` of a map with the same fields where arrays are `arr.tobytes()` bin, then `msgpack.unpackb`
  and `np.frombuffer` of each array: the least any msgpack codec of this message can do.
- slipstream: `bus.codec.encode(traj)` (validates) then `bus.codec.decode(data)` (validates, builds a Trajectory).

Raw and Slipstream alternate in short batches so that load from other processes hits both alike; each side's
rate comes from its fastest batch (encode and decode separately), the least disturbed by other processes.
codec_ratio = slipstream msgs/s / raw msgs/s (goal >= 0.8); encode_ratio and decode_ratio split it by direction.

    slipstream bench bus_codec --seconds 2 --json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from bus.codec import decode, encode
from bus.schema import Trajectory

PROMPT_TOKENS = 128
BATCH = 200  # messages per timed batch: long enough to time, short enough to interleave often


def sample_trajectory(tokens: int = 1024) -> Trajectory:
    """A trajectory as a rollout node sends it: prompt int32 [128], response int32 [tokens], logprobs [tokens]."""
    rng = np.random.default_rng(0)
    return Trajectory(
        id="0123456789abcdefghijklmnop",
        group_id="0123456789abcdefghijklmnoq",
        producer="rollout-0",
        prompt_ids=rng.integers(0, 150_000, PROMPT_TOKENS, dtype=np.int32),
        response_ids=rng.integers(0, 150_000, tokens, dtype=np.int32),
        behavior_logprobs=np.log(rng.uniform(0.01, 1.0, tokens)).astype(np.float32),
        reward=1.0,
        policy_version=12,
        finish_reason="length",
        created_at=1_700_000_000.0,
    )


def raw_encode(traj: Trajectory) -> bytes:
    return msgpack.packb(
        {
            "kind": "trajectory",
            "v": 1,
            "id": traj.id,
            "group_id": traj.group_id,
            "producer": traj.producer,
            "prompt_ids": traj.prompt_ids.tobytes(),
            "response_ids": traj.response_ids.tobytes(),
            "behavior_logprobs": traj.behavior_logprobs.tobytes(),
            "loss_mask": None,
            "reward": traj.reward,
            "rewards": traj.rewards,
            "policy_version": traj.policy_version,
            "version_ranges": None,
            "finish_reason": traj.finish_reason,
            "created_at": traj.created_at,
            "meta": traj.meta,
        }
    )


def raw_decode(data: bytes) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    wire = msgpack.unpackb(data)
    return (
        wire,
        np.frombuffer(wire["prompt_ids"], np.int32),
        np.frombuffer(wire["response_ids"], np.int32),
        np.frombuffer(wire["behavior_logprobs"], np.float32),
    )


Encoder = Callable[[Trajectory], bytes]
Decoder = Callable[[bytes], Any]


def _time_batch(encoder: Encoder, decoder: Decoder, traj: Trajectory) -> tuple[float, float]:
    """Seconds spent encoding BATCH messages, then decoding them."""
    start = time.perf_counter()
    encoded = [encoder(traj) for _ in range(BATCH)]
    middle = time.perf_counter()
    for data in encoded:
        decoder(data)
    return middle - start, time.perf_counter() - middle


def measure(seconds: float = 2.0, tokens: int = 1024) -> dict[str, Any]:
    """Round-trip rates of raw msgpack and of Slipstream's codec over about `seconds` seconds in total."""
    traj = sample_trajectory(tokens)
    assert raw_decode(raw_encode(traj))[2].tolist() == decode(encode(traj)).response_ids.tolist()
    best = {"raw": [math.inf, math.inf], "slipstream": [math.inf, math.inf]}  # [encode, decode] us per message
    sides = {"raw": (raw_encode, raw_decode), "slipstream": (encode, decode)}
    batches = 0
    deadline = time.perf_counter() + seconds
    while batches < 3 or time.perf_counter() < deadline:
        for name, (encoder, decoder) in sides.items():
            encode_s, decode_s = _time_batch(encoder, decoder, traj)
            best[name][0] = min(best[name][0], encode_s / BATCH * 1e6)
            best[name][1] = min(best[name][1], decode_s / BATCH * 1e6)
        batches += 1
    size = len(encode(traj))
    result: dict[str, Any] = {"tokens": tokens, "prompt_tokens": PROMPT_TOKENS, "message_bytes": size}
    result["messages"] = batches * BATCH
    for name, (encode_us, decode_us) in best.items():
        result[f"{name}_msgs_per_s"] = 1e6 / (encode_us + decode_us)
        result[f"{name}_mb_per_s"] = size / (encode_us + decode_us)
        result[f"{name}_encode_us"] = encode_us
        result[f"{name}_decode_us"] = decode_us
    result["codec_ratio"] = result["slipstream_msgs_per_s"] / result["raw_msgs_per_s"]
    result["encode_ratio"] = result["raw_encode_us"] / result["slipstream_encode_us"]
    result["decode_ratio"] = result["raw_decode_us"] / result["slipstream_decode_us"]
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slipstream bench bus_codec", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time, both sides together")
    parser.add_argument("--tokens", type=int, default=1024, help="response tokens per trajectory")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    args = parser.parse_args(argv)
    result = measure(args.seconds, args.tokens)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"trajectory: {result['prompt_tokens']} + {result['tokens']} tokens, {result['message_bytes']} bytes")
    for name in ("raw", "slipstream"):
        rate, throughput = result[f"{name}_msgs_per_s"], result[f"{name}_mb_per_s"]
        encode_us, decode_us = result[f"{name}_encode_us"], result[f"{name}_decode_us"]
        timing = f"(encode {encode_us:.2f} us, decode {decode_us:.2f} us)"
        print(f"{name:>10}: {rate:>9,.0f} msg/s {throughput:>7,.1f} MB/s {timing}")
    ratios = f"codec_ratio {result['codec_ratio']:.2f} (goal >= 0.8)"
    print(f"{ratios}: encode {result['encode_ratio']:.2f}, decode {result['decode_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
