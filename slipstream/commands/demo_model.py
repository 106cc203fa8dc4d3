"""`slipstream demo-model PATH [--hidden-size N ...]`: write the tiny HF-format demo model and tokenizer to PATH.

The options are the fields of `slipstream.demo_model.DemoModelSpec` (torch-free), so `--help` stays instant; torch
and transformers load only when the model is built.
"""

from __future__ import annotations

import argparse
import sys

from slipstream.demo_model import DemoModelSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="folder to write (created if missing; files of the same name are overwritten)")
    for name, field in DemoModelSpec.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=f"{field.description} (default: %(default)s)",
            )
        elif field.annotation == list[str]:
            parser.add_argument(
                flag, nargs="*", default=[], metavar="NAME", help=f"{field.description} (default: none)"
            )
        else:
            parser.add_argument(
                flag,
                type=field.annotation,
                default=field.default,
                metavar="N",
                help=f"{field.description} (default: %(default)s)",
            )


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from bus.settings import format_validation_error
    from slipstream.demo_model import build_demo_model

    # Only what was given: a field left at its default keeps the spec's meaning of "not asked for" (vocab_size then
    # grows by the tool tokens instead of refusing them).
    fields = DemoModelSpec.model_fields.items()
    spec = {
        name: getattr(args, name)
        for name, field in fields
        if getattr(args, name) != field.get_default(call_default_factory=True)
    }
    try:
        folder = build_demo_model(args.path, **spec)
    except ValidationError as exc:
        print(format_validation_error(exc, None), file=sys.stderr)
        return 2
    print(f"demo model written to {folder}")
    return 0
