"""Config sections of the HTTP engines: the SGLang server a rollout node uses, and our own `serve-engine`.

Torch-free and import-light (pydantic only), so a node's settings and `--help` never pull torch or httpx in.

    [serve_engine]                      # `slipstream serve-engine`: the torch engine behind SGLang's routes
    host = "127.0.0.1"
    port = 30000
    api_key_file = "/run/secrets/engine-api-key"

    [serve_engine.engine]               # the TorchEngineConfig of the engine it serves
    model_path = "runs/demo/model"

`SGLangConfig` has no section of its own: the rollout node's settings nest it where they choose (e.g.
`[rollout.sglang]`). API keys are read from a file or an environment variable, never from a config value or the
command line, so they do not end up in shell history, `ps` or a config repository.
"""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field, model_validator

from bus.settings import ApiKeySource, NodeSettings
from rollout_node.engines.base import TorchEngineConfig
from telemetry.config import TelemetryConfig

NAME_PATTERN = r"^[A-Za-z0-9_.:-]+$"  # node ids, session ids: they appear in stream entries, logs and URLs
HOST_PATTERN = r"^[A-Za-z0-9.:\-]+$"  # a host name or an IPv4/IPv6 address to bind


class SGLangConfig(ApiKeySource):
    """An SGLang server (>= 0.5) that a rollout node attaches to (`url`) or launches itself (`model_path`)."""

    url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        max_length=2048,
        description="base URL of a running SGLang server (e.g. http://127.0.0.1:30000); None: launch one",
    )
    model_path: str | None = Field(
        None, min_length=1, max_length=4096, description="checkpoint SGLang loads when launched (--model-path)"
    )
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=253,
        pattern=HOST_PATTERN,
        description="address a launched server binds to; 127.0.0.1 keeps it off the network",
    )
    port: int = Field(30000, ge=0, le=65535, description="port a launched server listens on; 0 picks a free one")
    launch_args: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="more `python -m sglang.launch_server` arguments, e.g. ['--tp-size', '2', "
        "'--mem-fraction-static', '0.7']",
    )
    logprobs: Literal["auto", "temperature_scaled", "raw"] = Field(
        "auto",
        description="what SGLang's output_token_logprobs hold when sampling: temperature_scaled (SGLang's default: "
        "log softmax(logits / T) before top-k/top-p), raw (server env SGLANG_RETURN_ORIGINAL_LOGPROB=1: log "
        "softmax(logits)), or auto: probed once on connecting",
    )
    max_top_logprobs: int = Field(
        64,
        ge=1,
        le=4096,
        description="most top logprobs per token asked for to renormalise top-k / top-p samples onto their support; "
        "a top_k above it (without top_p) is refused, a top_p nucleus wider than it fails the call",
    )
    pause_mode: Literal["retract", "in_place"] = Field(
        "retract",
        description="/pause_generation mode of pause(): retract (requests go back to the queue, KV recomputed) or "
        "in_place (kept with their KV cache); both keep the calls in flight",
    )
    pause_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="a pause() that no resume() lifts is lifted after this many seconds"
    )
    generate_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="longest wait for one /generate answer (all its samples)"
    )
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="longest wait for any other route's answer")
    connect_timeout_s: float = Field(5.0, gt=0, le=600, description="longest wait to open a connection")
    startup_timeout_s: float = Field(
        1200.0,
        gt=0,
        le=86400,
        description="longest wait for the server to answer /health after launching or attaching (model loading, "
        "CUDA graph capture)",
    )

    @model_validator(mode="after")
    def _url_or_model(self) -> SGLangConfig:
        if self.url is None and self.model_path is None:
            raise ValueError("url or model_path: set url to attach to a server, or model_path to launch one")
        return self


class ServeEngineConfig(ApiKeySource):
    """`slipstream serve-engine`: the torch engine behind SGLang's HTTP routes (see rollout_node/server.py)."""

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=253,
        pattern=HOST_PATTERN,
        description="bind address; 127.0.0.1 keeps it off the network, 0.0.0.0 exposes it (set an API key then)",
    )
    port: int = Field(30000, ge=0, le=65535, description="HTTP port; 0 picks a free one (printed on start)")
    node_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=NAME_PATTERN,
        description="this server's id in logs and slipstream_node_info (None: engine-<hostname>)",
    )
    max_body_mb: float = Field(
        8.0, gt=0, le=1024, description="largest request body in MiB; a bigger one is refused with 413"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a request body not received within this long is refused with 408"
    )
    weight_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="timeout of the weight-update group: joining it and every bucket's collective",
    )
    health_timeout_s: float = Field(
        20.0, gt=0, le=3600, description="/health_generate answers 503 when one token takes longer than this"
    )
    engine: TorchEngineConfig = Field(
        default_factory=TorchEngineConfig, description="the torch engine served ([serve_engine.engine])"
    )

    @property
    def max_body_bytes(self) -> int:
        """`max_body_mb` in bytes."""
        return int(self.max_body_mb * 2**20)

    @property
    def name(self) -> str:
        """`node_id`, or engine-<hostname> when unset."""
        return self.node_id or f"engine-{socket.gethostname()}"


class ServeEngineSettings(NodeSettings):
    """Everything `slipstream serve-engine` reads from the shared TOML file."""

    serve_engine: ServeEngineConfig = Field(default_factory=ServeEngineConfig, description="the HTTP engine server")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="/metrics, /healthz and logs")
