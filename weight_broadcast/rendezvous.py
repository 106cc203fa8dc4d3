"""Rendezvous of the broadcast: the TCPStore on learner rank 0, the broadcast process groups, and the control keys.

Process groups are built the way SGLang's `init_weights_update_group` builds them (`init_custom_process_group`):
`PrefixStore(group_name, store)` handed to torch's `_new_process_group_helper` with no default group involved, so
learner rank 0 (rank 0) and any mix of SGLang engines and our receivers (ranks from their `rank_offset`) meet in one
group, whatever default group each process has. Every group gets a fresh name, so one long-lived store serves them
all (SGLang connects its own client to it).

Control keys live under `slipstream-wb/` on the same store (`Board`); values are JSON, announcements are the bus's
msgpack `Weights`:

    announce/seq             counter of announcements          announce/<seq>       a `Weights`, the last few kept
    join/seq                 counter of join requests          join/<i>             JoinRequest (taken by the sender)
    <group>/ready/<name>     roll call: engine is ready        <group>/spec         GroupSpec: ranks and world size
    <group>/checksum/<version>     the update's `Weights.checksum`, set while its buckets are on their way
    <group>/ack/<version>/<name>   "" when loaded, else the error text

The checksum has a key of its own because the sender computes each bucket's digest right after filling it, while the
earlier buckets are already being sent: the announcement (the receivers' trigger) cannot wait for it.

Every wait here polls with a deadline: a TCPStore client serialises its calls, so one long blocking `wait` would
stall every other thread of the process that shares the client.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from datetime import timedelta

import structlog
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

from bus.codec import decode, encode
from bus.schema import Weights

log = structlog.get_logger(__name__)

POLL_S = 0.002  # store polling period: a check is one ~10 us round trip, and the poll adds at most this latency
ANNOUNCEMENTS_KEPT = 8  # older announcements are deleted (receivers only ever read the newest)
CONNECT_ATTEMPT_S = 1.0  # one attempt to reach a learner's store, for callers that retry (a receiver reconnecting)


def host_store(port: int, timeout_s: float) -> dist.TCPStore:
    """Start the rendezvous store on learner rank 0 (port 0 picks a free port: read `.port`)."""
    return dist.TCPStore("0.0.0.0", port, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def connect_store(addr: str, port: int, timeout_s: float, attempt_s: float | None = None) -> dist.TCPStore:
    """Connect to the learner's store, retrying for up to `attempt_s` (default `timeout_s`; the TCPStore client's
    backoff may add about as much again); every later call on the store is bounded by `timeout_s`. Callers that
    retry on their own pass a short `attempt_s` (`CONNECT_ATTEMPT_S`): an attempt blocks its thread, which then
    answers neither a stop nor its process's exit."""
    timeout = timedelta(seconds=timeout_s if attempt_s is None else min(attempt_s, timeout_s))
    store = dist.TCPStore(addr, port, is_master=False, timeout=timeout, wait_for_workers=False)
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


def open_group(
    store: dist.Store, group: str, rank: int, world_size: int, backend: str, timeout_s: float
) -> dist.ProcessGroup:
    """Join broadcast group `group` as `rank` of `world_size`; blocks until all ranks joined or `timeout_s`.

    The same call SGLang's engines make on `/init_weights_update_group`; `timeout_s` also bounds every later
    collective of the group.
    """
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group, store),
        group_name=group,
        timeout=timedelta(seconds=timeout_s),
    )
    # Group ranks are global ranks here: dist.broadcast(src=0, group=pg) then needs no default group.
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def close_group(pg: dist.ProcessGroup) -> None:
    """Destroy a broadcast group; errors of a group that already broke are logged, not raised."""
    try:
        dist.destroy_process_group(pg)
    except Exception as exc:  # a broken group may fail to shut down cleanly; it is gone either way
        log.warning("closing broadcast group failed", error=str(exc))


@dataclass(frozen=True, slots=True)
class Member:
    """One engine in a group: ranks rank_offset .. rank_offset + n_ranks - 1."""

    name: str
    rank_offset: int
    n_ranks: int


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """Who is in a broadcast group and at which ranks (learner rank 0 is rank 0)."""

    group: str
    world_size: int
    backend: str
    members: tuple[Member, ...]

    @classmethod
    def assign(cls, group: str, backend: str, engines: list[tuple[str, int]]) -> GroupSpec:
        """Ranks for `engines` [(name, n_ranks)] in order: engine i starts at 1 + the ranks of earlier engines."""
        members, offset = [], 1
        for name, n_ranks in engines:
            members.append(Member(name, offset, n_ranks))
            offset += n_ranks
        return cls(group, offset, backend, tuple(members))

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """An engine asking to be (re)admitted; `incarnation` tells a restarted process from the one it replaces."""

    name: str
    n_ranks: int = 1
    incarnation: str = ""
    meta: dict[str, str] = field(default_factory=dict)


class Board:
    """The control keys of the broadcast on the rendezvous store (see the module docstring)."""

    def __init__(self, store: dist.Store) -> None:
        self.store = PrefixStore("slipstream-wb", store)
        self._joins_taken = 0

    # --- announcements -----------------------------------------------------------------------------------------
    def announce(self, weights: Weights) -> int:
        """Publish `weights` (in its bus wire form) as the newest announcement; returns its sequence number."""
        seq = self.store.add("announce/seq", 1)
        self.store.set(f"announce/{seq}", encode(weights))
        if seq > ANNOUNCEMENTS_KEPT:
            self.store.delete_key(f"announce/{seq - ANNOUNCEMENTS_KEPT}")
        return seq

    def next_announcement(self, after: int, timeout_s: float) -> tuple[int, Weights] | None:
        """The newest announcement if its sequence number is above `after`, waiting up to `timeout_s` for one; None
        when none came. Older ones are skipped: each announcement supersedes the previous (the sender has moved on)."""
        deadline = time.monotonic() + timeout_s
        while True:
            latest = self.store.add("announce/seq", 0)
            raw = self._get_now(f"announce/{latest}") if latest > after else None
            if raw is not None:  # None right after the counter moved: its value is being written
                weights = decode(raw)
                assert isinstance(weights, Weights)
                return latest, weights
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)

    # --- joins ---------------------------------------------------------------------------------------------------
    def request_join(self, request: JoinRequest) -> None:
        i = self.store.add("join/seq", 1)
        self.store.set(f"join/{i}", json.dumps(dataclasses.asdict(request)))

    def take_joins(self) -> list[JoinRequest]:
        """Join requests not taken yet, oldest first (each is returned once)."""
        requests = []
        latest = self.store.add("join/seq", 0)
        while self._joins_taken < latest:
            key = f"join/{self._joins_taken + 1}"
            raw = self._get_now(key)
            if raw is None:  # counted but not written yet: next time
                break
            self.store.delete_key(key)
            self._joins_taken += 1
            requests.append(JoinRequest(**json.loads(raw)))
        return requests

    # --- roll call and group spec ---------------------------------------------------------------------------------
    def set_ready(self, group: str, name: str) -> None:
        self.store.set(f"{group}/ready/{name}", "1")

    def wait_ready(self, group: str, name: str, deadline: float) -> bool:
        return self._wait(f"{group}/ready/{name}", deadline) is not None

    def publish_spec(self, spec: GroupSpec) -> None:
        self.store.set(f"{spec.group}/spec", json.dumps(dataclasses.asdict(spec)))

    def wait_spec(self, group: str, deadline: float) -> GroupSpec | None:
        raw = self._wait(f"{group}/spec", deadline)
        if raw is None:
            return None
        data = json.loads(raw)
        members = tuple(Member(**m) for m in data["members"])
        return GroupSpec(data["group"], data["world_size"], data["backend"], members)

    # --- checksums -----------------------------------------------------------------------------------------------
    def publish_checksum(self, group: str, version: int, checksum: str) -> None:
        self.store.set(f"{group}/checksum/{version}", checksum)

    def wait_checksum(self, group: str, version: int, deadline: float) -> str | None:
        raw = self._wait(f"{group}/checksum/{version}", deadline)
        return None if raw is None else raw.decode()

    # --- acks ----------------------------------------------------------------------------------------------------
    def ack(self, group: str, version: int, name: str, error: str = "") -> None:
        """Tell the sender how receiving `version` ended for `name`: "" = loaded, else why not."""
        self.store.set(f"{group}/ack/{version}/{name}", error)

    def wait_ack(self, group: str, version: int, name: str, deadline: float) -> str | None:
        """The ack of `name` ("" = loaded, else the error), or None when none came before `deadline`."""
        key = f"{group}/ack/{version}/{name}"
        raw = self._wait(key, deadline)
        if raw is not None:
            self.store.delete_key(key)
        return None if raw is None else raw.decode()

    def forget(self, group: str, names: list[str], versions: list[int]) -> None:
        """Drop a retired group's keys (gloo's own keys under the group prefix stay: a few bytes per rank)."""
        keys = [f"{group}/spec", *(f"{group}/ready/{n}" for n in names), *(f"{group}/checksum/{v}" for v in versions)]
        for key in keys:
            self.store.delete_key(key)

    # --- helpers -----------------------------------------------------------------------------------------------
    def _get_now(self, key: str) -> bytes | None:
        return self.store.get(key) if self.store.check([key]) else None

    def _wait(self, key: str, deadline: float) -> bytes | None:
        while True:
            raw = self._get_now(key)
            if raw is not None or time.monotonic() >= deadline:
                return raw
            time.sleep(POLL_S)
