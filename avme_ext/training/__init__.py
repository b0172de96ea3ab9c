"""Training of an AVME model: Adam, validation, metrics, checkpoints, exact resume, DDP, CUDA graphs.

Entry point: :func:`train` (what ``avme train`` calls), which assembles a
:class:`TrainingSetup` and runs a :class:`Trainer`. One concern per module:

=================  ==========================================================================
``config``         :class:`TrainConfig`, :func:`resolve_configs` (options vs. a resumed run's)
``schedule``       epoch order, KL warm-up, learning rate, batches per epoch, step noise (pure functions)
``state``          :class:`TrainState`, the counters a checkpoint holds
``run_dir``        the run directory: refusing/overwriting a run, config.json, temp files
``run_lock``       :class:`RunLock`: one run per directory (a flock held by rank 0)
``metrics``        :class:`MetricsLog` (metrics.jsonl and TensorBoard)
``signals``        :class:`StopFlag` (SIGINT/SIGTERM: checkpoint at the next step boundary)
``splits``         the training and validation data of a run
``builders``       model, Adam and step, restored from a checkpoint: :func:`build_setup`
``step``           one optimisation step: :class:`EagerStep`, :class:`GraphedStep` (CUDA graphs)
``cost``           steps per epoch and the measured time per epoch, printed at the start
``trainer``        :class:`Trainer`, the epoch loop
``entry``          :func:`train`
=================  ==========================================================================

Run directory (``--out DIR``)::

    DIR/config.json          model config + every training argument (+ world size, version)
    DIR/metrics.jsonl        one JSON record per line: kinds "train", "valid", "epoch"
    DIR/last.safetensors     latest checkpoint (every epoch, and every --checkpoint-every steps)
    DIR/best.safetensors     checkpoint with the best validation negative ELBO so far
    DIR/tensorboard/         TensorBoard events (when torch.utils.tensorboard is importable)

Determinism (what makes ``--resume`` exact and DDP equal to one process):

* The model is initialised on the CPU from a generator seeded by ``seed``.
* The training order of epoch ``e`` is ``randperm(N)`` from a generator seeded by ``(seed, e)``;
  global batch ``i`` is positions ``[i*B, (i+1)*B)`` of it. A resumed run skips the batches
  of the epoch that were already done.
* The reparameterisation noise of global step ``s`` is ``randn(K, B, Z)`` from a generator
  seeded by ``(seed, s)`` (and the dynamic binarization, for gray-level data sets, from
  ``(seed, s, "data")``): a pure function of the step, so no generator state has to survive a
  restart, and every example gets the same noise whatever the number of processes. Seeds are
  ``avme_ext.seeds.derive_seed("avme-train", seed, *tags)``.
* With W processes every rank draws the *global* batch's noise and takes the rows
  ``rank, rank + W, ...`` of the global batch (:func:`avme_ext.distributed.local_rows`); each
  rank's loss is ``sum(local objective) * W / B`` so DDP's gradient average equals the
  single-process batch mean.
* The learning rate of the update after ``s`` steps is a function of ``s`` (``--lr-schedule``;
  the cosine decay's length is fixed in epochs when the run starts).
* The checkpoint holds the weights, Adam's state, and every counter and running sum of the
  metrics, so a resumed run writes the same metrics (except wall times) as an uninterrupted one.
* With ``--graph`` on (CUDA) the step replays CUDA graphs of the same operations; a resumed run
  recaptures them and continues the same trajectory (see :mod:`avme_ext.training.step`).

``--resume`` on a directory without a checkpoint starts a new run there (elastic restarts use
``--resume`` from the first launch); when a launch that died before its first checkpoint left a
``config.json``, its settings are used for the options not given.

On resume, ``metrics.jsonl`` is truncated to its size at the checkpoint (the byte offset is stored
in the checkpoint), dropping the records a killed run wrote after its last checkpoint; the resumed
run writes them again, so the curve has no duplicates and no gaps.

Exit codes of :func:`train`: 0 done (or nothing left to do), 130 after SIGINT and 143 after
SIGTERM (a checkpoint is written at the next step boundary first, and the run can be resumed).
Errors raise :class:`TrainError` (non-finite values: :class:`NonFiniteError`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the submodule that defines it. The names are imported on first use (PEP 562), so
#: ``avme_ext.training.config`` (no torch) is importable alone: the ``avme train`` parser reads it.
_EXPORTS = {
    **dict.fromkeys(("build_model", "build_setup", "make_adam", "make_step", "restore_training_state"), "builders"),
    **dict.fromkeys(("GRAPH_MODES", "LR_SCHEDULES", "MODEL_FIELDS", "CLASSES_FROM_DATA", "TrainConfig",
                     "resolve_configs"), "config"),
    "CostEstimate": "cost",
    "train": "entry",
    **dict.fromkeys(("NonFiniteError", "OptionError", "RunDirError", "TrainError"), "errors"),
    **dict.fromkeys(("MetricsLog", "tensorboard_available"), "metrics"),
    **dict.fromkeys(("RUN_FILES", "RunDirPlan", "clear_run_files", "plan_run_dir"), "run_dir"),
    "RunLock": "run_lock",
    **dict.fromkeys(("batches_per_epoch", "epoch_permutation", "kl_weight_at", "learning_rate_at", "step_noise"),
                    "schedule"),
    "StopFlag": "signals",
    **dict.fromkeys(("TrainingData", "load_training_data"), "splits"),
    "TrainState": "state",
    **dict.fromkeys(("EagerStep", "GraphedStep", "StepStats", "use_cuda_graphs"), "step"),
    **dict.fromkeys(("MAX_CONSECUTIVE_SKIPS", "Trainer", "TrainingSetup"), "trainer"),
}

if TYPE_CHECKING:
    from .builders import build_model, build_setup, make_adam, make_step, restore_training_state
    from .config import CLASSES_FROM_DATA, GRAPH_MODES, LR_SCHEDULES, MODEL_FIELDS, TrainConfig, resolve_configs
    from .cost import CostEstimate
    from .entry import train
    from .errors import NonFiniteError, OptionError, RunDirError, TrainError
    from .metrics import MetricsLog, tensorboard_available
    from .run_dir import RUN_FILES, RunDirPlan, clear_run_files, plan_run_dir
    from .run_lock import RunLock
    from .schedule import batches_per_epoch, epoch_permutation, kl_weight_at, learning_rate_at, step_noise
    from .signals import StopFlag
    from .splits import TrainingData, load_training_data
    from .state import TrainState
    from .step import EagerStep, GraphedStep, StepStats, use_cuda_graphs
    from .trainer import MAX_CONSECUTIVE_SKIPS, Trainer, TrainingSetup

__all__ = [
    "train",
    "Trainer",
    "TrainingSetup",
    "build_setup",
    "build_model",
    "make_adam",
    "make_step",
    "restore_training_state",
    "TrainConfig",
    "TrainState",
    "TrainingData",
    "load_training_data",
    "resolve_configs",
    "MODEL_FIELDS",
    "GRAPH_MODES",
    "LR_SCHEDULES",
    "CLASSES_FROM_DATA",
    "TrainError",
    "NonFiniteError",
    "RunDirError",
    "OptionError",
    "MetricsLog",
    "tensorboard_available",
    "StopFlag",
    "CostEstimate",
    "EagerStep",
    "GraphedStep",
    "StepStats",
    "use_cuda_graphs",
    "epoch_permutation",
    "kl_weight_at",
    "learning_rate_at",
    "batches_per_epoch",
    "step_noise",
    "plan_run_dir",
    "clear_run_files",
    "RunDirPlan",
    "RunLock",
    "RUN_FILES",
    "MAX_CONSECUTIVE_SKIPS",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
