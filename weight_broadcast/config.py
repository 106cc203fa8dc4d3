"""Config sections of the weight broadcast: `[broadcast]` on learner rank 0, `[weights]` on a rollout node.

Torch-free and import-light, so a node's settings (and `--help`) never pull torch in.

    [broadcast]                 # learner: hosts the rendezvous store, sends every update
    master_addr = "learner-0"   # the address engines use to reach this host
    master_port = 29600
    backend = "gloo"            # nccl for SGLang on GPUs
    checksum = "sum64"
    api_key_file = "/run/secrets/engine-api-key"   # for SGLang engines started with an API key

    [weights]                   # rollout node: receives updates into its torch engine
    master_addr = "learner-0"
    master_port = 29600
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bus.settings import ApiKeySource, Section

Checksum = Literal["sum64", "crc32", "none"]
# Default bucket sizes (MiB), measured with `slipstream bench broadcast` on CPU; NCCL/SGLang prefer few big calls.
GLOO_BUCKET_MB = 16.0
NCCL_BUCKET_MB = 512.0


class RendezvousConfig(Section):
    """Where the learner's rendezvous store listens, and how long anyone waits for a peer."""

    master_addr: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9.:\-]+$",
        description="host name or IP of learner rank 0 as the engines reach it (the TCPStore and the group's master)",
    )
    master_port: int = Field(
        29600, ge=0, le=65535, description="TCP port of the rendezvous store on learner rank 0; 0 picks a free one"
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="a peer that does not answer within this long (joining, receiving, acking) is removed and must "
        "rejoin; also the timeout of every collective of the broadcast group",
    )


class BroadcastConfig(RendezvousConfig, ApiKeySource):
    """The sending side (learner rank 0). The API key is the one sent to SGLang engines (HttpLink): the servers'
    `--api-key`, or their `--admin-api-key` when they have one (the weight and pause routes need it)."""

    backend: Literal["gloo", "nccl"] = Field(
        "gloo", description="torch.distributed backend of the broadcast group: gloo (CPU engines) or nccl (GPU/SGLang)"
    )
    bucket_mb: float | None = Field(
        None,
        gt=0,
        le=65536,
        description="largest flattened bucket in MiB (one dtype per bucket; a bigger tensor travels alone). Small "
        "buckets pipeline copying with sending on CPUs; each bucket costs SGLang one HTTP call. None: "
        f"{GLOO_BUCKET_MB:g} for gloo, {NCCL_BUCKET_MB:g} for nccl",
    )
    checksum: Checksum = Field(
        "sum64",
        description="per-bucket verification: sum64 (wrapping int64 sum of the bytes, at memory speed; misses swapped "
        "words), crc32 (catches any reordering, ~2 GB/s per core, host memory), none (byte counts only)",
    )
    group_prefix: str = Field(
        "slipstream-weights",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="name prefix of the broadcast process groups (each membership change forms a new group)",
    )
    join_poll_s: float = Field(
        0.5, gt=0, le=60, description="how often the background thread looks for joining or removed engines"
    )
    rejoin_after_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="a removed engine reached over HTTP (SGLang) is probed again after this long and readmitted when "
        "it answers; engines on the store ask to rejoin themselves",
    )

    @property
    def bucket_bytes(self) -> int:
        """`bucket_mb` in bytes (its backend's default when unset)."""
        mb = self.bucket_mb or (NCCL_BUCKET_MB if self.backend == "nccl" else GLOO_BUCKET_MB)
        return max(1, int(mb * 2**20))


class ReceiverConfig(RendezvousConfig):
    """The receiving side (a rollout node's torch engine)."""

    name: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="this engine's name in the broadcast group, unique among engines (None: <hostname>-<pid>)",
    )
    double_buffer: bool = Field(
        False,
        description="receive into two alternating buffer sets, so the tensors handed to the engine's load stay valid "
        "until the next load and the engine may alias them instead of copying (twice the buffer memory)",
    )
