"""How the sender reaches each engine outside the process group: the per-engine hook of every update.

The sender drives N engines whose receiving is triggered remotely. For each engine it holds an `EngineLink` and calls,
each in its own thread and each with a deadline:

1. `ready(group)`   roll call before a group is formed: is the engine there to join it?
2. `join(spec)`     make the engine join the group (runs while the sender joins it too);
3. `receive(w)`     make the engine receive update `w` (runs while the sender broadcasts the buckets) and return once
                    the engine has loaded it; raise when it did not.

Two links exist:

- `StoreLink`: our `WeightReceiver`, which triggers itself from the announcements on the rendezvous store and answers
  on the store (ready key, ack key). Nothing is sent to it.
- `HttpLink`: an engine with SGLang's HTTP routes (SGLang >= 0.5.22, or `serve-engine`): `/init_weights_update_group`,
  then per update `/pause_generation`, `/begin_weight_update`, one `/update_weights_from_distributed` per bucket
  (`load_format="flattened_bucket"`, the bucket's names/dtypes/shapes; the version and `flush_cache` with the last
  one), `/end_weight_update`, `/continue_generation`. SGLang refuses updates outside that session.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Protocol

import httpx
import structlog

from bus.schema import Weights
from weight_broadcast.rendezvous import Board, GroupSpec, JoinRequest

log = structlog.get_logger(__name__)


class LinkError(RuntimeError):
    """An engine did not join or did not load an update; the message says which and why, `status` the HTTP status
    when the engine answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EngineLink(Protocol):
    """The sender's handle on one engine (see the module docstring for the call order)."""

    name: str
    n_ranks: int
    # Removed engines with this set are probed again by the sender (they cannot ask to rejoin themselves).
    rejoin_by_sender: bool

    def ready(self, group: str, deadline: float) -> bool:
        """Whether the engine answered the roll call of `group` before `deadline` (time.monotonic())."""
        ...

    def join(self, spec: GroupSpec, master_addr: str, master_port: int, deadline: float) -> None:
        """Make the engine join `spec.group`; returns once it joined, raises `LinkError` otherwise."""
        ...

    def receive(self, weights: Weights, deadline: float) -> None:
        """Make the engine receive `weights`; returns once it loaded them, raises `LinkError` otherwise."""
        ...

    def leave(self, group: str, deadline: float) -> None:
        """Tell the engine that `group` is retired (best effort, never raises)."""
        ...


class StoreLink:
    """A `WeightReceiver` that reads announcements from the store and acks there."""

    rejoin_by_sender = False

    def __init__(self, board: Board, request: JoinRequest) -> None:
        self.board = board
        self.name = request.name
        self.n_ranks = request.n_ranks
        self.incarnation = request.incarnation

    def ready(self, group: str, deadline: float) -> bool:
        return self.board.wait_ready(group, self.name, deadline)

    def join(self, spec: GroupSpec, master_addr: str, master_port: int, deadline: float) -> None:
        """Nothing to send: the receiver reads the spec from the store after its roll call and joins."""

    def receive(self, weights: Weights, deadline: float) -> None:
        error = self.board.wait_ack(weights.group, weights.version, self.name, deadline)
        if error is None:
            raise LinkError(f"engine {self.name}: no ack for version {weights.version} within the timeout")
        if error:
            raise LinkError(f"engine {self.name}: {error}")

    def leave(self, group: str, deadline: float) -> None:
        """Nothing to send: the receiver closes its old group when it joins the next one."""


class HttpLink:
    """An engine with SGLang's weight-update HTTP routes at `url` (e.g. "http://host:30000").

    pause_mode: SGLang's `/pause_generation` mode during an update: "retract" keeps the requests in flight (they are
    recomputed with the new weights), "abort" drops them, "in_place" keeps them with their old KV cache (and the
    prefix cache is not flushed: SGLang refuses a flush while requests are held, so cached prefixes keep the old
    weights' KV).
    api_key: sent as `Authorization: Bearer <key>` (SGLang's `--api-key`, serve-engine's api key), if set.
    """

    rejoin_by_sender = True

    def __init__(
        self, name: str, url: str, n_ranks: int = 1, pause_mode: str = "retract", api_key: str | None = None
    ) -> None:
        if n_ranks < 1:
            raise ValueError(f"n_ranks: must be >= 1, got {n_ranks}")
        if pause_mode not in ("retract", "abort", "in_place"):
            raise ValueError(f"pause_mode: must be retract, abort or in_place, got {pause_mode!r}")
        self.name = name
        self.url = url.rstrip("/")
        self.n_ranks = n_ranks
        self.pause_mode = pause_mode
        self._http = httpx.Client(headers={"Authorization": f"Bearer {api_key}"} if api_key else None)

    def ready(self, group: str, deadline: float) -> bool:
        """Whether the server answers at all (GET /model_info, any status below 500). Not /health: SGLang's
        generates a token by default and answers 503 while generation is paused, and a server a dead sender left
        paused must still be let back in (the next update resumes it). A 401 answers too: an admin key is refused
        on the routes that need the plain API key, and the join says so if the key is wrong for it as well."""
        try:
            return self._http.get(f"{self.url}/model_info", timeout=_remaining(deadline)).status_code < 500
        except httpx.HTTPError:
            return False

    def join(self, spec: GroupSpec, master_addr: str, master_port: int, deadline: float) -> None:
        member = spec.member(self.name)
        if member is None:
            raise LinkError(f"engine {self.name}: not a member of group {spec.group}")
        self._post(
            "init_weights_update_group",
            {
                "master_address": master_addr,
                "master_port": master_port,
                "rank_offset": member.rank_offset,
                "world_size": spec.world_size,
                "group_name": spec.group,
                "backend": spec.backend,
            },
            deadline,
        )

    def receive(self, weights: Weights, deadline: float) -> None:
        self._post("pause_generation", {"mode": self.pause_mode}, deadline)
        began = False
        try:
            self._begin(deadline)
            began = True
            self._send_buckets(weights, deadline)
            self._post("end_weight_update", {}, deadline)
        except LinkError:
            with contextlib.suppress(LinkError):  # close the session and resume if the engine still answers
                if began:
                    self._post("end_weight_update", {}, deadline)
                self._post("continue_generation", {}, deadline)
            raise
        self._post("continue_generation", {}, deadline)

    def _begin(self, deadline: float) -> None:
        """Open SGLang's weight-update session. One left open by a sender that died mid-update is closed first: the
        new group's update replaces whatever that one loaded."""
        try:
            self._post("begin_weight_update", {"selector": "all"}, deadline)
        except LinkError as exc:
            if exc.status == 404:
                raise LinkError(
                    f"engine {self.name}: no /begin_weight_update: weight updates need SGLang >= 0.5.22 "
                    "(pip install 'sglang>=0.5.22,<0.6')",
                    status=404,
                ) from exc
            if "already open" not in str(exc):
                raise
            log.warning("engine had a weight-update session open; closing it", engine=self.name)
            self._post("end_weight_update", {}, deadline)
            self._post("begin_weight_update", {"selector": "all"}, deadline)

    def _send_buckets(self, weights: Weights, deadline: float) -> None:
        """One /update_weights_from_distributed per bucket, in send order (each returns once that bucket loaded).
        The version and the cache flush go with the last bucket: SGLang relabels its weights with every
        `weight_version` it is sent, and weights half loaded are not the new version."""
        for b, bucket in enumerate(weights.buckets):
            specs = [weights.tensors[i] for i in bucket]
            last = b == len(weights.buckets) - 1
            body: dict[str, Any] = {
                "names": [s.name for s in specs],
                "dtypes": [s.dtype for s in specs],
                "shapes": [list(s.shape) for s in specs],
                "group_name": weights.group,
                # in_place keeps the paused requests' KV cache, so SGLang refuses the flush while they are there.
                "flush_cache": last and self.pause_mode != "in_place",
                "load_format": "flattened_bucket",
            }
            if last:
                body["weight_version"] = str(weights.version)
            self._post("update_weights_from_distributed", body, deadline)

    def leave(self, group: str, deadline: float) -> None:
        """Ask the engine to drop `group` (best effort: a dead engine has nothing to drop)."""
        try:
            self._post("destroy_weights_update_group", {"group_name": group}, deadline)
        except LinkError as exc:
            log.info("engine did not leave its group", engine=self.name, group=group, error=str(exc))

    def _post(self, route: str, body: dict[str, Any], deadline: float) -> None:
        try:
            response = self._http.post(f"{self.url}/{route}", json=body, timeout=_remaining(deadline))
        except httpx.HTTPError as exc:
            raise LinkError(f"engine {self.name}: POST /{route} failed: {exc!r}") from exc
        reply = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if not response.is_success or (isinstance(reply, dict) and reply.get("success") is False):
            message = reply.get("message") if isinstance(reply, dict) else None
            raise LinkError(
                f"engine {self.name}: POST /{route} -> {response.status_code}: {message or response.text}",
                status=response.status_code,
            )


def _remaining(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())
