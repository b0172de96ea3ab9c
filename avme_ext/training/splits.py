"""The data a run trains and validates on: the splits (subsets of them), on the run's device, checked, and the
model's config fitted to them (image shape, classes)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import AVMEConfig
from ..data import DataSource, ImageSplit, check_pixels_for
from ..distributed import DistInfo
from ..seeds import derive_seed
from .config import TrainConfig
from .errors import OptionError, TrainError
from .schedule import SEED_NAMESPACE, batches_per_epoch

__all__ = ["TrainingData", "load_training_data", "fit_model_to_data"]


@dataclass(frozen=True)
class TrainingData:
    """What a run trains on.

    Attributes:
        train: the training split, on the run's device.
        valid: the validation split on the run's device, or None when validation is off (--valid-subset 0).
        num_batches: global batches per epoch (see :func:`batches_per_epoch`).
        model_config: the model's config, fitted to the data (see :func:`fit_model_to_data`).
        record: what the run records of its data (:meth:`avme_ext.data.DataSource.record`: pixels, image
            shape, the splits' sizes and rules, a fingerprint of an image folder or npz file).
    """

    train: ImageSplit
    valid: ImageSplit | None
    num_batches: int
    model_config: AVMEConfig = field(default_factory=AVMEConfig)
    record: dict[str, Any] = field(default_factory=dict)


def _subset(split: ImageSplit, size: int | None, option: str, seed: int, tag: str) -> ImageSplit:
    if size is None:
        return split
    if size > len(split):
        raise OptionError(f"{option} {size} is larger than {split.name} ({len(split)} images)")
    return split.subset(size, torch.Generator().manual_seed(derive_seed(SEED_NAMESPACE, seed, tag)))


def _on_device(split: ImageSplit, device: torch.device) -> ImageSplit:
    return dataclasses.replace(split, images=split.images.to(device), labels=split.labels.to(device))


def _check_labels(split: ImageSplit, num_classes: int) -> None:
    if num_classes == 0:
        return
    if not split.has_labels:
        raise TrainError(f"{split.name} has no labels; a conditional model (--num-classes {num_classes}) needs them")
    if len(split) and int(split.labels.max()) >= num_classes:
        raise TrainError(f"{split.name} has labels up to {int(split.labels.max())}, out of range for "
                         f"--num-classes {num_classes}")


def _check_batch_size(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        suggestion = batch_size // world_size * world_size or world_size
        raise TrainError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the number of processes "
            f"(WORLD_SIZE={world_size}); use e.g. --batch-size {suggestion}"
        )


def fit_model_to_data(model_cfg: AVMEConfig, train: ImageSplit, *, fit_shape: bool = False,
                      classes_from_data: bool = False) -> AVMEConfig:
    """The model config for the images of ``train``.

    Args:
        model_cfg: the config asked for (or a resumed run's).
        train: the training split.
        fit_shape: take the data's image shape (``data_dim``, ``image_shape``) when the config's differs
            (a new run whose shape was not given); otherwise a different shape is an error.
        classes_from_data: take the data set's number of classes (``--conditional``).

    Raises:
        TrainError: the shapes differ and ``fit_shape`` is False, or ``classes_from_data`` on unlabelled data.
    """
    changes: dict[str, Any] = {}
    wanted = model_cfg.resolved_image_shape
    if wanted != train.image_shape:
        if not fit_shape:
            raise TrainError(f"the model takes images of shape {wanted} (data_dim {model_cfg.data_dim}) but "
                             f"{train.name} has images of shape {train.image_shape}; train a new run for this data")
        changes.update(data_dim=math.prod(train.image_shape), image_shape=train.image_shape)
    if classes_from_data:
        if train.num_classes == 0 or not train.has_labels:
            raise TrainError(f"--conditional: {train.name} has no labels; train an unconditional model")
        changes["num_classes"] = train.num_classes
    return dataclasses.replace(model_cfg, **changes) if changes else model_cfg


def load_training_data(cfg: TrainConfig, model_cfg: AVMEConfig, info: DistInfo, device: torch.device, *,
                       fit_shape: bool = False, classes_from_data: bool = False) -> TrainingData:
    """Load, subset, check and move the training and validation splits (writes nothing), and fit the
    model's config to them (see :func:`fit_model_to_data` for ``fit_shape`` and ``classes_from_data``).

    Raises:
        TrainError: the batch does not divide among the processes, labels or images do not fit the
            model, or not one batch per epoch.
        OptionError: a subset larger than its split.
        FileNotFoundError, DataFormatError: the data files are missing or unreadable.
        DataOptionError: the data options do not fit the data (e.g. colour images, Bernoulli likelihood).
    """
    _check_batch_size(cfg.batch_size, info.world_size)
    source: DataSource = cfg.data_spec(model_cfg.likelihood).open()
    train = source.split("train")
    check_pixels_for(train, model_cfg.likelihood)
    model_cfg = fit_model_to_data(model_cfg, train, fit_shape=fit_shape, classes_from_data=classes_from_data)
    valid = None if cfg.valid_subset == 0 else source.split("valid")
    record = source.record()
    train = _subset(train, cfg.train_subset, "--train-subset", cfg.seed, "train-subset")
    if valid is not None:
        valid = _subset(valid, cfg.valid_subset, "--valid-subset", cfg.seed, "valid-subset")
    for split in (train, valid):
        if split is not None:
            _check_labels(split, model_cfg.num_classes)
    num_batches = batches_per_epoch(len(train), cfg.batch_size, info.world_size)
    if num_batches == 0:
        raise TrainError(f"{train.name} has {len(train)} images: not one batch for {info.world_size} processes")
    return TrainingData(_on_device(train, device), None if valid is None else _on_device(valid, device), num_batches,
                        model_cfg, record)
