"""The data sets avme reads, described for help texts and checks (no torch: the command line imports this).

The choices of the data options are those of :mod:`avme_ext.choices`, re-exported here.

Every data set has official *parts* (files): ``train`` and ``test`` for most, ``train``,
``valid`` and ``test`` for the fixed binarized MNIST, or none at all for a folder or an npz file
without splits (one part, ``all``). :mod:`avme_ext.data.splits` turns the parts into the three
splits ``train``, ``valid`` and ``test``.
"""

from __future__ import annotations

from dataclasses import dataclass

from avme_ext.choices import BINARIZE_MODES, CHANNELS, DATASETS, EMNIST_SPLITS, LIKELIHOODS, SPLITS

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
        default_size: the side it is resized to when ``--image-size`` is not given (None: its size as stored).
    """

    name: str
    summary: str
    default_size: int | None = None


CATALOG: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("binarized_mnist", "the fixed binarization of MNIST, 50k/10k/10k (vendored; no download)"),
        DatasetInfo(
            "binarized_mnist_amat",
            "the same, from Larochelle's binarized_mnist_{train,valid,test}.amat (no labels)",
        ),
        *(
            DatasetInfo(name, f"mnist with --binarize {mode} (the name of earlier versions)")
            for name, mode in LEGACY_MNIST.items()
        ),
        DatasetInfo("mnist", "official MNIST IDX files, 8-bit grey; valid = the last 10k training images"),
        DatasetInfo(
            "fashion_mnist",
            "Fashion-MNIST (torchvision FashionMNIST), 28x28 grey, 10 classes",
        ),
        DatasetInfo("kmnist", "Kuzushiji-MNIST (torchvision KMNIST), 28x28 grey, 10 classes"),
        DatasetInfo(
            "emnist",
            "EMNIST (torchvision EMNIST), 28x28 grey, split by --emnist-split",
        ),
        DatasetInfo(
            "omniglot",
            "Omniglot (torchvision Omniglot): background = train, evaluation = test; no labels",
            default_size=28,
        ),
        DatasetInfo("cifar10", "CIFAR-10 (torchvision CIFAR10), 32x32 colour, 10 classes"),
        DatasetInfo("svhn", "SVHN (torchvision SVHN, needs scipy), 32x32 colour, 10 classes"),
        DatasetInfo(
            "imagefolder",
            "a folder of images in class subfolders (or train/, valid/, test/ of them)",
        ),
        DatasetInfo("npz", "an npz file of uint8 images and integer labels (see the README for its keys)"),
    )
}

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
