"""The `[telemetry]` config section: where /metrics and /healthz listen, and how logs look.

Torch-free and import-light. `telemetry` may not import `bus.settings.Section`, so this is a plain pydantic model
with the same rules (unknown keys are errors, values re-validated on assignment); it nests in any node's settings.

    [telemetry]
    host = "0.0.0.0"     # in a container, so Prometheus can scrape it
    port = 9400
    log_format = "json"
    log_level = "info"

    [telemetry.tracking]  # the learner's metrics in TensorBoard and/or wandb (pip install 'slipstream[tracking]')
    tensorboard_dir = "runs/demo/tensorboard"
    wandb_project = "slipstream"
    wandb_mode = "offline"
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
WandbMode = Literal["online", "offline", "disabled"]


class TrackingConfig(BaseModel):
    """Experiment tracking of the learner's per-step metrics (rank 0 only; other nodes ignore it). Nothing is
    imported or written while both sinks are off; `telemetry/tracking.py` writes them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    tensorboard_dir: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="folder for TensorBoard event files of the learner's metrics (TRL-like keys: reward, loss, "
        "clip_ratio/low_mean, eval/accuracy, ...); None: no TensorBoard. Needs the tensorboard package",
    )
    wandb_project: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[^/\\#?%:]+$",
        description="Weights & Biases project the learner logs the same metrics to, one wandb run per Slipstream run "
        "(named run.name); None: no wandb. Needs the wandb package",
    )
    wandb_mode: WandbMode = Field(
        "online",
        description="online (send to the wandb server), offline (write under <run.output_dir>/wandb, for `wandb "
        "sync` later) or disabled (wandb stays off even with wandb_project set)",
    )

    @field_validator("wandb_mode", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class TelemetryConfig(BaseModel):
    """Telemetry server address and log rendering of one node."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9.:\-]+$",
        description="IP address or host name the /metrics and /healthz server binds to; 0.0.0.0 (or ::) exposes it "
        "on every interface, e.g. in a container",
    )
    port: int = Field(
        9400, ge=0, le=65535, description="TCP port of the /metrics and /healthz server; 0 picks a free one"
    )
    log_format: LogFormat = Field(
        "auto",
        description="json (one JSON object per line), console (readable, for a terminal), or auto: json unless "
        "the log stream is a terminal, overridden by env SLIPSTREAM_LOG_FORMAT",
    )
    log_level: LogLevel = Field("info", description="lowest level logged, for Slipstream and every library it uses")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="TensorBoard / wandb logging of the learner's metrics"
    )

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        # Environment variables and ops habits write INFO / JSON; the meaning is the same.
        return value.lower() if isinstance(value, str) else value
