"""The ``avme`` command line: ``avme train | sample | eval | plot`` (also ``python -m avme_ext``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import evaluate, plot, sample, train

__all__ = ["build_parser", "main"]

SUBCOMMANDS = (train, sample, evaluate, plot)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand module."""
    parser = argparse.ArgumentParser(
        prog="avme",
        description=(
            "Adaptive Variational Memory Encoding: a recurrent VAE that draws an image over K steps. "
            "Train it on binarized MNIST (vendored, no download needed), sample from it, "
            "evaluate honest likelihood bounds, and plot training curves."
        ),
        epilog="Run 'avme <command> --help' for the options of each command.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
