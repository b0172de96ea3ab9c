""":class:`DataSpec`: every option that decides which images a run sees, as plain JSON-able data (no torch).

A run stores its spec (the data fields of its ``TrainConfig``); ``avme eval`` and ``avme sample`` read
it back, so they find the same images without being told. :meth:`DataSpec.open` gives the
:class:`~avme_ext.data.sources.DataSource` that loads them. :func:`pixel_kind` decides what the
pixels become for a likelihood (checked when the files are read: an image folder's channels are
only known then).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import (
    BINARIZE_MODES,
    CHANNELS,
    EMNIST_SPLITS,
    LEGACY_MNIST,
    LIKELIHOODS,
    dataset_info,
)
from .errors import DataOptionError, check_name

if TYPE_CHECKING:
    from .sources import DataSource

__all__ = [
    "BINARY_SETS",
    "DATA_FIELDS",
    "FILE_SETS",
    "DataOptions",
    "DataSpec",
    "check_fraction",
    "default_data_root",
    "pixel_kind",
]

BINARY_SETS = ("binarized_mnist", "binarized_mnist_amat")
FILE_SETS = ("imagefolder", "npz")


def default_data_root() -> Path:
    """Root for downloadable data: ``$AVME_DATA_ROOT`` or ``~/.cache/avme_data``."""
    return Path(os.environ.get("AVME_DATA_ROOT", "~/.cache/avme_data")).expanduser()


def _option(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def check_fraction(name: str, value: object) -> float:
    """A fraction in (0, 1) (the message names the option)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DataOptionError(f"{_option(name)} must be a number in (0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DataOptions:
    """The data options a run records: the data fields of ``avme train``'s ``TrainConfig`` (which
    derives from this class), checked together by :class:`DataSpec`.

    Attributes:
        dataset: one of :data:`avme_ext.data.catalog.DATASETS`.
        data_root: the folder of the files (``imagefolder``: the image folder; ``npz``: the file);
            None: the vendored copy for ``binarized_mnist``, else :func:`default_data_root`.
        download: let torchvision (or the MNIST downloader) fetch missing files.
        binarize: ``static``, ``dynamic`` or ``threshold`` for grey data under the Bernoulli
            likelihood (None: ``dynamic`` under it; the ``mnist_<mode>`` names imply theirs).
        image_size: resize images to ``image_size x image_size`` (None: as stored; 28 for omniglot).
        channels: 1 (grey) or 3 (RGB) (None: as stored, or decided by an image folder's images).
        emnist_split: the EMNIST split (``emnist`` only).
        valid_fraction, test_fraction: shares held out by seed where the data set has no such split.
        split_seed: the seed of those hold-outs.
    """

    dataset: str = "binarized_mnist"
    data_root: str | None = None
    download: bool = False
    binarize: str | None = None
    image_size: int | None = None
    channels: int | None = None
    emnist_split: str = "balanced"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0


@dataclass(frozen=True)
class DataSpec(DataOptions):
    """Every option that decides which images a model sees: the :class:`DataOptions` of a run, the seed of a
    static binarization and the likelihood the pixels are for; checked when made.

    Attributes:
        seed: seed of the static binarization (one draw over a whole part; a run's training ``seed``).
        likelihood: ``"bernoulli"``, ``"logistic"``, or None (the pixels as stored: 8-bit levels,
            unless ``binarize`` or a binary data set says otherwise).
    """

    seed: int = 0
    likelihood: str | None = None

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
        if self.dataset in BINARY_SETS:
            given = [_option(n) for n in ("binarize", "image_size", "channels") if getattr(self, n) is not None]
            if given:
                raise DataOptionError(f"{self.dataset} holds images binarized once and for all (28x28, 0/1); "
                                      f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to it (use --dataset mnist)")
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
        if self.dataset in FILE_SETS:
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
        """A :class:`~avme_ext.data.sources.DataSource` that loads the splits of this spec (each part read once)."""
        from .sources import DataSource

        return DataSource(self)


def pixel_kind(spec: DataSpec, binary: bool, channels: int, name: str) -> str:
    """What the pixels of data ``name`` become for ``spec.likelihood``: ``binary`` (kept; under the logistic
    likelihood 0/1 pixels are the 8-bit levels 0 and 255), a binarization mode (``static``, ``dynamic``,
    ``threshold``) or ``levels`` (8-bit, ``k / 255``).

    Raises:
        DataOptionError: the likelihood or binarization does not fit the data (colour images under the
            Bernoulli likelihood, a binarization of binary images or for the logistic likelihood).
    """
    mode = spec.binarization
    if binary:  # 0/1 pixels: for the logistic likelihood they are the 8-bit levels 0 and 255
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


#: The fields of :class:`DataSpec` that a run's ``TrainConfig`` holds (all but ``likelihood``, a model option).
DATA_FIELDS: tuple[str, ...] = (*(f.name for f in dataclasses.fields(DataOptions)), "seed")
