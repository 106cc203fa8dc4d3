"""The `slipstream` subcommands, one module each (see `slipstream.cli`), and how they load their settings.

Import-light like the command modules: pydantic and the settings classes load only when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from bus.settings import NodeSettings

S = TypeVar("S", bound="NodeSettings")


@contextlib.contextmanager
def exit_on_config_error(command: str) -> Iterator[None]:
    """A `ConfigError` raised inside ends the command: SystemExit("slipstream <command>: <error>"), which prints the
    error (naming the field and the rule) on stderr and exits with status 1."""
    from bus.settings import ConfigError

    try:
        yield
    except ConfigError as exc:
        raise SystemExit(f"slipstream {command}: {exc}") from None


def load_or_exit(cls: type[S], args: argparse.Namespace, command: str) -> S:
    """`cls` from the TOML file `args.config`, SLIPSTREAM_* variables and the dotted overrides `args.overrides`, as
    `bus.settings.load_settings` builds it; a bad setting ends the command (`exit_on_config_error`)."""
    from bus.settings import load_settings

    with exit_on_config_error(command):
        settings = load_settings(cls, args.config, list(getattr(args, "overrides", [])))
    return settings
