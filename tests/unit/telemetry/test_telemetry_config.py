"""TelemetryConfig: documented, bounded fields; unknown keys and bad values are errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from telemetry.config import TelemetryConfig


def test_defaults_bind_locally() -> None:
    config = TelemetryConfig()
    assert (config.host, config.port, config.log_format, config.log_level) == ("127.0.0.1", 9400, "auto", "info")


def test_every_field_is_documented() -> None:
    for name, field in TelemetryConfig.model_fields.items():
        assert field.description and len(field.description) > 20, name


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"port": 65536}, "port"),
        ({"port": -1}, "port"),
        ({"host": ""}, "host"),
        ({"host": "127.0.0.1; rm -rf /"}, "host"),
        ({"log_format": "xml"}, "log_format"),
        ({"log_level": "verbose"}, "log_level"),
        ({"prot": 9400}, "prot"),
    ],
)
def test_bad_values_name_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        TelemetryConfig(**values)
    assert [err["loc"][0] for err in info.value.errors()] == [field]


def test_assignment_is_validated() -> None:
    config = TelemetryConfig()
    with pytest.raises(ValidationError, match="port"):
        config.port = 100000


def test_levels_and_formats_accept_any_case() -> None:
    config = TelemetryConfig(host="0.0.0.0", port=0, log_format="JSON", log_level="WARNING")
    assert (config.host, config.port, config.log_format, config.log_level) == ("0.0.0.0", 0, "json", "warning")
    assert TelemetryConfig(host="::").host == "::"
