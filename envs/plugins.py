"""Loading user code named by an import path "package.module:attribute" (reward functions, environments)."""

from __future__ import annotations

import importlib
import re
from typing import Any

IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def import_object(path: str) -> Any:
    """The object at "package.module:attribute"; a ValueError says which part is wrong."""
    if not IMPORT_PATH.fullmatch(path):
        raise ValueError(f"{path!r}: expected an import path 'package.module:attribute'")
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{path!r}: cannot import module {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ValueError(f"{path!r}: module {module_name!r} has no attribute {attribute!r}") from exc
