"""The learner's side of the weight broadcast: gather the full weights (every rank), send them from rank 0.

    broadcaster = Broadcaster(settings.broadcast, transport, runtime, node_id="learner", dtype=torch.bfloat16)
    broadcaster.publish(policy, version=7, wait=False)    # collective gather; rank 0 queues the send
    broadcaster.delivered_version                          # newest version the engines were sent (rank 0)

Rank 0 runs `weight_broadcast.WeightSender` on a background thread: `publish` gathers the full state dict
(torch.distributed.checkpoint's helpers, full_state_dict + cpu_offload; a LoRA policy's adapters merged in:
`model.policy_weights`) and stages it in the broadcast dtype (`WeightSender.stage`: the one copy, into the sender's
flat buckets, so training may change the weights right away); the thread sends the newest version staged (an older
one not yet sent is replaced: engines only want the latest) while training goes on. In sync mode
`publish(wait=True)` returns once delivered. The sender's timeouts bound every send, so a dead engine never stalls
the learner.

The same thread follows the control stream: `Join(role="rollout", address=<url>, meta={"engine": "sglang",
"n_ranks": k})` adds an `HttpLink` for that engine (torch engines join through the rendezvous store by themselves),
and the sender announces each `Weights` there. It also sends the learner's heartbeats.
"""

from __future__ import annotations

import threading
import time

import structlog
import torch
from torch import nn

from bus.codec import decode, encode
from bus.schema import Heartbeat, Join, Leave, Message, MessageError, Weights
from bus.transport import Transport
from learner_node.model import Runtime, policy_weights
from weight_broadcast.config import BroadcastConfig
from weight_broadcast.links import HttpLink
from weight_broadcast.sender import WeightSender

log = structlog.get_logger(__name__)

HEARTBEAT_S = 5.0


class Broadcaster:
    """Weight broadcast from learner rank 0 (see the module docstring); `publish` must be called by every rank."""

    def __init__(
        self,
        config: BroadcastConfig,
        transport: Transport | None,
        runtime: Runtime,
        *,
        node_id: str,
        dtype: torch.dtype,
    ) -> None:
        self.config, self.transport, self.runtime = config, transport, runtime
        self.node_id, self.dtype = node_id, dtype
        self.delivered_version = -1  # newest version handed to the engines (rank 0)
        self._sent = threading.Condition()
        self._slot: int | None = None  # the version staged last, until the thread sends it
        self._stop = threading.Event()
        self._cursor = "0"  # control stream position: from the start, to find engines that joined earlier
        self._sglang: dict[str, str] = {}  # SGLang engines added: node id -> url
        self._version = 0
        self.sender: WeightSender | None = None
        self._thread: threading.Thread | None = None
        self._engine_api_key: str | None = None
        if runtime.rank == 0:
            self._engine_api_key = config.api_key()  # read at start: a missing key file fails here, not per engine
            self.sender = WeightSender(config, announce=self._announce).start()
            self._thread = threading.Thread(target=self._serve, name="learner-broadcast", daemon=True)
            self._thread.start()

    @property
    def port(self) -> int | None:
        """The rendezvous store's port on rank 0 (the real one when master_port was 0)."""
        return self.sender.port if self.sender is not None else None

    def publish(self, model: nn.Module, version: int, *, wait: bool) -> None:
        """Send `model`'s weights as `version` (collective gather on every rank; rank 0 queues the send). With
        `wait`, rank 0 returns once the send finished (delivered or timed out)."""
        state = policy_weights(model)  # LoRA: merged, under the base model's names (engines need no LoRA support)
        if self.sender is None:
            return
        # The snapshot, here and now: with one rank the gathered tensors are the live parameters, which the next step
        # changes. It is the only copy; the thread sends the staged buckets as they are.
        self.sender.stage(state, version, self.dtype)
        with self._sent:
            self._slot = version
            self._version = version
            self._sent.notify_all()
            if wait:
                deadline = time.monotonic() + 4 * self.config.timeout_s
                while self.delivered_version < version and time.monotonic() < deadline:
                    self._sent.wait(timeout=max(0.0, deadline - time.monotonic()))
                if self.delivered_version < version:
                    log.warning("weights not delivered in time; training goes on", version=version)

    def close(self) -> None:
        """Stop the thread and the sender; say goodbye on the control stream."""
        self._stop.set()
        with self._sent:
            self._sent.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=4 * self.config.timeout_s)
        if self.sender is not None:
            self.sender.close()
            self._control(Leave(node_id=self.node_id, role="learner", version=self._version))

    # --- rank 0 thread -------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        self._control(Join(node_id=self.node_id, role="learner", version=self._version))
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        while not self._stop.is_set():
            with self._sent:
                if self._slot is None:
                    self._sent.wait(timeout=self.config.join_poll_s)
                job, self._slot = self._slot, None
            try:
                self._follow_joins()
                report = self.sender.send_staged() if job is not None else None  # type: ignore[union-attr]
                if report is not None:  # None: a later snapshot replaced this one and was sent already
                    with self._sent:
                        self.delivered_version = report.version
                        self._sent.notify_all()
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + HEARTBEAT_S
                    self._control(Heartbeat(node_id=self.node_id, role="learner", version=self._version))
            except Exception:  # the thread must outlive a bus hiccup or a bad message; the next round retries
                log.exception("weight broadcast round failed")

    def _follow_joins(self) -> None:
        """Add an HttpLink for each SGLang engine whose latest control event is a Join."""
        if self.transport is None or self.sender is None:
            return
        stream = self.transport.config.stream("control")
        latest: dict[str, Message] = {}
        while True:
            entries = self.transport.read(stream, self._cursor, 1000, 0)
            for entry in entries:
                try:
                    message = decode(entry.data)
                except MessageError:
                    continue
                if isinstance(message, Join | Leave) and message.role == "rollout":
                    latest[message.node_id] = message
            if entries:
                self._cursor = entries[-1].entry_id
            if len(entries) < 1000:
                break
        for node_id, event in latest.items():
            if isinstance(event, Leave):
                self._sglang.pop(node_id, None)
            elif event.meta.get("engine") == "sglang" and event.address and self._sglang.get(node_id) != event.address:
                self._sglang[node_id] = event.address
                n_ranks = int(event.meta.get("n_ranks", 1))
                self.sender.add_engine(HttpLink(node_id, event.address, n_ranks, api_key=self._engine_api_key))
                log.info("sglang engine added to the weight broadcast", engine=node_id, url=event.address)

    def _announce(self, weights: Weights) -> None:
        self._control(weights)

    def _control(self, message: Message) -> None:
        if self.transport is None:
            return
        stream = self.transport.config.stream("control")
        self.transport.publish(stream, [encode(message)], retain=self.transport.config.control_retain)
