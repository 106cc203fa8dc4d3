"""The sending side, on learner rank 0: hosts the rendezvous store, keeps the group, sends every update.

    sender = WeightSender(config.broadcast, announce=publish_on_control_stream)
    sender.start()                                  # background: admits joiners, re-forms broken groups
    sender.add_engine(HttpLink("sglang-0", "http://host:30000", n_ranks=2))   # engines that cannot ask themselves
    report = sender.update(model.state_dict().items(), version=step)           # blocks at most ~2 x timeout_s

    sender.stage(model.state_dict().items(), version=step)   # or in two parts: the snapshot (a copy, any thread)...
    report = sender.send_staged()                             # ...and its delivery (no copy), e.g. in a thread

One delivery of update v:

1. announce v's layout on the store (the receivers' trigger; skipped while there is no engine at all);
2. if the membership changed (joiners, or the last round failed), form a new group: roll call of the candidates
   (`EngineLink.ready`), ranks assigned in order (engine i at 1 + the ranks of earlier engines), spec on the store,
   engines and rank 0 join it together (`EngineLink.join` + `open_group`);
3. broadcast the staged buckets from rank 0 while every engine's `EngineLink.receive` runs (the first send of v
   digests each bucket right after posting it), and publish the checksum on the store;
4. `announce` the complete `Weights` (layout + checksum + group; it passes `bus.codec.validate`) through the
   callable, e.g. on the control stream, while the buckets are on the wire; then wait for the acks.

Staging is the one copy of a version: `stage` copies the tensors into flat buckets (cast to the broadcast dtype), on
the caller's thread; the first send digests each bucket while it is on the wire, off that thread. Two sets of buckets
alternate: the one last sent keeps the current weights (late joiners and re-formed groups get them without the
learner), the other takes the next snapshot, so a learner can stage version v+1 while v is still on the wire.

Nothing waits forever: the roll call, the group's formation and every collective are bounded by `timeout_s`, the
acks by `timeout_s` after the last bucket. An engine that fails a round is taken to the next group's roll call (the
group is re-formed in the background and the current version re-sent), where a dead one does not answer and is
removed; one that fails `MAX_STRIKES` rounds in a row is removed too. A removed engine rejoins by asking
(`WeightReceiver` does on its own) or, for links with `rejoin_by_sender` (SGLang over HTTP), by answering the
sender's probe after `rejoin_after_s`; either way it gets the current weights on joining.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import structlog
import torch
import torch.distributed as dist
from msgspec.structs import replace

from bus.schema import TensorSpec, Weights
from telemetry.metrics import (
    WEIGHT_BROADCAST_BYTES,
    WEIGHT_BROADCAST_DURATION,
    WEIGHT_BROADCAST_PEER_REMOVALS,
    WEIGHT_BROADCAST_PEERS,
)
from weight_broadcast.config import BroadcastConfig
from weight_broadcast.layout import FlatBuckets, Layout, bucket_digest, dtype_name, format_checksum
from weight_broadcast.links import EngineLink, StoreLink
from weight_broadcast.rendezvous import Board, GroupSpec, close_group, host_store, open_group

log = structlog.get_logger(__name__)

MAX_STRIKES = 3  # failed rounds in a row before an engine is removed even though it answers roll calls


@dataclass(slots=True)
class UpdateReport:
    """How one delivery went: `delivered` engines hold `version` now, `failed` maps the others to why not."""

    version: int
    group: str
    nbytes: int
    seconds: float
    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class WeightSender:
    """Learner rank 0's end of the weight broadcast (see the module docstring). Thread-safe."""

    def __init__(
        self,
        config: BroadcastConfig,
        announce: Callable[[Weights], None] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config
        self._announce = announce or (lambda weights: None)
        self.device = torch.device(device or ("cuda" if config.backend == "nccl" else "cpu"))
        self.store = host_store(config.master_port, config.timeout_s)
        self.port: int = self.store.port
        self.board = Board(self.store)
        self._token = os.urandom(3).hex()  # group names of an earlier sender on the same store never collide
        self._generation = 0
        self._lock = threading.RLock()
        self._members: dict[str, EngineLink] = {}  # in the current group, in rank order
        self._pending: dict[str, EngineLink] = {}  # candidates for the next group's roll call
        self._probation: dict[str, tuple[EngineLink, float]] = {}  # removed: (link, monotonic time to try again)
        self._strikes: dict[str, int] = {}
        self._group = ""
        self._versions: list[int] = []  # versions sent over the current group (their checksum keys)
        self._pg: dist.ProcessGroup | None = None
        self._staging: FlatBuckets | None = None  # the current version, as sent
        self._current: Weights | None = None  # the current version's announcement (group set per delivery)
        self._stage_lock = threading.Lock()  # the spare set and what it holds (taken after `_lock`, never before)
        self._spare: FlatBuckets | None = None  # the next version's snapshot
        self._staged: Weights | None = None  # the snapshot's announcement, until `send_staged` takes it
        self._digested = False  # whether the current version's checksum is known (its first send takes it)
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="weight-link")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def members(self) -> list[str]:
        """Engines in the current group, in rank order."""
        with self._lock:
            return list(self._members)

    # --- public API ----------------------------------------------------------------------------------------------
    def start(self) -> WeightSender:
        """Start the background thread that admits joiners and re-forms broken groups between updates."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="weight-sender", daemon=True)
            self._thread.start()
        return self

    def add_engine(self, link: EngineLink) -> None:
        """Admit an engine at the next delivery (the next update, or the background thread's next round)."""
        with self._lock:
            self._admit(link)

    def update(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], version: int
    ) -> UpdateReport:
        """`stage` then `send_staged`: send `named_tensors` as policy `version` to every engine; returns once each
        loaded it or failed."""
        self.stage(named_tensors, version)
        report = self.send_staged()
        assert report is not None
        return report

    def stage(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        version: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Snapshot `named_tensors` (full tensors, dtypes of `bus.schema.DTYPE_SIZES`, or cast to `dtype`) as policy
        `version` into the spare buckets (its first send takes the digests); the caller may change the tensors once
        this returns. It may run while a delivery is in progress; a snapshot not sent yet is replaced by the next."""
        items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        specs = [TensorSpec(name, dtype_name(dtype or t.dtype), list(t.shape)) for name, t in items]
        with self._stage_lock:
            if self._spare is None or self._spare.layout.specs() != specs:
                self._spare = FlatBuckets(Layout.plan(specs, self.config.bucket_bytes), self.device)
            sources = [t.detach() for _, t in items]
            for b in range(len(self._spare.buffers)):
                self._spare.fill(b, sources)
            self._staged = self._spare.layout.weights(version, checksum="", group="")

    def send_staged(self) -> UpdateReport | None:
        """Deliver the last `stage`d snapshot (no copy: its buckets go on the wire) and make it the current weights;
        None when nothing was staged since the last delivery."""
        with self._lock:
            with self._stage_lock:
                if self._staged is None:
                    return None
                self._staging, self._spare = self._spare, self._staging
                self._current, self._staged = self._staged, None
                self._digested = False
            return self._deliver()  # a `stage` may fill the spare set meanwhile: it is not the one being sent

    def close(self) -> None:
        """Stop the background thread, retire the group (SGLang engines are told to drop it) and the thread pool.
        The store stops once the sender is garbage: the engines then look for a new learner on the same port."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.config.timeout_s)
        with self._lock:
            self._retire_group()
            self._pending.clear()
            self._probation.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- delivery ------------------------------------------------------------------------------------------------
    def _deliver(self) -> UpdateReport:
        """Announce the current weights and send them to the group, re-forming it first if membership changed."""
        assert self._current is not None
        started = time.monotonic()
        for request in self.board.take_joins():
            self._admit(StoreLink(self.board, request))
        reform = self._pg is None or bool(self._pending)
        if reform:
            self._retire_group()
            self._generation += 1
            group = f"{self.config.group_prefix}-{self._token}-{self._generation}" if self._pending else ""
        else:
            group = self._group
        weights = replace(self._current, group=group, created_at=time.time())
        report = UpdateReport(weights.version, group, sum(weights.bucket_bytes), 0.0)
        if group:  # with no engine at all there is nothing to announce: a joiner gets the version on joining
            self.board.announce(weights)
        if reform and group:
            self._form(group, report)
        if self._pg is not None:
            self._broadcast(weights, report)
        report.seconds = time.monotonic() - started
        WEIGHT_BROADCAST_DURATION.observe(report.seconds)
        WEIGHT_BROADCAST_PEERS.set(len(self._members))
        log.info(
            "weights delivered" if not report.failed else "weights partly delivered",
            version=report.version,
            group=group,
            delivered=report.delivered,
            failed=report.failed,
            seconds=round(report.seconds, 3),
            mb=round(report.nbytes / 2**20, 1),
        )
        return report

    def _form(self, group: str, report: UpdateReport) -> None:
        """Roll call of the pending engines, then form `group` with those present (sets `_pg` on success)."""
        candidates = list(self._pending.values())
        self._pending.clear()
        deadline = time.monotonic() + self.config.timeout_s
        answers = [self._pool.submit(link.ready, group, deadline) for link in candidates]
        present = []
        for link, answer in zip(candidates, answers, strict=True):
            if _error_of(answer, deadline) is None and answer.result():
                present.append(link)
            else:
                report.failed[link.name] = "did not answer the roll call within the timeout"
                self._remove(link, "timeout")
        if not present:
            return
        spec = GroupSpec.assign(group, self.config.backend, [(link.name, link.n_ranks) for link in present])
        self.board.publish_spec(spec)
        deadline = time.monotonic() + self.config.timeout_s
        joins = [self._pool.submit(link.join, spec, self.config.master_addr, self.port, deadline) for link in present]
        try:
            pg = open_group(self.store, group, 0, spec.world_size, self.config.backend, self.config.timeout_s)
        except Exception as exc:  # someone did not join: the roll call of the next group finds out who
            log.warning("forming the broadcast group failed", group=group, error=str(exc))
            for link, join in zip(present, joins, strict=True):
                report.failed[link.name] = _error_of(join, deadline) or f"group {group} did not form: {exc}"
                self._strike(link)
            self.board.forget(group, [link.name for link in present], [])
            return
        self._pg, self._group, self._versions = pg, group, []
        self._members = {link.name: link for link in present}
        log.info("broadcast group formed", group=group, world_size=spec.world_size, members=list(self._members))

    def _broadcast(self, weights: Weights, report: UpdateReport) -> None:
        """Send the buckets over the current group while each member receives; then wait for their acks."""
        assert self._pg is not None and self._staging is not None and self._current is not None
        links = list(self._members.values())
        deadline = time.monotonic() + 2 * self.config.timeout_s  # the collectives' timeout, then the acks'
        receipts = [self._pool.submit(link.receive, weights, deadline) for link in links]
        self._versions.append(weights.version)
        error = self._send(weights)
        if error:  # a peer died or stalled past the timeout: the group is unusable now
            # Dropping the group now closes its connections: members still waiting for buckets fail (and ack their
            # error) at once instead of at their own timeout.
            self._retire_group()
        else:
            WEIGHT_BROADCAST_BYTES.inc(report.nbytes)
        ack_deadline = time.monotonic() + self.config.timeout_s
        failed: dict[str, str] = {}
        for link, receipt in zip(links, receipts, strict=True):
            failure = _error_of(receipt, ack_deadline)
            if failure is None:
                report.delivered.append(link.name)
                self._strikes.pop(link.name, None)
            else:
                failed[link.name] = f"{failure} ({error})" if error else failure
        report.failed.update(failed)
        if error or failed:
            log.warning("broadcast round failed", group=weights.group, error=error, failed=failed)
            self._retire_group()  # every member goes to the next roll call; the failed ones with a strike
            for name in failed:
                self._strike(self._pending.pop(name))

    def _send(self, weights: Weights) -> str:
        """Post every bucket's broadcast from rank 0 (the first send of a version digests each bucket right after
        posting it), then publish the checksum and `announce` the complete `Weights` while the buckets are on the
        wire; returns "" or what failed. The pending works die with this frame, so a failed group can be closed right
        after."""
        assert self._staging is not None and self._current is not None
        algorithm = self.config.checksum
        try:
            works, digests = [], []
            for b in range(len(weights.buckets)):
                wire = self._staging.wire(b)
                works.append(dist.broadcast(wire, src=0, group=self._pg, async_op=True))
                if not self._digested:  # the first send of a version: digest bucket b while it is on the wire
                    digests.append("" if algorithm == "none" else bucket_digest(wire, algorithm))
            if not self._digested:
                self._current.checksum, self._digested = format_checksum(algorithm, digests), True
            self.board.publish_checksum(weights.group, weights.version, self._current.checksum)
            self._announce(replace(weights, checksum=self._current.checksum))
            for work in works:
                work.wait()
        except Exception as exc:
            return f"broadcast failed: {exc}"
        return ""

    # --- membership ----------------------------------------------------------------------------------------------
    def _admit(self, link: EngineLink) -> None:
        """Make `link` a candidate of the next group, unless it is on probation (same incarnation, too soon)."""
        held = self._probation.get(link.name)
        same_process = held is not None and getattr(held[0], "incarnation", 0) == getattr(link, "incarnation", 0)
        if held is not None and same_process and time.monotonic() < held[1]:
            self._probation[link.name] = (link, held[1])
            return
        self._probation.pop(link.name, None)
        if link.name in self._members:  # it came back (restarted, or it saw itself dropped): re-form the group
            self._retire_group()
        self._pending[link.name] = link

    def _strike(self, link: EngineLink) -> None:
        """Count a failed round: back to the next roll call, or removed after MAX_STRIKES in a row."""
        strikes = self._strikes[link.name] = self._strikes.get(link.name, 0) + 1
        if strikes >= MAX_STRIKES:
            self._remove(link, "error", probation=True)
        else:
            self._pending[link.name] = link

    def _remove(self, link: EngineLink, reason: str, probation: bool = False) -> None:
        WEIGHT_BROADCAST_PEER_REMOVALS.labels(reason).inc()
        self._strikes.pop(link.name, None)
        if probation or link.rejoin_by_sender:
            self._probation[link.name] = (link, time.monotonic() + self.config.rejoin_after_s)
        log.warning("engine removed from the weight broadcast", engine=link.name, reason=reason)

    def _retire_group(self) -> None:
        """Close the current group; its members become candidates of the next one."""
        if self._pg is not None:
            close_group(self._pg)
            self._pg = None
        if self._group:
            deadline = time.monotonic() + min(self.config.timeout_s, 5.0)
            for link in self._members.values():
                self._pool.submit(link.leave, self._group, deadline)
            self.board.forget(self._group, list(self._members), self._versions)
        for name, link in self._members.items():
            self._pending.setdefault(name, link)
        self._members, self._group, self._versions = {}, "", []

    def _serve(self) -> None:
        """Background loop: admit joiners and engines back from probation; re-send the current weights to them."""
        while not self._stop.wait(self.config.join_poll_s):
            try:
                with self._lock:
                    for request in self.board.take_joins():
                        self._admit(StoreLink(self.board, request))
                    now = time.monotonic()
                    for name, (link, due) in list(self._probation.items()):
                        if now >= due:
                            del self._probation[name]
                            self._pending[name] = link
                    if self._current is not None and self._pending:
                        self._deliver()
            except Exception:  # never let the thread die: the next round retries
                log.exception("weight sender background round failed")


def _error_of(future: Future, deadline: float) -> str | None:
    """None when the future succeeded by `deadline`, else why not."""
    done, _ = wait([future], timeout=max(0.0, deadline - time.monotonic()))
    if not done:
        return "no answer within the timeout"
    exc = future.exception()
    return None if exc is None else str(exc)
