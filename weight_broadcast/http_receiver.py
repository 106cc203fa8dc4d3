"""SGLang's weight-update HTTP routes for our torch engine, so one `HttpLink` drives SGLang and `serve-engine` alike.

    receiver = HttpReceiver(load=engine.load_weights)      # load(named_tensors, version)
    app.include_router(weight_routes(receiver))             # in serve-engine's FastAPI app

Routes (request bodies as SGLang's; replies {"success": bool, "message": str}, 400 on failure):

- POST /init_weights_update_group   {master_address, master_port, rank_offset, world_size, group_name, backend}
- POST /begin_weight_update   {selector}: opens the update session (refused while one is open), as SGLang >= 0.5.22
- POST /update_weights_from_distributed   {names, dtypes, shapes, group_name, weight_version, flush_cache,
  load_format="flattened_bucket"}: receives one bucket (the tensors' bytes back to back, as uint8); refused outside
  a session
- POST /end_weight_update   {}: closes the session (refused when none is open)
- POST /destroy_weights_update_group   {group_name}

SGLang loads each bucket as it arrives; here the buckets of a session are staged and loaded in one `load` call when
the bucket with flush_cache=true arrives (`HttpLink` sets it on the last bucket only) or the session ends, so an
update that breaks off midway loads nothing. The version loaded is the session's last `weight_version` (`HttpLink`
sends it with the last bucket, so SGLang never labels half-loaded weights as the new version), else the current one
plus 1. There is no checksum on this path (SGLang's requests carry none): sizes are checked by the collective itself.
Generation control (/pause_generation, /continue_generation, /health) is the engine server's.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Literal

import structlog
import torch
import torch.distributed as dist
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from bus.schema import TensorSpec
from weight_broadcast.layout import FlatBuckets, Layout
from weight_broadcast.receiver import LoadFn
from weight_broadcast.rendezvous import close_group, connect_store, open_group

log = structlog.get_logger(__name__)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # SGLang clients send fields this engine has no use for


class InitGroupRequest(_Request):
    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    group_name: str = Field(min_length=1)
    backend: str = "gloo"


class UpdateBucketRequest(_Request):
    names: list[str] = Field(min_length=1)
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str
    weight_version: str | None = None
    flush_cache: bool = True
    load_format: str | None = None


class DestroyGroupRequest(_Request):
    group_name: str


class BeginUpdateRequest(_Request):
    selector: Literal["target", "draft", "all"] = "all"  # SGLang's runners; this engine has the target only


class EndUpdateRequest(_Request):
    pass


class HttpReceiver:
    """One engine rank receiving buckets on SGLang's terms (see the module docstring). Thread-safe."""

    def __init__(self, load: LoadFn, device: torch.device | str = "cpu", timeout_s: float = 60.0) -> None:
        self.load = load
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.version: int | None = None
        self.group = ""
        self._lock = threading.Lock()
        self._store: dist.TCPStore | None = None
        self._pg: dist.ProcessGroup | None = None
        self._staged: list[tuple[str, torch.Tensor]] = []
        self._session_open = False
        self._session_version: int | None = None  # the session's last weight_version

    def init_group(self, request: InitGroupRequest) -> None:
        """Join `request.group_name` at `request.rank_offset` (blocks until every rank joined, or the timeout)."""
        with self._lock:
            self._close()
            self._staged = []  # buckets of a sender that is gone: a new group starts every update afresh
            self._store = connect_store(request.master_address, request.master_port, self.timeout_s)
            self._pg = open_group(
                self._store,
                request.group_name,
                request.rank_offset,
                request.world_size,
                request.backend,
                self.timeout_s,
            )
            self.group = request.group_name

    def begin(self) -> None:
        """Open an update session (SGLang's /begin_weight_update): buckets are accepted until `end`."""
        with self._lock:
            if self._session_open:
                raise ValueError("a weight-update session is already open; call end_weight_update() first")
            self._session_open, self._session_version, self._staged = True, None, []

    def update_bucket(self, request: UpdateBucketRequest) -> None:
        """Receive one bucket; on the session's last one (flush_cache) load everything staged as one version."""
        if request.load_format != "flattened_bucket":
            raise ValueError(f"load_format: only 'flattened_bucket' is served, got {request.load_format!r}")
        if not len(request.names) == len(request.dtypes) == len(request.shapes):
            raise ValueError("names/dtypes/shapes: must have the same length")
        if len(set(request.dtypes)) != 1:
            raise ValueError(f"dtypes: a bucket holds one dtype, got {sorted(set(request.dtypes))}")
        version = int(request.weight_version) if request.weight_version is not None else None
        with self._lock:
            if not self._session_open:
                raise ValueError(
                    "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
                )
            if self._pg is None or request.group_name != self.group:
                raise ValueError(f"group_name: {request.group_name!r} is not this engine's group {self.group!r}")
            specs = [TensorSpec(*spec) for spec in zip(request.names, request.dtypes, request.shapes, strict=True)]
            # One dtype: one bucket. Fresh buffers per update, so `load` may keep (alias) what it is handed.
            bucket = FlatBuckets(Layout.plan(specs, bucket_bytes=sys.maxsize), self.device)
            try:
                dist.broadcast(bucket.wire(0), src=0, group=self._pg)
            except Exception:
                self._staged = []  # what this session staged is incomplete: nothing of it is loaded
                self._close()
                raise
            self._staged.extend(bucket.named())
            if version is not None:
                self._session_version = version
            if request.flush_cache:
                self._load_staged()

    def end(self) -> None:
        """Close the session (SGLang's /end_weight_update), loading what was staged without a flush_cache bucket."""
        with self._lock:
            if not self._session_open:
                raise ValueError("no weight-update session is open; call begin_weight_update() first")
            if self._staged:
                self._load_staged()
            self._session_open = False

    def _load_staged(self) -> None:
        staged, self._staged = self._staged, []
        version = self._session_version if self._session_version is not None else (self.version or 0) + 1
        self.load(staged, version)
        self.version = version
        log.info("weights loaded", version=version, tensors=len(staged), group=self.group)

    def destroy_group(self, request: DestroyGroupRequest) -> None:
        with self._lock:
            if request.group_name == self.group:
                self._close()

    def _close(self) -> None:
        if self._pg is not None:
            close_group(self._pg)
        self._pg, self.group = None, ""


def weight_routes(receiver: HttpReceiver) -> APIRouter:
    """SGLang's weight-update routes over `receiver`."""
    router = APIRouter()

    def answer(action: str, call: Callable[[], None]) -> JSONResponse:
        try:
            call()
        except Exception as exc:
            log.warning("weight route failed", action=action, error=str(exc))
            return JSONResponse({"success": False, "message": f"{action}: {exc}"}, status_code=400)
        return JSONResponse({"success": True, "message": f"{action}: done"})

    @router.post("/init_weights_update_group")
    def init_weights_update_group(request: InitGroupRequest) -> JSONResponse:
        return answer("init_weights_update_group", lambda: receiver.init_group(request))

    @router.post("/begin_weight_update")
    def begin_weight_update(request: BeginUpdateRequest | None = None) -> JSONResponse:
        return answer("begin_weight_update", receiver.begin)

    @router.post("/update_weights_from_distributed")
    def update_weights_from_distributed(request: UpdateBucketRequest) -> JSONResponse:
        return answer("update_weights_from_distributed", lambda: receiver.update_bucket(request))

    @router.post("/end_weight_update")
    def end_weight_update(request: EndUpdateRequest | None = None) -> JSONResponse:
        return answer("end_weight_update", receiver.end)

    @router.post("/destroy_weights_update_group")
    def destroy_weights_update_group(request: DestroyGroupRequest) -> JSONResponse:
        return answer("destroy_weights_update_group", lambda: receiver.destroy_group(request))

    return router
