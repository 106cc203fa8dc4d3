"""structlog setup: JSON lines in containers, a readable console on a terminal, stdlib logging routed through it.

    configure_logging("auto", "info", node_id="rollout-0", role="rollout")
    set_policy_version(3)           # every later line, from every thread and task, carries policy_version=3
    bind_context(task_id="t-17")    # this thread / asyncio task only (structlog contextvars)
    log = structlog.get_logger(__name__)
    log.info("generated", samples=8)

Node-level fields (`configure_logging(**bind)`, `set_policy_version`) are process-wide on purpose: contextvars do
not reach other threads, and an asyncio task copies them when it is created, so a version set by the weight-update
task would never show on the lines of generation tasks that already run. Request-scoped fields use `bind_context`.

Logs go to stderr, leaving stdout to command output (`slipstream bench --json` prints one JSON object there).
Values under secret-looking keys (password, token, secret, authorization, api key, ...) and credentials inside URLs
(`redis://:pw@host`) are replaced by `***` on every line, structlog's and the stdlib's alike.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO, get_args

import structlog
from structlog.typing import Processor

from telemetry.config import LogFormat, LogLevel

REDACTED = "***"
FORMAT_ENV = "SLIPSTREAM_LOG_FORMAT"

_HANDLER_NAME = "slipstream"
# Replaced whole, never mutated, so the processor can read it from any thread without a lock.
_process_context: dict[str, Any] = {}

# A key is secret when one of its words is in _SECRET_WORDS or its words end with one of _SECRET_ENDINGS. "token"
# counts only as the last word: `hf_token` is a secret, `num_tokens` and `token_ids` are ordinary LLM fields.
_SECRET_WORDS = frozenset(
    {"password", "passwd", "secret", "secrets", "authorization", "cookie", "credential", "credentials", "apikey"}
)
_SECRET_ENDINGS: tuple[tuple[str, ...], ...] = (("token",), ("api", "key"), ("access", "key"), ("private", "key"))
_KEY_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_BEARER = re.compile(r"(?P<scheme>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_MAX_REDACT_DEPTH = 6


def is_secret_key(name: str) -> bool:
    """Whether a field named `name` (snake_case, kebab-case, camelCase or a header name) holds a secret."""
    words = tuple(w.lower() for w in _KEY_WORD_SPLIT.split(name) if w)
    return any(w in _SECRET_WORDS for w in words) or any(words[-len(end) :] == end for end in _SECRET_ENDINGS)


def redact(value: Any, _depth: int = 0) -> Any:
    """`value` with secrets replaced: under secret keys of nested mappings, and URL/Bearer credentials in text."""
    if isinstance(value, str):
        return _BEARER.sub(rf"\g<scheme>{REDACTED}", _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", value))
    if _depth >= _MAX_REDACT_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_key(str(k)) else redact(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, _depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v, _depth + 1) for v in value)
    return value


def _redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return redact(event_dict)


def _add_process_context(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in _process_context.items():
        event_dict.setdefault(key, value)  # a field given on the line itself wins
    return event_dict


# Run on every line, structlog's and foreign (stdlib) ones, before rendering.
_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    _add_process_context,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def resolve_format(fmt: LogFormat, stream: TextIO) -> LogFormat:
    """`auto` -> env SLIPSTREAM_LOG_FORMAT if it names json/console, else console on a terminal and json otherwise."""
    if fmt != "auto":
        return fmt
    from_env = os.environ.get(FORMAT_ENV, "").strip().lower()
    if from_env in ("json", "console"):
        return from_env  # type: ignore[return-value]  # checked just above
    return "console" if stream.isatty() else "json"


def configure_logging(
    fmt: LogFormat = "auto", level: LogLevel = "info", *, stream: TextIO | None = None, **bind: Any
) -> None:
    """Route structlog and stdlib logging (redis, uvicorn, httpx, ...) to one handler on `stream` (default stderr).

    `bind` fields (node_id, role, ...) go on every line from every thread; calling again replaces them and the
    handler (never a second handler). `level` applies to the root logger, so to libraries too.
    """
    if fmt not in get_args(LogFormat):
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(get_args(LogFormat))}")
    if level not in get_args(LogLevel):
        raise ValueError(f"log level {level!r}: expected one of {', '.join(get_args(LogLevel))}")
    out = stream if stream is not None else sys.stderr
    renderer: Processor
    if resolve_format(fmt, out) == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            # Tracebacks become text before redaction: exception messages carry URLs with passwords too.
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The structlog chain is the same for every format (rendering happens in the handler), so loggers cached on
    # first use stay correct after a reconfiguration.
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger bound before a reconfiguration (or inside structlog.testing.capture_logs) follows it.
        cache_logger_on_first_use=False,
    )
    global _process_context
    _process_context = dict(bind)


def set_policy_version(version: int) -> None:
    """Put `policy_version=version` on every later line of this process, whichever thread or task logs it."""
    global _process_context
    _process_context = {**_process_context, "policy_version": version}


def bind_context(**kv: Any) -> None:
    """Bind fields to the lines of the current thread / asyncio task only (structlog contextvars)."""
    structlog.contextvars.bind_contextvars(**kv)
