"""The learner's progress for a person: its "train_step", "eval" and "summary" log events folded into numbers, and
shown either as plain lines (pipes, CI, tests: one line per event) or as a live `rich` table (a terminal).

    view = make_view(sys.stdout, Progress())   # LiveView on a terminal, PlainView otherwise
    follow(learner_stderr, view)               # JSON log lines in; progress shown, other lines passed on
    view.close()
    print(view.progress.done_line(code))       # `done: exit=0 steps=40 ... eval_accuracy=0.180 elapsed_s=61.2`

`slipstream up` follows its learner child this way, and so does `slipstream learner` on a terminal.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import structlog
from rich.console import Console, ConsoleRenderable
from rich.live import Live
from rich.table import Table
from rich.text import Text

REFRESH_PER_S = 4  # the elapsed time ticks between steps; more often only costs CPU on a shared machine


@dataclass
class Progress:
    """What is known of the run, from the learner's events."""

    target_accuracy: float | None = None
    started: float = field(default_factory=time.monotonic)
    reached_target_s: float | None = None  # elapsed seconds at the first eval at or above target_accuracy
    reached_target_step: int | None = None  # the optimizer step of that eval
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, elapsed s, accuracy) of each eval
    eval_split: str = "heldout"  # "train" when the learner evaluates on its training prompts (task.eval_split)
    step: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    eval_accuracy: float | None = None
    first_eval_accuracy: float | None = None
    summary: dict[str, Any] | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def take(self, event: dict[str, Any]) -> str | None:
        """Fold one learner log event in; return the plain progress line for it, if it is a progress event."""
        name = event.get("event")
        if name == "train_step":
            self.step = int(event.get("step", self.step))
            self.last = event
            return (
                f"step {self.step:>5}  v{event.get('version', '?'):<4} reward {_num(event.get('reward_mean'))}  "
                f"loss {_num(event.get('loss'))}  staleness {_num(event.get('staleness_mean'))}"
                f"/{event.get('staleness_max', '?')}  tok/s {_num(event.get('tokens_per_s'), 0)}  "
                f"eval {_num(self.eval_accuracy)}  {self.elapsed():6.1f}s"
            )
        if name == "eval":
            self.eval_accuracy = float(event["eval_accuracy"])
            self.eval_split = str(event.get("eval_split", self.eval_split))
            step = int(event.get("step", self.step))
            self.evals.append((step, round(self.elapsed(), 2), self.eval_accuracy))
            if self.first_eval_accuracy is None:
                self.first_eval_accuracy = self.eval_accuracy
            target = self.target_accuracy
            if target is not None and self.reached_target_s is None and self.eval_accuracy >= target:
                self.reached_target_s, self.reached_target_step = self.elapsed(), step
            on = "  (on training prompts)" if self.eval_split == "train" else ""
            return f"eval  step {step:>5}  eval_accuracy={self.eval_accuracy:.3f}{on}"
        if name == "summary":
            self.summary = event
            if event.get("eval_accuracy") is not None:
                self.eval_accuracy = float(event["eval_accuracy"])
        return None

    def done_line(self, code: int) -> str:
        """The run's last line; scripts and tests read `eval_accuracy=<v> elapsed_s=<s>` at its end."""
        summary = self.summary or {}
        start = "-" if self.first_eval_accuracy is None else f"{self.first_eval_accuracy:.3f}"
        accuracy = "nan" if self.eval_accuracy is None else f"{self.eval_accuracy:.3f}"
        return (
            f"done: exit={code} steps={summary.get('steps', self.step)} eval_accuracy_start={start} "
            f"eval_accuracy={accuracy} elapsed_s={self.elapsed():.1f}"
        )

    def table(self) -> Table:
        """The run at a glance: the newest step's numbers, the evaluation and the clock."""
        last = self.last
        table = Table(title="slipstream learner", show_header=False, min_width=44)
        table.add_column("what", style="bold")
        table.add_column("value", justify="right")
        table.add_row("step", str(self.step))
        table.add_row("policy version", str(last.get("version", "-")))
        table.add_row("reward (mean)", _num(last.get("reward_mean")).strip())
        table.add_row("loss", _num(last.get("loss")).strip())
        start = "-" if self.first_eval_accuracy is None else f"{self.first_eval_accuracy:.3f}"
        now = "-" if self.eval_accuracy is None else f"{self.eval_accuracy:.3f}"
        on = "training prompts" if self.eval_split == "train" else "held out"
        table.add_row(f"eval accuracy, {on} (start -> now)", f"{start} -> {now}")
        table.add_row("throughput (tok/s)", _num(last.get("tokens_per_s"), 0).strip())
        staleness = f"{_num(last.get('staleness_mean')).strip()} / {last.get('staleness_max', '-')}"
        table.add_row("staleness (mean / max versions)", staleness)
        table.add_row("samples (step) / dropped (run)", f"{last.get('samples', '-')} / {last.get('dropped', '-')}")
        table.add_row("elapsed", f"{self.elapsed():.1f}s")
        return table


def _num(value: Any, digits: int = 3) -> str:
    return "   -  " if value is None else f"{float(value):6.{digits}f}"


class View(Protocol):
    """Where progress goes: `event` takes a learner log event, `note` a line for the person (a warning, a path)."""

    progress: Progress

    def event(self, event: dict[str, Any]) -> None: ...

    def note(self, text: str | Text) -> None: ...

    def close(self) -> None: ...


class PlainView:
    """One line per progress event on `out`: what pipes, CI logs and tests read."""

    def __init__(self, out: IO[str], progress: Progress) -> None:
        self.out, self.progress = out, progress

    def event(self, event: dict[str, Any]) -> None:
        line = self.progress.take(event)
        if line:
            self.note(line)

    def note(self, text: str | Text) -> None:
        print(text, file=self.out, flush=True)  # a Text prints as its plain text

    def close(self) -> None:
        pass


class _LiveTable:
    """Rebuilt at every refresh, so the elapsed time moves between steps."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __rich__(self) -> ConsoleRenderable:
        return self.progress.table()


class LiveView:
    """A `rich` table redrawn in place on a terminal; notes print above it. Closing leaves the last table shown."""

    def __init__(self, console: Console, progress: Progress) -> None:
        self.progress = progress
        self.console = console
        self._lock = threading.Lock()  # a follower thread and the main thread both write
        self._live = Live(_LiveTable(progress), console=console, refresh_per_second=REFRESH_PER_S)
        self._live.start()

    def event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.progress.take(event)
            self._live.refresh()

    def note(self, text: str | Text) -> None:
        with self._lock:
            self._live.console.print(text)

    def close(self) -> None:
        with self._lock:
            self._live.stop()


def make_view(out: IO[str], progress: Progress) -> View:
    """A live table when `out` is a terminal, plain lines otherwise."""
    if out.isatty():
        return LiveView(Console(file=out), progress)
    return PlainView(out, progress)


def follow(lines: Iterable[bytes], view: View, *, copy_to: IO[bytes] | None = None, echo: bool = False) -> None:
    """Feed a learner's JSON log lines to `view` until the stream ends.

    `copy_to` gets every line as it came (the learner's log file). Other lines: errors always become a note; with
    `echo`, every non-progress line does too, JSON events rendered as a terminal log line (the person sees the whole
    log above the table, as a learner on a terminal would show it)."""
    render = structlog.dev.ConsoleRenderer(colors=isinstance(view, LiveView) and view.console.is_terminal)
    for raw in lines:
        if copy_to is not None:
            copy_to.write(raw)
            copy_to.flush()
        event = _event(raw)
        if event is not None and event.get("event") in ("train_step", "eval", "summary"):
            view.event(event)
        elif echo:
            view.note(Text.from_ansi(render(None, "", dict(event))) if event else raw.decode(errors="replace").rstrip())
        elif event is not None and event.get("level") in ("error", "critical"):
            view.note(f"learner {event.get('level')}: {event.get('event')}")


def _event(raw: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
