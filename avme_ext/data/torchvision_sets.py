"""The data sets read by ``torchvision.datasets``: Fashion-MNIST, KMNIST, EMNIST, Omniglot, CIFAR-10 and SVHN.

torchvision reads the files, in the layout and format it downloads, and checks them as it does
(CIFAR-10, SVHN and Omniglot against the md5 of the official files). Each reader here returns one
official part (``"train"`` or ``"test"``) as a :class:`RawPart` of uint8 ``(N, C, H, W)`` images.
Before torchvision is called, the files it needs are looked for, so that a missing file gives one
line naming it and the options that fix it.

Where the files live under ``root`` (torchvision's layout; ``download=True`` puts them there):

==============  ===========================================================================
fashion_mnist   ``FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (uncompressed)
kmnist          ``KMNIST/raw/...`` (the same names)
emnist          ``EMNIST/raw/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte``
omniglot        ``omniglot-py/images_{background,evaluation}.zip`` and their unzipped folders
cifar10         ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
svhn            ``SVHN/{train,test}_32x32.mat`` (or directly in ``root``; needs scipy)
==============  ===========================================================================

EMNIST's files store every image transposed; they are turned upright here. Omniglot's strokes are
black on white; they are inverted here so that ink is 1, as in MNIST (and the IWAE paper's Omniglot).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataFormatError, missing_files_error
from .files import read_image_files
from .raw import RawPart

__all__ = ["TORCHVISION_READERS", "idx_file_names", "read_torchvision_part"]

_MNIST_LIKE = {"fashion_mnist": ("FashionMNIST", "Fashion-MNIST"), "kmnist": ("KMNIST", "Kuzushiji-MNIST")}


def _datasets() -> Any:
    import torchvision.datasets

    return torchvision.datasets


def idx_file_names(prefixes: tuple[str, ...]) -> list[str]:
    """``<prefix>-images-idx3-ubyte`` and ``<prefix>-labels-idx1-ubyte`` for each prefix."""
    return [f"{p}-{kind}" for p in prefixes for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]


def _open(what: str, expected: list[Path], download: bool, make: Callable[[], Any], note: str = "") -> Any:
    """``make()`` (a torchvision data set), after checking that the files ``expected`` exist (unless
    ``download``), with torchvision's errors turned into one line that names the files."""
    missing = [path for path in expected if not path.exists()]
    if missing and not download:
        raise missing_files_error(what, missing, note)
    try:
        return make()
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError, EOFError) as error:
        if download and missing:
            raise OSError(f"could not fetch the {what} into {missing[0].parent}: {error}") from None
        names = ", ".join(str(p) for p in expected)
        raise DataFormatError(
            f"{what} ({names}) cannot be read by torchvision: {error}. A file is corrupt, "
            "truncated or not the official one; delete it and download it again"
        ) from None


def _mnist_like(name: str) -> Callable[[Path, str, bool], RawPart]:
    folder, title = _MNIST_LIKE[name]

    def read(root: Path, part: str, download: bool) -> RawPart:
        expected = [root / folder / "raw" / n for n in idx_file_names(("train", "t10k"))]
        dataset = _open(
            f"{title} files",
            expected,
            download,
            lambda: getattr(_datasets(), folder)(root, train=part == "train", download=download),
            "uncompressed, as torchvision unpacks them; with the official .gz files beside them, "
            "download unpacks them without a network",
        )
        return RawPart(dataset.data.unsqueeze(1).contiguous(), dataset.targets.long(), len(dataset.classes))

    return read


def read_emnist(root: Path, part: str, download: bool, split: str) -> RawPart:
    """EMNIST ``split`` (``torchvision.datasets.EMNIST``), images turned upright (the files store them transposed)."""
    prefix = f"emnist-{split}-{'train' if part == 'train' else 'test'}"
    expected = [root / "EMNIST" / "raw" / n for n in idx_file_names((prefix,))]
    dataset = _open(
        f"EMNIST {split} {part} files",
        expected,
        download,
        lambda: _datasets().EMNIST(root, split=split, train=part == "train", download=download),
        "uncompressed, as torchvision unpacks them",
    )
    images = dataset.data.transpose(1, 2).unsqueeze(1).contiguous()
    return RawPart(images, dataset.targets.long(), len(dataset.classes))


def read_omniglot(root: Path, part: str, download: bool) -> RawPart:
    """Omniglot's background (``train``) or evaluation (``test``) set, ink = 255, every character's images in
    sorted order of (alphabet, character, file name); no labels (the two sets hold different characters)."""
    folder = "images_background" if part == "train" else "images_evaluation"
    base = root / "omniglot-py"
    dataset = _open(
        f"Omniglot {folder} files",
        [base / f"{folder}.zip", base / folder],
        download,
        lambda: _datasets().Omniglot(root, background=part == "train", download=download),
        "torchvision checks the zip file and reads the unzipped folder",
    )
    paths = sorted(Path(dataset.target_folder).glob("*/*/*.png"))
    if not paths:
        raise DataFormatError(f"{dataset.target_folder}: no <alphabet>/<character>/*.png images")
    return RawPart.unlabelled(255 - read_image_files(paths, "L", None, f"omniglot {part}"))


def read_cifar10(root: Path, part: str, download: bool) -> RawPart:
    """CIFAR-10 (``torchvision.datasets.CIFAR10``, which checks every batch file's md5)."""
    base = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    dataset = _open(
        "CIFAR-10 files",
        [base / n for n in names],
        download,
        lambda: _datasets().CIFAR10(root, train=part == "train", download=download),
        "the python version, cifar-10-python.tar.gz unpacked",
    )
    images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
    return RawPart(images, torch.tensor(dataset.targets, dtype=torch.int64), len(dataset.classes))


def read_svhn(root: Path, part: str, download: bool) -> RawPart:
    """SVHN's ``train`` or ``test`` file (``torchvision.datasets.SVHN``, md5-checked; labels 0-9, as torchvision maps 10 to 0).

    The file is read from ``root/SVHN/`` (where a download goes) or, if it is there, ``root/``.
    """
    if importlib.util.find_spec("scipy") is None:
        from .errors import DataOptionError

        raise DataOptionError(
            "svhn: torchvision reads SVHN's .mat files with scipy, which is not installed; "
            "pip install scipy (or: pip install 'avme[svhn]')"
        )
    name = f"{part}_32x32.mat"
    folder = root if (root / name).is_file() else root / "SVHN"
    dataset = _open(
        f"SVHN {part} file", [folder / name], download, lambda: _datasets().SVHN(folder, split=part, download=download)
    )
    return RawPart(
        torch.from_numpy(np.ascontiguousarray(dataset.data)), torch.from_numpy(dataset.labels.astype(np.int64)), 10
    )


#: data set name -> reader of one official part (``root``, ``"train"`` or ``"test"``, ``download``).
TORCHVISION_READERS: dict[str, Callable[..., RawPart]] = {
    **{name: _mnist_like(name) for name in _MNIST_LIKE},
    "emnist": read_emnist,
    "omniglot": read_omniglot,
    "cifar10": read_cifar10,
    "svhn": read_svhn,
}


def read_torchvision_part(dataset: str, root: Path, part: str, download: bool, **options: Any) -> RawPart:
    """Read official ``part`` (``"train"`` or ``"test"``) of a torchvision data set (see :data:`TORCHVISION_READERS`)."""
    return TORCHVISION_READERS[dataset](root, part, download, **options)
