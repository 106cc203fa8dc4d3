"""`slipstream serve-engine --config FILE [--serve_engine.port 30001 ...]`: the torch engine behind SGLang's routes.

Serves `rollout_node.server.build_app` (generation, pause/continue, weight updates over a gloo/nccl group driven by
the learner's `HttpLink`, /metrics) on `[serve_engine]` host:port, plus the node telemetry server (/metrics,
/healthz) on `[telemetry]`. The API key comes from `serve_engine.api_key_file` or the variable named by
`serve_engine.api_key_env` (SLIPSTREAM_ENGINE_API_KEY), never from the command line. Prints the URL it serves on
stdout once it accepts connections; stops on SIGTERM or SIGINT.

This module stays import-light (`slipstream --help`); torch loads in `run`.
"""

from __future__ import annotations

import argparse
import signal
import threading

from slipstream.commands import exit_on_config_error, load_or_exit

TAKES_OVERRIDES = True  # dotted --section.field overrides arrive as args.overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [-h] [--config CONFIG] [--section.field VALUE ...]"
    parser.add_argument("--config", default=None, help="TOML file with the [serve_engine] and [telemetry] sections")


def run(args: argparse.Namespace) -> int:
    from rollout_node.server_config import ServeEngineSettings

    settings = load_or_exit(ServeEngineSettings, args, "serve-engine")
    config = settings.serve_engine
    with exit_on_config_error("serve-engine"):
        api_key = config.api_key()

    import structlog

    from rollout_node.engines.torch_engine import TorchEngine
    from rollout_node.server import build_app, weight_loader
    from telemetry.http import serve_in_thread
    from telemetry.node import start_node_telemetry
    from weight_broadcast.http_receiver import HttpReceiver

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serving: list[TorchEngine] = []  # the engine, once it serves: /healthz is 503 while the model loads

    def readiness() -> tuple[bool, dict[str, int]]:
        return (True, {"version": serving[0].version}) if serving else (False, {})

    # Telemetry first: it configures logging (stderr), so even the model loading logs stay off stdout.
    telemetry = start_node_telemetry(settings.telemetry, role="engine", node_id=config.name, readiness=readiness)
    log = structlog.get_logger("slipstream.serve_engine")
    if api_key is None and config.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on a non-loopback address without an API key: anyone reaching it can change weights")
    try:
        engine = TorchEngine.from_config(config.engine)
        receiver = HttpReceiver(weight_loader(engine), device=config.engine.device, timeout_s=config.weight_timeout_s)
        app = build_app(
            engine,
            api_key=api_key,
            receiver=receiver,
            model_path=config.engine.model_path,
            tokenizer=engine.tokenizer,
            max_body_bytes=config.max_body_bytes,
            body_timeout_s=config.body_timeout_s,
            health_timeout_s=config.health_timeout_s,
        )
        server = serve_in_thread(app, config.host, config.port)
        serving.append(engine)
        print(server.url, flush=True)
        log.info("serve-engine ready", url=server.url, telemetry=telemetry.url, auth=api_key is not None)
        while server.alive and not stop.wait(0.5):
            pass
        server.stop()
        engine.close()
    finally:
        telemetry.stop()
    return 0 if stop.is_set() else 1  # the HTTP server died on its own
