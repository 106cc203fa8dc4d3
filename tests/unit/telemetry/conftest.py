"""Fixtures shared by the telemetry tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from telemetry import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo configure_logging after a test: root handlers and level, structlog config, process-wide bindings."""
    root = logging.getLogger()
    handlers, level, config, context = list(root.handlers), root.level, structlog.get_config(), logs._process_context
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    structlog.configure(**config)
    structlog.contextvars.clear_contextvars()
    logs._process_context = context
