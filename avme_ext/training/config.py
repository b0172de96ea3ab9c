"""``TrainConfig`` (every option of ``avme train`` but the model sizes) and :func:`resolve_configs`,
which combines the options given now with those saved by the run being resumed. Needs no torch
(the ``avme train`` parser reads its defaults)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from avme_ext._value_checks import check_choice, check_positive_int
from avme_ext.choices import DATASETS, IMPLS, PRECISIONS
from avme_ext.config import AVMEConfig
from avme_ext.data.spec import DataOptions, DataSpec

from .errors import OptionError, TrainError

__all__ = [
    "DATASETS",  # the option tuples of avme_ext.choices, re-exported (one object per option)
    "IMPLS",
    "PRECISIONS",
    "TrainConfig",
    "MODEL_FIELDS",
    "GRAPH_MODES",
    "LR_SCHEDULES",
    "CLASSES_FROM_DATA",
    "resolve_configs",
    "option_name",
]

#: ``--graph``: capture the training step in CUDA graphs (see :mod:`avme_ext.training.step`).
GRAPH_MODES = ("auto", "on", "off")

#: ``--lr-schedule``: the learning rate of every step (see :func:`avme_ext.training.schedule.learning_rate_at`).
LR_SCHEDULES = ("constant", "cosine")

#: ``num_classes`` given as this value (``avme train --conditional``): as many classes as the data set has.
CLASSES_FROM_DATA = "data"

#: The fields of :class:`AVMEConfig`, given to ``avme train`` as model options.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(AVMEConfig))


def option_name(field_name: str) -> str:
    """How an error names a field: ``"batch_size (--batch-size)"``, for Python and command-line users alike."""
    return f"{field_name} (--{field_name.replace('_', '-')})"


#: The data options a resumed run must keep: all of them but where the files are and whether to
#: download them.
_FIXED_DATA_OPTIONS = tuple(f.name for f in dataclasses.fields(DataOptions) if f.name not in ("data_root", "download"))


@dataclass(frozen=True)
class TrainConfig(DataOptions):
    """Every training argument of ``avme train`` except the model sizes (see :class:`AVMEConfig`).

    Fields in :attr:`FIXED` define the run's trajectory: on ``--resume`` they are taken from the
    checkpoint and may not be changed. Fields in :attr:`PER_LAUNCH` describe the machine of one
    launch and are never taken from a checkpoint. The others may change between launches.

    The learning rate follows ``lr_schedule``: ``constant`` (``lr`` throughout), or ``cosine``
    (``lr`` for ``lr_hold_epochs``, default 0, then down to ``lr_final``, default 0, along half a
    cosine over ``lr_decay_epochs``, default the rest of the run's first ``epochs``, then
    ``lr_final``); the cosine fields are made concrete when the config is made, so a run resumed
    with a larger ``--epochs`` keeps its schedule.

    The data fields are those of :class:`~avme_ext.data.spec.DataOptions` (``dataset``, ``data_root``,
    ``download``, ``binarize``, ``image_size``, ``channels``, ``emnist_split``, ``valid_fraction``,
    ``test_fraction``, ``split_seed``; with ``seed`` for a static binarization, see :meth:`data_spec`); the
    run's config records them, so ``avme eval`` and ``avme sample`` find the same images.

    ``patience`` N > 0 stops the run (exit code 0) once N epochs have passed since its best
    validation negative ELBO (early stopping); 0 never stops early.
    """

    epochs: int = 50
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_final: float | None = None
    lr_decay_epochs: int | None = None
    lr_hold_epochs: int | None = None
    clip_grad: float = 10.0
    seed: int = 0
    kl_warmup_steps: int = 0
    train_subset: int | None = None
    valid_subset: int | None = None
    valid_batch_size: int = 500
    device: str = "auto"
    impl: str = "auto"
    precision: str = "fp32"
    graph: str = "auto"
    log_every: int = 50
    checkpoint_every: int = 0
    tensorboard: bool | None = None
    progress: bool = True
    skip_nonfinite: bool = False
    patience: int = 0

    FIXED = (
        "batch_size",
        "lr",
        "lr_schedule",
        "lr_final",
        "lr_decay_epochs",
        "lr_hold_epochs",
        "clip_grad",
        "seed",
        "kl_warmup_steps",
        *_FIXED_DATA_OPTIONS,
        "train_subset",
        "valid_subset",
        "valid_batch_size",
    )
    PER_LAUNCH = ("device", "graph")

    def __post_init__(self) -> None:
        try:
            self._check()
        except ValueError as error:
            raise OptionError(str(error)) from None
        if self.lr_schedule == "cosine":  # made concrete now: a later --epochs must not move the decay
            if self.lr_final is None:
                object.__setattr__(self, "lr_final", 0.0)
            hold = 0 if self.lr_hold_epochs is None else self.lr_hold_epochs
            object.__setattr__(self, "lr_hold_epochs", hold)
            if self.lr_decay_epochs is None:
                object.__setattr__(self, "lr_decay_epochs", max(self.epochs - hold, 1))

    def _check(self) -> None:
        minimums = {
            "epochs": 1,
            "batch_size": 1,
            "seed": 0,
            "kl_warmup_steps": 0,
            "valid_batch_size": 1,
            "log_every": 1,
            "checkpoint_every": 0,
            "patience": 0,
        }
        for name, minimum in minimums.items():
            check_positive_int(option_name(name), getattr(self, name), minimum)
        if self.train_subset is not None:
            check_positive_int(option_name("train_subset"), self.train_subset, 1)
        if self.valid_subset is not None:
            check_positive_int(option_name("valid_subset"), self.valid_subset, 0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{option_name('lr')} must be a finite number > 0, got {self.lr!r}")
        check_choice(option_name("lr_schedule"), self.lr_schedule, LR_SCHEDULES)
        self._check_schedule()
        if not (isinstance(self.clip_grad, (int, float)) and math.isfinite(self.clip_grad) and self.clip_grad >= 0):
            raise ValueError(
                f"{option_name('clip_grad')} must be a finite number >= 0 (0 disables clipping), got {self.clip_grad!r}"
            )
        check_choice(option_name("dataset"), self.dataset, DATASETS)
        self.data_spec()  # the data options, checked together (DataOptionError is a ValueError)
        check_choice(option_name("impl"), self.impl, IMPLS)
        check_choice(option_name("precision"), self.precision, PRECISIONS)
        check_choice(option_name("graph"), self.graph, GRAPH_MODES)

    def _check_schedule(self) -> None:
        if self.lr_schedule == "constant":
            extra = [
                option_name(name)
                for name in ("lr_final", "lr_decay_epochs", "lr_hold_epochs")
                if getattr(self, name) is not None
            ]
            if extra:
                raise ValueError(
                    f"{' and '.join(extra)} only apply to {option_name('lr_schedule')} cosine; "
                    "the constant schedule keeps --lr for the whole run"
                )
            return
        if self.lr_final is not None and not (
            isinstance(self.lr_final, (int, float)) and math.isfinite(self.lr_final) and 0 <= self.lr_final <= self.lr
        ):
            raise ValueError(
                f"{option_name('lr_final')} must be a finite number in [0, lr={self.lr:g}], got {self.lr_final!r}"
            )
        if self.lr_decay_epochs is not None:
            check_positive_int(option_name("lr_decay_epochs"), self.lr_decay_epochs, 1)
        if self.lr_hold_epochs is not None:
            check_positive_int(option_name("lr_hold_epochs"), self.lr_hold_epochs, 0)

    def cosine_phase(self) -> tuple[int, int, float]:
        """``(lr_hold_epochs, lr_decay_epochs, lr_final)`` of the cosine schedule (concrete once the config is made).

        Raises:
            ValueError: the schedule is not ``cosine``.
        """
        hold, decay, final = self.lr_hold_epochs, self.lr_decay_epochs, self.lr_final
        if self.lr_schedule != "cosine" or hold is None or decay is None or final is None:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} has no cosine phase")
        return hold, decay, final

    def data_spec(self, likelihood: str | None = None) -> DataSpec:
        """The run's data options as a :class:`~avme_ext.data.spec.DataSpec`, for a model of ``likelihood``
        (the static binarization is seeded by ``seed``)."""
        return DataSpec.from_options(self.to_dict(), likelihood=likelihood)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _describe_differences(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} (checkpoint) vs {new.get(k)!r} (this command)"
        for k in keys
        if k in new and old.get(k) != new[k]
    ]


def _resolve_model(
    model_given: dict[str, Any], saved: AVMEConfig | None, checkpoint_name: str, strict: bool
) -> AVMEConfig:
    if saved is None:
        return AVMEConfig(**model_given)
    wanted = AVMEConfig(**{**saved.to_dict(), **model_given})
    if strict and wanted != saved:
        diff = "; ".join(_describe_differences(saved.to_dict(), model_given, MODEL_FIELDS))
        raise TrainError(
            f"{checkpoint_name} holds a model of another configuration: it is {saved}, but this "
            f"command asks for {wanted} ({diff}). Drop the model options to continue the saved run, "
            "or start a new run with another --out."
        )
    return wanted


def _resolve_train(
    train_given: dict[str, Any], saved: dict[str, Any] | None, checkpoint_name: str, strict: bool
) -> TrainConfig:
    if saved is None:
        return TrainConfig(**train_given)
    # the device and the graph mode are chosen anew at every launch (a run may move between machines)
    known = {k: v for k, v in saved.items() if k in TrainConfig.field_names() and k not in TrainConfig.PER_LAUNCH}
    diff = _describe_differences(known, train_given, TrainConfig.FIXED)
    if strict and diff:
        raise TrainError(
            f"{checkpoint_name} was trained with other settings, which --resume cannot change: "
            + "; ".join(diff)
            + ". Drop these options to continue the saved run, or start a new run with another --out."
        )
    return TrainConfig(**{**known, **train_given})


def resolve_configs(
    given: dict[str, Any],
    saved_train: dict[str, Any] | None = None,
    saved_model: AVMEConfig | None = None,
    checkpoint_name: str = "the checkpoint",
    strict: bool = True,
) -> tuple[TrainConfig, AVMEConfig]:
    """Combine the options given on the command line with a resumed run's saved ones.

    Args:
        given: options the user gave explicitly (training fields of :class:`TrainConfig` and
            model fields of :class:`AVMEConfig`); anything else is refused.
        saved_train, saved_model: the resumed checkpoint's arguments (None for a new run).
        checkpoint_name: how to name the checkpoint in errors.
        strict: refuse changes (a checkpoint); False lets the given options override the saved ones
            (the config.json of a run that was killed before its first checkpoint).

    Returns:
        the effective (training, model) configs: given options, else saved ones, else defaults.

    Raises:
        TrainError: a model option or a trajectory-defining training option (:attr:`TrainConfig.FIXED`)
            differs from the checkpoint's.
        OptionError: an unknown option or an invalid value (a ValueError).
    """
    unknown = sorted(set(given) - set(TrainConfig.field_names()) - set(MODEL_FIELDS))
    if unknown:
        raise OptionError(f"unknown training options {unknown}")
    model_given = {k: v for k, v in given.items() if k in MODEL_FIELDS}
    train_given = {k: v for k, v in given.items() if k in TrainConfig.field_names()}
    try:
        model = _resolve_model(model_given, saved_model, checkpoint_name, strict)
    except ValueError as error:  # AVMEConfig's checks name the field: say which option it is
        raise OptionError(f"model option: {error}") from None
    return _resolve_train(train_given, saved_train, checkpoint_name, strict), model
