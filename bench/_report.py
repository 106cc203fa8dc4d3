"""How a benchmark prints its report: one JSON object (`--json`, nothing else on stdout) or one `key value` line per
figure."""

from __future__ import annotations

import json
from typing import Any


def print_report(report: dict[str, Any], as_json: bool, key_width: int = 28) -> None:
    """`report` as one JSON line, or as aligned `key value` lines (keys left-aligned in `key_width` columns)."""
    if as_json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:{key_width}s} {value}")
