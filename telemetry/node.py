"""One call that gives a node its telemetry: logs configured, identity exposed, /metrics and /healthz served.

server = start_node_telemetry(settings.telemetry, role="rollout", node_id="rollout-0", readiness=node.readiness)
...
server.stop()
"""

from __future__ import annotations

from telemetry.config import TelemetryConfig
from telemetry.logs import configure_logging
from telemetry.metrics import set_node_info
from telemetry.server import Readiness, TelemetryServer


def start_node_telemetry(
    config: TelemetryConfig, *, role: str, node_id: str, readiness: Readiness | None = None
) -> TelemetryServer:
    """Configure logging (every line bound to node_id and role), set `slipstream_node_info`, start the server."""
    configure_logging(config.log_format, config.log_level, node_id=node_id, role=role)
    set_node_info(node_id, role)
    return TelemetryServer(config.host, config.port, readiness=readiness).start()
