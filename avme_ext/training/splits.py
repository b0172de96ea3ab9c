"""The data a run trains and validates on: the splits (subsets of them), on the run's device, checked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import AVMEConfig
from ..data import ImageSplit, load_split
from ..distributed import DistInfo
from ..seeds import derive_seed
from .config import TrainConfig
from .errors import OptionError, TrainError
from .schedule import SEED_NAMESPACE, batches_per_epoch

__all__ = ["TrainingData", "load_training_data"]


@dataclass(frozen=True)
class TrainingData:
    """What a run trains on.

    Attributes:
        train: the training split, on the run's device.
        valid: the validation split on the run's device, or None when validation is off (--valid-subset 0).
        num_batches: global batches per epoch (see :func:`batches_per_epoch`).
    """

    train: ImageSplit
    valid: ImageSplit | None
    num_batches: int


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


def load_training_data(cfg: TrainConfig, model_cfg: AVMEConfig, info: DistInfo, device: torch.device) -> TrainingData:
    """Load, subset, check and move the training and validation splits (writes nothing).

    Raises:
        TrainError: the batch does not divide among the processes, labels do not fit the model, or
            not one batch per epoch.
        OptionError: a subset larger than its split.
        FileNotFoundError, DataFormatError: the data files are missing or unreadable.
    """
    _check_batch_size(cfg.batch_size, info.world_size)
    train = load_split(cfg.dataset, "train", cfg.data_root, cfg.download, cfg.seed)
    train = _subset(train, cfg.train_subset, "--train-subset", cfg.seed, "train-subset")
    valid = None
    if cfg.valid_subset != 0:
        valid = load_split(cfg.dataset, "valid", cfg.data_root, cfg.download, cfg.seed)
        valid = _subset(valid, cfg.valid_subset, "--valid-subset", cfg.seed, "valid-subset")
    for split in (train, valid):
        if split is not None:
            _check_labels(split, model_cfg.num_classes)
    num_batches = batches_per_epoch(len(train), cfg.batch_size, info.world_size)
    if num_batches == 0:
        raise TrainError(f"{train.name} has {len(train)} images: not one batch for {info.world_size} processes")
    return TrainingData(_on_device(train, device), None if valid is None else _on_device(valid, device), num_batches)
