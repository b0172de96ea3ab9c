"""The data sets avme reads, described for help texts and checks (no torch: the command line imports this).

The choices of the data options are those of :mod:`avme_ext.choices`, re-exported here.

Every data set has official *parts* (files): ``train`` and ``test`` for most, ``train``,
``valid`` and ``test`` for the fixed binarized MNIST, or none at all for a folder or an npz file
without splits (one part, ``all``). :mod:`avme_ext.data.splits` turns the parts into the three
splits ``train``, ``valid`` and ``test``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import (
    BINARIZE_MODES,
    CHANNELS,
    DATASETS,
    EMNIST_SPLITS,
    LIKELIHOODS,
    SPLITS,
)

__all__ = [
    "BINARIZE_MODES",
    "CATALOG",
    "CHANNELS",
    "DATASETS",
    "EMNIST_SPLITS",
    "LEGACY_MNIST",
    "LIKELIHOODS",
    "SPLITS",
    "DatasetInfo",
    "dataset_info",
    "describe_datasets",
]

#: The binarized MNIST names of earlier versions: ``mnist_<mode>`` is ``mnist`` with ``binarize=<mode>``.
LEGACY_MNIST: dict[str, str] = {f"mnist_{mode}": mode for mode in BINARIZE_MODES}


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, for help texts and checks.

    Attributes:
        name: the ``--dataset`` name.
        summary: one line for ``--help``.
        pixels: ``"binary"`` (0/1 files), ``"grey"`` (8-bit grey), ``"colour"`` (8-bit RGB), or
            ``"files"`` (decided by the files: an image folder, an npz file).
        native_size: the side of its images as stored (None: decided by the files).
        default_size: the side it is resized to when ``--image-size`` is not given (None: its native size).
        torchvision: the ``torchvision.datasets`` class that reads it, if any.
    """

    name: str
    summary: str
    pixels: str
    native_size: int | None = None
    default_size: int | None = None
    torchvision: str | None = None


CATALOG: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("binarized_mnist", "the fixed binarization of MNIST, 50k/10k/10k (vendored; no download)",
                "binary", 28),
    DatasetInfo("binarized_mnist_amat", "the same, from Larochelle's binarized_mnist_{train,valid,test}.amat "
                "(no labels)", "binary", 28),
    *(DatasetInfo(name, f"mnist with --binarize {mode} (the name of earlier versions)", "grey", 28)
      for name, mode in LEGACY_MNIST.items()),
    DatasetInfo("mnist", "official MNIST IDX files, 8-bit grey; valid = the last 10k training images", "grey", 28),
    DatasetInfo("fashion_mnist", "Fashion-MNIST (torchvision FashionMNIST), 28x28 grey, 10 classes", "grey", 28,
                torchvision="FashionMNIST"),
    DatasetInfo("kmnist", "Kuzushiji-MNIST (torchvision KMNIST), 28x28 grey, 10 classes", "grey", 28,
                torchvision="KMNIST"),
    DatasetInfo("emnist", "EMNIST (torchvision EMNIST), 28x28 grey, split by --emnist-split", "grey", 28,
                torchvision="EMNIST"),
    DatasetInfo("omniglot", "Omniglot (torchvision Omniglot): background = train, evaluation = test; no labels",
                "grey", 105, default_size=28, torchvision="Omniglot"),
    DatasetInfo("cifar10", "CIFAR-10 (torchvision CIFAR10), 32x32 colour, 10 classes", "colour", 32,
                torchvision="CIFAR10"),
    DatasetInfo("svhn", "SVHN (torchvision SVHN, needs scipy), 32x32 colour, 10 classes", "colour", 32,
                torchvision="SVHN"),
    DatasetInfo("imagefolder", "a folder of images in class subfolders (or train/, valid/, test/ of them)",
                "files", torchvision="ImageFolder"),
    DatasetInfo("npz", "an npz file of uint8 images and integer labels (see the README for its keys)", "files"),
)}

if tuple(CATALOG) != DATASETS:  # pragma: no cover - a module that contradicts avme_ext.choices
    raise ImportError("avme_ext.data.catalog must describe every data set of avme_ext.choices.DATASETS, in its order")


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if name not in CATALOG:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    return CATALOG[name]


def describe_datasets(indent: str = "  ") -> str:
    """One line per data set, ``name  summary``, for a ``--help`` epilog."""
    width = max(len(name) for name in DATASETS)
    return "\n".join(f"{indent}{info.name:<{width}}  {info.summary}" for info in CATALOG.values())
