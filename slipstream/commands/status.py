"""`slipstream status [--config C] [--bus.url redis://...] [--json]`: the cluster at a glance, read from Redis.

Streams (length, pending per group), nodes (last join / heartbeat / leave on the control stream, with version and
age), the newest weights version, the accounting hash (published = trained + dropped by reason) and the newest
dead letters with their reasons, a page at a time: `--dead N` of them, and `--dead-before ID` for the page older
than the entry `ID` (the JSON's `dead_next`). A dead letter's payload is never read into the output: only its size,
SHA-256 and whether the dead stream kept all of it (it keeps a prefix of `bus.dead_payload_bytes`).
"""

from __future__ import annotations

import argparse
from typing import Any

from slipstream.commands import load_or_exit

TAKES_OVERRIDES = True  # dotted --section.field overrides arrive as args.overrides

NODE_EVENTS = ("join", "heartbeat", "leave")
CONTROL_SCAN = 10_000  # newest control entries read to find every node's last word


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="TOML file whose [bus] section names the Redis")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--dead", type=int, default=5, help="dead letters to show (a page, newest first)")
    parser.add_argument("--dead-before", default=None, help="show the page of dead letters older than this entry id")


def collect(bus: Any, dead: int, dead_before: str | None = None) -> dict[str, Any]:
    """Everything `status` shows, as plain data. `bus` is a `BusConfig` with a Redis URL; `dead` dead letters older
    than entry id `dead_before` (None: the newest)."""
    import time

    from bus.codec import decode
    from bus.schema import MessageError, Weights
    from bus.transport import setup_transport

    transport = setup_transport(bus)
    try:
        client = transport.client
        streams = {}
        for name in ("tasks", "trajectories", "control", "dead"):
            key = bus.stream(name)
            groups = client.xinfo_groups(key) if client.exists(key) else []
            streams[name] = {
                "length": transport.length(key),
                "groups": {_text(g["name"]): {"pending": g["pending"], "consumers": g["consumers"]} for g in groups},
            }
        nodes: dict[str, dict[str, Any]] = {}
        weights_version = None
        now = time.time()
        for entry in client.xrevrange(bus.stream("control"), count=CONTROL_SCAN):
            try:
                msg = decode(entry[1][b"data"])
            except (MessageError, KeyError):
                continue
            if isinstance(msg, Weights):
                weights_version = msg.version if weights_version is None else weights_version
                continue
            kind = type(msg).__name__.lower()
            if kind in NODE_EVENTS and msg.node_id not in nodes:  # newest first: the first seen is the last word
                nodes[msg.node_id] = {
                    "role": msg.role,
                    "state": "left" if kind == "leave" else "up",
                    "version": msg.version,
                    "age_s": round(now - msg.created_at, 1),
                }
        accounting = {_text(k): int(v) for k, v in client.hgetall(f"{bus.prefix}accounting").items()}
        page = transport.dead_letters(dead, before=dead_before)[::-1]  # newest first
        letters = [
            {
                "entry_id": d.entry_id,
                "reason": d.reason,
                "stream": d.stream,
                "producer": d.producer,
                "age_s": round(now - d.time, 1),
                "size": d.size,
                "sha256": d.sha256,
                "truncated": d.truncated,
            }
            for d in page
        ]
        older = page and client.xrevrange(bus.dead, max=f"({page[-1].entry_id}", count=1)
        return {
            "url": transport_url(bus),
            "streams": streams,
            "nodes": nodes,
            "weights_version": weights_version,
            "accounting": accounting,
            "dead_letters": letters,
            "dead_next": page[-1].entry_id if older else None,  # pass as --dead-before for the next page
        }
    finally:
        transport.close()


def transport_url(bus: Any) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(bus.url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}"  # never the password


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def render(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]Slipstream[/] on {status['url']}  weights version: {status['weights_version']}")
    streams = Table("stream", "length", "group", "pending", "consumers")
    for name, info in status["streams"].items():
        groups = info["groups"] or {"-": {"pending": "-", "consumers": "-"}}
        for group, g in groups.items():
            streams.add_row(name, str(info["length"]), group, str(g["pending"]), str(g["consumers"]))
    console.print(streams)
    nodes = Table("node", "role", "state", "version", "last seen (s ago)")
    for node_id, n in sorted(status["nodes"].items()):
        nodes.add_row(node_id, n["role"], n["state"], str(n["version"]), str(n["age_s"]))
    console.print(nodes)
    acc = status["accounting"]
    if acc:
        dropped = sum(v for k, v in acc.items() if k.startswith("dropped:"))
        console.print(
            f"accounting: published={acc.get('published', 0)} trained={acc.get('trained', 0)} dropped={dropped} "
            + " ".join(f"{k}={v}" for k, v in sorted(acc.items()) if k.startswith("dropped:"))
        )
    for letter in status["dead_letters"]:
        kept = " (prefix kept)" if letter["truncated"] else ""
        console.print(
            f"dead {letter['entry_id']}: [red]{letter['reason']}[/] from {letter['producer']} on {letter['stream']}, "
            f"{letter['size']} bytes{kept}"
        )
    if status["dead_next"]:
        console.print(f"older dead letters: --dead-before {status['dead_next']}")


def run(args: argparse.Namespace) -> int:
    import json

    from bus.config import BusConfig
    from bus.settings import NodeSettings

    class StatusSettings(NodeSettings):
        bus: BusConfig = BusConfig()

    settings = load_or_exit(StatusSettings, args, "status")
    if settings.bus.type != "redis" or not settings.bus.url:
        raise SystemExit("slipstream status: needs a Redis bus: set bus.url (e.g. --bus.url redis://127.0.0.1:6379)")
    if args.dead < 0:
        raise SystemExit(f"slipstream status: --dead: must be >= 0 (got {args.dead})")
    status = collect(settings.bus, args.dead, args.dead_before)
    if args.json:
        print(json.dumps(status))
    else:
        render(status)
    return 0
