"""Producer SDK for external agents: put trajectories, groups and preference pairs on the bus by URL.

    from bus import Producer

    with Producer.connect("redis://bus:6379/0", producer_name="my-agent") as producer:
        traj = producer.trajectory(prompt_ids=[1, 2, 3], response_ids=[4, 5], logprobs=[-0.1, -2.3], reward=1.0)
        producer.send(traj)

Every message is validated (encoded) before anything is sent: a bad one raises `MessageError` naming the field,
and `send_many` sends nothing when any message is bad. Each message carries an id (the idempotency key), so a
retried send is recognised by the consumer and trained once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np

from bus.codec import encode, validate
from bus.config import BusConfig
from bus.schema import Group, Message, Trajectory, new_id
from bus.transport import Transport, setup_transport

# URL scheme -> transport type
_SCHEMES = {"redis": "redis", "rediss": "redis", "unix": "redis", "tcp": "zmq", "ipc": "zmq", "inproc": "inproc"}


class Producer:
    """Sends messages to one stream (by default the trajectories stream) through a transport."""

    def __init__(
        self, transport: Transport, stream: str, producer_name: str | None = None, *, owns_transport: bool = False
    ) -> None:
        self.transport, self.stream = transport, stream
        self.producer_name = producer_name or f"{socket.gethostname()}-{os.getpid()}"
        self._owns_transport = owns_transport

    @classmethod
    def connect(cls, url: str, *, stream: str | None = None, producer_name: str | None = None, **opts: Any) -> Producer:
        """Connect by URL: redis://, rediss:// (TLS), unix:// -> Redis Streams; tcp://, ipc:// -> ZeroMQ (the
        consumer binds that endpoint); inproc://NAME -> in-process. `opts` are `BusConfig` fields (e.g.
        `password_file`, `max_stream_length`, `zmq_curve_secret_key_file`); `stream` defaults to the
        trajectories stream of that config."""
        scheme = url.partition("://")[0]
        kind = _SCHEMES.get(scheme)
        if kind is None:
            raise ValueError(f"url: scheme {scheme!r} is not one of {sorted(_SCHEMES)} (got {url!r})")
        where = {"zmq_endpoint": url} if kind == "zmq" else {"url": url}
        config = BusConfig(type=kind, **where, **opts)
        return cls(setup_transport(config), stream or config.stream("trajectories"), producer_name, owns_transport=True)

    def send(self, message: Message) -> str:
        """Validate, encode and publish one message; returns its entry id."""
        return self.send_many([message])[0]

    def send_many(self, messages: Sequence[Message]) -> list[str]:
        """Validate and encode every message first (nothing is sent if one is bad), then publish in pipelined
        batches of `publish_batch`, waiting while the stream is full; returns the entry ids."""
        limits = self.transport.config.limits()
        payloads = [encode(m, limits=limits) for m in messages]
        batch = self.transport.config.publish_batch
        ids: list[str] = []
        for start in range(0, len(payloads), batch):
            ids += self.transport.publish(self.stream, payloads[start : start + batch])
        return ids

    def trajectory(
        self,
        *,
        prompt_ids: Sequence[int] | np.ndarray,
        response_ids: Sequence[int] | np.ndarray,
        logprobs: Sequence[float] | np.ndarray,
        reward: float,
        group_id: str | None = None,
        loss_mask: Sequence[int] | np.ndarray | None = None,
        policy_version: int = 0,
        finish_reason: str = "stop",
        rewards: dict[str, float] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Trajectory:
        """A validated `Trajectory` from plain lists, with a fresh id (the idempotency key: keep the object and
        re-send it, rather than building a new one, when a send must be retried).

        prompt_ids [P] and response_ids [T] are token ids; logprobs [T] the sampling policy's log-probability of
        each response token; loss_mask [T] 1 = train on the token, 0 = tool/environment token (None: all 1).
        group_id None makes a group of one (the trajectory's own id); trajectories sharing a group_id are
        grouped by the learner. Raises `MessageError` naming the field when something is invalid.
        """
        traj_id = new_id()
        traj = Trajectory(
            id=traj_id,
            group_id=group_id or traj_id,
            producer=self.producer_name,
            # No dtype here: the codec converts to int32/float32/uint8 and names the field of a value that won't fit.
            prompt_ids=np.asarray(prompt_ids),
            response_ids=np.asarray(response_ids),
            behavior_logprobs=np.asarray(logprobs),
            loss_mask=None if loss_mask is None else np.asarray(loss_mask),
            reward=float(reward),
            rewards=dict(rewards or {}),
            policy_version=policy_version,
            finish_reason=finish_reason,
            meta=dict(meta or {}),
        )
        validate(traj, self.transport.config.limits())
        return traj

    def group(
        self, trajectories: Sequence[Trajectory], *, task_id: str | None = None, meta: dict[str, Any] | None = None
    ) -> Group:
        """A validated `Group` of `trajectories` (the completions of one prompt) under a fresh group id, which
        is also written into each trajectory's group_id."""
        group_id = new_id()
        for traj in trajectories:
            traj.group_id = group_id
        group = Group(
            id=group_id,
            producer=self.producer_name,
            trajectories=list(trajectories),
            task_id=task_id,
            meta=dict(meta or {}),
        )
        validate(group, self.transport.config.limits())
        return group

    def close(self) -> None:
        """Close the transport if `connect` made it (queued ZeroMQ messages get `zmq_linger_ms` to leave)."""
        if self._owns_transport:
            self.transport.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
