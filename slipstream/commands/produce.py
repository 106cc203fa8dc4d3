"""`slipstream produce --url URL (--jsonl FILE | --synthetic N)`: publish trajectories onto the bus, as an agent would.

`--jsonl`: one trajectory per line with the wire protocol's field names and plain lists (prompt_ids, response_ids,
behavior_logprobs, reward, optional group_id, loss_mask, rewards, policy_version, finish_reason, meta); lines that
share a group_id are sent as one group. A line that fails validation is reported with its line number and the field,
and nothing from the file is sent. `--synthetic N`: N random trajectories in groups of `--group-size` (load tests).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="bus URL: redis://host:port, rediss://..., tcp://host:port")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--jsonl", help="file of trajectories, one JSON object per line")
    source.add_argument("--synthetic", type=int, help="number of random trajectories to send")
    parser.add_argument("--group-size", type=int, default=8, help="trajectories per synthetic group")
    parser.add_argument("--tokens", type=int, default=256, help="response tokens per synthetic trajectory")
    parser.add_argument("--vocab-size", type=int, default=32_000, help="token ids of synthetic trajectories are below")
    parser.add_argument("--producer", default="slipstream-produce", help="producer name written in every message")
    parser.add_argument("--stream", default=None, help="stream to publish on (default: the trajectories stream)")


def read_jsonl(path: str, producer: Any) -> list[Any]:
    """The file's trajectories as validated messages: groups for shared group_ids, trajectories otherwise."""
    import json

    from bus.schema import MessageError

    groups: dict[str, list[Any]] = {}
    singles: list[Any] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise MessageError("data", "each line must be a JSON object")
                fields = dict(row)
                traj = producer.trajectory(
                    prompt_ids=fields.pop("prompt_ids"),
                    response_ids=fields.pop("response_ids"),
                    logprobs=fields.pop("behavior_logprobs"),
                    reward=fields.pop("reward"),
                    **fields,
                )  # validates: a bad field raises MessageError naming it
            except KeyError as exc:
                raise SystemExit(f"{path}:{number}: {exc.args[0]}: required field is missing") from None
            except (ValueError, TypeError) as exc:
                raise SystemExit(f"{path}:{number}: {exc}") from None
            if "group_id" in row:
                groups.setdefault(row["group_id"], []).append(traj)
            else:
                singles.append(traj)
    return [producer.group(members) for members in groups.values()] + singles


def synthetic(producer: Any, count: int, group_size: int, tokens: int, vocab_size: int) -> list[Any]:
    import numpy as np

    rng = np.random.default_rng()
    messages = []
    for start in range(0, count, group_size):
        members = [
            producer.trajectory(
                prompt_ids=rng.integers(0, vocab_size, 32, dtype=np.int32),
                response_ids=rng.integers(0, vocab_size, tokens, dtype=np.int32),
                logprobs=-rng.random(tokens, dtype=np.float32),
                reward=float(rng.random()),
            )
            for _ in range(min(group_size, count - start))
        ]
        messages.append(producer.group(members))
    return messages


def run(args: argparse.Namespace) -> int:
    from bus.producer import Producer

    for name in ("synthetic", "group_size", "tokens", "vocab_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"slipstream produce: --{name.replace('_', '-')}: must be >= 1 (got {value})")
    with Producer.connect(args.url, stream=args.stream, producer_name=args.producer) as producer:
        if args.jsonl:
            messages = read_jsonl(args.jsonl, producer)
        else:
            messages = synthetic(producer, args.synthetic, args.group_size, args.tokens, args.vocab_size)
        producer.send_many(messages)
    sent = sum(len(getattr(m, "trajectories", [m])) for m in messages)
    print(f"sent {sent} trajectories in {len(messages)} messages")
    return 0
