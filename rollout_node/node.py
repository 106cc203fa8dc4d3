"""The rollout node: tasks from the bus -> engine -> rewards -> one `Group` per task on the trajectories stream.

    node = RolloutNode(settings)     # settings: rollout_node.config.RolloutSettings
    node.start()                     # engine, bus, Join, threads, telemetry (and the agent proxy if configured)
    node.serve()                     # until request_stop() (SIGTERM/SIGINT under run_node)
    node.shutdown()                  # finish or release the tasks in hand, Leave

Threads and their jobs:

- generation workers and the scorer: the tasks, from poll to ack (`rollout_node.pipeline.TaskPipeline`); what goes
  out and its count are `rollout_node.trajectories`.
- weights (torch engine): a `WeightReceiver` in the learner's broadcast group; each update is staged and swapped
  between decode steps, so generation in flight records the switch in its samples' version_ranges.
- heartbeat: Join on start, Heartbeat every `heartbeat_interval_s`, Leave on exit (control stream).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from bus.codec import encode
from bus.consumer import MessageConsumer
from bus.schema import Heartbeat, Join, Leave, NodeEvent, Task
from bus.settings import ModelConfig, load_pretrained
from bus.transport import Transport, setup_transport
from envs import RewardSet
from rollout_node.config import RolloutSettings
from rollout_node.engines.base import Engine
from rollout_node.pipeline import TaskPipeline
from rollout_node.trajectories import Publisher
from telemetry.logs import set_policy_version
from telemetry.metrics import ROLLOUT_HEARTBEATS_SENT, ROLLOUT_POLICY_VERSION
from telemetry.node import start_node_telemetry

log = structlog.get_logger(__name__)

CLOSE_JOIN_S = 2.0  # at shutdown, how long background threads (weights, heartbeat) get to notice and end


def build_engine(settings: RolloutSettings) -> Engine:
    """The engine `rollout.engine` names (imported only now: torch or the SGLang client)."""
    if settings.rollout.engine == "torch":
        from rollout_node.engines.torch_engine import TorchEngine

        return TorchEngine.from_config(settings.torch_engine_config())
    from rollout_node.engines.sglang import SGLangEngine

    return SGLangEngine.from_config(settings.sglang_config())


def load_tokenizer(engine: Engine, model: ModelConfig) -> Any:
    """The engine's tokenizer when it has one, else the checkpoint's (`[model]`: a local folder or a Hub id)."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, model.path, model)


class RolloutNode:
    """One rollout node (see the module docstring). `engine`/`tokenizer` may be given (tests, embedding)."""

    def __init__(self, settings: RolloutSettings, engine: Engine | None = None, tokenizer: Any = None) -> None:
        self.settings, self.config = settings, settings.rollout
        self.node_id = self.config.resolved_node_id()
        self.engine, self.tokenizer = engine, tokenizer
        self.rewards = RewardSet.from_config(settings.task)  # a wrong reward path fails here, before anything runs
        self._stop = threading.Event()  # serve() returns
        self._stop_taking = threading.Event()  # workers take no more tasks
        self._closing = threading.Event()  # background threads (weights, heartbeat) end
        self._updating = threading.Event()  # a weight update is being loaded (the proxy answers 503 meanwhile)
        self._pipeline: TaskPipeline | None = None  # the tasks in hand, made by start() once engine and bus are there
        self._threads: list[threading.Thread] = []
        self._bus_contact = 0.0  # monotonic time of the last successful bus call
        self._version = 0  # the engine's version when last looked at
        self._telemetry: Any = None
        self._proxy: Any = None
        self.transport: Transport | None = None
        self.publisher: Publisher  # set by start(), with the consumer
        self.consumer: MessageConsumer

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> RolloutNode:
        """Serve telemetry, load the engine, join the bus, announce, start every thread. Returns self."""
        self._telemetry = start_node_telemetry(
            self.settings.telemetry, role="rollout", node_id=self.node_id, readiness=self.readiness
        )
        log.info("rollout node starting", engine=self.config.engine, telemetry_port=self._telemetry.port)
        if self.engine is None:
            self.engine = build_engine(self.settings)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.engine, self.settings.model)
        self._note_version(self.engine.version)
        bus = self.settings.bus
        self.transport = setup_transport(bus)
        self.publisher = Publisher(self.transport)
        self.consumer = MessageConsumer(self.transport, bus.stream("tasks"), "rollout", self.node_id, kinds=(Task,))
        self._touch_bus()
        if self.config.proxy_port is not None:
            self._start_proxy()
        self._announce(self._join())
        if self.config.engine == "torch" and self.config.receive_weights:
            # Not a daemon: it may be inside a store call when the node stops (e.g. a connect attempt to a learner that
            # is gone: a few seconds). The interpreter waits for it at exit; finalizing under it would abort the
            # process when the call returns (SIGABRT, "terminate called without an active exception"), not exit 0.
            self._spawn(self._receive_weights, "weights", daemon=False)
        self._spawn(self._heartbeats, "heartbeat")
        self._pipeline = TaskPipeline(
            self.settings,
            self.node_id,
            self.engine,
            self.tokenizer,
            self.rewards,
            self.consumer,
            self.publisher,
            self._stop_taking,
            self._closing,
            self._touch_bus,
        )
        self._pipeline.start(self._spawn)
        log.info("rollout node started", node_id=self.node_id, version=self.engine.version)
        return self

    def serve(self) -> None:
        """Block until `request_stop()`."""
        while not self._stop.wait(1.0):
            pass

    def request_stop(self) -> None:
        """Stop taking tasks and let `serve` return (safe from a signal handler)."""
        self._stop_taking.set()
        self._stop.set()

    def shutdown(self) -> None:
        """Finish the tasks in hand within `shutdown_timeout_s`, abort and requeue the rest, publish Leave, close.
        Also cleans up after a `start` that failed half-way."""
        self.request_stop()
        if self._proxy is not None:
            self._proxy.stop()
        left = self._pipeline.settle_in_hand() if self._pipeline is not None else []
        if self.transport is not None:
            self._announce(Leave(self.node_id, "rollout", self._version_now()))
        self._closing.set()
        for thread in self._threads:
            thread.join(timeout=CLOSE_JOIN_S)
        if self.engine is not None:
            self.engine.close()
        if self.transport is not None:
            self.transport.close()
        if self._telemetry is not None:
            self._telemetry.stop()
        log.info("rollout node stopped", released=len(left))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the engine is loaded, the bus answered recently and the node is not stopping."""
        fresh_s = 2 * self.config.heartbeat_interval_s + self.settings.bus.socket_timeout_s
        bus_ok = time.monotonic() - self._bus_contact < fresh_s
        details = {
            "engine": "loaded" if self.engine is not None else "loading",
            "bus": "ok" if bus_ok else "unreachable",
            "stopping": self._stop_taking.is_set(),
            "tasks_in_hand": self._pipeline.tasks_in_hand if self._pipeline is not None else 0,
        }
        return self.engine is not None and bus_ok and not self._stop_taking.is_set(), details

    def updating(self) -> bool:
        """Whether new weights are being loaded into the engine right now."""
        return self._updating.is_set()

    # --- weights, heartbeats, proxy ------------------------------------------------------------------------------
    def _receive_weights(self) -> None:
        """Join the learner's broadcast group (retrying until it is there) and load every update it sends."""
        from weight_broadcast.receiver import WeightReceiver
        from weight_broadcast.rendezvous import CONNECT_ATTEMPT_S

        config = self.settings.weights
        if config.name is None:
            config = config.model_copy(update={"name": self.node_id})
        receiver = WeightReceiver(config, load=self._load_weights)
        while not self._closing.is_set():
            try:
                receiver.connect(CONNECT_ATTEMPT_S)
                break
            except Exception as exc:
                log.warning("learner's weight broadcast unreachable; retrying", error=str(exc))
                self._closing.wait(1.0)
        else:
            return
        receiver.run(self._closing, poll_s=0.5)
        receiver.close()

    def _load_weights(self, named_tensors: list[Any], version: int) -> None:
        """The receiver's load: the engine stages the tensors and swaps them in between decode steps."""
        assert self.engine is not None
        self._updating.set()
        try:
            self.engine.load_weights(named_tensors, version)
        finally:
            self._updating.clear()
        self._note_version(version)

    def _heartbeats(self) -> None:
        while not self._closing.wait(self.config.heartbeat_interval_s):
            version = self._version_now()
            self._note_version(version)
            if self._announce(Heartbeat(self.node_id, "rollout", version)):
                ROLLOUT_HEARTBEATS_SENT.inc()

    def _join(self) -> Join:
        assert self.engine is not None
        address = self.config.engine_url or getattr(self.engine, "url", None)
        meta: dict[str, Any] = {"engine": self.config.engine, "n_ranks": int(getattr(self.engine, "n_ranks", 1))}
        if self._proxy is not None:
            meta["proxy"] = self._proxy.url
        return Join(self.node_id, "rollout", self.engine.version, meta=meta, address=address)

    def _announce(self, event: NodeEvent) -> bool:
        """Publish a node event on the control stream; a bus failure is logged, never raised."""
        assert self.transport is not None
        bus = self.settings.bus
        try:
            self.transport.publish(bus.stream("control"), [encode(event)], retain=bus.control_retain)
        except Exception as exc:
            log.warning("control message not sent", kind=type(event).__name__, error=str(exc))
            return False
        self._touch_bus()
        return True

    def _start_proxy(self) -> None:
        from rollout_node.proxy import AgentProxy

        assert self.engine is not None
        model_name = Path(self.settings.model.path).name or "slipstream"
        producer = f"{self.node_id}:proxy"
        self._proxy = AgentProxy(
            self.config, self.engine, self.tokenizer, self.publisher.publish, self.updating, producer, model_name
        ).start()

    # --- helpers -------------------------------------------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str, daemon: bool = True) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=daemon)
        thread.start()
        self._threads.append(thread)
        return thread

    def _touch_bus(self) -> None:
        self._bus_contact = time.monotonic()

    def _version_now(self) -> int:
        try:
            return self.engine.version if self.engine is not None else self._version
        except Exception:  # a remote engine that does not answer: report the last version seen
            return self._version

    def _note_version(self, version: int) -> None:
        self._version = version
        ROLLOUT_POLICY_VERSION.set(version)
        set_policy_version(version)


def run_node(settings: RolloutSettings) -> int:
    """`slipstream rollout`: start, serve until SIGTERM/SIGINT, shut down cleanly; returns the exit status (0).
    A second signal aborts the generation in flight at once (its tasks are requeued)."""
    node = RolloutNode(settings)
    signals = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal signals
        signals += 1
        log.info("signal received, stopping", signal=signal.Signals(signum).name)
        node.request_stop()
        if signals > 1 and node.engine is not None:
            node.engine.abort()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        node.start()
    except Exception:
        log.exception("rollout node failed to start")
        node.shutdown()
        return 1
    node.serve()
    node.shutdown()
    return 0
