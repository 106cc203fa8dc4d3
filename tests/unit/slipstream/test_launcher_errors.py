"""`last_error`: the line `slipstream up` quotes when a node exits, read from the end of the node's log."""

from __future__ import annotations

import json
from pathlib import Path

from slipstream.launcher import last_error


def test_the_last_exception_line_is_found_with_or_without_torchrun_prefix(tmp_path: Path) -> None:
    log = tmp_path / "learner.log"
    log.write_text(
        "step 1\nTraceback (most recent call last):\nValueError: an earlier one\n"
        "[rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "telemetry/server.py", line 92, in start\n'
        "[rank0]: OSError: [Errno 98] cannot listen on 127.0.0.1:9400: Address already in use\n"
        "frame #0: c10::Error::Error(c10::SourceLocation) + 0x9d\n"  # a C++ frame names an Error but is none
        "Exception raised from throwTimeoutError at socket.cpp:1030\n"
    )
    assert last_error(log) == "OSError: [Errno 98] cannot listen on 127.0.0.1:9400: Address already in use"


def test_qualified_names_bare_names_and_what_is_not_there(tmp_path: Path) -> None:
    log = tmp_path / "rollout-0.log"
    log.write_text("redis.exceptions.ConnectionError: Error 111 connecting\nKeyboardInterrupt\n")
    assert last_error(log) == "KeyboardInterrupt"
    log.write_text("redis.exceptions.ConnectionError: Error 111 connecting\n" + "x" * 300 + "\n")
    assert last_error(log) == "redis.exceptions.ConnectionError: Error 111 connecting"
    log.write_text("all fine\n")
    assert last_error(log) is None
    assert last_error(tmp_path / "missing.log") is None


def test_only_the_tail_of_a_long_log_is_read_and_the_line_is_bounded(tmp_path: Path) -> None:
    log = tmp_path / "learner.log"
    log.write_text("RuntimeError: long ago\n" + "step\n" * 20_000 + "RuntimeError: " + "y" * 1000 + "\n")
    found = last_error(log)
    assert found is not None and found.startswith("RuntimeError: yyy") and len(found) == 300
    log.write_text("RuntimeError: long ago\n" + "step\n" * 20_000)  # 100 KB later: beyond the tail read
    assert last_error(log) is None


def test_a_json_log_line_gives_the_last_line_of_its_exception(tmp_path: Path) -> None:
    log = tmp_path / "rollout-0.log"
    failed = {
        "event": "rollout node failed to start", "level": "error",
        "exception": "Traceback (most recent call last):\n  File \"node.py\"\nOSError: [Errno 98] in use\n",
    }  # fmt: skip
    log.write_text(json.dumps(failed) + "\n" + json.dumps({"event": "rollout node stopped", "level": "info"}) + "\n")
    assert last_error(log) == "OSError: [Errno 98] in use"
    log.write_text('{"event": "not json after all"\n{"exception": 3}\n')
    assert last_error(log) is None
