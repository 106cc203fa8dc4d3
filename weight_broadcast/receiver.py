"""The receiving side, in a rollout node: joins the broadcast group, receives, verifies and loads each update.

    receiver = WeightReceiver(config.weights, load=engine.load_weights)   # load(named_tensors, version)
    receiver.connect()                     # asks to join: the learner sends the current weights on joining
    threading.Thread(target=receiver.run, args=(stop_event,), daemon=True).start()

The receiver triggers itself from the announcements on the rendezvous store (the same `Weights` the learner publishes
on the control stream): `run` waits for the newest one and calls `receive`, which a caller may also call directly.
For an announcement of a group it is not in yet, it answers the roll call, reads the group's spec and joins at its
`rank_offset`; an announcement of a group that leaves it out means it was removed, so it asks to join again.

Every bucket lands in a preallocated flat buffer (its size fixed by the validated layout) and is checked against the
announced per-bucket digest while the next ones arrive. Only when all buckets check out are the tensors handed to
`load`; a failed check means the version is NOT switched and the learner gets the error. The tensors handed to `load`
are views into the receiver's buffers: with `double_buffer` they stay untouched until the next successful load (the
engine may alias them, e.g. `load_state_dict(..., assign=True)`); without it the engine must copy them (the next
update overwrites them).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import structlog
import torch
import torch.distributed as dist

from bus.schema import Weights
from telemetry.metrics import ROLLOUT_WEIGHT_LOAD_DURATION
from weight_broadcast.config import ReceiverConfig
from weight_broadcast.layout import FlatBuckets, Layout, bucket_digest, parse_checksum, validate_weights
from weight_broadcast.rendezvous import (
    CONNECT_ATTEMPT_S,
    Board,
    JoinRequest,
    close_group,
    connect_store,
    open_group,
)

log = structlog.get_logger(__name__)

LoadFn = Callable[[list[tuple[str, torch.Tensor]], int], None]


class WeightVerificationError(RuntimeError):
    """Received buckets do not match the announcement; nothing was loaded."""


class WeightReceiver:
    """One engine's end of the weight broadcast (one rank). Not thread-safe: drive it from one thread."""

    def __init__(self, config: ReceiverConfig, load: LoadFn, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.load = load
        self.device = torch.device(device)
        self.name = config.name or f"{socket.gethostname()}-{os.getpid()}"
        self.incarnation = os.urandom(6).hex()
        self.version: int | None = None  # the version the engine holds (None before the first load)
        self.rank: int | None = None  # this engine's rank in the current group
        self.group = ""
        self._checksum = ""
        self._board: Board | None = None
        self._store: dist.TCPStore | None = None
        self._pg: dist.ProcessGroup | None = None
        self._seq = 0  # sequence number of the last announcement taken from the store
        self._sets: list[FlatBuckets | None] = [None, None] if config.double_buffer else [None]
        self._loaded_set = len(self._sets) - 1  # the set the engine's tensors come from; receive into the other

    # --- public API ----------------------------------------------------------------------------------------------
    def connect(self, attempt_s: float | None = None) -> None:
        """Connect to the learner's store (waiting up to `attempt_s`, default `timeout_s`, for it) and ask to join
        the broadcast."""
        config = self.config
        self._store = connect_store(config.master_addr, config.master_port, config.timeout_s, attempt_s)
        self._board = Board(self._store)
        self._seq = self._board.store.add("announce/seq", 0)  # before asking: the answer comes after this one
        self._request_join()

    def run(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        """Receive every new announcement until `stop` is set; failures are logged and the loop goes on."""
        learner_gone = False
        while not stop.is_set():
            try:
                self.step(poll_s)
                learner_gone = False
            except WeightVerificationError as exc:
                log.error("weights refused", engine=self.name, error=str(exc))
            except dist.DistNetworkError as exc:  # no learner's store to reconnect to (it ended or restarts)
                (log.debug if learner_gone else log.warning)("no learner to receive weights from: retrying",
                                                             engine=self.name, error=str(exc))  # fmt: skip
                learner_gone = True
                stop.wait(min(poll_s, 1.0))
            except Exception:
                log.exception("weight update failed", engine=self.name)
                stop.wait(min(poll_s, 1.0))

    def step(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for an announcement newer than the last one taken, and receive it (only the newest
        counts: stale ones are skipped). Returns whether a new version was loaded."""
        board = self._connected()
        try:
            got = board.next_announcement(self._seq, timeout_s)
        except dist.DistNetworkError as exc:  # the learner is gone: connect to its successor and ask to join
            log.warning("lost the learner's store: reconnecting", engine=self.name, error=str(exc))
            self._leave()
            self.connect(CONNECT_ATTEMPT_S)  # raises while no learner is back: the next step tries again
            return False
        if got is None:
            return False
        self._seq, weights = got
        before = self.version
        return self.receive(weights) and self.version != before

    def receive(self, weights: Weights) -> bool:
        """Receive update `weights` through its group; returns whether the engine now holds `weights.version`.

        False when this engine is not in `weights.group` (it asked to join and gets the weights in a later group) or
        the group broke mid-way (the learner re-forms it). Raises `WeightVerificationError` when the buckets do not
        match the announcement, `MessageError` for an unusable announcement; nothing is loaded then.
        """
        board = self._connected()
        validate_weights(weights)
        if not weights.group:
            return False
        if weights.group != self.group and not self._join(weights.group):
            return False
        started = time.monotonic()
        target = (self._loaded_set + 1) % len(self._sets)
        buffers = self._sets[target]
        layout = Layout.of(weights)
        if buffers is None or buffers.layout != layout:
            buffers = self._sets[target] = FlatBuckets(layout, self.device)
        try:
            checksum, errors = self._receive_buckets(weights, buffers)
        except Exception as exc:  # a peer or the learner died, or a timeout: this group is unusable now
            failure = f"receive failed: {exc}"
        else:
            failure = ""
        if failure:  # out of the except block, so the failed works are gone and closing the group closes it
            self._leave()
            log.warning("weight broadcast failed", engine=self.name, group=weights.group, error=failure)
            self._ack(weights, failure)
            return False
        if errors:
            message = f"version {weights.version} refused: " + "; ".join(errors)
            self._ack(weights, message)
            raise WeightVerificationError(message)
        if (weights.version, checksum) != (self.version, self._checksum) or not checksum:
            try:
                self.load(buffers.named(), weights.version)
            except Exception as exc:
                self._ack(weights, f"load failed: {exc!r}")
                raise
            self.version, self._checksum, self._loaded_set = weights.version, checksum, target
            ROLLOUT_WEIGHT_LOAD_DURATION.observe(time.monotonic() - started)
            log.info("weights loaded", engine=self.name, version=weights.version, seconds=time.monotonic() - started)
        board.ack(weights.group, weights.version, self.name)
        return True

    def close(self) -> None:
        """Leave the current group (the learner notices at its next update)."""
        self._leave()

    # --- helpers -------------------------------------------------------------------------------------------------
    def _connected(self) -> Board:
        if self._board is None:
            raise RuntimeError("WeightReceiver: call connect() first")
        return self._board

    def _join(self, group: str) -> bool:
        """Answer the roll call of `group` and join it if the spec lists this engine; else ask to join again."""
        board = self._connected()
        self._leave()
        board.set_ready(group, self.name)
        # The learner waits up to timeout_s for the roll call before it writes the spec: wait longer than that.
        spec = board.wait_spec(group, time.monotonic() + 2 * self.config.timeout_s)
        member = spec.member(self.name) if spec is not None else None
        if spec is None or member is None:
            log.info("not in the broadcast group: asking to join", engine=self.name, group=group)
            self._request_join()
            return False
        try:
            assert self._store is not None
            self._pg = open_group(
                self._store, group, member.rank_offset, spec.world_size, spec.backend, self.config.timeout_s
            )
        except Exception as exc:
            log.warning("joining the broadcast group failed", engine=self.name, group=group, error=str(exc))
            return False
        self.group, self.rank = group, member.rank_offset
        log.info("joined the broadcast group", engine=self.name, group=group, rank=self.rank, world=spec.world_size)
        return True

    def _receive_buckets(self, weights: Weights, buffers: FlatBuckets) -> tuple[str, list[str]]:
        """Receive every bucket into `buffers`, checking each while the next ones arrive; returns the checksum and
        the mismatches.

        The checksum is read from the store (the sender publishes it once its last bucket is posted, long before
        that bucket arrives). Byte counts need no check of their own: `validate_weights` matched every bucket's size
        to its tensors, and a collective whose sizes differ between sender and receiver fails.
        """
        works = [
            dist.broadcast(buffers.wire(b), src=0, group=self._pg, async_op=True) for b in range(len(weights.buckets))
        ]
        checksum: str | None = None
        errors = []
        for b, work in enumerate(works):
            work.wait()
            if checksum is None:
                deadline = time.monotonic() + self.config.timeout_s
                checksum = self._connected().wait_checksum(weights.group, weights.version, deadline)
                if checksum is None:
                    raise TimeoutError(f"no checksum for version {weights.version} within {self.config.timeout_s}s")
                algorithm, digests = parse_checksum(checksum, len(weights.buckets))
            if digests and (got := bucket_digest(buffers.wire(b), algorithm)) != digests[b]:
                errors.append(f"bucket {b} {algorithm} {got} != announced {digests[b]}")
        assert checksum is not None
        return checksum, errors

    def _ack(self, weights: Weights, error: str) -> None:
        try:
            self._connected().ack(weights.group, weights.version, self.name, error)
        except Exception as exc:  # the learner is gone: nobody to tell
            log.warning("could not ack to the learner", engine=self.name, error=str(exc))

    def _request_join(self) -> None:
        self._connected().request_join(JoinRequest(self.name, 1, self.incarnation))

    def _leave(self) -> None:
        if self._pg is not None:
            close_group(self._pg)
        self._pg, self.group, self.rank = None, "", None
