"""Image data for the recurrent VAE: data sets, splits, binarization and batching.

Every loader returns an :class:`ImageSplit`: flattened images ``(N, D)``, ``D = C * H * W``,
plus ``(N,)`` int64 labels. :func:`load_split` loads one split of a data set by name;
:class:`DataSpec` holds every data option of a run and :meth:`DataSpec.open` gives a
:class:`DataSource` that loads its splits (each file read once) and describes them for the
run's config (:meth:`DataSource.record`).

Data sets (:data:`DATASETS`; see :mod:`avme_ext.data.catalog`): the fixed binarized MNIST
(vendored) and its amat files, MNIST's IDX files (``mnist``, and ``mnist_static`` /
``mnist_dynamic`` / ``mnist_threshold``), the torchvision data sets ``fashion_mnist``, ``kmnist``,
``emnist``, ``omniglot``, ``cifar10``, ``svhn``, a folder of images (``imagefolder``) and an npz
file (``npz``).

One module per job: ``catalog`` (names and choices; no torch), ``image_split`` (:class:`ImageSplit`),
``mnist`` (MNIST's own files and downloads), ``torchvision_sets`` (the torchvision readers),
``files`` (image folders, npz files), ``pixels`` (channels, resizing, binarization), ``splits``
(held-out splits by seed), ``spec`` (:class:`DataSpec`; no torch), ``sources`` (:class:`DataSource`,
:func:`load_split`), ``runs`` (the data of a trained run: :func:`load_run_split`), ``errors``.
The names are imported on first use, so ``catalog`` and ``spec`` can be read without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "BINARIZE_MODES",
    "CATALOG",
    "CHANNELS",
    "DATASETS",
    "DATA_FIELDS",
    "EMNIST_SPLITS",
    "IMAGE_SIZE",
    "LIKELIHOODS",
    "NUM_CLASSES",
    "NUM_PIXELS",
    "SPLITS",
    "DataFormatError",
    "DataOptionError",
    "DataOptions",
    "DataSource",
    "DataSpec",
    "ImageSplit",
    "RawPart",
    "check_pixels_for",
    "default_data_root",
    "describe_datasets",
    "download_binarized_mnist_amat",
    "download_mnist",
    "load_amat",
    "load_binarized_mnist",
    "load_binarized_mnist_amat",
    "load_mnist_idx",
    "load_run_split",
    "load_split",
    "pixel_kind",
    "read_idx",
    "run_data_spec",
]

#: Public name -> the submodule that defines it.
_EXPORTS = {
    **dict.fromkeys(("SPLITS", "DATASETS", "BINARIZE_MODES", "EMNIST_SPLITS", "CHANNELS", "LIKELIHOODS", "CATALOG",
                     "describe_datasets", "dataset_info", "LEGACY_MNIST"), "catalog"),
    **dict.fromkeys(("IMAGE_SIZE", "NUM_PIXELS", "NUM_CLASSES", "MNIST_SHAPE", "ImageSplit"), "image_split"),
    **dict.fromkeys(("DataFormatError", "DataOptionError"), "errors"),
    "RawPart": "raw",
    **dict.fromkeys(("DataOptions", "DataSpec", "DATA_FIELDS", "pixel_kind", "default_data_root"), "spec"),
    **dict.fromkeys(("DataSource", "load_split", "check_pixels_for"), "sources"),
    **dict.fromkeys(("run_data_spec", "load_run_split"), "runs"),
}
#: Where any other name of earlier versions (when this package was one module) now lives.
_FALLBACK = "mnist"

if TYPE_CHECKING:
    from .catalog import (
        BINARIZE_MODES,
        CATALOG,
        CHANNELS,
        DATASETS,
        EMNIST_SPLITS,
        LIKELIHOODS,
        SPLITS,
        describe_datasets,
    )
    from .errors import DataFormatError, DataOptionError
    from .image_split import IMAGE_SIZE, NUM_CLASSES, NUM_PIXELS, ImageSplit
    from .mnist import (
        download_binarized_mnist_amat,
        download_mnist,
        load_amat,
        load_binarized_mnist,
        load_binarized_mnist_amat,
        load_mnist_idx,
        read_idx,
    )
    from .raw import RawPart
    from .runs import load_run_split, run_data_spec
    from .sources import DataSource, check_pixels_for, load_split
    from .spec import DATA_FIELDS, DataOptions, DataSpec, default_data_root, pixel_kind


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module(f".{_EXPORTS.get(name, _FALLBACK)}", __name__)
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
