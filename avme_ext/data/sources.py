""":class:`DataSpec` (every data option, as JSON-able data) and :class:`DataSource` (its splits, loaded once).

The pipeline from files to an :class:`ImageSplit`:

1. read a part (official file, folder, npz key) as uint8 ``(N, C, H, W)`` (:mod:`.mnist`,
   :mod:`.torchvision_sets`, :mod:`.files`);
2. make it grey or RGB (``channels``) and resize it (``image_size``) (:mod:`.pixels`);
3. give its pixels the form the likelihood takes (:func:`pixel_kind`): 0/1 (binarized static or
   by threshold, drawn over the whole part), grey levels binarized at every batch (dynamic), or
   8-bit levels ``k / 255`` (the logistic likelihood);
4. take the split's rows (:mod:`.splits`).

:meth:`DataSource.record` describes the result (pixels, shape, splits and their rule, a fingerprint
of a folder or npz file); a run stores it, and :meth:`DataSource.check_record` refuses data that
differ from a run's record.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .catalog import (
    BINARIZE_MODES,
    CHANNELS,
    EMNIST_SPLITS,
    LEGACY_MNIST,
    LIKELIHOODS,
    SPLITS,
    dataset_info,
)
from .errors import DataFormatError, DataOptionError, check_name
from .files import SourceFiles, read_image_folder, read_npz
from .image_split import ImageSplit
from .mnist import (
    MNIST_TRAIN_SIZE,
    NPZ_FILENAME,
    default_data_root,
    load_binarized_mnist,
    load_binarized_mnist_amat,
    read_mnist_part,
)
from .pixels import binarize_levels, resize, to_channels
from .raw import RawPart
from .splits import SplitRows, check_fraction, split_rows
from .torchvision_sets import TORCHVISION_READERS, read_torchvision_part

__all__ = ["DataSource", "DataSpec", "check_pixels_for", "load_split", "pixel_kind"]

_BINARY_SETS = ("binarized_mnist", "binarized_mnist_amat")
_FILE_SETS = ("imagefolder", "npz")

PathLike = str | os.PathLike


def _option(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


@dataclass(frozen=True)
class DataSpec:
    """Every option that decides which images a run sees (the data options of ``avme train``).

    Attributes:
        dataset: one of :data:`avme_ext.data.catalog.DATASETS`.
        data_root: the folder of the files (``imagefolder``: the image folder; ``npz``: the file);
            None: the vendored copy for ``binarized_mnist``, else :func:`default_data_root`.
        download: let torchvision (or the MNIST downloader) fetch missing files.
        seed: seed of the static binarization (one draw over a whole part).
        binarize: ``static``, ``dynamic`` or ``threshold`` for grey data under the Bernoulli
            likelihood (None: ``dynamic`` under it; the ``mnist_<mode>`` names imply theirs).
        likelihood: ``"bernoulli"``, ``"logistic"``, or None (the pixels as stored: 8-bit levels,
            unless ``binarize`` or a binary data set says otherwise).
        image_size: resize images to ``image_size x image_size`` (None: as stored; 28 for omniglot).
        channels: 1 (grey) or 3 (RGB) (None: as stored, or decided by an image folder's images).
        emnist_split: the EMNIST split (``emnist`` only).
        valid_fraction, test_fraction: shares held out by seed where the data set has no such split.
        split_seed: the seed of those hold-outs.
    """

    dataset: str = "binarized_mnist"
    data_root: str | None = None
    download: bool = False
    seed: int = 0
    binarize: str | None = None
    likelihood: str | None = None
    image_size: int | None = None
    channels: int | None = None
    emnist_split: str = "balanced"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0

    def __post_init__(self) -> None:
        dataset_info(self.dataset)  # an unknown name: the message lists the valid ones
        if self.binarize is not None:
            check_name("binarization", self.binarize, BINARIZE_MODES)
        if self.likelihood is not None:
            check_name("likelihood", self.likelihood, LIKELIHOODS)
        if self.channels is not None:
            check_name("channels", self.channels, CHANNELS)
        check_name("EMNIST split", self.emnist_split, EMNIST_SPLITS)
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DataOptionError(f"{_option(name)} must be an integer >= 0, got {value!r}")
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 1):
            raise DataOptionError(f"{_option('image_size')} must be an integer >= 1, got {self.image_size!r}")
        check_fraction("valid_fraction", self.valid_fraction)
        check_fraction("test_fraction", self.test_fraction)
        if self.valid_fraction + self.test_fraction >= 1:
            raise DataOptionError(f"{_option('valid_fraction')} + {_option('test_fraction')} must be < 1, got "
                                  f"{self.valid_fraction:g} + {self.test_fraction:g}")
        self._check_fit()

    def _check_fit(self) -> None:
        """Refuse options that cannot apply to this data set (those that depend on the files are checked
        when they are read, by :func:`pixel_kind`)."""
        if self.dataset in _BINARY_SETS:
            given = [_option(n) for n in ("binarize", "image_size", "channels") if getattr(self, n) is not None]
            if given:
                raise DataOptionError(f"{self.dataset} holds images binarized once and for all (28x28, 0/1); "
                                      f"{' and '.join(given)} do not apply to it (use --dataset mnist)")
        implied = LEGACY_MNIST.get(self.dataset)
        if implied and self.binarize not in (None, implied):
            raise DataOptionError(f"--dataset {self.dataset} is mnist binarized '{implied}'; it cannot take "
                                  f"{_option('binarize')} {self.binarize} (use --dataset mnist --binarize "
                                  f"{self.binarize})")
        if self.emnist_split != "balanced" and self.dataset != "emnist":
            raise DataOptionError(f"{_option('emnist_split')} only applies to --dataset emnist")

    @property
    def binarization(self) -> str | None:
        """The binarization asked for: ``binarize``, or the one a ``mnist_<mode>`` name implies."""
        return LEGACY_MNIST.get(self.dataset, self.binarize)

    @property
    def root(self) -> Path | None:
        """The folder (or npz file) of the data: ``data_root``, else the default (None: the vendored copy)."""
        if self.data_root is not None:
            return Path(self.data_root).expanduser()
        if self.dataset == "binarized_mnist":
            return None
        if self.dataset in _FILE_SETS:
            raise DataOptionError(f"--dataset {self.dataset} needs data_root (--data-root "
                                  f"{'DIR' if self.dataset == 'imagefolder' else 'FILE.npz'}): the "
                                  f"{'folder of images' if self.dataset == 'imagefolder' else 'npz file'} to read")
        return default_data_root()

    @classmethod
    def from_options(cls, options: dict[str, Any], **overrides: Any) -> DataSpec:
        """The spec of a run's options (a ``TrainConfig`` dict: other keys are ignored), then ``overrides``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**options, **overrides}.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def open(self) -> DataSource:
        """A :class:`DataSource` that loads the splits of this spec (each part read once)."""
        return DataSource(self)


def pixel_kind(spec: DataSpec, binary: bool, channels: int, name: str) -> str:
    """What the pixels of data ``name`` become for ``spec.likelihood``: ``binary`` (kept), a binarization
    mode (``static``, ``dynamic``, ``threshold``) or ``levels`` (8-bit, ``k / 255``).

    Raises:
        DataOptionError: the likelihood or binarization does not fit the data (binary images under
            the logistic likelihood, colour images under the Bernoulli one, ...).
    """
    mode = spec.binarization
    if binary:
        if spec.likelihood == "logistic":
            raise DataOptionError(f"{name} holds binary (0/1) images; the logistic likelihood models 8-bit levels "
                                  "(use --likelihood bernoulli)")
        if mode is not None:
            raise DataOptionError(f"{name} holds binary (0/1) images already; {_option('binarize')} does not apply")
        return "binary"
    if spec.likelihood == "logistic":
        if mode is not None:
            raise DataOptionError(f"{_option('binarize')} {mode} is for --likelihood bernoulli; the logistic "
                                  f"likelihood takes the 8-bit levels of {name} (drop --binarize"
                                  + (", and use --dataset mnist)" if spec.dataset in LEGACY_MNIST else ")"))
        return "levels"
    if channels != 1 and (spec.likelihood == "bernoulli" or mode is not None):
        raise DataOptionError(f"{name} has colour images; the Bernoulli likelihood takes 0/1 pixels of grey "
                              "images: use --likelihood logistic, or --channels 1 to make them grey")
    if spec.likelihood == "bernoulli":
        return mode or "dynamic"
    return mode or "levels"


def check_pixels_for(split: ImageSplit, likelihood: str) -> None:
    """Refuse a split whose pixels the likelihood does not model (0/1 for ``bernoulli``, levels for ``logistic``).

    Raises:
        DataOptionError: e.g. 8-bit levels given to a Bernoulli model.
    """
    wanted = "levels" if likelihood == "logistic" else ("binary", "dynamic")
    if split.pixels not in wanted:
        raise DataOptionError(
            f"{split.name} gives {split.pixels} pixels, but a model with the {likelihood} likelihood needs "
            + ("8-bit levels (drop --binarize)" if likelihood == "logistic" else
               "0/1 pixels (a --binarize mode, or a data set of binary images)"))


class DataSource:
    """The splits of a :class:`DataSpec`, each part of the files read (and made ready) once.

    Args:
        spec: the options.
    """

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        self.info = dataset_info(spec.dataset)
        self._ready: dict[str, tuple[torch.Tensor, torch.Tensor, bool, bool, tuple[int, int, int], int]] = {}
        self._loaded: dict[str, ImageSplit] = {}

    # ----------------------------------------------------------------- parts
    @cached_property
    def _files(self) -> SourceFiles:
        root = self.spec.root
        assert root is not None
        if self.spec.dataset == "npz":
            return read_npz(root)
        return read_image_folder(root, self.spec.image_size, self.spec.channels)

    @property
    def parts(self) -> frozenset[str]:
        """The parts the data set has (``train``/``valid``/``test``, or ``all``)."""
        if self.spec.dataset in _FILE_SETS:
            return frozenset(self._files.parts)
        if self.spec.dataset in _BINARY_SETS:
            return frozenset(SPLITS)
        return frozenset(("train", "test"))

    def _read(self, part: str) -> RawPart:
        spec, root = self.spec, self.spec.root
        if spec.dataset in _FILE_SETS:
            return self._files.parts[part]
        if spec.dataset in TORCHVISION_READERS:
            options = {"split": spec.emnist_split} if spec.dataset == "emnist" else {}
            return read_torchvision_part(spec.dataset, root, part, spec.download, **options)
        images, labels = read_mnist_part(part, root, spec.download)
        return RawPart(images.unsqueeze(1), labels, 10)

    def _prepared(self, part: str) -> tuple[torch.Tensor, torch.Tensor, bool, bool, tuple[int, int, int], int]:
        """(images (N, D), labels, binarized, levels, image shape, classes) of ``part``, pixels in their final form."""
        if part not in self._ready:
            raw = self._read(part)
            images = raw.images
            if self.spec.channels is not None:
                images = to_channels(images, self.spec.channels)
            size = self.spec.image_size or self.info.default_size
            if size is not None:
                images = resize(images, size)
            shape = tuple(images.shape[1:])
            kind = pixel_kind(self.spec, raw.binary, shape[0], self.spec.dataset)
            flat = images.reshape(images.shape[0], -1)
            if kind in ("binary", "levels"):
                pixels, binarized = flat, kind == "binary"
            else:
                pixels, binarized = binarize_levels(flat, kind, self.spec.seed)
            self._ready[part] = (pixels, raw.labels, binarized, kind == "levels", shape, raw.num_classes)
        return self._ready[part]

    def _rows(self, split: str) -> SplitRows:
        spec = self.spec
        if spec.dataset == "mnist" or spec.dataset in LEGACY_MNIST:  # MNIST's own rule (as in earlier versions)
            if split == "test":
                return SplitRows("test", None, "the official test part (t10k), whole")
            rows = slice(None, MNIST_TRAIN_SIZE) if split == "train" else slice(MNIST_TRAIN_SIZE, None)
            where = "the first 50,000" if split == "train" else "the last 10,000"
            return SplitRows("train", rows, f"{where} images of the official training part")  # type: ignore[arg-type]
        parts = self.parts
        size = None if split in parts else len(self._prepared("all" if "all" in parts else "train")[0])
        return split_rows(split, parts, size, valid_fraction=spec.valid_fraction, test_fraction=spec.test_fraction,
                          seed=spec.split_seed)

    # ----------------------------------------------------------------- splits
    def split(self, split: str) -> ImageSplit:
        """Load ``split`` (one of :data:`SPLITS`).

        Raises:
            FileNotFoundError: files are missing (one line naming them; ``cli_hint`` in command-line terms).
            DataFormatError: a file is unreadable. DataOptionError: the options do not fit the data.
        """
        check_name("split", split, SPLITS)
        if split in self._loaded:
            return self._loaded[split]
        spec = self.spec
        if spec.likelihood is not None and spec.dataset in _BINARY_SETS:
            pixel_kind(spec, True, 1, spec.dataset)
        if spec.dataset == "binarized_mnist":
            root = spec.root
            loaded = load_binarized_mnist(split, None if root is None else root / NPZ_FILENAME)
        elif spec.dataset == "binarized_mnist_amat":
            loaded = load_binarized_mnist_amat(split, spec.root, spec.download)
        else:
            loaded = self._load(split)
        self._loaded[split] = loaded
        return loaded

    def _load(self, split: str) -> ImageSplit:
        where = self._rows(split)
        pixels, labels, binarized, levels, shape, classes = self._prepared(where.part)
        if where.rows is not None:
            pixels, labels = pixels[where.rows], labels[where.rows]
        return ImageSplit(pixels, labels, binarized, f"{self.spec.dataset}/{split}", shape, levels, classes)

    # ----------------------------------------------------------------- provenance
    def record(self) -> dict[str, Any]:
        """What a run records of its data: pixels, image shape, classes, and for every split loaded so far
        its size and rule (plus the fingerprint of a folder or npz file)."""
        if not self._loaded:
            raise RuntimeError("record() describes the splits loaded so far; load one first")
        first = next(iter(self._loaded.values()))
        record: dict[str, Any] = {
            "dataset": self.spec.dataset,
            "pixels": first.pixels,
            "image_shape": list(first.image_shape),
            "num_classes": first.num_classes,
            "split_seed": self.spec.split_seed,
            "splits": {name: {"size": len(s), "rule": self._rule(name)} for name, s in self._loaded.items()},
        }
        if self.spec.dataset in _FILE_SETS:
            record["fingerprint"] = self._files.fingerprint
        return record

    def _rule(self, split: str) -> str:
        if self.spec.dataset in _BINARY_SETS:
            return f"the data set's own {split} part, whole"
        return self._rows(split).rule

    def check_record(self, saved: dict[str, Any], split: str) -> None:
        """Refuse ``split`` (loaded) when it differs from a run's ``record()`` (other files, shape or pixels).

        Raises:
            DataFormatError: the message names what differs.
        """
        current = self.split(split)
        differences = []
        if saved.get("fingerprint") and self.spec.dataset in _FILE_SETS and saved["fingerprint"] != self._files.fingerprint:
            differences.append(f"the files changed (fingerprint {self._files.fingerprint} vs {saved['fingerprint']})")
        if "image_shape" in saved and tuple(saved["image_shape"]) != current.image_shape:
            differences.append(f"image shape {current.image_shape} vs {tuple(saved['image_shape'])}")
        if saved.get("pixels") not in (None, current.pixels):
            differences.append(f"pixels {current.pixels} vs {saved['pixels']}")
        size = saved.get("splits", {}).get(split, {}).get("size")
        if size is not None and size != len(current):
            differences.append(f"{size} {split} images when trained, {len(current)} now")
        if differences:
            raise DataFormatError(f"{current.name} differs from the data the run was trained on: "
                                  + "; ".join(differences))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the images (loads the training split's part)."""
        return self.split("train").image_shape

    @property
    def num_pixels(self) -> int:
        return math.prod(self.image_shape)


def load_split(
    dataset: str = "binarized_mnist",
    split: str = "train",
    root: PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    **options: Any,
) -> ImageSplit:
    """Load ``split`` (one of :data:`SPLITS`) of ``dataset`` (one of :data:`DATASETS`).

    ``binarized_mnist`` reads ``root/binarized_mnist.npz`` when ``root`` is given, else the
    vendored copy. The other data sets read from ``root`` (default :func:`default_data_root`).
    For ``mnist`` and the ``mnist_*`` data sets, ``train`` is the first 50,000 official training
    images, ``valid`` the last 10,000 and ``test`` the official test set; ``seed`` seeds the static
    binarization (drawn once over all 60,000 training images, so train and valid come from the
    same draw). Other data sets without a valid (or test) split hold one out by ``split_seed``
    (see :mod:`avme_ext.data.splits`).

    Args:
        options: the other fields of :class:`DataSpec` (``binarize``, ``likelihood``, ``image_size``,
            ``channels``, ``emnist_split``, ``valid_fraction``, ``test_fraction``, ``split_seed``).
            Without ``binarize`` or ``likelihood`` a grey or colour data set gives its 8-bit levels.
    """
    check_name("split", split, SPLITS)
    spec = DataSpec(dataset, None if root is None else str(root), download, seed, **options)
    return spec.open().split(split)
