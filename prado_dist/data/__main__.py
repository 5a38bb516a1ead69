"""`python -m prado_dist.data {fetch,demo,inspect}`: get, generate or check a dataset folder."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from prado_dist.data import demo, fetch, inspection


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prado_dist.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, summary in (
        ("fetch", fetch, "download the five painters' images listed in the Kaggle prado.csv"),
        ("demo", demo, "generate the small synthetic demo dataset"),
        ("inspect", inspection, "counts per painter and split, image sizes, rejected files"),
    ):
        command = commands.add_parser(name, help=summary, description=summary)
        module.add_arguments(command)
        command.set_defaults(handler=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
