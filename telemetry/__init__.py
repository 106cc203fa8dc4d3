"""Telemetry of every node. Import from the modules; this file stays empty so that `import telemetry.metrics`
(done by the bus on every import) does not pull in pydantic, structlog's renderers and the HTTP server.

- `telemetry.metrics`: every Prometheus metric, on the isolated `REGISTRY`; `set_node_info`.
- `telemetry.server`: `TelemetryServer`, serving /metrics and /healthz.
- `telemetry.http`: `serve_in_thread`, uvicorn in a daemon thread: the HTTP server of every node (engine server, agent
  proxy, telemetry).
- `telemetry.logs`: `configure_logging`, `set_policy_version`, `bind_context` (structlog).
- `telemetry.config`: `TelemetryConfig`, the `[telemetry]` section of a node's settings (and its `tracking`).
- `telemetry.node`: `start_node_telemetry`, the three above in one call.
- `telemetry.tracking`: `setup_tracking`, the learner's metrics to TensorBoard / wandb under TRL-like keys.

Imports nothing of Slipstream's own: every other package may import it.
"""
