"""One learner rank: `python -m learner_node.main [--config C] [--resume] [--section.field value ...]`.

`slipstream learner` runs this in-process for one rank, or under torchrun (one process per rank) for more.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="learner_node.main", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="TOML file with the run's sections")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    args, overrides = parser.parse_known_args(argv)

    from bus.settings import ConfigError, load_settings
    from learner_node.config import LearnerSettings

    try:
        settings = load_settings(LearnerSettings, args.config, overrides)
    except ConfigError as exc:
        print(f"slipstream learner: {exc}", file=sys.stderr)
        return 2

    from transformers.utils import logging as hf_logging

    from learner_node.node import LearnerNode
    from telemetry.tracking import TrackingError

    hf_logging.disable_progress_bar()  # bars on stderr would break the JSON log lines `slipstream up` reads
    try:
        node = LearnerNode(settings, resume=args.resume)
    except TrackingError as exc:  # a sink the config asks for cannot start: a setup error, not a crash
        print(f"slipstream learner: {exc}", file=sys.stderr)
        return 2
    return node.run()


if __name__ == "__main__":
    sys.exit(main())
