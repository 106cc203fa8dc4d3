"""ZeroMQ transport: many producers PUSH (connect) to one consumer that PULLs (binds) - a fan-in pipe.

Frames: `[stream, data]` (stream name as UTF-8, data = the msgpack message). Backpressure is ZeroMQ's high-water
marks: a producer whose queue (`zmq_sndhwm`) and the consumer's (`zmq_rcvhwm`) are full waits, and fails with
`BackpressureTimeout` after `backpressure_timeout_s`.

ZeroMQ gives NO delivery guarantee across crashes: there is no broker, so messages queued in a producer or consumer
process, or handed to a consumer that dies before processing them, are lost. `ack` and `claim_stale` are no-ops,
`requeue` puts the payload back in this process's buffer, and dead letters are kept in memory (and logged). Use
Redis where every message must be accounted for; ZeroMQ is for fast, low-latency feeds where losing a few samples
when a node dies is acceptable. One consumer process binds an endpoint; consumer groups are not shared.

CURVE (optional): the consumer holds a secret key and an allow-list directory of producer public certificates
(`zmq.auth` format, written by `slipstream keys`); a producer whose key is not listed gets nothing in.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import replace

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from bus.config import BusConfig
from bus.transport.base import BackpressureTimeout, BusError, DeadLetter, Delivery, Guarantees, Transport
from telemetry.metrics import BUS_BACKPRESSURE_WAIT

log = structlog.get_logger(__name__)


def _load_certificate(path: str | None, field: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    if path is None:
        raise BusError(f"{field}: required for ZeroMQ CURVE")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise BusError(f"{field}: cannot load a CURVE certificate from {path}: {exc}") from exc
    if need_secret and secret is None:
        raise BusError(f"{field}: {path} holds no secret key (use the '.key_secret' file)")
    return public, secret


class ZmqTransport(Transport):
    """PUSH/PULL over one endpoint. Sockets are made on first use: `publish` connects, `ensure_group`/`consume` bind."""

    name = "zmq"
    # No broker: a payload lives in one process's queue; one consumer binds an endpoint (see the module docstring).
    guarantees = Guarantees(acks=False, redelivery=False, persistence=False, shared_groups=False, ledger=False)

    def __init__(self, config: BusConfig, endpoint: str | None = None) -> None:
        super().__init__(config)
        self.endpoint = endpoint or config.zmq_endpoint
        self._ctx = zmq.Context()
        self._push: zmq.Socket | None = None
        self._pull: zmq.Socket | None = None
        self._rcvtimeo_ms = -1  # the pull socket's receive timeout (ZeroMQ's default: wait forever)
        self._auth: ThreadAuthenticator | None = None
        # ZeroMQ sockets are not thread-safe: one lock per role.
        self._push_lock, self._pull_lock = threading.Lock(), threading.Lock()
        # Received messages not yet handed out, per stream (one socket carries every stream).
        self._buffers: defaultdict[str, deque[Delivery]] = defaultdict(deque)
        self._seq = itertools.count(1)
        self._dead: deque[DeadLetter] = deque(maxlen=config.dead_entries)

    # --- sockets -------------------------------------------------------------------------------------------------
    def _pusher(self) -> zmq.Socket:
        if self._push is None:
            cfg = self.config
            sock = self._ctx.socket(zmq.PUSH)
            sock.sndhwm = cfg.zmq_sndhwm
            sock.linger = cfg.zmq_linger_ms
            if cfg.zmq_curve_secret_key_file:
                sock.curve_publickey, sock.curve_secretkey = _load_certificate(
                    cfg.zmq_curve_secret_key_file, "zmq_curve_secret_key_file", True
                )
                sock.curve_serverkey = _load_certificate(
                    cfg.zmq_curve_server_key_file, "zmq_curve_server_key_file", False
                )[0]
            sock.connect(self.endpoint)
            self._push = sock
        return self._push

    def _puller(self) -> zmq.Socket:
        if self._pull is None:
            cfg = self.config
            sock = self._ctx.socket(zmq.PULL)
            sock.rcvhwm = cfg.zmq_rcvhwm
            sock.linger = 0  # on close, whatever is still queued here is lost anyway (see module docstring)
            if cfg.zmq_curve_secret_key_file:
                if cfg.zmq_curve_allowed_keys_dir is None:
                    raise BusError("zmq_curve_allowed_keys_dir: required for a CURVE consumer (the allow-list)")
                self._auth = ThreadAuthenticator(self._ctx)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=cfg.zmq_curve_allowed_keys_dir)
                sock.curve_publickey, sock.curve_secretkey = _load_certificate(
                    cfg.zmq_curve_secret_key_file, "zmq_curve_secret_key_file", True
                )
                sock.curve_server = True
            try:
                sock.bind(self.endpoint)
            except zmq.ZMQError as exc:
                sock.close()
                raise BusError(f"zmq_endpoint: cannot bind {self.endpoint}: {exc}") from exc
            self._pull = sock
        return self._pull

    # --- producing -----------------------------------------------------------------------------------------------
    def _publish(self, stream: str, payloads: Sequence[bytes], retain: int | None) -> tuple[list[str], int]:
        topic = stream.encode()
        with self._push_lock:
            sock = self._pusher()
            # Two send() calls instead of send_multipart, which type-checks and loops in Python (~1 us a message).
            # A message is queued whole or not at all: a full queue refuses its first frame, and a frame refused
            # later rolls back the ones before it, so after a wait both frames go again.
            send, more = sock.send, zmq.NOBLOCK | zmq.SNDMORE
            for payload in payloads:
                try:
                    send(topic, more)
                    send(payload, zmq.NOBLOCK)
                except zmq.Again:
                    self._wait_writable(sock, stream)
                    sock.send_multipart((topic, payload), flags=zmq.NOBLOCK)
        # No broker, no entry ids: local sequence numbers, for logs only.
        return [str(next(self._seq)) for _ in payloads], 0

    def _wait_writable(self, sock: zmq.Socket, stream: str) -> None:
        timeout = self.config.backpressure_timeout_s
        started = time.monotonic()
        try:
            if not sock.poll(int(timeout * 1000), zmq.POLLOUT):
                limit = self.config.zmq_sndhwm
                raise BackpressureTimeout(stream, limit, limit, time.monotonic() - started, "zmq_sndhwm")
        finally:
            BUS_BACKPRESSURE_WAIT.labels(stream).inc(time.monotonic() - started)

    # --- consuming -----------------------------------------------------------------------------------------------
    def ensure_group(self, stream: str, group: str) -> None:
        with self._pull_lock:
            self._puller()

    def _consume(self, stream: str, group: str, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        with self._pull_lock:
            buffer = self._buffers[stream]
            out = [buffer.popleft() for _ in range(min(count, len(buffer)))]
            if len(out) < count:
                self._receive(stream, out, count, 0 if out else block_ms)
            return out

    def _receive(self, stream: str, out: list[Delivery], count: int, block_ms: int) -> None:
        """Receive until `out` holds `count` messages of `stream` (others go to their streams' buffers), waiting
        up to `block_ms` for the first message only."""
        sock = self._puller()
        if block_ms != self._rcvtimeo_ms:  # a blocking recv() with a timeout: no poll(), no zmq.Again to raise
            sock.setsockopt(zmq.RCVTIMEO, block_ms)
            self._rcvtimeo_ms = block_ms
        topic = stream.encode()
        # Locals: this loop runs once per message, and attribute look-ups are a measurable share of it. Frames
        # (copy=False) say themselves whether more follow, cheaper than recv_multipart's getsockopt(RCVMORE) calls.
        recv, noblock, seq, append = sock.recv, zmq.NOBLOCK, self._seq, out.append
        flags = noblock if out else 0
        while len(out) < count:
            try:
                first = recv(flags, copy=False)
            except zmq.Again:  # nothing more queued (or nothing came within block_ms)
                return
            flags = noblock
            entry_id = str(next(seq))  # a local sequence number; str() is half the cost of an f-string here
            # The frames of a message arrive together (ZeroMQ delivers all of them or none): no waiting below.
            if not first.more:
                self._reject_frames(sock, stream, entry_id, [first.bytes])
                continue
            data = recv(noblock, copy=False)
            name = first.bytes
            if data.more:
                self._reject_frames(sock, stream, entry_id, [name, data.bytes])
            elif name == topic:
                append(Delivery(stream, entry_id, data.bytes, 1))
            else:
                other = name.decode(errors="replace")
                self._buffers[other].append(Delivery(other, entry_id, data.bytes, 1))

    def _reject_frames(self, sock: zmq.Socket, stream: str, entry_id: str, frames: list[bytes]) -> None:
        """Dead-letter a message that is not [stream, data]: `frames` so far, then the rest of its frames."""
        while sock.getsockopt(zmq.RCVMORE):
            frames.append(sock.recv(zmq.NOBLOCK))
        reason = f"frames: expected 2 [stream, data], got {len(frames)}"
        self.dead_letter(stream, "", Delivery(stream, entry_id, b"".join(frames), 1), reason)

    def _ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        """Nothing to ack: ZeroMQ has no broker-side pending list."""

    def _dead_letter_many(self, stream: str, group: str, letters: Sequence[DeadLetter]) -> None:
        self._dead.extend(replace(letter, entry_id=str(next(self._seq))) for letter in letters)

    def requeue(self, stream: str, group: str, delivery: Delivery, consumer: str | None = None) -> str | None:
        entry_id = str(next(self._seq))
        with self._pull_lock:
            self._buffers[stream].append(Delivery(stream, entry_id, delivery.data, delivery.deliveries + 1))
        return entry_id

    def _claim_stale(self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        return []  # nothing is pending anywhere but in this process

    def read(self, stream: str, after: str, count: int, block_ms: int) -> list[Delivery]:
        return self._consume(stream, "", "", count, block_ms)

    def length(self, stream: str) -> int:
        return len(self._buffers[stream])

    def pending(self, stream: str, group: str) -> int:
        return 0

    def trim(self, stream: str) -> int:
        return len(self._buffers[stream])

    def dead_letters(self, count: int = 100, before: str | None = None) -> list[DeadLetter]:
        letters = [d for d in self._dead if before is None or int(d.entry_id) < int(before)]
        return letters[-count:]

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
        # destroy() closes every socket with its linger (producers flush queued messages for up to zmq_linger_ms).
        self._ctx.destroy()
