"""`slipstream bench bus`: the codec, Redis and ZeroMQ paths against raw msgpack, redis-py and pyzmq, same run.

Prints codec_ratio, redis_ratio and zmq_ratio (Slipstream / raw; goal >= 0.8 each) with the absolute msgs/s and
MB/s of every side. The parts run alone as `slipstream bench bus_codec` and `slipstream bench bus_transports`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from bench.bus_codec import measure as measure_codec
from bench.bus_transports import measure_redis, measure_zmq
from bus.embedded import EmbeddedRedis

RATIOS = ("codec_ratio", "redis_ratio", "zmq_ratio")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slipstream bench bus", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="response tokens per trajectory")
    parser.add_argument("--n", type=int, default=20_000, help="messages per Redis run (ZeroMQ runs move 2.5x more)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the best of each is kept")
    parser.add_argument("--seconds", type=float, default=2.0, help="codec measuring time")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    if min(args.tokens, args.n, args.repeat) < 1 or args.seconds <= 0:
        parser.error("--tokens, --n, --repeat must be >= 1 and --seconds > 0")
    results: dict[str, float] = {}
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
        codec = measure_codec(args.seconds, args.tokens)
        results |= {k if k.startswith("codec") else f"codec_{k}": v for k, v in codec.items()}
        with EmbeddedRedis() as server:
            results |= measure_redis(server.url, args.n, args.tokens, repeat=args.repeat)
        results |= measure_zmq(int(args.n * 2.5), args.tokens, repeat=args.repeat)
    if args.json:
        print(json.dumps(results))
        return 0
    for key, value in results.items():
        if key not in RATIOS:
            print(f"{key:36s} {value:14,.2f}")
    for key in RATIOS:
        print(f"{key:36s} {results[key]:14.2f}   (goal >= 0.8)")
    return 0
