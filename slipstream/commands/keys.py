"""`slipstream keys DIR NAME [NAME ...]`: ZeroMQ CURVE key pairs for the bus.

For each NAME, writes `DIR/NAME.key` (public; give it to the other side) and `DIR/NAME.key_secret` (secret; mode 0600,
stays on its host). The consumer (learner) uses its own `.key_secret` as `bus.zmq_curve_secret_key_file` and a folder
holding the allowed producers' public `.key` files as `bus.zmq_curve_allowed_keys_dir`; a producer uses its own
`.key_secret` and the consumer's public key as `bus.zmq_curve_server_key_file`.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder to write the key files into (created if missing)")
    parser.add_argument("names", nargs="+", help="one key pair per name, e.g. learner agent-1 agent-2")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")


def run(args: argparse.Namespace) -> int:
    import zmq.auth

    folder = Path(args.dir)
    for name in args.names:
        if not NAME.match(name):
            raise SystemExit(f"slipstream keys: name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
        if not args.force and (folder / f"{name}.key_secret").exists():
            raise SystemExit(f"slipstream keys: {folder / name}.key_secret exists (use --force to overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        public, secret = zmq.auth.create_certificates(str(folder), name)
        os.chmod(secret, 0o600)
        print(f"{name}: public {public}  secret {secret}")
    return 0
