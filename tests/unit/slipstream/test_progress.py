"""The learner's progress as a person sees it: plain lines off a terminal, a live rich table on one."""

from __future__ import annotations

import io
import json
import re

from rich.console import Console

from slipstream.progress import LiveView, PlainView, Progress, follow, make_view

STEP = {
    "event": "train_step",
    "step": 7,
    "version": 7,
    "reward_mean": 0.4375,
    "loss": -0.01234,
    "staleness_mean": 0.5,
    "staleness_max": 1,
    "tokens_per_s": 1234.5,
    "samples": 64,
    "dropped": 3,
}
EVAL = {"event": "eval", "step": 0, "eval_accuracy": 0.125}
SUMMARY = {"event": "summary", "steps": 7, "eval_accuracy": 0.25, "accounting": {"trained": 448}}


def lines(*events: dict) -> list[bytes]:
    return [json.dumps(e).encode() + b"\n" for e in events]


def test_off_a_terminal_each_step_and_eval_is_one_line_and_the_last_line_holds_the_accuracy() -> None:
    out = io.StringIO()
    view = make_view(out, Progress())
    assert isinstance(view, PlainView)
    follow(lines(EVAL, STEP, SUMMARY), view)
    view.close()
    shown = out.getvalue().splitlines()
    assert shown[0] == "eval  step     0  eval_accuracy=0.125"
    step_line = r"step     7  v7    reward  0\.438  loss -0\.012  staleness  0\.500/1  tok/s   1234  eval  0\.125 "
    assert re.match(step_line, shown[1])
    assert len(shown) == 2  # the summary is folded in, not printed
    done = view.progress.done_line(0)
    assert re.fullmatch(r"done: exit=0 steps=7 eval_accuracy_start=0\.125 eval_accuracy=0\.250 elapsed_s=[\d.]+", done)


def test_on_a_terminal_a_live_table_holds_the_numbers() -> None:
    file = io.StringIO()
    view = LiveView(Console(file=file, force_terminal=True, width=100, color_system=None), Progress())
    follow(lines(EVAL, STEP), view)
    view.close()
    rendered = file.getvalue()
    for row, value in [
        ("step", "7"),
        ("policy version", "7"),
        ("reward (mean)", "0.438"),
        ("loss", "-0.012"),
        ("eval accuracy, held out (start -> now)", "0.125 -> 0.125"),
        ("throughput (tok/s)", "1234"),
        ("staleness (mean / max versions)", "0.500 / 1"),
        ("samples (step) / dropped (run)", "64 / 3"),
    ]:
        assert re.search(rf"{re.escape(row)}\s*│\s*{re.escape(value)} ", rendered), (row, rendered[-2000:])
    assert re.search(r"elapsed\s*│\s*[\d.]+s", rendered)
    assert "step     7" not in rendered  # the table replaces the plain lines


def test_on_a_terminal_other_log_lines_print_above_the_table_and_the_log_file_gets_every_line() -> None:
    file, log_file = io.StringIO(), io.BytesIO()
    view = LiveView(Console(file=file, force_terminal=True, width=120, color_system=None), Progress())
    warning = {"event": "resume asked for, but there is no checkpoint yet", "level": "warning", "node_id": "learner-0"}
    raw = [*lines(warning, STEP), b"torchrun: not a JSON line\n"]
    follow(raw, view, copy_to=log_file, echo=True)
    view.close()
    rendered = file.getvalue()
    assert "resume asked for, but there is no checkpoint yet" in rendered and "node_id=learner-0" in rendered
    assert "torchrun: not a JSON line" in rendered
    assert log_file.getvalue() == b"".join(raw)


def test_without_echo_only_errors_are_passed_on() -> None:
    out = io.StringIO()
    view = PlainView(out, Progress())
    follow(lines({"event": "dropped", "level": "info"}, {"event": "bus lost", "level": "error"}), view)
    assert out.getvalue() == "learner error: bus lost\n"
