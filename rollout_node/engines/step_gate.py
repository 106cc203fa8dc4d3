"""`StepGate`: decode steps run concurrently, a weight swap runs alone between them, and pause/resume/abort gate
new steps (the TorchEngine's threading contract, see `rollout_node.engines.base`). Torch-free: plain threading.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import structlog

log = structlog.get_logger(__name__)


class StepGate:
    """Admits decode steps (any number at once, from any threads) unless paused, aborted, or a weight swap is
    waiting; a swap waits for the steps in progress to end and then runs alone (writer-preferring RW lock)."""

    def __init__(self, pause_timeout_s: float) -> None:
        self._cond = threading.Condition()
        self._swap_lock = threading.Lock()  # one swap at a time
        self._steps = 0  # decode steps in progress
        self._swaps_waiting = 0
        self._paused_until: float | None = None  # monotonic deadline of the current pause
        self._pause_timeout_s = pause_timeout_s
        self.abort_epoch = 0  # bumped by abort(); a call that started in an older epoch stops

    def pause(self) -> None:
        with self._cond:
            self._paused_until = time.monotonic() + self._pause_timeout_s

    def resume(self) -> None:
        with self._cond:
            self._paused_until = None
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self.abort_epoch += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def step(self, abort_epoch: int) -> Iterator[bool]:
        """Hold the model for one step; yields False (holding nothing) if aborted since `abort_epoch`."""
        with self._cond:
            while True:
                if self.abort_epoch != abort_epoch:
                    admitted = False
                    break
                if self._paused_until is not None and time.monotonic() >= self._paused_until:
                    log.warning("pause expired without resume; resuming", pause_timeout_s=self._pause_timeout_s)
                    self._paused_until = None
                if self._paused_until is None and not self._swaps_waiting:
                    self._steps += 1
                    admitted = True
                    break
                wake_at = self._paused_until or time.monotonic() + self._pause_timeout_s
                self._cond.wait(timeout=max(0.0, wake_at - time.monotonic()))
        try:
            yield admitted
        finally:
            if admitted:
                with self._cond:
                    self._steps -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout_s: float) -> Iterator[None]:
        """Hold the model alone: no step runs inside. Raises TimeoutError after `timeout_s` without it."""
        deadline = time.monotonic() + timeout_s
        if not self._swap_lock.acquire(timeout=timeout_s):
            raise TimeoutError(f"weight swap: another swap held the engine for over {timeout_s}s")
        try:
            with self._cond:
                self._swaps_waiting += 1
                idle = self._cond.wait_for(lambda: self._steps == 0, timeout=max(0.0, deadline - time.monotonic()))
                if not idle:
                    self._swaps_waiting -= 1
                    self._cond.notify_all()
                    raise TimeoutError(f"weight swap: a decode step did not end within {timeout_s}s")
            try:
                yield
            finally:
                with self._cond:
                    self._swaps_waiting -= 1
                    self._cond.notify_all()
        finally:
            self._swap_lock.release()
