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

import os
from dataclasses import replace
from functools import cached_property
from typing import Any

from . import mnist
from .catalog import LEGACY_MNIST, SPLITS, dataset_info
from .errors import DataFormatError, DataOptionError, check_name
from .files import SourceFiles, read_image_folder, read_npz
from .image_split import ImageSplit
from .pixels import binarize_levels, resize, to_channels
from .raw import RawPart
from .spec import BINARY_SETS, FILE_SETS, DataSpec, pixel_kind
from .splits import SplitRows, split_rows, whole_part
from .torchvision_sets import TORCHVISION_READERS, read_torchvision_part

__all__ = ["DataSource", "check_pixels_for", "load_split"]

PathLike = str | os.PathLike[str]


def check_pixels_for(split: ImageSplit, likelihood: str) -> None:
    """Refuse a split whose pixels the likelihood does not model: ``bernoulli`` takes 0/1 pixels (binary or
    binarized per batch), ``logistic`` 8-bit levels ``k / 255`` (0/1 pixels are the levels 0 and 255).

    Raises:
        DataOptionError: 8-bit levels given to a Bernoulli model, or grey levels binarized per batch
            given to a logistic one.
    """
    wanted = ("levels", "binary") if likelihood == "logistic" else ("binary", "dynamic")
    if split.pixels not in wanted:
        raise DataOptionError(
            f"{split.name} gives {split.pixels} pixels, but a model with the {likelihood} likelihood needs "
            + (
                "8-bit levels (drop --binarize)"
                if likelihood == "logistic"
                else "0/1 pixels (a --binarize mode, or a data set of binary images)"
            )
        )


class DataSource:
    """The splits of a :class:`DataSpec`, each part of the files read (and made ready) once.

    Args:
        spec: the options.
    """

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        self.info = dataset_info(spec.dataset)
        self._ready: dict[str, ImageSplit] = {}
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
        if self.spec.dataset in FILE_SETS:
            return frozenset(self._files.parts)
        if self.spec.dataset in BINARY_SETS:
            return frozenset(SPLITS)
        return frozenset(("train", "test"))

    def _read(self, part: str) -> RawPart:
        spec, root = self.spec, self.spec.root
        if spec.dataset in FILE_SETS:
            return self._files.parts[part]
        assert root is not None, "only the vendored binarized_mnist has no data root"
        if spec.dataset in TORCHVISION_READERS:
            options = {"split": spec.emnist_split} if spec.dataset == "emnist" else {}
            return read_torchvision_part(spec.dataset, root, part, spec.download, **options)
        images, labels = mnist.read_mnist_part(part, root, spec.download)
        return RawPart(images.unsqueeze(1), labels, 10)

    def _prepared(self, part: str) -> ImageSplit:
        """The whole of ``part`` (named ``<dataset>/<part>``), pixels in their final form."""
        if part not in self._ready:
            raw = self._read(part)
            images = raw.images
            if self.spec.channels is not None:
                images = to_channels(images, self.spec.channels)
            size = self.spec.image_size or self.info.default_size
            if size is not None:
                images = resize(images, size)
            channels, height, width = images.shape[1:]
            shape = (channels, height, width)
            kind = pixel_kind(self.spec, raw.binary, shape[0], self.spec.dataset)
            flat = images.reshape(images.shape[0], -1)
            if kind in ("binary", "levels"):
                pixels, binarized = flat, kind == "binary"
            else:
                pixels, binarized = binarize_levels(flat, kind, self.spec.seed)
            name = f"{self.spec.dataset}/{part}"
            self._ready[part] = ImageSplit(
                pixels, raw.labels, binarized, name, shape, kind == "levels", raw.num_classes
            )
        return self._ready[part]

    def _rows(self, split: str) -> SplitRows:
        spec = self.spec
        if spec.dataset == "mnist" or spec.dataset in LEGACY_MNIST:  # MNIST's own rule (as in earlier versions)
            if split == "test":
                return SplitRows("test", None, "the official test part (t10k), whole")
            rows = slice(None, mnist.MNIST_TRAIN_SIZE) if split == "train" else slice(mnist.MNIST_TRAIN_SIZE, None)
            where = "the first 50,000" if split == "train" else "the last 10,000"
            return SplitRows("train", rows, f"{where} images of the official training part")  # type: ignore[arg-type]
        parts = self.parts
        base = "all" if "all" in parts else "train"
        size = None if whole_part(split, parts) else len(self._prepared(base))
        return split_rows(
            split,
            parts,
            size,
            valid_fraction=spec.valid_fraction,
            test_fraction=spec.test_fraction,
            seed=spec.split_seed,
        )

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
        if spec.dataset == "binarized_mnist":
            root = spec.root
            loaded = mnist.load_binarized_mnist(split, None if root is None else root / mnist.NPZ_FILENAME)
        elif spec.dataset == "binarized_mnist_amat":
            assert spec.root is not None, "only the vendored binarized_mnist has no data root"
            loaded = mnist.load_binarized_mnist_amat(split, spec.root, spec.download)
        else:
            loaded = self._load(split)
        self._loaded[split] = loaded
        return loaded

    def _load(self, split: str) -> ImageSplit:
        where = self._rows(split)
        part, name = self._prepared(where.part), f"{self.spec.dataset}/{split}"
        return replace(part, name=name) if where.rows is None else part.take(where.rows, name)

    # ----------------------------------------------------------------- provenance
    def record(self) -> dict[str, Any]:
        """What a run records of its data: pixels, image shape, classes, and the size and rule of every split
        loaded so far (of all three for an image folder or npz file, which are read whole; with their
        fingerprint)."""
        if not self._loaded:
            raise RuntimeError("record() describes the splits loaded so far; load one first")
        first = next(iter(self._loaded.values()))
        record: dict[str, Any] = {
            "dataset": self.spec.dataset,
            "pixels": first.pixels,
            "image_shape": list(first.image_shape),
            "num_classes": first.num_classes,
            "split_seed": self.spec.split_seed,
            "splits": {
                name: {"size": self._size(name), "rule": self._rule(name)}
                for name in SPLITS
                if name in self._loaded or self.spec.dataset in FILE_SETS
            },
        }
        if self.spec.dataset in FILE_SETS:
            record["fingerprint"] = self._files.fingerprint
        return record

    def _size(self, split: str) -> int:
        if split in self._loaded:
            return len(self._loaded[split])
        where = self._rows(split)  # a part already read (an image folder or npz file is read whole)
        return len(self._prepared(where.part)) if where.rows is None else len(where.rows)

    def _rule(self, split: str) -> str:
        if self.spec.dataset in BINARY_SETS:
            return f"the data set's own {split} part, whole"
        return self._rows(split).rule

    def check_record(self, saved: dict[str, Any], split: str) -> None:
        """Refuse ``split`` (loaded) when it differs from a run's ``record()`` (other files, shape or pixels).

        Raises:
            DataFormatError: the message names what differs.
        """
        current = self.split(split)
        differences = []
        if (
            saved.get("fingerprint")
            and self.spec.dataset in FILE_SETS
            and saved["fingerprint"] != self._files.fingerprint
        ):
            differences.append(f"the files changed (fingerprint {self._files.fingerprint} vs {saved['fingerprint']})")
        if "image_shape" in saved and tuple(saved["image_shape"]) != current.image_shape:
            differences.append(f"image shape {current.image_shape} vs {tuple(saved['image_shape'])}")
        if saved.get("pixels") not in (None, current.pixels):
            differences.append(f"pixels {current.pixels} vs {saved['pixels']}")
        size = saved.get("splits", {}).get(split, {}).get("size")
        if size is not None and size != len(current):
            differences.append(f"{size} {split} images when trained, {len(current)} now")
        if differences:
            raise DataFormatError(
                f"{current.name} differs from the data the run was trained on: " + "; ".join(differences)
            )


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
    spec = DataSpec(
        dataset=dataset, data_root=None if root is None else str(root), download=download, seed=seed, **options
    )
    return spec.open().split(split)
