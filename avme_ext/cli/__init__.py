"""The ``avme`` command line: ``avme train | sample | eval | plot | export | list-pretrained``
(also ``python -m avme_ext``).

Every subcommand runs through :func:`avme_ext.cli._common.run_subcommand`: the same
``--threads``, the same one-line errors and the same exit status (see ``avme --help``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import evaluate, export, list_pretrained, plot, sample, train
from ._common import (
    EXIT_STATUS_HELP,
    CommandParser,
    RawDefaultsFormatter,
    add_threads_argument,
    parse_and_run,
)

__all__ = ["build_parser", "main"]

SUBCOMMANDS = (train, sample, evaluate, plot, export, list_pretrained)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand module; ``--threads`` on each."""
    parser = CommandParser(
        prog="avme",
        description=(
            "Adaptive Variational Memory Encoding: a recurrent VAE that draws an image over K steps. "
            "Train it on binarized MNIST (vendored, no download needed), sample from it, "
            "evaluate honest likelihood bounds, plot training curves, export small weights files."
        ),
        epilog="Run 'avme <command> --help' for the options of each command.\n\n" + EXIT_STATUS_HELP,
        formatter_class=RawDefaultsFormatter,
    )
    add_threads_argument(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for module in SUBCOMMANDS:
        module.register(subparsers)
    for subparser in subparsers.choices.values():
        add_threads_argument(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the chosen subcommand; returns the exit status."""
    return parse_and_run(build_parser(), argv)
