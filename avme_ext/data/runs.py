"""The images of a trained run: the data options its checkpoint recorded, overridden by those given now.

``avme eval RUN`` and ``avme sample RUN --reconstruct N`` call :func:`load_run_split`, so they read
the data set the run was trained on (same options, same held-out splits, the same static
binarization) without being told, and refuse images the model cannot take.
"""

from __future__ import annotations

import os
from typing import Any

from .catalog import SPLITS
from .errors import DataOptionError, check_name
from .image_split import ImageSplit
from .sources import check_pixels_for
from .spec import DATA_FIELDS, DataSpec

__all__ = ["load_run_split", "run_data_spec"]

#: Options that describe one machine, never taken from a run.
_PER_MACHINE = ("download",)


def run_data_spec(saved: dict[str, Any] | None, given: dict[str, Any], *, likelihood: str,
                  seed: int = 0) -> tuple[DataSpec, bool]:
    """The data options for a run's model: its saved ones (when ``given`` names no other data set),
    then those ``given``.

    Args:
        saved: the run's training options (``TrainConfig`` fields), or None (a weights file without them).
        given: the data options given now (fields of :data:`DATA_FIELDS`; absent = not given).
        likelihood: the model's likelihood.
        seed: the seed of a static binarization when the run's options are not used (the run's own
            ``seed`` otherwise, so the images are those it was trained on).

    Returns:
        the spec, and whether it is the run's data set (then its record can be checked).
    """
    unknown = sorted(set(given) - set(DATA_FIELDS))
    if unknown:
        raise ValueError(f"unknown data options {unknown}; expected some of {', '.join(DATA_FIELDS)}")
    run_dataset = (saved or {}).get("dataset", "binarized_mnist")
    same = saved is not None and given.get("dataset", run_dataset) == run_dataset
    base = {k: v for k, v in (saved or {}).items() if k in DATA_FIELDS and k not in _PER_MACHINE} if same else {}
    options = {"seed": seed, **base, **given}
    return DataSpec.from_options(options, likelihood=likelihood), same


def load_run_split(
    checkpoint: str | os.PathLike,
    split: str,
    given: dict[str, Any],
    model_config: Any,
    *,
    seed: int = 0,
) -> ImageSplit:
    """Load ``split`` of the data a checkpoint's model was trained on (see :func:`run_data_spec`).

    Args:
        checkpoint: a run directory, a checkpoint or a weights file.
        split: one of :data:`SPLITS`.
        given: data options given now (override the run's).
        model_config: the model's :class:`~avme_ext.config.AVMEConfig` (its likelihood and image shape).
        seed: see :func:`run_data_spec`.

    Raises:
        FileNotFoundError, DataFormatError: missing or unreadable files, or files that differ from
            those the run recorded (an image folder that changed).
        DataOptionError: the images do not fit the model (shape, pixels).
    """
    from ..checkpoint import read_training_options

    check_name("split", split, SPLITS)
    saved, record = read_training_options(checkpoint)
    spec, same = run_data_spec(saved, given, likelihood=model_config.likelihood, seed=seed)
    source = spec.open()
    images = source.split(split)
    if same and record:
        source.check_record(record, split)
    check_pixels_for(images, model_config.likelihood)
    if images.image_shape != model_config.resolved_image_shape:
        raise DataOptionError(
            f"{images.name} has images of shape {images.image_shape}, but the model takes "
            f"{model_config.resolved_image_shape}; give the data options it was trained with "
            "(--dataset, --image-size, --channels)")
    return images
