"""Shared argparse helpers of the ``avme`` subcommands.

* :func:`add_device_arguments` adds ``--device`` (``auto`` picks CUDA when available),
  ``--impl`` (fused CUDA ops or the pure-PyTorch reference) and ``--precision``.
* :func:`resolve_device` turns a ``--device`` string into a :class:`torch.device`, refusing
  a CUDA device that does not exist with a clear message.
* :func:`add_seed_argument`, :func:`add_checkpoint_argument`, :func:`add_data_arguments`.
* :class:`CLIError` is an error the user can fix; :func:`fail` prints it and returns exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

import torch

__all__ = [
    "CLIError",
    "RawDefaultsFormatter",
    "add_checkpoint_argument",
    "add_data_arguments",
    "add_device_arguments",
    "add_seed_argument",
    "fail",
    "load_model_for_cli",
    "positive_int",
    "reports_cli_errors",
    "nonnegative_int",
    "resolve_device",
]

IMPL_CHOICES = ("auto", "cuda", "ref")
PRECISION_CHOICES = ("fp32", "tf32", "bf16")


class CLIError(Exception):
    """A problem with the command's inputs (missing file, bad value) reported without a traceback."""


class RawDefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in ``--help`` and keep the description/epilog line breaks (for examples).

    A default is not repeated when the help text already states it, nor shown when it is None
    or False (a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def fail(message: object, code: int = 2) -> int:
    """Print ``avme: error: message`` to stderr and return ``code`` (a non-zero exit status)."""
    print(f"avme: error: {message}", file=sys.stderr)
    return code


def reports_cli_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Decorate a subcommand's ``run(args)``: a :class:`CLIError` becomes ``avme: error: ...`` and exit code 2."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CLIError as error:
            return fail(error)

    return run


def _integer_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer_at_least(text, 0)


def add_device_arguments(parser: argparse.ArgumentParser, *, precision: bool = True) -> None:
    """Add ``--device``, ``--impl`` (and ``--precision`` unless ``precision=False``)."""
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...",
    )
    parser.add_argument(
        "--impl",
        default="auto",
        choices=IMPL_CHOICES,
        help="recurrence implementation: 'cuda' fused kernels, 'ref' pure PyTorch, 'auto' fused when available",
    )
    if precision:
        parser.add_argument(
            "--precision",
            default="fp32",
            choices=PRECISION_CHOICES,
            help="matrix-product precision of the fused CUDA ops (the reference path is fp32)",
        )


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"``/None → ``cuda`` if available else ``cpu``; otherwise ``torch.device(name)``
    (see :func:`avme_ext.distributed.resolve_device`, which this wraps for one process).

    Raises:
        CLIError: the name is not a device, or names a CUDA device that is not present.
    """
    from ..distributed import DistInfo
    from ..distributed import resolve_device as resolve_for_process

    try:
        return resolve_for_process("auto" if name is None else str(name), DistInfo())
    except ValueError as error:
        raise CLIError(str(error)) from None


def add_seed_argument(parser: argparse.ArgumentParser, default: int = 0) -> None:
    """Add ``--seed`` (an integer)."""
    parser.add_argument("--seed", type=int, default=default, help="random seed (results are reproducible given it)")


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """Add the positional ``CHECKPOINT`` (a run directory or a ``.safetensors`` file)."""
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a run directory (its best.safetensors, else last.safetensors) or a .safetensors checkpoint file",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--dataset`` and ``--data-root`` (the vendored binarized MNIST needs neither)."""
    from ..data import DATASETS

    parser.add_argument("--dataset", default=DATASETS[0], choices=DATASETS, help="data set")
    parser.add_argument(
        "--data-root",
        default=None,
        help="directory of downloaded data files (default: the package's data directory / vendored copy)",
    )
    parser.add_argument(
        "--download", action="store_true", help="download the data set into --data-root if missing (needs network)"
    )


def load_model_for_cli(args: argparse.Namespace, device: torch.device):
    """Load ``args.checkpoint`` onto ``device`` with ``--impl``/``--precision``, as a :class:`CLIError` on failure."""
    from ..checkpoint import CheckpointError, load_model

    try:
        return load_model(
            args.checkpoint,
            device=device,
            impl=getattr(args, "impl", "auto"),
            precision=getattr(args, "precision", "fp32"),
        )
    except (FileNotFoundError, CheckpointError) as error:
        raise CLIError(str(error)) from None
