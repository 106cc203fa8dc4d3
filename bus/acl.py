"""Redis ACL file for a Slipstream bus, rendered from `deploy/redis/users.acl.template` and password files.

    python -m bus.acl passwords secrets/                  # a random password file per template user (mode 0600)
    python -m bus.acl render --password-dir secrets/ [--config run.toml] [--bus.prefix p:] > users.acl

The template holds the rules (one user per role, docs/security.md); this module only fills in what differs between
deployments: the key prefix and stream keys of a `BusConfig` (glob characters escaped) and the SHA-256 of each user's
password. Passwords are read from files, never from the command line, and never written anywhere but their own files.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `slipstream acl --help` (and every CLI parser build) stays import-light
    from bus.config import BusConfig

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "redis" / "users.acl.template"
MIN_PASSWORD_CHARS = 16
USER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # also the password file's name
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_STREAMS = ("tasks", "trajectories", "control", "dead")


class AclError(ValueError):
    """A template, config or password file that cannot make an ACL file; the message names the culprit and rule."""


def render(config: BusConfig, password_dir: str | Path, template: str | None = None) -> str:
    """The ACL file text for `config`'s keys, with the password hash of `password_dir/<user>` for every user.

    A template user whose name ends in `*` becomes one user per matching password file (possibly none).
    """
    folder = Path(password_dir)
    keys = {"prefix": _key_pattern("prefix", config.prefix)}
    keys.update({name: _key_pattern(f"{name}_stream", config.stream(name)) for name in _STREAMS})
    lines = []
    for number, line in _entries(TEMPLATE.read_text() if template is None else template):
        name = line.split()[1]
        users = _matching_files(folder, name) if name.endswith("*") else [name]
        for user in users:
            lines.append(_fill(line.replace(f"user {name} ", f"user {user} ", 1), number, user, folder, keys))
    return "\n".join(lines) + "\n"


def user_names(template: str | None = None) -> list[str]:
    """The users of the template that need a password, wildcard names without their `*` (e.g. `producer`)."""
    text = TEMPLATE.read_text() if template is None else template
    return [line.split()[1].rstrip("*") for _, line in _entries(text) if "{password}" in line]


def write_passwords(password_dir: str | Path, names: Sequence[str]) -> list[Path]:
    """Write a random password (256 bits, URL-safe text) to `password_dir/<name>` for each name lacking a file.

    The folder is made mode 0700 and each file 0600; existing files are kept. Returns the files written.
    """
    folder = Path(password_dir)
    for name in names:
        if not USER_NAME.match(name):
            raise AclError(f"user name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for name in names:
        path = folder / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        written.append(path)
    return written


def _entries(template: str) -> list[tuple[int, str]]:
    """(line number, logical line): comments and blank lines dropped, indented lines joined to the user above, runs
    of whitespace made one space (redis-server splits ACL file lines on single spaces and has no comments)."""
    entries: list[tuple[int, list[str]]] = []
    for number, raw in enumerate(template.splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if raw[0].isspace():
            if not entries:
                raise AclError(f"template line {number}: a continuation line before any user line")
            entries[-1][1].append(text)
        elif text.startswith("user ") and len(text.split()) >= 2:
            entries.append((number, [text]))
        else:
            raise AclError(f"template line {number}: must start with 'user NAME' (or be indented, or a # comment)")
    return [(number, " ".join(" ".join(parts).split())) for number, parts in entries]


def _fill(line: str, number: int, user: str, folder: Path, keys: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "password":
            return "#" + hashlib.sha256(_read_password(folder, user).encode()).hexdigest()
        if name not in keys:
            known = ["password", *keys]
            raise AclError(f"template line {number}: unknown placeholder {{{name}}}; known: {known}")
        return keys[name]

    return _PLACEHOLDER.sub(value, line)


def _read_password(folder: Path, user: str) -> str:
    from bus.config import BusConfig

    path = folder / user
    if not path.is_file():
        raise AclError(f"password file {path}: missing (user {user}; `python -m bus.acl passwords {folder}` makes it)")
    try:
        # The client reads the same file through BusConfig.password(): one rule for what the password is.
        password = BusConfig(password_file=str(path)).password()
    except ValueError as exc:
        raise AclError(f"password file {path}: {exc}") from exc
    if password is None or len(password) < MIN_PASSWORD_CHARS:
        raise AclError(f"password file {path}: the password must have at least {MIN_PASSWORD_CHARS} characters")
    return password


def _matching_files(folder: Path, pattern: str) -> list[str]:
    if not folder.is_dir():
        raise AclError(f"password dir {folder}: not a folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and fnmatch.fnmatchcase(p.name, pattern))
    for name in names:
        if not USER_NAME.match(name):
            raise AclError(f"password file {folder / name}: a user name needs 1-64 letters, digits, '_', '.' or '-'")
    return names


def _key_pattern(field: str, key: str) -> str:
    """`key` as a literal ACL key pattern: glob characters escaped; whitespace and parentheses cannot be written."""
    if re.search(r"[\s()]", key):
        raise AclError(f"{field}: {key!r} cannot go into an ACL file (no whitespace or parentheses)")
    return _GLOB_SPECIAL.sub(r"\\\1", key)


# --- command line ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`render` and `passwords` subcommands (also wired as `slipstream acl`)."""
    sub = parser.add_subparsers(dest="acl_command", required=True, metavar="{render,passwords}")
    render_p = sub.add_parser("render", help="print the ACL file for a [bus] config (dotted --bus.x overrides work)")
    render_p.add_argument("--password-dir", required=True, help="folder of password files, one per user name")
    render_p.add_argument("--config", default=None, help="TOML file whose [bus] section gives the prefix and streams")
    render_p.add_argument("--template", default=None, help=f"ACL template (default {TEMPLATE})")
    passwords_p = sub.add_parser("passwords", help="write a random password file for each user that lacks one")
    passwords_p.add_argument("password_dir", help="folder to write into (created mode 0700)")
    passwords_p.add_argument("names", nargs="*", help="user names (default: the template's users)")
    passwords_p.add_argument("--template", default=None, help=f"ACL template (default {TEMPLATE})")


def run(args: argparse.Namespace) -> int:
    """Run a parsed `render` or `passwords` command; `args.overrides` holds dotted `--bus.x` overrides."""
    from bus.config import BusConfig
    from bus.settings import ConfigError, NodeSettings, load_settings

    class AclSettings(NodeSettings):
        bus: BusConfig = BusConfig()

    try:
        template = Path(args.template).read_text() if args.template else None
        if args.acl_command == "passwords":
            if args.overrides:
                raise AclError(f"unrecognized arguments: {' '.join(args.overrides)}")
            for path in write_passwords(args.password_dir, args.names or user_names(template)):
                print(f"wrote {path}", file=sys.stderr)
            return 0
        settings = load_settings(AclSettings, args.config, args.overrides)
        sys.stdout.write(render(settings.bus, args.password_dir, template))
        return 0
    except (AclError, ConfigError, OSError) as exc:
        print(f"bus.acl {args.acl_command}: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`python -m bus.acl render|passwords ...`; returns the exit status (2 with a message on stderr on errors)."""
    parser = argparse.ArgumentParser(prog="python -m bus.acl", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
