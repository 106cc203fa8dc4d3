"""Publish one trajectory to Slipstream with nothing but `msgpack` and `redis` (no Slipstream import).

This is the wire contract of docs/wire-protocol.md in action: a msgpack map with `kind` and `v`, token ids as
little-endian int32 bin, log-probabilities as little-endian float32 bin, XADDed to the trajectories stream as the
entry field `data`. Run it against a running Slipstream bus:

    python examples/produce_without_slipstream.py --url redis://localhost:6379 --stream slipstream:trajectories

It prints one JSON line: {"stream": ..., "entry_id": ..., "id": <trajectory id>}.
"""

import argparse
import json
import math
import struct
import time
import uuid

import msgpack
import redis


def int32_bin(values: list[int]) -> bytes:
    """Token ids as the wire wants them: little-endian int32, 4 bytes each."""
    return struct.pack(f"<{len(values)}i", *values)


def float32_bin(values: list[float]) -> bytes:
    """Log-probabilities as little-endian float32, 4 bytes each."""
    return struct.pack(f"<{len(values)}f", *values)


def make_trajectory(producer: str) -> dict:
    """A finished sample: prompt "2+3=" answered "5" by some external agent, rewarded 1.0."""
    prompt_ids = [1, 17, 42, 18, 61]  # token ids of the prompt, in the learner's tokenizer
    response_ids = [20, 2]  # the sampled tokens ("5", end-of-sequence)
    probabilities = [0.81, 0.97]  # what the sampling policy gave each sampled token
    return {
        "kind": "trajectory",
        "v": 1,
        "id": uuid.uuid4().hex,  # idempotency key: the learner trains each id at most once
        "group_id": uuid.uuid4().hex,  # samples of the same prompt share it (GRPO groups them)
        "producer": producer,
        "prompt_ids": int32_bin(prompt_ids),
        "response_ids": int32_bin(response_ids),
        "behavior_logprobs": float32_bin([math.log(p) for p in probabilities]),
        "loss_mask": bytes([1, 1]),  # uint8 per response token; 0 would exclude a tool/environment token
        "reward": 1.0,
        "rewards": {"correct": 1.0},
        "policy_version": 0,  # the weights version that sampled it (0: the initial weights)
        "finish_reason": "stop",
        "created_at": time.time(),
        "meta": {"task": "arith", "answer": "5"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Publish one trajectory to Slipstream")
    parser.add_argument("--url", default="redis://localhost:6379", help="the bus's Redis, redis://host:port")
    parser.add_argument("--stream", default="slipstream:trajectories", help="stream the learner consumes")
    parser.add_argument("--producer", default="example-agent", help="name of this producer")
    args = parser.parse_args()

    trajectory = make_trajectory(args.producer)
    client = redis.Redis.from_url(args.url)
    entry_id = client.xadd(args.stream, {"data": msgpack.packb(trajectory, use_bin_type=True)})
    print(json.dumps({"stream": args.stream, "entry_id": entry_id.decode(), "id": trajectory["id"]}))


if __name__ == "__main__":
    main()
