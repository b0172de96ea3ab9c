"""Checks of plain Python values (no torch), shared by the configs and the modules.

Every check raises a ``ValueError`` that names the argument and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_choice", "check_positive_int"]


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Check that ``value`` is an int >= ``minimum`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
