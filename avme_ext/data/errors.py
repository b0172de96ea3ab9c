"""The errors of the data loaders: a file that is missing (one line naming the files and what to do) or unreadable."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["DataFormatError", "DataOptionError", "check_name", "missing_files_error"]


class DataFormatError(ValueError):
    """A data file exists but is corrupt, truncated or not in the expected format."""


class DataOptionError(ValueError):
    """Data options that do not fit together or do not fit the data (e.g. colour images with a Bernoulli
    likelihood). ``exit_code`` 2: the command line reports it as a usage error."""

    exit_code = 2


def check_name(kind: str, value: object, choices: Sequence[object]) -> None:
    """Refuse ``value`` unless it is one of ``choices`` (the message lists them)."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(map(str, choices))}")


def missing_files_error(what: str, paths: Iterable[Path], note: str = "", *, downloadable: bool = True
                        ) -> FileNotFoundError:
    """A one-line :class:`FileNotFoundError` naming the files expected and what to do.

    Args:
        what: the data, e.g. ``"CIFAR-10 files"``.
        paths: the files (or folders) expected.
        note: an extra remark, e.g. ``"uncompressed files without .gz also work"``.
        downloadable: whether ``download=True`` (``--download``) can fetch them.

    Returns:
        the error; its ``cli_hint`` attribute holds the command-line wording (``--download``,
        ``--data-root``) that ``avme`` prints instead of the Python wording (``download=True``, ``root``).
    """
    listing = ", ".join(str(p) for p in paths)
    found = f"{what} not found: expected {listing}" + (f" ({note})" if note else "")
    python = "pass download=True to fetch them, or root=DIR where they are" if downloadable else \
        "pass root=DIR (the folder that holds them)"
    cli = "pass --download to fetch them, or --data-root DIR where they are" if downloadable else \
        "pass --data-root DIR (the folder that holds them)"
    error = FileNotFoundError(f"{found}; {python}")
    error.cli_hint = f"{found}; {cli}"  # type: ignore[attr-defined]  # what the command line says
    return error
