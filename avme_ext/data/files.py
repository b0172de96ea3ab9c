"""A user's own images: a folder of image files in class subfolders (``imagefolder``) or an npz file (``npz``).

Each reader returns the parts it found (``train``/``valid``/``test``, or ``all`` when the source has
no splits) and a fingerprint of the source, which a run records so that a later ``avme eval`` can
tell whether the files changed.

Image folder (``--data-root DIR``), as ``torchvision.datasets.ImageFolder`` reads it::

    DIR/<class>/<image>                          no splits: one part, split by seed
    DIR/train/<class>/<image>, DIR/test/...      splits (valid/ or val/ and test/ optional)

Files with the extensions of ``torchvision.datasets.folder.IMG_EXTENSIONS`` are read, in sorted
order (class, then path), with PIL. Classes are the sorted subfolder names (of ``train/`` in the
split layout). Images are made grey (PIL's ``convert("L")``) or RGB: ``channels`` when given, else
grey when every image is grey (PIL modes 1, L, LA, I, F) and RGB otherwise; an alpha channel is
dropped. They are resized to ``image_size x image_size`` when given (not cropped: see
:func:`avme_ext.data.pixels.resize`); without it every image must have the same size.

npz file (``--data-root FILE.npz``), read with ``numpy.load(allow_pickle=False)``:

==========================================  ==========================================================
key                                         content
==========================================  ==========================================================
``images`` (+ ``labels``)                   no splits: one part, split by seed
``x_train`` (+ ``y_train``), optionally     splits; a missing ``valid`` (or ``test``) is held out
``x_valid``/``y_valid``, ``x_test``/...     from ``train`` by seed
==========================================  ==========================================================

Images are ``uint8`` 8-bit intensities (or ``bool`` for images already binarized), shaped
``(N, H, W)`` (grey), ``(N, H, W, C)`` with C = 1 or 3 (channels last, as numpy and PIL images),
or ``(N, C, H, W)`` with C = 1 or 3 (when the last axis is not 1 or 3). Labels are ``(N,)``
integers >= 0; without labels the images are unlabelled.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import DataFormatError, missing_files_error
from .pixels import resize
from .raw import RawPart

__all__ = ["GREY_MODES", "SourceFiles", "read_image_files", "read_image_folder", "read_npz"]

#: PIL modes read as grey images.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SPLIT_FOLDERS = {"train": ("train",), "valid": ("valid", "val"), "test": ("test",)}


@dataclass(frozen=True, eq=False)
class SourceFiles:
    """What a reader found.

    Attributes:
        parts: ``{"train": ..., "valid": ..., "test": ...}`` (those present) or ``{"all": ...}``.
        fingerprint: ``"sha256:<hex>"`` of the files read (names and sizes for a folder, bytes for an npz).
    """

    parts: dict[str, RawPart]
    fingerprint: str


# --------------------------------------------------------------------------- image folder
def _part_folders(root: Path) -> dict[str, Path]:
    """``{"all": root}``, or the split folders when ``root`` holds ``train/`` and nothing but split folders."""
    children = sorted(p.name for p in root.iterdir() if p.is_dir())
    known = {name for names in _SPLIT_FOLDERS.values() for name in names}
    if "train" not in children or not set(children) <= known:
        return {"all": root}
    if {"valid", "val"} <= set(children):
        raise DataFormatError(f"{root}: holds both valid/ and val/; keep one")
    return {part: root / name for part, names in _SPLIT_FOLDERS.items() for name in names if name in children}


def _samples(folders: dict[str, Path]) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """Each part's (path, class index) in torchvision's order, and the class names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    base = folders["all"] if "all" in folders else folders["train"]  # see _part_folders
    try:
        classes, class_to_idx = find_classes(str(base))
    except FileNotFoundError:
        raise missing_files_error(
            "image folder classes",
            [base / "<class>" / "<image>.png"],
            "one subfolder of images per class",
            downloadable=False,
        ) from None
    samples = {}
    for part, folder in folders.items():
        extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in class_to_idx)
        if extra:
            raise DataFormatError(f"{folder}: class folders {extra} are not classes of {base} ({classes})")
        samples[part] = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples[part]:
            raise missing_files_error(
                f"images of {folder}",
                [folder / "<class>" / "<image>.png"],
                f"extensions {', '.join(IMG_EXTENSIONS)}",
                downloadable=False,
            )
    return samples, classes


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError) as error:
        raise DataFormatError(f"{path}: not a readable image ({error})") from None


def _common_size(headers: list[tuple[str, tuple[int, int]]], paths: list[str]) -> tuple[int, int]:
    sizes = {size for _, size in headers}
    if len(sizes) > 1:
        (w0, h0), (w1, h1) = headers[0][1], next(s for _, s in headers if s != headers[0][1])
        other = paths[[s for _, s in headers].index((w1, h1))]
        raise DataFormatError(
            f"images have different sizes ({paths[0]} is {w0}x{h0}, {other} is {w1}x{h1}); "
            "pass image_size (--image-size N) to resize them all to N x N"
        )
    width, height = sizes.pop()
    return height, width


def read_image_folder(root: Path, image_size: int | None = None, channels: int | None = None) -> SourceFiles:
    """Read an image folder (see the module docstring) into uint8 parts of one shape.

    Args:
        root: the folder.
        image_size: resize every image to ``image_size x image_size`` (None: keep, all must agree).
        channels: 1 or 3 (None: 1 when every image is grey, else 3).
    """
    if not root.is_dir():
        raise missing_files_error("image folder", [root], "a folder of <class>/<image> files", downloadable=False)
    samples, classes = _samples(_part_folders(root))
    paths = [path for part in samples.values() for path, _ in part]
    if not channels or image_size is None:  # the headers, to infer channels or check that sizes agree
        headers = []
        for path in paths:
            with _open_image(path) as image:
                headers.append((image.mode, image.size))
        channels = channels or (1 if all(mode in GREY_MODES for mode, _ in headers) else 3)
        if image_size is None:
            _common_size(headers, paths)
    mode = "L" if channels == 1 else "RGB"
    parts = {
        part: RawPart(
            read_image_files([p for p, _ in items], mode, image_size, f"image folder ({part})"),
            torch.tensor([c for _, c in items], dtype=torch.int64),
            len(classes),
        )
        for part, items in samples.items()
    }
    digest = hashlib.sha256()
    for path, label in ((p, c) for part in samples.values() for p, c in part):
        digest.update(f"{Path(path).relative_to(root)}\t{label}\t{Path(path).stat().st_size}\n".encode())
    return SourceFiles(parts, "sha256:" + digest.hexdigest())


_Item = TypeVar("_Item")


def _progress(items: Sequence[_Item], description: str) -> Iterable[_Item]:
    """``items`` behind a progress bar ``reading <description>`` (shown for 2000 items or more, on a terminal)."""
    from tqdm.auto import tqdm

    bar: Iterable[_Item] = tqdm(
        items, desc=f"reading {description}", unit="img", leave=False, disable=len(items) < 2000 or None
    )
    return bar


def read_image_files(paths: Sequence[str | Path], mode: str, image_size: int | None, description: str) -> torch.Tensor:
    """Decode image files into one ``(N, C, H, W)`` uint8 tensor (C = 1 for PIL ``mode`` "L", 3 for "RGB").

    Args:
        paths: the files, in the order of the rows.
        mode: the PIL mode each image is converted to ("L" or "RGB").
        image_size: resize every image to ``image_size x image_size`` (None: keep; all must agree).
        description: what the progress bar reads (``reading <description>``).

    Raises:
        DataFormatError: a file that is not a readable image, or that cannot be decoded.
    """
    images = []
    for path in _progress(paths, description):
        with _open_image(str(path)) as image:
            try:
                array = np.asarray(image.convert(mode), dtype=np.uint8)
            except (OSError, ValueError) as error:
                raise DataFormatError(f"{path}: cannot decode the image ({error})") from None
        tensor = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)
        images.append(resize(tensor.unsqueeze(0), image_size)[0] if image_size else tensor)
    return torch.stack(images)


# --------------------------------------------------------------------------- npz
_NPZ_HELP = (
    "expected keys images (+ labels), or x_train (+ y_train) with optional x_valid/y_valid and "
    "x_test/y_test; images uint8 (or bool) (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3"
)


def _npz_images(array: np.ndarray, where: str) -> tuple[torch.Tensor, bool]:
    """``(N, C, H, W)`` uint8 images of an npz array and whether they are binary (bool)."""
    if array.dtype not in (np.uint8, np.bool_):
        hint = (
            " (scale floats in [0, 1] with numpy.round(x * 255).astype(numpy.uint8))"
            if np.issubdtype(array.dtype, np.floating)
            else ""
        )
        raise DataFormatError(
            f"{where}: images must be uint8 (8-bit levels) or bool (binary), got {array.dtype}" + hint
        )
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif not (array.ndim == 4 and array.shape[1] in (1, 3)):
        raise DataFormatError(f"{where}: got shape {array.shape}; {_NPZ_HELP}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)), array.dtype == np.bool_


def _npz_labels(labels: np.ndarray | None, n: int, where: str) -> torch.Tensor:
    if labels is None:
        return torch.full((n,), -1, dtype=torch.int64)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{where}: expected ({n},) integer labels, got {labels.shape} {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise DataFormatError(f"{where}: labels must be >= 0, found {labels.min()}")
    return torch.from_numpy(labels.astype(np.int64))


def _npz_keys(files: list[str], path: Path) -> dict[str, tuple[str, str]]:
    """part -> (images key, labels key) of the parts the file holds."""
    if "images" in files and "x_train" in files:
        raise DataFormatError(f"{path}: holds both images and x_train; {_NPZ_HELP}")
    if "images" in files:
        return {"all": ("images", "labels")}
    if "x_train" not in files:
        raise DataFormatError(f"{path}: has keys {files}; {_NPZ_HELP}")
    return {part: (f"x_{part}", f"y_{part}") for part in ("train", "valid", "test") if f"x_{part}" in files}


def read_npz(path: Path) -> SourceFiles:
    """Read an npz file of images (see the module docstring)."""
    if not path.is_file():
        raise missing_files_error("npz file", [path], "pass the file itself", downloadable=False)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = _npz_keys(list(npz.files), path)
            arrays = {part: (npz[x], npz[y] if y in npz.files else None) for part, (x, y) in keys.items()}
    except DataFormatError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise DataFormatError(f"{path}: corrupt or truncated npz file ({type(error).__name__}: {error})") from None
    loaded = {}
    for part, (images, labels) in arrays.items():
        x_key, y_key = keys[part]
        tensor, binary = _npz_images(images, f"{path}[{x_key}]")
        loaded[part] = (tensor, binary, _npz_labels(labels, tensor.shape[0], f"{path}[{y_key}]"))
    shapes = {tuple(t.shape[1:]) for t, _, _ in loaded.values()}
    kinds = {b for _, b, _ in loaded.values()}
    if len(shapes) > 1 or len(kinds) > 1:
        raise DataFormatError(
            f"{path}: every part must hold images of one shape and dtype, got "
            + ", ".join(f"{keys[p][0]} {tuple(t.shape)} {'bool' if b else 'uint8'}" for p, (t, b, _) in loaded.items())
        )
    num_classes = max((int(y.max()) + 1 for _, _, y in loaded.values() if y.numel() and y.min() >= 0), default=0)
    parts = {part: RawPart(t, y, num_classes, b) for part, (t, b, y) in loaded.items()}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return SourceFiles(parts, "sha256:" + digest.hexdigest())
