"""How many images one PNG of ``avme sample`` holds, so that every file it writes opens anywhere.

Pillow (and the viewers built on it) warns about images of more than ``MAX_PNG_PIXELS`` pixels
as possible decompression bombs and refuses those of twice that; a grid that would be larger
is split into numbered files (``samples-1.png``, ``samples-2.png``, ...) of at most that size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

__all__ = ["MAX_PNG_PIXELS", "items_per_png", "numbered_paths", "split_note"]

#: Pixels of one PNG at most: Pillow's default ``Image.MAX_IMAGE_PIXELS``, above which it warns.
MAX_PNG_PIXELS = 89_478_485


def items_per_png(total: int, pixels_of: Callable[[int], int], limit: int | None = None) -> int:
    """How many of ``total`` items one PNG holds: all of them when their grid has at most ``limit``
    pixels (``pixels_of(n)``, non-decreasing in ``n``), else as few files as the largest grid under
    ``limit`` allows, with the items spread evenly over them (at least 1 per file).
    ``limit`` defaults to :data:`MAX_PNG_PIXELS`."""
    limit = MAX_PNG_PIXELS if limit is None else limit
    if pixels_of(total) <= limit:
        return total
    low, high = 1, total  # pixels_of(high) > limit
    while high - low > 1:
        middle = (low + high) // 2
        if pixels_of(middle) <= limit:
            low = middle
        else:
            high = middle
    return math.ceil(total / math.ceil(total / low))  # as many files, evened out


def numbered_paths(path: Path, count: int) -> list[Path]:
    """``[path]`` for one file, else ``stem-1.png`` ... ``stem-N.png`` beside it (numbers zero-padded)."""
    if count == 1:
        return [path]
    width = len(str(count))
    return [path.with_name(f"{path.stem}-{i:0{width}d}{path.suffix}") for i in range(1, count + 1)]


def split_note(option: str, path: Path, total: int, per_file: int, unit: str, megapixels: float) -> str:
    """The one line that says a grid was split: what, into which files, and why."""
    files = math.ceil(total / per_file)
    paths = numbered_paths(path, files)
    return (f"{option} {path}: {total} {unit} make a {megapixels:.0f}-megapixel image, more than image viewers open "
            f"(Pillow's limit: {MAX_PNG_PIXELS / 1e6:.0f} megapixels); written as {files} files of at most "
            f"{per_file} {unit}: {paths[0].name} ... {paths[-1].name}")
