"""MNIST's own files: the fixed binarization (npz, amat) and the official IDX files, and their downloads.

``binarized_mnist``
    The standard fixed binarization (Salakhutdinov & Murray 2008, Larochelle & Murray 2011) with
    50k/10k/10k train/valid/test images, vendored with the package as
    ``avme_ext/assets/binarized_mnist.npz`` (see its README).
``binarized_mnist_amat``
    The same data from Larochelle's original ``binarized_mnist_{split}.amat`` text files. These
    carry no labels: labels are filled with ``-1`` and :attr:`ImageSplit.has_labels` is False.
official MNIST (IDX)
    :func:`read_idx` reads the official gzipped (or uncompressed) IDX files; :func:`load_mnist_idx`
    binarizes them (static, dynamic or threshold). The data sets ``mnist`` and ``mnist_<mode>`` of
    :mod:`avme_ext.data.sources` are built on them.

Downloads only happen when asked for (``download=True`` / the CLI flag ``--download``); otherwise
missing files raise a one-line :class:`FileNotFoundError` naming the expected paths.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .catalog import BINARIZE_MODES, SPLITS
from .errors import DataFormatError, check_name, missing_files_error
from .image_split import IMAGE_SIZE, NUM_CLASSES, NUM_PIXELS, ImageSplit
from .pixels import binarize_levels
from .spec import default_data_root

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_FILES",
    "MNIST_TRAIN_SIZE",
    "NPZ_FILENAME",
    "VENDORED_NPZ",
    "amat_path",
    "default_data_root",
    "download_binarized_mnist_amat",
    "download_mnist",
    "load_amat",
    "load_binarized_mnist",
    "load_binarized_mnist_amat",
    "load_mnist_idx",
    "mnist_idx_paths",
    "read_idx",
    "read_mnist_part",
]

#: Vendored copy of the fixed binarization (packed bits, see assets/README.md).
VENDORED_NPZ = Path(__file__).resolve().parent.parent / "assets" / "binarized_mnist.npz"
NPZ_FILENAME = "binarized_mnist.npz"
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{split}.amat"
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
#: Official MNIST IDX files and their md5 sums.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_TRAIN_SIZE = 50_000  # first 50k official training images; the last 10k are "valid"
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

PathLike = str | os.PathLike

_check_name = check_name


def _check_binary(array: np.ndarray, where: str) -> None:
    if array.size and array.max() > 1:
        raise DataFormatError(f"{where}: expected 0/1 pixel values, found values up to {array.max()}")


def _check_labels(labels: np.ndarray, n: int, where: str) -> torch.Tensor:
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{where}: expected ({n},) integer labels, got {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataFormatError(f"{where}: labels must be in [0, {NUM_CLASSES}), "
                              f"got range [{labels.min()}, {labels.max()}]")
    return torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- fixed binarization (npz)


def load_binarized_mnist(split: str = "train", path: PathLike | None = None) -> ImageSplit:
    """Load the fixed binarization of MNIST from an npz file.

    The file holds ``x_{split}`` as ``(N, 98)`` uint8 ``numpy.packbits`` rows (or unpacked
    ``(N, 784)`` 0/1 rows) and ``y_{split}`` as ``(N,)`` integer labels.

    Args:
        split: one of :data:`SPLITS` (50,000 / 10,000 / 10,000 images).
        path: npz file; defaults to the copy vendored with the package.

    Returns:
        :class:`ImageSplit` with ``(N, 784)`` uint8 0/1 images and ``(N,)`` int64 labels.
    """
    _check_name("split", split, SPLITS)
    path = Path(path) if path is not None else VENDORED_NPZ
    if not path.is_file():
        raise missing_files_error("binarized MNIST npz", [path], downloadable=False)
    xkey, ykey = f"x_{split}", f"y_{split}"
    expected = f"expected an npz with keys {xkey} (N, 98) packed uint8 and {ykey} (N,) labels"
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in (xkey, ykey) if k not in npz.files]
            if missing:
                raise DataFormatError(f"{path}: missing keys {missing} (has {npz.files}); {expected}")
            x, y = npz[xkey], npz[ykey]
    except DataFormatError:
        raise
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated npz file ({type(exc).__name__}: {exc}); "
                              f"{expected}") from exc
    where = f"{path}[{xkey}]"
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] not in (NUM_PIXELS // 8, NUM_PIXELS):
        raise DataFormatError(f"{where}: got {x.shape} {x.dtype}; {expected}")
    if x.shape[1] == NUM_PIXELS // 8:
        x = np.unpackbits(x, axis=1, count=NUM_PIXELS)
    _check_binary(x, where)
    labels = _check_labels(y, x.shape[0], f"{path}[{ykey}]")
    return ImageSplit(torch.from_numpy(x), labels, True, f"binarized_mnist/{split}")


# --------------------------------------------------------------------------- Larochelle's amat files


def load_amat(path: PathLike) -> torch.Tensor:
    """Parse a ``binarized_mnist_{split}.amat`` text file.

    One image per line, 784 whitespace-separated 0/1 values (blank lines are skipped).

    Returns:
        ``(N, 784)`` uint8 tensor of 0/1 values.
    """
    path = Path(path)
    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            rows.append(_parse_amat_row(tokens, f"{path}, line {lineno}"))
    if not rows:
        return torch.zeros(0, NUM_PIXELS, dtype=torch.uint8)
    return torch.from_numpy(np.stack(rows))


def _parse_amat_row(tokens: list[bytes], where: str) -> np.ndarray:
    if len(tokens) != NUM_PIXELS:
        raise DataFormatError(f"{where}: expected {NUM_PIXELS} values, got {len(tokens)}")
    joined = b"".join(tokens)
    if len(joined) == NUM_PIXELS:  # fast path: single-character tokens; other bytes wrap to > 1
        row = np.frombuffer(joined, dtype=np.uint8) - np.uint8(ord("0"))
        if row.max() <= 1:
            return row
    try:  # e.g. "0.0 1.0"
        row = np.array([float(t) for t in tokens])
    except ValueError as exc:
        raise DataFormatError(f"{where}: non-numeric value ({exc})") from None
    if not np.isin(row, (0, 1)).all():
        bad = next(t for t, v in zip(tokens, row) if v not in (0, 1))
        raise DataFormatError(f"{where}: expected 0/1 values, found {bad.decode(errors='replace')!r}")
    return row.astype(np.uint8)


def amat_path(root: PathLike, split: str) -> Path:
    """Where the amat file of ``split`` is expected: ``root/binarized_mnist_{split}.amat``."""
    return Path(root) / f"binarized_mnist_{split}.amat"


def load_binarized_mnist_amat(split: str, root: PathLike, download: bool = False) -> ImageSplit:
    """Load Larochelle's ``root/binarized_mnist_{split}.amat``.

    The amat files carry no labels: the returned split's labels are all ``-1`` and its
    :attr:`ImageSplit.has_labels` is False.
    """
    _check_name("split", split, SPLITS)
    path = amat_path(root, split)
    if not path.is_file():
        if not download:
            raise missing_files_error("binarized MNIST amat file", [path])
        download_binarized_mnist_amat(root, splits=(split,))
    images = load_amat(path)
    labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
    return ImageSplit(images, labels, True, f"binarized_mnist_amat/{split}")


# --------------------------------------------------------------------------- official MNIST (IDX)


def read_idx(path: PathLike, magic: int) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes.

    The header is a big-endian int32 magic number ``0x0000TTDD`` (type ``TT`` = 0x08 for
    ubyte, ``DD`` = number of dimensions; 2051 for image files, 2049 for label files)
    followed by one big-endian uint32 per dimension.

    Returns:
        uint8 array of the dimensions given in the header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: cannot decompress ({exc})") from exc
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataFormatError(f"{path}: expected IDX magic number {magic}, found {found}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(dims, dtype=np.int64)):
        raise DataFormatError(f"{path}: truncated or oversized IDX file: header says shape {dims}, "
                              f"file has {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def mnist_idx_paths(root: PathLike, prefix: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of ``prefix`` (``"train"`` or ``"t10k"``) under ``root``, or None."""
    found = [_find_idx(Path(root), f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    return None if None in found else (found[0], found[1])


def read_mnist_part(part: str, root: PathLike, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The official MNIST ``part`` (``"train"``: 60,000 images, ``"test"``: 10,000) as stored.

    Files are looked up, gzipped or not, in ``root/`` and in torchvision's layout
    ``root/MNIST/raw/`` (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
    ``t10k-...`` for the test part).

    Returns:
        ``(N, 28, 28)`` uint8 grey levels and ``(N,)`` int64 labels.
    """
    _check_name("split", part, ("train", "test"))
    root = Path(root)
    prefix = "train" if part == "train" else "t10k"
    paths = mnist_idx_paths(root, prefix)
    if paths is None:
        if not download:
            names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
            raise missing_files_error(
                f"MNIST {part} IDX files", [d / n for d in (root, root / "MNIST" / "raw") for n in names],
                "both files in one of the two folders; uncompressed files without .gz also work")
        download_mnist(root)
        paths = mnist_idx_paths(root, prefix)
        if paths is None:
            raise missing_files_error(f"MNIST {part} IDX files after download", [root / "MNIST" / "raw"])
    images = read_idx(paths[0], IDX_IMAGES_MAGIC)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataFormatError(f"{paths[0]}: expected (N, 28, 28) images, got {images.shape}")
    labels = _check_labels(read_idx(paths[1], IDX_LABELS_MAGIC), images.shape[0], str(paths[1]))
    return torch.from_numpy(images.copy()), labels


def load_mnist_idx(
    split: str,
    root: PathLike,
    binarize: str = "static",
    seed: int = 0,
    download: bool = False,
) -> ImageSplit:
    """Load and binarize the official MNIST IDX files (see :func:`read_mnist_part`).

    Args:
        split: ``"train"`` (all 60,000 official training images) or ``"test"`` (10,000).
        root: data folder.
        binarize: ``"static"``: one Bernoulli(gray) draw from a ``torch.Generator`` seeded
            with ``seed`` (reproducible); ``"dynamic"``: keep float32 gray levels, binarized at
            every :meth:`ImageSplit.batch` call; ``"threshold"``: gray level > 0.5.
        seed: seed of the static binarization.
        download: fetch the files with :func:`download_mnist` if they are missing.

    Returns:
        :class:`ImageSplit` of ``(N, 784)`` images and ``(N,)`` int64 labels.
    """
    _check_name("split", split, ("train", "test"))
    _check_name("binarization", binarize, BINARIZE_MODES)
    images, labels = read_mnist_part(split, root, download)
    pixels, binarized = binarize_levels(images.reshape(-1, NUM_PIXELS), binarize, seed)
    return ImageSplit(pixels, labels, binarized, f"mnist_{binarize}/{split}")


# --------------------------------------------------------------------------- downloads


def _download(urls: Sequence[str], dest: Path, md5: str | None = None) -> None:
    """Fetch the first working URL to ``dest`` (atomically; md5-checked when given)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                digest = hashlib.md5()
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if md5 is not None and digest.hexdigest() != md5:
                raise OSError(f"md5 {digest.hexdigest()} != expected {md5}")
            os.replace(tmp, dest)
            return
        except OSError as exc:
            errors.append(f"{url}: {exc}")
            tmp.unlink(missing_ok=True)
    raise OSError(f"could not download {dest.name}:\n  " + "\n  ".join(errors))


def download_mnist(root: PathLike) -> None:
    """Download the four official MNIST IDX .gz files (md5-checked) into
    ``root/MNIST/raw/``, the layout ``torchvision.datasets.MNIST`` also uses."""
    raw = Path(root) / "MNIST" / "raw"
    for name, md5 in MNIST_FILES.items():
        if not (raw / name).is_file():
            _download([mirror + name for mirror in MNIST_MIRRORS], raw / name, md5)


def download_binarized_mnist_amat(root: PathLike, splits: Sequence[str] = SPLITS) -> None:
    """Download Larochelle's ``binarized_mnist_{split}.amat`` files into ``root/``."""
    for split in splits:
        _check_name("split", split, SPLITS)
        if not amat_path(root, split).is_file():
            _download([AMAT_URL.format(split=split)], amat_path(root, split))
