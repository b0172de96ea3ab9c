"""Image grids of flattened images (samples, unrolled drawing steps, reconstructions), as PNG, and
the drawing as an animated GIF.

Every image is a flattened ``(D,)`` vector of means (or data pixels) in [0, 1], channels first,
of an image of ``image_shape = (C, H, W)`` with C = 1 (grey) or 3 (RGB) and ``D = C * H * W``.
When ``image_shape`` is not given it is :func:`avme_ext.config.default_image_shape` of D:
(1, 28, 28) for 784 pixels (MNIST digits), else one grey row of D pixels; pass the model's
``model.image_shape`` for anything else. Grey images are shown as white on black
(``invert=True``: black on white; for colour, the complementary colours). Tiles are separated by
``padding`` pixels of gray (``pad_value``) so the tile boundaries stay visible, and the whole grid
is scaled up by an integer factor with nearest-neighbour upsampling so it is legible.

Geometry: a grid of ``rows x cols`` tiles of H x W pixels is
``scale * (rows * (H + padding) + padding)`` pixels high and
``scale * (cols * (W + padding) + padding)`` wide (see :func:`grid_size`).

Every layout has a function that returns the ``(3, height, width)`` grid (``*_grid``) and one that
saves it (``save_*``). :func:`write_png` saves a grid atomically with the permissions of a normally
created file, so a command can lay out all its images first and write them only at the end.

The drawing as an animation: :func:`drawing_frames` lays out the canvases sigmoid(s_t) of every
step t = 1..K as one grid per step, with a bar along the bottom filled to t/K; :func:`encode_gif`
makes them an animated GIF (Pillow), each step shown ``frame_ms`` and the finished drawing held
``hold_ms``; :func:`save_drawing_gif` does both and writes the file atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from .checkpoint import atomic_write_bytes
from .config import default_image_shape

if TYPE_CHECKING:
    import PIL.Image
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = [
    "square_columns",
    "GridOptions",
    "class_grid",
    "drawing_frames",
    "encode_gif",
    "encode_png",
    "grid_size",
    "make_image_grid",
    "reconstructions_grid",
    "sample_grid",
    "save_class_grid",
    "save_drawing_gif",
    "save_image_grid",
    "save_reconstructions",
    "save_sample_grid",
    "save_unrolled_strips",
    "unrolled_strips_grid",
    "write_gif",
    "write_png",
]

DEFAULT_PADDING = 2
DEFAULT_PAD_VALUE = 0.5
#: How long each drawing step and the finished drawing are shown in a GIF, in milliseconds.
DEFAULT_FRAME_MS = 150
DEFAULT_HOLD_MS = 1500
#: Height in pixels (before ``scale``) of a GIF frame's progress bar.
PROGRESS_BAR_HEIGHT = 2

_MNIST_SHAPE = default_image_shape(784)


def grid_size(
    rows: int,
    cols: int,
    *,
    padding: int = DEFAULT_PADDING,
    scale: int = 1,
    image_shape: Sequence[int] = _MNIST_SHAPE,
) -> tuple[int, int]:
    """(height, width) in pixels of a grid of ``rows x cols`` tiles of ``image_shape`` (C, H, W)."""
    _, height, width = image_shape
    return (
        scale * (rows * (height + padding) + padding),
        scale * (cols * (width + padding) + padding),
    )


def _resolve_shape(image_shape: Sequence[int] | None, data_dim: int) -> tuple[int, int, int]:
    """``image_shape`` checked against D = ``data_dim`` (None: the default shape of D)."""
    if image_shape is None:
        return default_image_shape(data_dim)
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise ValueError(f"image_shape must be (channels, height, width) with 1 or 3 channels, got {image_shape!r}")
    if math.prod(shape) != data_dim:
        raise ValueError(f"image_shape {shape} holds {math.prod(shape)} pixels, but the images have {data_dim}")
    return shape


def _describe(value: object) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _check_flat(name: str, images: Tensor) -> Tensor:
    """(B, D) images as float on the CPU clamped to [0, 1], or a clear error naming ``name``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(images).__name__}")
    if images.dim() != 2:
        raise ValueError(f"{name} must be (B, D) flattened images, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} holds no images")
    return images.detach().float().cpu().clamp(0.0, 1.0)


def _check_scale(scale: int) -> int:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    return scale


class GridOptions(TypedDict, total=False):
    """The keyword options of :func:`make_image_grid` that the other grid functions pass on."""

    image_shape: Sequence[int] | None
    scale: int
    padding: int
    pad_value: float
    invert: bool


def make_image_grid(
    images: Tensor,
    nrow: int = 8,
    *,
    image_shape: Sequence[int] | None = None,
    scale: int = 1,
    padding: int = DEFAULT_PADDING,
    pad_value: float = DEFAULT_PAD_VALUE,
    invert: bool = False,
) -> Tensor:
    """Tile flattened images ``(B, D)`` into a ``(3, height, width)`` float grid with ``nrow`` tiles per row.

    ``image_shape`` (C, H, W) is the images' shape (default: see the module docs). The last row is
    left-aligned when ``B`` is not a multiple of ``nrow``; the size is :func:`grid_size` of
    ``(ceil(B / ncols), ncols)`` with ``ncols = min(nrow, B)``.
    """
    images = _check_flat("images", images)
    shape = _resolve_shape(image_shape, images.shape[1])
    scale = _check_scale(scale)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if invert:
        images = 1.0 - images
    grid: Tensor = make_grid(images.view(-1, *shape), nrow=nrow, padding=padding, pad_value=pad_value)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return grid


def encode_png(grid: Tensor) -> bytes:
    """The PNG file of a ``(3, H, W)`` (or ``(1, H, W)``) float grid with values in [0, 1]."""
    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    return buffer.getvalue()


def _check_suffix(path: str | os.PathLike[str], suffix: str, what: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ValueError(f"{path}: {what} are written as {suffix[1:].upper()}; use a {suffix} file name")
    return path


def _check_png_path(path: str | os.PathLike[str]) -> Path:
    return _check_suffix(path, ".png", "image files")


def write_png(grid: Tensor, path: str | os.PathLike[str]) -> Path:
    """Write a grid as a PNG file, atomically (a reader never sees a partial file); returns the path."""
    path = _check_png_path(path)
    return atomic_write_bytes(path, encode_png(grid))


def save_image_grid(images: Tensor, path: str | os.PathLike[str], nrow: int = 8, **kwargs: Unpack[GridOptions]) -> Path:
    """Save flattened images ``(B, D)`` as a PNG grid (``kwargs``: see :func:`make_image_grid`)."""
    return write_png(make_image_grid(images, nrow, **kwargs), _check_png_path(path))


def square_columns(count: int) -> int:
    """Tiles per row of a grid of ``count`` tiles that is about square."""
    return max(1, math.ceil(math.sqrt(count)))


def sample_grid(probs: Tensor, nrow: int | None = None, **kwargs: Unpack[GridOptions]) -> Tensor:
    """Samples ``(B, D)`` (means of p(x | z)) as a grid, ``nrow`` per row (default ~square).

    ``kwargs``: see :func:`make_image_grid` (``image_shape`` for images other than 28x28 grey).
    """
    if nrow is None:
        nrow = square_columns(_check_flat("probs", probs).shape[0])
    return make_image_grid(probs, nrow, **kwargs)


def save_sample_grid(
    probs: Tensor, path: str | os.PathLike[str], nrow: int | None = None, **kwargs: Unpack[GridOptions]
) -> Path:
    """Save samples ``(B, D)`` (means of p(x | z)) as a PNG grid, ``nrow`` per row (default ~square)."""
    return write_png(sample_grid(probs, nrow, **kwargs), _check_png_path(path))


def _check_steps(steps: Tensor) -> tuple[int, int, int]:
    """(K, B, D) of the canvases of every step, or a clear error."""
    if not isinstance(steps, Tensor) or steps.dim() != 3 or 0 in steps.shape:
        raise ValueError(f"steps must be (K, B, D) canvases of every drawing step, got {_describe(steps)}")
    k, b, d = steps.shape
    return k, b, d


def unrolled_strips_grid(steps: Tensor, **kwargs: Unpack[GridOptions]) -> Tensor:
    """The drawing process: one row per image showing sigmoid(s_t) for t = 1..K left to right.

    Args:
        steps: (K, B, D) canvases after every step (``AVME.sample(..., return_steps=True)``).
        kwargs: see :func:`make_image_grid`.

    The grid has B rows and K columns (the paper's Figures 8 and 9).
    """
    k, b, d = _check_steps(steps)
    rows = steps.transpose(0, 1).reshape(b * k, d)
    return make_image_grid(rows, k, **kwargs)


def save_unrolled_strips(steps: Tensor, path: str | os.PathLike[str], **kwargs: Unpack[GridOptions]) -> Path:
    """Save :func:`unrolled_strips_grid` of ``steps`` (K, B, D) as a PNG."""
    return write_png(unrolled_strips_grid(steps, **kwargs), _check_png_path(path))


def class_grid(probs: Tensor, *, per_class: int | None = None, **kwargs: Unpack[GridOptions]) -> Tensor:
    """Class-conditional samples with one row per class.

    Args:
        probs: (C, N, D) N samples for each of C classes (or (C * N, D) with an explicit
            ``per_class=N`` keyword), row c showing class c.
        kwargs: see :func:`make_image_grid`.
    """
    if isinstance(probs, Tensor) and probs.dim() == 2:
        if per_class is None or per_class < 1 or probs.shape[0] % per_class:
            raise ValueError(f"(C*N, D) class samples need per_class=N dividing {probs.shape[0]}, got {per_class}")
        probs = probs.view(-1, per_class, probs.shape[1])
    if not isinstance(probs, Tensor) or probs.dim() != 3:
        raise ValueError(f"class samples must be (C, N, D), got {_describe(probs)}")
    c, n, d = probs.shape
    return make_image_grid(probs.reshape(c * n, d), n, **kwargs)


def save_class_grid(
    probs: Tensor, path: str | os.PathLike[str], *, per_class: int | None = None, **kwargs: Unpack[GridOptions]
) -> Path:
    """Save :func:`class_grid` of ``probs`` as a PNG."""
    return write_png(class_grid(probs, per_class=per_class, **kwargs), _check_png_path(path))


def reconstructions_grid(x: Tensor, recon: Tensor, nrow: int = 8, **kwargs: Unpack[GridOptions]) -> Tensor:
    """Data and reconstructions as pairs of rows: ``nrow`` originals, then their reconstructions below.

    Args:
        x: (B, D) the images; recon: (B, D) their reconstructions (means of p(x | z)).
        kwargs: see :func:`make_image_grid`.

    When B is not a multiple of ``nrow`` the last pair of rows is padded with blank tiles.
    The grid has ``2 * ceil(B / nrow)`` rows of ``min(nrow, B)`` tiles.
    """
    x = _check_flat("x", x)
    recon = _check_flat("recon", recon)
    if x.shape != recon.shape:
        raise ValueError(f"x {tuple(x.shape)} and recon {tuple(recon.shape)} must have the same shape")
    b, d = x.shape
    cols = min(nrow, b)
    groups = math.ceil(b / cols)
    blank = torch.zeros(groups * cols - b, d)
    x = torch.cat([x, blank]).view(groups, 1, cols, d)
    recon = torch.cat([recon, blank]).view(groups, 1, cols, d)
    paired = torch.cat([x, recon], dim=1).reshape(groups * 2 * cols, d)
    return make_image_grid(paired, cols, **kwargs)


def save_reconstructions(
    x: Tensor, recon: Tensor, path: str | os.PathLike[str], nrow: int = 8, **kwargs: Unpack[GridOptions]
) -> Path:
    """Save :func:`reconstructions_grid` of ``x`` and ``recon`` (B, D) as a PNG."""
    return write_png(reconstructions_grid(x, recon, nrow, **kwargs), _check_png_path(path))


# --------------------------------------------------------------------------- animation
def drawing_frames(steps: Tensor, nrow: int | None = None, **kwargs: Unpack[GridOptions]) -> list[Tensor]:
    """One grid per drawing step: frame t shows sigmoid(s_t) of every image, a bar below filled to t/K.

    Args:
        steps: (K, B, D) canvases after every step (``AVME.sample(..., return_steps=True)``).
        nrow: images per row (default ~square).
        kwargs: see :func:`make_image_grid` (``image_shape``, ``scale``, ``padding``, ...).

    Returns:
        K ``(3, height + bar, width)`` grids, ``height, width`` those of :func:`make_image_grid` and
        ``bar = scale * PROGRESS_BAR_HEIGHT``. The bar also keeps two steps that look alike
        distinct frames, so an animation always has K frames.
    """
    k, b, _ = _check_steps(steps)
    nrow = square_columns(b) if nrow is None else nrow
    scale = _check_scale(kwargs.get("scale", 1))
    pad_value = kwargs.get("pad_value", DEFAULT_PAD_VALUE)
    frames = []
    for t in range(k):
        grid = make_image_grid(steps[t], nrow, **kwargs)
        bar = torch.full((3, scale * PROGRESS_BAR_HEIGHT, grid.shape[2]), float(pad_value))
        bar[:, :, : round(grid.shape[2] * (t + 1) / k)] = 1.0
        frames.append(torch.cat([grid, bar], dim=1))
    return frames


def _to_pil(grid: Tensor) -> PIL.Image.Image:
    """A (3, H, W) float grid in [0, 1] as a Pillow image: mode "L" when its channels are equal, else "RGB"."""
    from PIL import Image

    pixels = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    if bool((pixels[0] == pixels[1]).all() and (pixels[0] == pixels[2]).all()):
        return Image.fromarray(pixels[0].numpy(), mode="L")
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def encode_gif(frames: Sequence[Tensor], *, frame_ms: int = DEFAULT_FRAME_MS, hold_ms: int = DEFAULT_HOLD_MS) -> bytes:
    """An animated GIF, looping forever, of ``(3, H, W)`` grids in [0, 1] (all of one size).

    Each frame is shown ``frame_ms`` milliseconds, the last ``hold_ms`` (GIF stores hundredths of a
    second). Grey frames are stored with a grey palette, colour frames each with its own 256-colour
    palette. Consecutive identical frames are merged by the encoder (their times added).
    """
    if not frames:
        raise ValueError("an animation needs at least one frame")
    sizes = {tuple(f.shape) for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"animation frames must all have one size, got {sorted(sizes)}")
    for name, value in (("frame_ms", frame_ms), ("hold_ms", hold_ms)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 10:
            raise ValueError(f"{name} must be an integer number of milliseconds >= 10, got {value!r}")
    images = [_to_pil(f.detach().float().cpu()) for f in frames]
    if len({image.mode for image in images}) > 1:  # a colour model whose canvas is grey at some step
        images = [image.convert("RGB") for image in images]
    buffer = io.BytesIO()
    durations = [frame_ms] * (len(images) - 1) + [hold_ms]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return buffer.getvalue()


def write_gif(
    frames: Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    frame_ms: int = DEFAULT_FRAME_MS,
    hold_ms: int = DEFAULT_HOLD_MS,
) -> Path:
    """Write :func:`encode_gif` of ``frames`` to a ``.gif`` file, atomically; returns the path."""
    path = _check_suffix(path, ".gif", "animations")
    return atomic_write_bytes(path, encode_gif(frames, frame_ms=frame_ms, hold_ms=hold_ms))


def save_drawing_gif(
    steps: Tensor,
    path: str | os.PathLike[str],
    nrow: int | None = None,
    *,
    frame_ms: int = DEFAULT_FRAME_MS,
    hold_ms: int = DEFAULT_HOLD_MS,
    **kwargs: Unpack[GridOptions],
) -> Path:
    """Save the K drawing steps (K, B, D) as an animated GIF of :func:`drawing_frames`."""
    path = _check_suffix(path, ".gif", "animations")
    return write_gif(drawing_frames(steps, nrow, **kwargs), path, frame_ms=frame_ms, hold_ms=hold_ms)
