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
    # argparse.SUPPRESS: a flag not given stays out of the namespace, so the spec tells a field asked for from one left
    # at its default (vocab_size left alone grows by the tool tokens; asked for, it must hold them).
    for name, field in DemoModelSpec.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown = "none" if default == [] else default
        common = {"default": argparse.SUPPRESS, "help": f"{field.description} (default: {shown})"}
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif field.annotation == list[str]:
            parser.add_argument(flag, nargs="*", metavar="NAME", **common)
        else:
            parser.add_argument(flag, type=field.annotation, metavar="N", **common)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from bus.settings import format_validation_error
    from slipstream.demo_model import build_demo_model

    spec = {name: getattr(args, name) for name in DemoModelSpec.model_fields if hasattr(args, name)}
    try:
        folder = build_demo_model(args.path, **spec)
    except ValidationError as exc:
        print(format_validation_error(exc, None), file=sys.stderr)
        return 2
    print(f"demo model written to {folder}")
    return 0
