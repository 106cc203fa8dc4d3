"""configure_logging: JSON lines bound to node id and policy version from every thread, stdlib logs routed the
same way, a readable console on a terminal, and secrets redacted."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from telemetry import logs
from telemetry.logs import bind_context, configure_logging, is_secret_key, set_policy_version


class Terminal(io.StringIO):
    """A stream that says it is a TTY, as stderr does on a developer's terminal."""

    def isatty(self) -> bool:
        return True


pytestmark = pytest.mark.usefixtures("restore_logging")


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_node_id_policy_version_level_logger_and_utc_timestamp() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out, node_id="learner-0", role="learner")
    set_policy_version(4)
    structlog.get_logger("slipstream.test").info("step done", step=12)

    (line,) = lines(out)
    assert line["event"] == "step done"
    assert (line["step"], line["node_id"], line["role"], line["policy_version"]) == (12, "learner-0", "learner", 4)
    assert (line["level"], line["logger"]) == ("info", "slipstream.test")
    assert line["timestamp"].endswith("Z")
    assert datetime.fromisoformat(line["timestamp"]).tzinfo == UTC


def test_policy_version_updates_reach_other_threads_and_running_tasks() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out, node_id="rollout-1")
    log = structlog.get_logger("slipstream.test")
    set_policy_version(1)

    async def main() -> None:
        version_set = asyncio.Event()

        async def generator() -> None:  # created before the update, as a long-running generation task is
            await version_set.wait()
            log.info("from task")

        task = asyncio.create_task(generator())
        await asyncio.sleep(0)
        set_policy_version(2)
        version_set.set()
        await task

    asyncio.run(main())
    thread = threading.Thread(target=lambda: logging.getLogger("redis").warning("from thread"))
    thread.start()
    thread.join(timeout=10)

    by_event = {line["event"]: line for line in lines(out)}
    assert by_event["from task"]["policy_version"] == 2
    assert by_event["from thread"]["policy_version"] == 2
    assert by_event["from thread"]["node_id"] == "rollout-1"


def test_stdlib_logging_comes_out_as_the_same_json() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out, node_id="n")
    logging.getLogger("uvicorn.error").warning("port %d busy", 8000)
    try:
        raise ValueError("bad frame")
    except ValueError:
        logging.getLogger("redis.connection").exception("reader died")

    busy, died = lines(out)
    assert (busy["event"], busy["logger"], busy["level"], busy["node_id"]) == (
        "port 8000 busy",
        "uvicorn.error",
        "warning",
        "n",
    )
    assert died["level"] == "error"
    assert "ValueError: bad frame" in died["exception"]


def test_level_filters_structlog_and_stdlib_alike() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", stream=out)
    structlog.get_logger("a").info("hidden")
    logging.getLogger("b").info("hidden too")
    structlog.get_logger("a").warning("shown")
    assert [line["event"] for line in lines(out)] == ["shown"]


def test_bind_context_is_scoped_to_the_current_context() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    log = structlog.get_logger("t")
    bind_context(task_id="t-17")
    log.info("here")
    thread = threading.Thread(target=lambda: log.info("elsewhere"))
    thread.start()
    thread.join(timeout=10)
    here, elsewhere = lines(out)
    assert here["task_id"] == "t-17"
    assert "task_id" not in elsewhere


def test_reconfiguring_replaces_handler_and_bindings() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", stream=first, node_id="old")
    configure_logging("json", stream=second, node_id="new")
    structlog.get_logger("t").info("once")
    assert first.getvalue() == ""
    (line,) = lines(second)
    assert line["node_id"] == "new"


def test_console_format_renders_readable_text() -> None:
    out = Terminal()
    configure_logging("console", "info", stream=out, node_id="rollout-0")
    structlog.get_logger("slipstream.test").info("weights loaded", version=3)
    text = out.getvalue()
    assert "weights loaded" in text
    assert "rollout-0" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(
    ("env", "stream", "expected"),
    [
        (None, Terminal(), "console"),
        (None, io.StringIO(), "json"),
        ("json", Terminal(), "json"),
        ("CONSOLE", io.StringIO(), "console"),
        ("bogus", io.StringIO(), "json"),
    ],
)
def test_auto_format(monkeypatch: pytest.MonkeyPatch, env: str | None, stream: io.StringIO, expected: str) -> None:
    if env is None:
        monkeypatch.delenv(logs.FORMAT_ENV, raising=False)
    else:
        monkeypatch.setenv(logs.FORMAT_ENV, env)
    assert logs.resolve_format("auto", stream) == expected
    assert logs.resolve_format("console", io.StringIO()) == "console"


def test_secrets_are_redacted_in_fields_nested_values_urls_and_messages() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    structlog.get_logger("t").info(
        "connecting to redis://:hunter2@redis:6379/0",
        password="hunter2",
        hf_token="hf_abc",
        apiKey="k1",
        headers={"Authorization": "Bearer s3cr3t", "X-Api-Key": "k2", "Accept": "text/plain"},
        url="rediss://user:hunter2@cache:6380",
        note="sent Bearer s3cr3t upstream",
        num_tokens=17,
        token_ids=[1, 2, 3],
        max_new_tokens=8,
    )
    logging.getLogger("redis").error("lost redis://default:hunter2@h:1")
    text = out.getvalue()
    for secret in ("hunter2", "hf_abc", "k1", "k2", "s3cr3t"):
        assert secret not in text
    line, stdlib_line = lines(out)
    assert line["password"] == line["hf_token"] == line["apiKey"] == "***"
    assert line["headers"] == {"Authorization": "***", "X-Api-Key": "***", "Accept": "text/plain"}
    assert line["url"] == "rediss://***@cache:6380"
    assert (line["num_tokens"], line["token_ids"], line["max_new_tokens"]) == (17, [1, 2, 3], 8)
    assert stdlib_line["event"] == "lost redis://***@h:1"


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("db_password", True),
        ("client_secret", True),
        ("access_token", True),
        ("refreshToken", True),
        ("Authorization", True),
        ("set-cookie", True),
        ("OPENAI_API_KEY", True),
        ("private_key", True),
        ("tokens", False),
        ("token_ids", False),
        ("num_tokens", False),
        ("tokenizer", False),
        ("stream_key", False),
        ("password_file", True),
    ],
)
def test_secret_key_names(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"fmt": "xml"}, "log format 'xml'"), ({"level": "loud"}, "log level")]
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        configure_logging(stream=io.StringIO(), **kwargs)
