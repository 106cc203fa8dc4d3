"""The rollout node's settings: `[rollout]` (`RolloutConfig`) and the sections it reads (`RolloutSettings`).

Torch-free and import-light: `slipstream rollout --help` builds its options from these classes.

    [model]
    path = "runs/demo/model"        # the torch engine loads it (unless [rollout.torch] names its own)

    [rollout]
    engine = "torch"                # or "sglang"
    tasks_per_call = 16
    proxy_port = 8000               # OpenAI-compatible agent proxy; absent = off

    [rollout.torch]
    max_batch_size = 64

    [rollout.sglang]                # engine = "sglang": attach to a server (url) or launch one (model_path)
    url = "http://127.0.0.1:30000"

    [weights]                       # where the learner's weight broadcast is (torch engine)
    master_addr = "learner-0"
"""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field

from bus.config import BusConfig
from bus.settings import ENV_NAME_PATTERN, ModelConfig, NodeSettings, Section, read_secret
from envs.config import TaskConfig
from rollout_node.engines.base import TorchEngineConfig
from rollout_node.server_config import HOST_PATTERN, NAME_PATTERN, SGLangConfig
from telemetry.config import TelemetryConfig
from weight_broadcast.config import ReceiverConfig

ToolParser = Literal["hermes", "none"]  # rollout_node.tool_calls


class RolloutConfig(Section):
    """How one rollout node takes tasks, generates, publishes, announces itself and serves agents."""

    node_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=NAME_PATTERN,
        description="consumer name on the tasks stream and producer name of its groups; stable across restarts so a "
        "restarted node re-reads its own pending tasks (None: <hostname>-<index>)",
    )
    index: int = Field(0, ge=0, le=9999, description="this node's number on its host; names it when node_id is None")
    engine: Literal["torch", "sglang"] = Field(
        "torch",
        description="torch: the built-in engine in this process, weights from the broadcast group ([weights]); "
        "sglang: an SGLang server, weights pushed to it over HTTP by the learner",
    )
    torch: TorchEngineConfig = Field(
        default_factory=TorchEngineConfig,
        description="the torch engine; model_path and dtype default to [model] path and dtype",
    )
    sglang: SGLangConfig | None = Field(
        None,
        description="the SGLang server: url to attach to, or how to launch one (None: launch one on [model] path)",
    )
    receive_weights: bool = Field(
        True,
        description="torch engine: join the learner's weight broadcast ([weights]); false keeps the checkpoint's "
        "weights (evaluation, tests)",
    )
    engine_url: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="URL of this node's engine HTTP server announced in Join.address, so the learner can push weights "
        "to it (None: the engine's own URL, if it has one)",
    )
    tasks_per_call: int = Field(
        16,
        ge=1,
        le=1024,
        description="tasks taken per poll and generated together (one engine call per distinct sampling setting): 16 "
        "tasks of 16 samples fill the torch engine's 256-row batch and keep 256 requests in flight on SGLang",
    )
    generation_workers: int = Field(
        1,
        ge=1,
        le=256,
        description="engine calls in flight at once (an SGLang server batches concurrent calls; the torch engine "
        "batches within a call)",
    )
    queue_size: int = Field(
        4, ge=1, le=4096, description="generated tasks waiting to be scored and published; generation waits when full"
    )
    min_version_wait_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="a task whose min_version the engine has not reached waits this long for the weights, then runs "
        "anyway (the learner judges staleness)",
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, le=3600, description="seconds between Heartbeat messages on the control stream"
    )
    shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="on SIGTERM/SIGINT, how long the tasks in hand may take to finish; the rest are aborted and "
        "requeued for other nodes",
    )
    engine_retry_s: float = Field(
        1.0, ge=0, le=600, description="pause after a failed engine call (a sick engine is not hammered)"
    )

    proxy_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="port of the OpenAI-compatible agent proxy in front of this node's engine (None: off; 0: a free "
        "port, logged)",
    )
    proxy_host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=253,
        pattern=HOST_PATTERN,
        description="address the proxy binds to (0.0.0.0 exposes it; set a token then)",
    )
    proxy_token_file: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="file whose first line is the bearer token the proxy requires; takes precedence over the env",
    )
    proxy_token_env: str = Field(
        "SLIPSTREAM_PROXY_TOKEN",
        min_length=1,
        max_length=256,
        pattern=ENV_NAME_PATTERN,
        description="environment variable read for the proxy's bearer token when no proxy_token_file is set "
        "(neither set: no token required)",
    )
    proxy_session_ttl_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="an agent session idle for this long is dropped without a trajectory (counted as abandoned)",
    )
    proxy_max_sessions: int = Field(
        1024, ge=1, le=1_000_000, description="open sessions at most; a new one beyond this is refused with 429"
    )
    proxy_max_request_bytes: int = Field(
        1_048_576, ge=1024, le=2**30, description="a request body larger than this is refused with 413"
    )
    proxy_body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a request body not received within this long is refused with 408"
    )
    proxy_max_tokens: int = Field(
        1024,
        ge=1,
        le=1_048_576,
        description="most tokens one call may generate; also the default when a request gives no max_tokens",
    )
    proxy_max_n: int = Field(16, ge=1, le=1024, description="most completions one call may ask for (n)")
    proxy_retry_after_s: int = Field(
        1, ge=1, le=3600, description="Retry-After (seconds) of the 503 answered while new weights are being loaded"
    )
    proxy_tool_parser: ToolParser = Field(
        "hermes",
        description="how tool calls are read from a chat completion with `tools`: 'hermes' (<tool_call>{json}"
        "</tool_call>, Hermes/Qwen templates) or 'none' (the text is the content)",
    )
    proxy_model_name: str = Field(
        "", max_length=256, description="model id the proxy reports in /v1/models ('' = the model folder's name)"
    )

    def resolved_node_id(self) -> str:
        """`node_id`, else `<hostname>-<index>`."""
        return self.node_id or f"{socket.gethostname()}-{self.index}"

    def proxy_token(self) -> str | None:
        """The proxy's bearer token: first line of `proxy_token_file`, else `$proxy_token_env`, else None."""
        return read_secret(self.proxy_token_file, self.proxy_token_env, "proxy_token_file", "token")


class RolloutSettings(NodeSettings):
    """Every section `slipstream rollout` reads from the shared TOML file (others are ignored)."""

    bus: BusConfig = Field(default_factory=BusConfig, description="the message bus")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="/metrics, /healthz and logs")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the policy checkpoint")
    task: TaskConfig = Field(default_factory=TaskConfig, description="prompt format and rewards (read by both nodes)")
    weights: ReceiverConfig = Field(default_factory=ReceiverConfig, description="the learner's weight broadcast")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="this node")

    def sglang_config(self) -> SGLangConfig:
        """`[rollout.sglang]`, or a server launched on `[model]` path when that section is absent."""
        return self.rollout.sglang or SGLangConfig(model_path=self.model.path)

    def torch_engine_config(self) -> TorchEngineConfig:
        """`[rollout.torch]` with model_path and dtype taken from `[model]` unless it sets them itself."""
        given = self.rollout.torch.model_fields_set
        defaults = {"model_path": self.model.path, "dtype": self.model.dtype} | self.model.pretrained_kwargs()
        return self.rollout.torch.model_copy(update={k: v for k, v in defaults.items() if k not in given})
