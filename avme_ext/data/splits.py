"""Which images of a data set's parts form its ``train``, ``valid`` and ``test`` splits.

A split the data set has (an official file, a ``test/`` folder, an ``x_test`` key) is that part,
whole. A split it lacks is held out by seed from its ``train`` part (or from its only part,
``all``, when it has no splits at all):

    perm = torch.randperm(N, generator=torch.Generator().manual_seed(split_seed))
    test  = perm[:n_test]                      (when the data set has no test split)
    valid = perm[n_test : n_test + n_valid]    (when it has no valid split)
    train = the rest

with ``n = floor(fraction * N + 1/2)`` (``test_fraction``, ``valid_fraction``) and every split in
the order of the files (sorted positions). The rule is a function of ``N`` and the seed only, so
the same files give the same splits on every machine; :class:`SplitRows` also says it in words for
the run's config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .catalog import SPLITS
from .errors import DataOptionError, check_name

__all__ = ["SplitRows", "split_rows", "whole_part"]


@dataclass(frozen=True)
class SplitRows:
    """Where a split's images are.

    Attributes:
        part: the part they come from (``"train"``, ``"valid"``, ``"test"`` or ``"all"``).
        rows: ``(n,)`` int64 sorted positions in that part, or None for the whole part.
        rule: how they were chosen, in words.
    """

    part: str
    rows: torch.Tensor | None
    rule: str


def _count(fraction: float, n: int) -> int:
    return math.floor(fraction * n + 0.5)


def whole_part(split: str, parts: frozenset[str] | set[str]) -> bool:
    """Whether ``split`` is a whole part of the data set: one it has, and not the part (``train`` or
    ``all``) that held-out splits come from when it lacks a ``valid`` or ``test`` part."""
    base = "all" if "all" in parts else "train"
    return split in parts and (split != base or {"valid", "test"} <= parts)


def _describe(split: str, base: str, size: int, n_test: int, n_valid: int, seed: int) -> str:
    """The rule of :func:`split_rows` in words for a held-out split or what is left of ``base`` (``size`` images)."""
    over = "all the images" if base == "all" else "the train part"
    perm = f"torch.randperm({size}, generator=torch.Generator().manual_seed({seed})) over {over}"
    if split == "test":
        where = f"positions [0, {n_test})"
    elif split == "valid":
        where = f"positions [{n_test}, {n_test + n_valid})"
    else:
        where = f"positions [{n_test + n_valid}, {size})"
    return f"{where} of {perm}, in file order"


def split_rows(
    split: str,
    parts: frozenset[str] | set[str],
    size: int | None,
    *,
    valid_fraction: float,
    test_fraction: float,
    seed: int,
) -> SplitRows:
    """The rows of ``split`` (see the module docstring).

    Args:
        split: one of :data:`SPLITS`.
        parts: the parts the data set has.
        size: images in the part held-out splits come from (``train``, or ``all``); unused (may be None)
            when ``split`` is a whole part (one the data set has, and not ``train`` when splits are held
            out of it).
        valid_fraction, test_fraction: the held-out shares.
        seed: the seed of the permutation.

    Raises:
        DataOptionError: a held-out split (or what is left for training) would be empty.
    """
    check_name("split", split, SPLITS)
    if whole_part(split, parts):
        return SplitRows(split, None, f"the data set's own {split} part, whole")
    base = "all" if "all" in parts else "train"
    carved = [s for s in ("test", "valid") if s not in parts]
    assert size is not None, "the size of the part to split is needed"
    n_test = _count(test_fraction, size) if "test" in carved else 0
    n_valid = _count(valid_fraction, size) if "valid" in carved else 0
    counts = {"test": n_test, "valid": n_valid, "train": size - n_test - n_valid}
    empty = [s for s in ("train", *carved) if counts[s] < 1]
    if empty:
        raise DataOptionError(
            f"the {base} part has {size} images: too few to hold out {' and '.join(carved)} "
            f"(valid_fraction {valid_fraction:g}, test_fraction {test_fraction:g} leave {', '.join(empty)} empty)"
        )
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    start = {"test": 0, "valid": n_test, "train": n_test + n_valid}[split]
    rows = perm[start : start + counts[split]].sort().values
    return SplitRows(base, rows, _describe(split, base, size, n_test, n_valid, seed))
