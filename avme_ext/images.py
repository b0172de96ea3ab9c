"""PNG image grids of flattened 28x28 images (samples, unrolled drawing steps, reconstructions).

Every image is a flattened ``(784,)`` vector of Bernoulli means (or binary pixels) in [0, 1],
shown as white digits on black (``invert=True``: black on white). Tiles are separated by
``padding`` pixels of gray (``pad_value``) so the tile boundaries stay visible, and the whole
grid is scaled up by an integer factor with nearest-neighbour upsampling so it is legible.

Geometry: a grid of ``rows x cols`` tiles is
``scale * (rows * (28 + padding) + padding)`` pixels high and
``scale * (cols * (28 + padding) + padding)`` wide (see :func:`grid_size`).

Every layout has a function that returns the ``(3, H, W)`` grid (``*_grid``) and one that saves
it (``save_*``). :func:`write_png` saves a grid atomically with the permissions of a normally
created file, so a command can lay out all its images first and write them only at the end.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from .checkpoint import atomic_write_bytes
from .data import IMAGE_SIZE, NUM_PIXELS

__all__ = [
    "class_grid",
    "encode_png",
    "grid_size",
    "make_image_grid",
    "reconstructions_grid",
    "sample_grid",
    "save_class_grid",
    "save_image_grid",
    "save_reconstructions",
    "save_sample_grid",
    "save_unrolled_strips",
    "unrolled_strips_grid",
    "write_png",
]

DEFAULT_PADDING = 2
DEFAULT_PAD_VALUE = 0.5


def grid_size(rows: int, cols: int, *, padding: int = DEFAULT_PADDING, scale: int = 1) -> tuple[int, int]:
    """(height, width) in pixels of a grid of ``rows x cols`` 28x28 tiles."""
    return (
        scale * (rows * (IMAGE_SIZE + padding) + padding),
        scale * (cols * (IMAGE_SIZE + padding) + padding),
    )


def _check_flat(name: str, images: Tensor) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(images).__name__}")
    if images.dim() != 2 or images.shape[1] != NUM_PIXELS:
        raise ValueError(f"{name} must be (B, {NUM_PIXELS}) flattened 28x28 images, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} holds no images")
    return images.detach().float().cpu().clamp(0.0, 1.0)


def _check_scale(scale: int) -> int:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    return scale


def make_image_grid(
    images: Tensor,
    nrow: int = 8,
    *,
    scale: int = 1,
    padding: int = DEFAULT_PADDING,
    pad_value: float = DEFAULT_PAD_VALUE,
    invert: bool = False,
) -> Tensor:
    """Tile flattened images ``(B, 784)`` into a ``(3, H, W)`` float grid with ``nrow`` tiles per row.

    The last row is left-aligned when ``B`` is not a multiple of ``nrow``; ``H, W`` are
    :func:`grid_size` of ``(ceil(B / ncols), ncols)`` with ``ncols = min(nrow, B)``.
    """
    images = _check_flat("images", images)
    scale = _check_scale(scale)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if invert:
        images = 1.0 - images
    tiles = images.view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    grid = make_grid(tiles, nrow=nrow, padding=padding, pad_value=pad_value)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return grid


def encode_png(grid: Tensor) -> bytes:
    """The PNG file of a ``(3, H, W)`` (or ``(1, H, W)``) float grid with values in [0, 1]."""
    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    return buffer.getvalue()


def _check_png_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: image files are written as PNG; use a .png file name")
    return path


def write_png(grid: Tensor, path: str | os.PathLike) -> Path:
    """Write a grid as a PNG file, atomically (a reader never sees a partial file); returns the path."""
    path = _check_png_path(path)
    return atomic_write_bytes(path, encode_png(grid))


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8, **kwargs) -> Path:
    """Save flattened images ``(B, 784)`` as a PNG grid (``kwargs``: see :func:`make_image_grid`)."""
    return write_png(make_image_grid(images, nrow, **kwargs), _check_png_path(path))


def sample_grid(probs: Tensor, nrow: int | None = None, **kwargs) -> Tensor:
    """Samples ``(B, 784)`` (Bernoulli means) as a grid, ``nrow`` per row (default ~square)."""
    if nrow is None:
        nrow = max(1, math.ceil(math.sqrt(_check_flat("probs", probs).shape[0])))
    return make_image_grid(probs, nrow, **kwargs)


def save_sample_grid(probs: Tensor, path: str | os.PathLike, nrow: int | None = None, **kwargs) -> Path:
    """Save samples ``(B, 784)`` (Bernoulli means) as a PNG grid, ``nrow`` per row (default ~square)."""
    return write_png(sample_grid(probs, nrow, **kwargs), _check_png_path(path))


def unrolled_strips_grid(steps: Tensor, **kwargs) -> Tensor:
    """The drawing process: one row per image showing sigmoid(s_t) for t = 1..K left to right.

    Args:
        steps: (K, B, 784) canvases after every step (``AVME.sample(..., return_steps=True)``).

    The grid has B rows and K columns (the paper's Figures 8 and 9).
    """
    if not isinstance(steps, Tensor) or steps.dim() != 3 or steps.shape[2] != NUM_PIXELS:
        shape = tuple(steps.shape) if isinstance(steps, Tensor) else type(steps).__name__
        raise ValueError(f"steps must be (K, B, {NUM_PIXELS}), got {shape}")
    k, b, _ = steps.shape
    rows = steps.transpose(0, 1).reshape(b * k, NUM_PIXELS)
    return make_image_grid(rows, k, **kwargs)


def save_unrolled_strips(steps: Tensor, path: str | os.PathLike, **kwargs) -> Path:
    """Save :func:`unrolled_strips_grid` of ``steps`` (K, B, 784) as a PNG."""
    return write_png(unrolled_strips_grid(steps, **kwargs), _check_png_path(path))


def class_grid(probs: Tensor, **kwargs) -> Tensor:
    """Class-conditional samples with one row per class.

    Args:
        probs: (C, N, 784) N samples for each of C classes (or (C * N, 784) with an explicit
            ``per_class=N`` keyword), row c showing class c.
    """
    per_class = kwargs.pop("per_class", None)
    if isinstance(probs, Tensor) and probs.dim() == 2:
        if per_class is None or per_class < 1 or probs.shape[0] % per_class:
            raise ValueError(f"(C*N, 784) class samples need per_class=N dividing {probs.shape[0]}, got {per_class}")
        probs = probs.view(-1, per_class, probs.shape[1])
    if not isinstance(probs, Tensor) or probs.dim() != 3 or probs.shape[2] != NUM_PIXELS:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"class samples must be (C, N, {NUM_PIXELS}), got {shape}")
    c, n, _ = probs.shape
    return make_image_grid(probs.reshape(c * n, NUM_PIXELS), n, **kwargs)


def save_class_grid(probs: Tensor, path: str | os.PathLike, **kwargs) -> Path:
    """Save :func:`class_grid` of ``probs`` as a PNG."""
    return write_png(class_grid(probs, **kwargs), _check_png_path(path))


def reconstructions_grid(x: Tensor, recon: Tensor, nrow: int = 8, **kwargs) -> Tensor:
    """Data and reconstructions as pairs of rows: ``nrow`` originals, then their reconstructions below.

    Args:
        x: (B, 784) the images; recon: (B, 784) their reconstructions (Bernoulli means).

    When B is not a multiple of ``nrow`` the last pair of rows is padded with blank tiles.
    The grid has ``2 * ceil(B / nrow)`` rows of ``min(nrow, B)`` tiles.
    """
    x = _check_flat("x", x)
    recon = _check_flat("recon", recon)
    if x.shape != recon.shape:
        raise ValueError(f"x {tuple(x.shape)} and recon {tuple(recon.shape)} must have the same shape")
    b = x.shape[0]
    cols = min(nrow, b)
    groups = math.ceil(b / cols)
    blank = torch.zeros(groups * cols - b, NUM_PIXELS)
    x = torch.cat([x, blank]).view(groups, 1, cols, NUM_PIXELS)
    recon = torch.cat([recon, blank]).view(groups, 1, cols, NUM_PIXELS)
    paired = torch.cat([x, recon], dim=1).reshape(groups * 2 * cols, NUM_PIXELS)
    return make_image_grid(paired, cols, **kwargs)


def save_reconstructions(x: Tensor, recon: Tensor, path: str | os.PathLike, nrow: int = 8, **kwargs) -> Path:
    """Save :func:`reconstructions_grid` of ``x`` and ``recon`` (B, 784) as a PNG."""
    return write_png(reconstructions_grid(x, recon, nrow, **kwargs), _check_png_path(path))
