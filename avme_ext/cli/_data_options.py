"""The data options of ``avme train``, ``avme eval`` and ``avme sample`` (no torch: the parsers are built from this).

``avme train`` records them in the run; ``avme eval`` and ``avme sample`` take the run's unless
told otherwise, so their defaults are "the run's".
"""

from __future__ import annotations

import argparse

from ..choices import BINARIZE_MODES, CHANNELS, DATASETS, EMNIST_SPLITS
from ..data.catalog import describe_datasets
from ..data.spec import DATA_FIELDS
from ._common import (
    DATA_ROOT_HELP,
    CLIError,
    cli_message,
    nonnegative_int,
    positive_int,
)

__all__ = ["add_data_options", "datasets_epilog", "given_data_options", "load_run_images"]

#: The data options of a run that ``avme eval`` / ``avme sample`` may override (``seed`` is their own option).
_OVERRIDABLE = tuple(name for name in DATA_FIELDS if name != "seed")


def _fraction(text: str) -> float:
    """argparse type: a number in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value:g}")
    return value


def datasets_epilog() -> str:
    """The ``data sets:`` section of a help epilog: one line per data set."""
    return "data sets (--dataset):\n" + describe_datasets()


def add_data_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, given_only: bool = False,
                     from_run: bool = False) -> None:
    """Add ``--dataset``, ``--data-root``, ``--download`` and the options that shape the images.

    Args:
        parser: the parser or argument group.
        given_only: every default None ("not given"), stated in the help (``avme train``, whose
            ``--resume`` takes them from the checkpoint).
        from_run: the defaults are the run's (``avme eval``, ``avme sample``); implies ``given_only``.
    """
    given_only = given_only or from_run

    def default(value: object) -> str:
        if from_run:
            return f" (default: the run's, else {value})"
        return f" (default: {value})" if given_only else ""

    parser.add_argument("--dataset", metavar="NAME", choices=DATASETS, default=None if given_only else DATASETS[0],
                        help="data set, one of the list below; binarized_mnist is vendored (no download)"
                        + default(DATASETS[0]))
    parser.add_argument("--data-root", metavar="DIR", default=None,
                        help=DATA_ROOT_HELP)
    parser.add_argument("--download", action="store_const", const=True, default=None if given_only else False,
                        help="let torchvision fetch missing files into --data-root (needs a network)")
    parser.add_argument("--binarize", choices=BINARIZE_MODES, default=None,
                        help="grey images under --likelihood bernoulli: static (one draw, seeded by the training --seed), dynamic "
                        "(a fresh draw for every batch: the IWAE paper's protocol), threshold (gray level > 0.5); "
                        "colour images cannot be binarized (use --channels 1)"
                        + default("dynamic; an mnist_<mode> name implies its mode"))
    parser.add_argument("--image-size", metavar="N", type=positive_int, default=None,
                        help="resize every image to N x N (bilinear, antialiased; not cropped)"
                        + default("as stored; omniglot 28"))
    parser.add_argument("--channels", type=int, choices=CHANNELS, default=None,
                        help="1: grey (colour made grey as PIL's convert('L') does), 3: RGB"
                        + default("as stored; an image folder is grey when every image is"))
    parser.add_argument("--emnist-split", choices=EMNIST_SPLITS, default=None,
                        help="emnist only: torchvision's EMNIST split" + default("balanced"))
    parser.add_argument("--valid-fraction", metavar="F", type=_fraction, default=None,
                        help="share of the training images held out (by --split-seed) for validation when the data "
                        "set has no validation split; mnist keeps its last 10,000" + default(0.1))
    parser.add_argument("--test-fraction", metavar="F", type=_fraction, default=None,
                        help="share held out for testing when the data set has no test split (an image folder or npz "
                        "file without splits)" + default(0.1))
    parser.add_argument("--split-seed", metavar="N", type=nonnegative_int, default=None,
                        help="seed of those held-out splits (the run's config records the split)" + default(0))


def given_data_options(args: argparse.Namespace) -> dict[str, object]:
    """The data options given explicitly on the command line (``avme eval``/``avme sample``: they override the run's)."""
    return {name: getattr(args, name) for name in _OVERRIDABLE if getattr(args, name, None) is not None}


def load_run_images(args: argparse.Namespace, checkpoint: object, model: object, purpose: str = ""):
    """``args.split`` of the data ``model`` (loaded from ``checkpoint``) was trained on, with the data options
    given in ``args`` overriding the run's (see :func:`avme_ext.data.load_run_split`).

    Raises:
        CLIError: the images cannot be loaded or do not fit the model (one line, in command-line terms).
    """
    from ..data import load_run_split

    try:
        return load_run_split(checkpoint, args.split, given_data_options(args), model.config, seed=args.seed)
    except (FileNotFoundError, ValueError) as error:
        raise CLIError(f"cannot load the {args.split} images{purpose}: {cli_message(error)}") from None
