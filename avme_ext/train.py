"""Training of an AVME model: Adam, validation, metrics, checkpoints, exact resume, DDP.

Entry points: :func:`train` (what ``avme train`` calls) and the :class:`Trainer` it drives.

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
  restart, and every example gets the same noise whatever the number of processes.
* With W processes every rank draws the *global* batch's noise and takes the rows
  ``rank, rank + W, ...`` of the global batch (:func:`avme_ext.distributed.local_rows`); each
  rank's loss is ``sum(local objective) * W / B`` so DDP's gradient average equals the
  single-process batch mean.
* The checkpoint holds the weights, Adam's state, and every counter and running sum of the
  metrics, so a resumed run writes the same metrics (except wall times) as an uninterrupted one.

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

import dataclasses
import datetime
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from . import __version__
from . import distributed as dist_utils
from .checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from .config import AVMEConfig
from .core import IMPLS
from .data import DATASETS, ImageSplit, load_split
from .distributed import DistInfo
from .evaluation import evaluate
from .model import AVME
from .ops import PRECISIONS

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainError",
    "NonFiniteError",
    "RunDirError",
    "Trainer",
    "train",
    "derive_seed",
    "epoch_permutation",
    "kl_weight_at",
    "batches_per_epoch",
    "step_noise",
    "resolve_configs",
    "prepare_run_dir",
    "RUN_FILES",
    "MAX_CONSECUTIVE_SKIPS",
]

#: Files (and the tensorboard folder) that make a directory a run directory.
RUN_FILES = ("config.json", "metrics.jsonl", "last.safetensors", "last.json", "best.safetensors", "best.json",
             "tensorboard")
#: ``--skip-nonfinite`` gives up after this many non-finite steps in a row.
MAX_CONSECUTIVE_SKIPS = 100


class TrainError(RuntimeError):
    """A training run cannot start or continue; the message says why and what to do."""


class NonFiniteError(TrainError):
    """A non-finite loss or gradient norm (the message names the step and epoch)."""


class RunDirError(TrainError):
    """The output directory cannot be used as asked (e.g. it holds a run and neither --resume nor --overwrite)."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Every training argument of ``avme train`` except the model sizes (see :class:`AVMEConfig`).

    Fields in :attr:`FIXED` define the run's trajectory: on ``--resume`` they are taken from the
    checkpoint and may not be changed. The others may change between launches.
    """

    epochs: int = 50
    batch_size: int = 100
    lr: float = 1e-3
    clip_grad: float = 10.0
    seed: int = 0
    kl_warmup_steps: int = 0
    dataset: str = "binarized_mnist"
    data_root: str | None = None
    download: bool = False
    train_subset: int | None = None
    valid_subset: int | None = None
    valid_batch_size: int = 500
    device: str = "auto"
    impl: str = "auto"
    precision: str = "fp32"
    log_every: int = 50
    checkpoint_every: int = 0
    tensorboard: bool | None = None
    progress: bool = True
    skip_nonfinite: bool = False

    FIXED = ("batch_size", "lr", "clip_grad", "seed", "kl_warmup_steps", "dataset", "train_subset",
             "valid_subset", "valid_batch_size")

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("kl_warmup_steps", self.kl_warmup_steps, 0)
        _check_int("valid_batch_size", self.valid_batch_size, 1)
        _check_int("log_every", self.log_every, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        if self.train_subset is not None:
            _check_int("train_subset", self.train_subset, 1)
        if self.valid_subset is not None:
            _check_int("valid_subset", self.valid_subset, 0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.clip_grad, (int, float)) and math.isfinite(self.clip_grad) and self.clip_grad >= 0):
            raise ValueError(f"clip_grad must be a finite number >= 0 (0 disables clipping), got {self.clip_grad!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(AVMEConfig))


def _describe_differences(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [f"{k}: {old.get(k)!r} (checkpoint) vs {new.get(k)!r} (this command)" for k in keys
            if k in new and old.get(k) != new[k]]


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
        ValueError: an unknown option or an invalid value.
    """
    unknown = sorted(set(given) - set(TrainConfig.field_names()) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"unknown training options {unknown}")
    model_given = {k: v for k, v in given.items() if k in MODEL_FIELDS}
    train_given = {k: v for k, v in given.items() if k in TrainConfig.field_names()}
    if saved_model is not None:
        wanted = AVMEConfig(**{**saved_model.to_dict(), **model_given})
        if strict and wanted != saved_model:
            diff = "; ".join(_describe_differences(saved_model.to_dict(), model_given, MODEL_FIELDS))
            raise TrainError(
                f"{checkpoint_name} holds a model of another configuration: it is {saved_model}, but this "
                f"command asks for {wanted} ({diff}). Drop the model options to continue the saved run, "
                "or start a new run with another --out."
            )
        model = wanted
    else:
        model = AVMEConfig(**model_given)
    if saved_train is not None:
        # the device is chosen anew at every launch (a run may move between machines)
        known = {k: v for k, v in saved_train.items() if k in TrainConfig.field_names() and k != "device"}
        diff = _describe_differences(known, train_given, TrainConfig.FIXED)
        if strict and diff:
            raise TrainError(
                f"{checkpoint_name} was trained with other settings, which --resume cannot change: "
                + "; ".join(diff) + ". Drop these options to continue the saved run, or start a new run with another --out."
            )
        train_cfg = TrainConfig(**{**known, **train_given})
    else:
        train_cfg = TrainConfig(**train_given)
    return train_cfg, model


# --------------------------------------------------------------------------- pure functions


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed for the random stream named by ``tags`` (e.g. ``("noise", step)``), stable across runs."""
    text = ":".join(["avme-train", str(int(seed)), *(str(t) for t in tags)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> Tensor:
    """The training order of ``epoch``: a CPU int64 permutation of ``num_examples``, a function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(num_examples, generator=generator)


def kl_weight_at(step: int, warmup_steps: int) -> float:
    """KL weight of the update after ``step`` completed steps: ``min(1, step / warmup_steps)`` (1 without warm-up)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def batches_per_epoch(num_examples: int, batch_size: int, world_size: int = 1) -> int:
    """Global batches in an epoch: every full batch, plus the final partial one unless it has
    fewer examples than processes (a process would get no rows); one process keeps it always."""
    full, rest = divmod(num_examples, batch_size)
    return full + (1 if rest >= world_size else 0)


def step_noise(model: AVME, seed: int, step: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """The reparameterisation noise (K, B, Z) of the *global* batch of step ``step``.

    ``generator`` (on the model's device) is reseeded from ``(seed, step)``: the noise is a pure
    function of the step, identical on every rank.
    """
    generator.manual_seed(derive_seed(seed, "noise", step))
    return model.core.draw_noise(batch_size, generator)


# --------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Counters and running sums saved in every checkpoint (all JSON-able).

    Attributes:
        epoch: current epoch (0-based); equals the number of finished epochs when ``batch`` is 0.
        batch: global batches of ``epoch`` already done.
        step: training iterations done (optimizer updates plus skipped non-finite steps).
        skipped: non-finite steps skipped with ``--skip-nonfinite``.
        best_nelbo: best validation negative ELBO so far (None: none yet).
        elapsed: seconds of the run so far, over every launch.
        epoch_seconds: training seconds of the current epoch so far.
        epoch_loss, epoch_examples: sums of the current epoch.
        window: running sums of the current logging window.
        metrics_offset: size of metrics.jsonl when the checkpoint was written.
        history: per finished epoch: {"epoch", "seconds", "valid_seconds"}.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    skipped: int = 0
    best_nelbo: float | None = None
    elapsed: float = 0.0
    epoch_seconds: float = 0.0
    epoch_loss: float = 0.0
    epoch_examples: int = 0
    window: dict[str, float] = field(default_factory=lambda: _empty_window())
    metrics_offset: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _empty_window() -> dict[str, float]:
    return {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0, "examples": 0, "steps": 0}


# --------------------------------------------------------------------------- run directory


def _run_files_in(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> tuple[Path | None, str | None]:
    """Decide how to use ``out`` (rank 0 only; never deletes anything but run files with ``overwrite``).

    Returns:
        (checkpoint to resume from or None, a notice to print or None).

    Raises:
        RunDirError: ``out`` is a file, or it holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory")
    last = out / "last.safetensors"
    if resume:
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite contradict each other; choose one")
        if last.is_file():
            return last, None
        return None, (f"--resume: no checkpoint {last} yet; starting a new run there "
                      "(normal for the first launch of an elastic torchrun job)")
    existing = _run_files_in(out) if out.is_dir() else []
    if existing and not overwrite:
        raise RunDirError(
            f"--out {out} already holds a run ({', '.join(existing)}); refusing to overwrite it. Pass --resume to "
            "continue it, --overwrite to replace it, or choose another --out."
        )
    if existing:
        for name in existing:
            path = out / name
            if path.is_dir():
                for child in sorted(path.rglob("*"), reverse=True):
                    child.rmdir() if child.is_dir() else child.unlink()
                path.rmdir()
            else:
                path.unlink()
        return None, f"--overwrite: removed the previous run's files in {out} ({', '.join(existing)})"
    return None, None


def _remove_stale_temp_files(out: Path) -> None:
    """Delete temporary files left by a write that was killed before its atomic rename."""
    for name in RUN_FILES:
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def default_out_dir(name: str | None) -> Path:
    """``runs/<name>`` or ``runs/<YYYYmmdd-HHMMSS>``."""
    return Path("runs") / (name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """Appends JSON records to metrics.jsonl and, optionally, scalars to TensorBoard (rank 0 only)."""

    def __init__(self, path: Path, *, truncate_to: int | None, tensorboard_dir: Path | None, purge_step: int | None):
        self.path = path
        if truncate_to is not None and path.exists() and path.stat().st_size > truncate_to:
            with open(path, "r+b") as handle:
                handle.truncate(truncate_to)
        self.handle: TextIO = open(path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (one line) and mirror its numbers to TensorBoard."""
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            kind, step = record["kind"], record["step"]
            for key, value in record.items():
                if key in ("kind", "step", "epoch", "best") or not isinstance(value, (int, float, list)):
                    continue
                if isinstance(value, list):
                    for t, v in enumerate(value):
                        self.writer.add_scalar(f"{kind}/{key}/{t + 1}", v, step)
                else:
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def sync(self) -> int:
        """Flush to disk and return the file's size (stored in checkpoints)."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        if self.writer is not None:
            self.writer.flush()
        return self.handle.tell()

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


def tensorboard_available() -> bool:
    """True when ``torch.utils.tensorboard`` can be imported (needs the ``tensorboard`` package)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- signals


class StopFlag:
    """Records SIGINT/SIGTERM; the trainer checkpoints and stops at the next step boundary.

    A second signal of the same kind gets its default behaviour (immediate stop).
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Install the handlers for the duration of the block (main thread only; else a no-op)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# --------------------------------------------------------------------------- trainer


def _load_train_splits(cfg: TrainConfig, device: torch.device) -> tuple[ImageSplit, ImageSplit | None]:
    """The training split and the validation split (None when ``valid_subset`` is 0), on ``device``."""
    train = load_split(cfg.dataset, "train", cfg.data_root, cfg.download, cfg.seed)
    if cfg.train_subset is not None:
        if cfg.train_subset > len(train):
            raise ValueError(f"--train-subset {cfg.train_subset} is larger than {train.name} ({len(train)} images)")
        train = train.subset(cfg.train_subset, torch.Generator().manual_seed(derive_seed(cfg.seed, "train-subset")))
    valid = None
    if cfg.valid_subset != 0:
        valid = load_split(cfg.dataset, "valid", cfg.data_root, cfg.download, cfg.seed)
        if cfg.valid_subset is not None:
            if cfg.valid_subset > len(valid):
                raise ValueError(f"--valid-subset {cfg.valid_subset} is larger than {valid.name} ({len(valid)} images)")
            valid = valid.subset(cfg.valid_subset, torch.Generator().manual_seed(derive_seed(cfg.seed, "valid-subset")))
    to = lambda s: dataclasses.replace(s, images=s.images.to(device), labels=s.labels.to(device))  # noqa: E731
    return to(train), (to(valid) if valid is not None else None)


def _check_labels(split: ImageSplit, num_classes: int) -> None:
    if num_classes == 0:
        return
    if not split.has_labels:
        raise TrainError(f"{split.name} has no labels; a conditional model (--num-classes {num_classes}) needs them")
    if len(split) and int(split.labels.max()) >= num_classes:
        raise TrainError(f"{split.name} has labels up to {int(split.labels.max())}, out of range for "
                         f"--num-classes {num_classes}")


def build_model(model_cfg: AVMEConfig, cfg: TrainConfig, device: torch.device) -> AVME:
    """The model, initialised on the CPU from ``seed`` (same weights on every device and rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = AVME.from_config(model_cfg, impl=cfg.impl, precision=cfg.precision)
    model = model.to(device)
    try:
        model.core.resolved_impl(device)
    except RuntimeError as error:
        raise TrainError(f"--impl {cfg.impl}: {error}") from None
    return model


class Trainer:
    """Trains an AVME model in a run directory; see the module docstring for the guarantees.

    Args:
        cfg: training arguments.
        model_cfg: model architecture.
        out: run directory (created by rank 0).
        info: this process's place in the job (:func:`avme_ext.distributed.detect`).
        device: this process's device.
        resume_from: checkpoint to continue from, or None for a new run.
        log: prints a message (rank 0 decides whether to show it).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: AVMEConfig,
        out: Path,
        info: DistInfo,
        device: torch.device,
        resume_from: Path | None = None,
        log: Any = None,
    ) -> None:
        self.cfg, self.model_cfg, self.out, self.info, self.device = cfg, model_cfg, out, info, device
        self._print = log or (lambda message: None)
        if cfg.batch_size % info.world_size:
            raise TrainError(
                f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the number of processes "
                f"(WORLD_SIZE={info.world_size}); use e.g. --batch-size {cfg.batch_size // info.world_size * info.world_size or info.world_size}"
            )
        self.train_split, self.valid_split = _load_train_splits(cfg, device)
        _check_labels(self.train_split, model_cfg.num_classes)
        if self.valid_split is not None:
            _check_labels(self.valid_split, model_cfg.num_classes)
        self.num_batches = batches_per_epoch(len(self.train_split), cfg.batch_size, info.world_size)
        if self.num_batches == 0:
            raise TrainError(f"{self.train_split.name} has {len(self.train_split)} images: not one batch for "
                             f"{info.world_size} processes")
        self.model = build_model(model_cfg, cfg, device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.state = TrainState()
        if resume_from is not None:
            self._load(resume_from)
        self.forward_model: nn.Module = self.model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.noise_generator = torch.Generator(device=device)
        self.data_generator = torch.Generator(device=self.train_split.images.device)
        self.metrics: MetricsLog | None = None
        self.stop = StopFlag()
        self._consecutive_skips = 0
        self._launch_time = time.perf_counter()
        self._launch_elapsed = self.state.elapsed

    # ----------------------------------------------------------------- checkpoints
    def _load(self, path: Path) -> None:
        """Restore weights, Adam state and counters from ``path`` (the config was checked before)."""
        checkpoint = load_checkpoint(path)
        if checkpoint.config != self.model_cfg:
            raise TrainError(f"{path} holds a model of another configuration: it is {checkpoint.config}, "
                             f"this run is {self.model_cfg}")
        try:
            self.model.load_state_dict(checkpoint.model_state)
            if checkpoint.optimizer_state is None:
                raise CheckpointError(f"{path} has no optimizer state; it cannot be resumed (it can be evaluated)")
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: cannot restore the training state ({error})") from None
        self.state = TrainState.from_dict(checkpoint.trainer_state.get("state", {}))

    def _save(self, name: str) -> Path:
        """Write ``DIR/<name>.safetensors`` atomically (rank 0 only; other ranks return at once)."""
        path = self.out / f"{name}.safetensors"
        if not self.info.is_main:
            return path
        if self.metrics is not None:
            self.state.metrics_offset = self.metrics.sync()
        self.state.elapsed = self._elapsed()
        trainer_state = {
            "state": self.state.to_dict(),
            "train": self.cfg.to_dict(),
            "world_size": self.info.world_size,
            "avme_version": __version__,
        }
        save_checkpoint(path, self.model, optimizer=self.optimizer, trainer_state=trainer_state)
        return path

    def _elapsed(self) -> float:
        return self._launch_elapsed + (time.perf_counter() - self._launch_time)

    # ----------------------------------------------------------------- one step
    def _batch(self, epoch_perm: Tensor, batch: int, step: int) -> tuple[Tensor, Tensor | None, Tensor, int]:
        """This rank's (x, y, eps) of global batch ``batch`` and the global batch size."""
        cfg, info = self.cfg, self.info
        index = epoch_perm[batch * cfg.batch_size : (batch + 1) * cfg.batch_size]
        size = int(index.shape[0])
        rows = dist_utils.local_rows(size, info.rank, info.world_size)
        split = self.train_split
        if split.binarized:
            x, y = split.batch(index[rows], device=self.device)
        else:  # dynamic binarization: draw the global batch, so the draw does not depend on the sharding
            self.data_generator.manual_seed(derive_seed(cfg.seed, "data", step))
            x, y = split.batch(index, generator=self.data_generator, device=self.device)
            x, y = x[rows], y[rows]
        eps = step_noise(self.model, cfg.seed, step, size, self.noise_generator)[:, rows].contiguous()
        return x, (y if self.model_cfg.num_classes else None), eps, size

    def train_step(self, x: Tensor, y: Tensor | None, eps: Tensor, global_size: int, kl_weight: float) -> list[float]:
        """Forward, backward, all-reduce, clip; returns [loss sum, reconstruction sum, kl sum, grad norm, stop].

        Sums are over the global batch (all ranks). The optimizer is not stepped here.
        """
        terms = self.forward_model(x, y, eps=eps)
        objective = terms.reconstruction + kl_weight * terms.kl.sum(dim=1)
        loss = objective.sum() * (self.info.world_size / global_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats = torch.stack([objective.sum(), terms.reconstruction.sum(), terms.kl.sum()]).detach().double()
        stats = torch.cat([stats, stats.new_tensor([1.0 if self.stop else 0.0])])
        dist_utils.all_reduce_sum(stats)
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        values = torch.cat([stats[:3], grad_norm.detach().double().reshape(1).to(stats.device), stats[3:]]).tolist()
        return values

    def _nonfinite(self, loss: float, grad_norm: float, epoch: int, batch: int) -> None:
        """Stop (or, with ``--skip-nonfinite``, skip this update) after a non-finite loss or gradient."""
        what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm})"
        where = f"step {self.state.step + 1} (epoch {epoch + 1}, batch {batch + 1} of {self.num_batches})"
        self.optimizer.zero_grad(set_to_none=True)
        if not self.cfg.skip_nonfinite:
            last = self.out / "last.safetensors"
            kept = f"the last good checkpoint {last} is untouched" if last.is_file() else "no checkpoint was written"
            raise NonFiniteError(
                f"non-finite {what} at {where}; stopping without an update ({kept}). Lower --lr or --clip-grad, "
                "add --kl-warmup-steps, or pass --skip-nonfinite to skip such steps."
            )
        self._consecutive_skips += 1
        self.state.skipped += 1
        self._print(f"warning: non-finite {what} at {where}; update skipped (--skip-nonfinite, "
                    f"{self.state.skipped} skipped so far)")
        if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteError(f"{MAX_CONSECUTIVE_SKIPS} non-finite steps in a row, the last at {where}; giving up "
                                 f"(the last good checkpoint is {self.out / 'last.safetensors'})")

    # ----------------------------------------------------------------- logging
    def _log_train(self, epoch: int, window_start: float) -> None:
        window = self.state.window
        if window["steps"] == 0 or self.metrics is None:
            self.state.window = _empty_window()
            return
        n = max(window["examples"], 1)
        seconds = max(time.perf_counter() - window_start, 1e-9)
        self.metrics.write({
            "kind": "train",
            "epoch": epoch + 1,
            "step": self.state.step,
            "loss": window["loss"] / n,
            "reconstruction": window["reconstruction"] / n,
            "kl": window["kl"] / n,
            "kl_weight": kl_weight_at(max(self.state.step - 1, 0), self.cfg.kl_warmup_steps),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "examples_per_s": window["examples"] / seconds,
            "time": self._elapsed(),
        })
        self.state.window = _empty_window()

    def validate(self, epoch: int) -> dict[str, Any] | None:
        """Validation ELBO over the (sharded) validation split, merged exactly over ranks; logs a record."""
        if self.valid_split is None:
            return None
        result = evaluate(
            self.model, self.valid_split, batch_size=self.cfg.valid_batch_size, seed=self.cfg.seed,
            shard=(self.info.rank, self.info.world_size),
        )
        summary = dist_utils.gather_eval_result(result).summary()
        nelbo = summary["nelbo"]
        best = math.isfinite(nelbo) and (self.state.best_nelbo is None or nelbo < self.state.best_nelbo)
        if best:
            self.state.best_nelbo = nelbo
        if self.metrics is not None:
            self.metrics.write({
                "kind": "valid", "epoch": epoch + 1, "step": self.state.step, "nelbo": nelbo,
                "reconstruction": summary["reconstruction"], "kl": summary["kl"],
                "kl_per_step": summary["kl_per_step"], "best": best, "time": self._elapsed(),
            })
        return {**summary, "best": best}

    # ----------------------------------------------------------------- epochs
    def _interrupted(self) -> int:
        """Checkpoint at the current position and return the exit code for the signal received."""
        signum = self.stop.signum or signal.SIGTERM
        path = self._save("last")
        name = signal.Signals(signum).name
        self._print(f"{name} received: saved {path} at step {self.state.step} (epoch {self.state.epoch + 1}, "
                    f"batch {self.state.batch} of {self.num_batches}); continue with --resume")
        return 128 + int(signum)

    def train_epoch(self, epoch: int, bar_factory: Any) -> bool:
        """Run the remaining batches of ``epoch``; returns False when stopped by a signal."""
        cfg, state = self.cfg, self.state
        perm = epoch_permutation(len(self.train_split), cfg.seed, epoch).to(self.train_split.images.device)
        self.model.train()
        bar = bar_factory(epoch)
        window_start = time.perf_counter()
        segment_start = time.perf_counter()
        try:
            for batch in range(state.batch, self.num_batches):
                x, y, eps, size = self._batch(perm, batch, state.step)
                kl_weight = kl_weight_at(state.step, cfg.kl_warmup_steps)
                loss_sum, recon_sum, kl_sum, grad_norm, stop = self.train_step(x, y, eps, size, kl_weight)
                if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                    self._nonfinite(loss_sum / size, grad_norm, epoch, batch)
                else:
                    self._consecutive_skips = 0
                    self.optimizer.step()
                    window = state.window
                    window["loss"] += loss_sum
                    window["reconstruction"] += recon_sum
                    window["kl"] += kl_sum
                    window["examples"] += size
                    window["steps"] += 1
                    state.epoch_loss += loss_sum
                    state.epoch_examples += size
                state.step += 1
                state.batch = batch + 1
                if bar is not None:
                    bar.update(1)
                    if state.epoch_examples:
                        bar.set_postfix(loss=f"{state.epoch_loss / state.epoch_examples:.2f}", refresh=False)
                if state.step % cfg.log_every == 0:
                    self._log_train(epoch, window_start)
                    window_start = time.perf_counter()
                if stop > 0:
                    state.epoch_seconds += time.perf_counter() - segment_start
                    return False
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < self.num_batches:
                    state.epoch_seconds += time.perf_counter() - segment_start
                    self._save("last")
                    segment_start = time.perf_counter()
        finally:
            if bar is not None:
                bar.close()
        state.epoch_seconds += time.perf_counter() - segment_start
        self._log_train(epoch, window_start)
        return True

    def _finish_epoch(self, epoch: int) -> None:
        """Validation, the "epoch" record, best/last checkpoints; moves the state to the next epoch."""
        state = self.state
        valid_start = time.perf_counter()
        summary = self.validate(epoch)
        valid_seconds = time.perf_counter() - valid_start
        if self.metrics is not None:
            self.metrics.write({
                "kind": "epoch", "epoch": epoch + 1, "step": state.step, "seconds": state.epoch_seconds,
                "train_loss": state.epoch_loss / max(state.epoch_examples, 1), "examples": state.epoch_examples,
            })
        message = (f"epoch {epoch + 1}/{self.cfg.epochs}: train loss {state.epoch_loss / max(state.epoch_examples, 1):.3f}"
                   f" ({state.epoch_seconds:.1f} s)")
        if summary is not None:
            message += f", valid nelbo {summary['nelbo']:.3f}{' (best)' if summary['best'] else ''} ({valid_seconds:.1f} s)"
        state.history.append({"epoch": epoch + 1, "seconds": state.epoch_seconds, "valid_seconds": valid_seconds})
        state.epoch, state.batch = epoch + 1, 0
        state.epoch_seconds, state.epoch_loss, state.epoch_examples = 0.0, 0.0, 0
        if summary is not None and summary["best"]:
            self._save("best")  # before last: a kill in between redoes this epoch and rewrites best
        self._save("last")
        self._print(message)

    def run(self) -> int:
        """Train up to ``cfg.epochs``; returns the exit code (0, or 128 + signal number)."""
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        show = cfg.progress and self.info.is_main

        def bar_factory(epoch: int) -> Any:
            if not show:
                return None
            return tqdm(total=self.num_batches, initial=state.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                        unit="batch", dynamic_ncols=True, leave=False)

        with self.stop.installed():
            for epoch in range(state.epoch, cfg.epochs):
                if not self.train_epoch(epoch, bar_factory):
                    return self._interrupted()
                self._finish_epoch(epoch)
                if dist_utils.any_true(bool(self.stop), self.device):
                    return self._interrupted()
        self._print(self.summary_text())
        return 0

    def summary_text(self) -> str:
        """The end-of-run report: epochs, steps, seconds per epoch (training and validation), best ELBO."""
        history = self.state.history
        lines = [f"done: {self.state.epoch} epochs, {self.state.step} steps in {self._elapsed():.1f} s "
                 f"({self.info.world_size} process{'es' if self.info.world_size > 1 else ''} on {self.device.type})"]
        if history:
            seconds = [h["seconds"] for h in history]
            valid = [h["valid_seconds"] for h in history]
            lines.append(f"seconds per epoch (training, {len(self.train_split)} images): mean {sum(seconds) / len(seconds):.2f}, "
                         f"last {seconds[-1]:.2f}; validation: mean {sum(valid) / len(valid):.2f}")
        if self.state.skipped:
            lines.append(f"skipped non-finite steps: {self.state.skipped}")
        if self.state.best_nelbo is not None:
            lines.append(f"best validation nelbo: {self.state.best_nelbo:.4f} ({self.out / 'best.safetensors'})")
        return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def _write_config(out: Path, cfg: TrainConfig, model_cfg: AVMEConfig, info: DistInfo) -> None:
    document = {
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "world_size": info.world_size,
        "avme_version": __version__,
        "torch_version": torch.__version__,
    }
    data = (json.dumps(document, indent=2) + "\n").encode()
    atomic_write_bytes(out / "config.json", lambda tmp: Path(tmp).write_bytes(data))


def _check_config_json(out: Path, checkpoint_cfg: AVMEConfig, checkpoint: Path) -> None:
    """Refuse a run dir whose config.json describes another model than its checkpoint."""
    saved = _read_run_config(out)
    if saved is not None and saved[1] != checkpoint_cfg:
        raise TrainError(f"{out / 'config.json'} describes {saved[1]} but {checkpoint} holds {checkpoint_cfg}; "
                         "the run directory mixes two runs")


def _read_run_config(out: Path) -> tuple[dict[str, Any], AVMEConfig] | None:
    """The training arguments and model config in ``out/config.json``, or None when there is none."""
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
        return dict(document["train"]), AVMEConfig.from_dict(document["model"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainError(f"{path} is not a readable run config ({error}); move it away or fix it") from None


def _tensorboard_choice(cfg: TrainConfig) -> bool:
    if cfg.tensorboard is False:
        return False
    available = tensorboard_available()
    if cfg.tensorboard and not available:
        raise TrainError("--tensorboard: torch.utils.tensorboard cannot be imported; "
                         "pip install tensorboard, or pass --no-tensorboard")
    return available


def _broadcast_outcome(info: DistInfo, work: Any) -> Any:
    """Run ``work()`` on rank 0 and give its result (or its error) to every rank."""
    outcome: Any = None
    if info.is_main:
        try:
            outcome = ("ok", work())
        except (TrainError, CheckpointError, OSError, ValueError) as error:
            outcome = ("error", error)
    outcome = dist_utils.broadcast_object(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def train(
    given: dict[str, Any],
    *,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stream: TextIO | None = None,
) -> int:
    """Train a model (``avme train``): set up the job, the run directory and the :class:`Trainer`, and run it.

    Args:
        given: explicitly given options (fields of :class:`TrainConfig` and :class:`AVMEConfig`);
            on ``resume`` the others come from the checkpoint, else from the defaults.
        out: run directory (default ``runs/<name or timestamp>``).
        resume: continue from ``out/last.safetensors`` (a notice and a new run when there is none yet).
        overwrite: replace the run files of an existing run directory.
        stream: where rank 0 prints messages (default stderr).

    Returns:
        the exit code: 0, or 130/143 after SIGINT/SIGTERM (checkpoint saved).
    """
    info = dist_utils.detect()
    stream = stream or sys.stderr

    def say(message: str) -> None:
        if info.is_main:
            try:
                from tqdm.auto import tqdm

                tqdm.write(message, file=stream)
            except ImportError:  # pragma: no cover
                print(message, file=stream, flush=True)

    device = dist_utils.resolve_device(str(given.get("device", "auto")), info)
    dist_utils.setup(info, device)
    try:
        out_dir = Path(out) if out is not None else None
        if out_dir is None:
            if resume:
                raise TrainError("--resume needs --out DIR (the run directory to continue)")
            out_dir = Path(dist_utils.broadcast_object(str(default_out_dir(name))))

        def inspect_run_dir() -> tuple[Path | None, str | None, Any]:
            checkpoint, message = prepare_run_dir(out_dir, resume=resume, overwrite=overwrite)
            return checkpoint, message, (_read_run_config(out_dir) if resume and checkpoint is None else None)

        resume_from, notice, started = _broadcast_outcome(info, inspect_run_dir)
        if notice:
            say(notice)
        saved_train = saved_model = None
        strict = True
        if started is not None:  # killed before its first checkpoint: start again with its settings
            (saved_train, saved_model), strict = started, False
            say(f"using the settings of {out_dir / 'config.json'} (options given now take precedence)")
        if resume_from is not None:
            checkpoint = load_checkpoint(resume_from)
            saved_train, saved_model = checkpoint.trainer_state.get("train", {}), checkpoint.config
            _check_config_json(out_dir, saved_model, resume_from)
            saved_world = checkpoint.trainer_state.get("world_size", 1)
            if saved_world != info.world_size:
                say(f"note: resuming a run of {saved_world} process(es) with {info.world_size}; "
                    "the result equals an uninterrupted run to float tolerance, not bit for bit")
        cfg, model_cfg = resolve_configs(given, saved_train, saved_model, str(resume_from), strict=strict)
        use_tensorboard = _tensorboard_choice(cfg)
        trainer = Trainer(cfg, model_cfg, out_dir, info, device, resume_from, say)
        if resume_from is not None and trainer.state.epoch >= cfg.epochs:
            say(f"{resume_from} already finished {trainer.state.epoch} epochs (--epochs {cfg.epochs}); "
                "nothing to do (pass a larger --epochs to continue)")
            return 0
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_temp_files(out_dir)
            _write_config(out_dir, cfg, model_cfg, info)
            trainer.metrics = MetricsLog(
                out_dir / "metrics.jsonl",
                truncate_to=trainer.state.metrics_offset if resume_from is not None else 0,
                tensorboard_dir=out_dir / "tensorboard" if use_tensorboard else None,
                purge_step=trainer.state.step + 1,  # drops events a killed launch wrote after the checkpoint
            )
        if resume_from is not None:
            say(f"resuming {resume_from} at step {trainer.state.step} (epoch {trainer.state.epoch + 1}, "
                f"batch {trainer.state.batch} of {trainer.num_batches})")
        else:
            say(f"training {model_cfg} in {out_dir} ({info.world_size} process(es), {device})")
        try:
            code = trainer.run()
        finally:
            if trainer.metrics is not None:
                trainer.metrics.close()
        dist_utils.barrier()  # leave together: a rank torn down while a peer still talks to it can abort
        return code
    finally:
        dist_utils.teardown()
