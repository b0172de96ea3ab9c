"""``train()``: what ``avme train`` runs, one launch of a run, in named steps.

1. join the job (torchrun) and pick the device;
2. choose the run directory, take its lock (:mod:`~avme_ext.training.run_lock`, rank 0: one run
   per directory) and find what to resume (:func:`find_resume_point`, rank 0 decides);
3. resolve the options against the resumed run's (:func:`~avme_ext.training.config.resolve_configs`);
4. build data, model and step (:func:`~avme_ext.training.builders.build_setup`);
5. open the run directory: replace a previous run (--overwrite), write config.json, open the
   metrics log (:func:`open_run_dir`, rank 0);
6. run the :class:`~avme_ext.training.trainer.Trainer`.

Steps 1-4 write nothing but the lock file (removed when the launch ends), so a launch that cannot
start leaves its run directory as it was.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch

from .. import distributed as dist_utils
from ..checkpoint import Checkpoint, CheckpointError, load_checkpoint
from ..config import AVMEConfig
from ..distributed import DistInfo
from .builders import build_setup
from .config import CLASSES_FROM_DATA, TrainConfig, resolve_configs
from .cost import plural
from .errors import OptionError, TrainError
from .metrics import MetricsLog, tensorboard_available
from .run_dir import (
    check_run_config,
    clear_run_files,
    plan_run_dir,
    read_run_config,
    remove_stale_temp_files,
    reserve_default_out_dir,
    write_run_config,
)
from .run_lock import RunLock
from .schedule import describe_schedule
from .state import TrainState
from .step import GraphedStep
from .trainer import Trainer, TrainingSetup

__all__ = ["train", "ResumePoint", "find_resume_point", "open_run_dir"]

T = TypeVar("T")
Say = Callable[[str], None]


@dataclass(frozen=True)
class ResumePoint:
    """Where a launch starts from.

    Attributes:
        path: the checkpoint to continue (None: a new run).
        checkpoint: its contents.
        saved_train, saved_model: the options to continue with (the checkpoint's, or those of a
            config.json left by a launch that died before its first checkpoint), or None.
        strict: True when the saved options come from a checkpoint and may not be changed.
        replaced: the previous run's files that ``--overwrite`` replaces (removed by :func:`open_run_dir`).
    """

    path: Path | None = None
    checkpoint: Checkpoint | None = None
    saved_train: dict[str, Any] | None = None
    saved_model: AVMEConfig | None = None
    strict: bool = True
    replaced: tuple[str, ...] = ()

    @property
    def state(self) -> TrainState | None:
        """The resumed run's counters (None for a new run)."""
        return None if self.checkpoint is None else TrainState.from_checkpoint(self.checkpoint.trainer_state)


def _printer(info: DistInfo, stream: TextIO) -> Say:
    """Print a message on rank 0 (through tqdm, so progress bars stay intact)."""

    def say(message: str) -> None:
        if info.is_main:
            try:
                from tqdm.auto import tqdm

                tqdm.write(message, file=stream)
            except ImportError:  # pragma: no cover
                print(message, file=stream, flush=True)

    return say


def _on_rank0(info: DistInfo, work: Callable[[], T]) -> T:
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


def _choose_out_dir(out: str | os.PathLike | None, name: str | None, resume: bool, info: DistInfo) -> Path:
    if out is not None:
        return Path(out)
    if resume:
        raise TrainError("--resume needs --out DIR (the run directory to continue)")
    return _on_rank0(info, lambda: reserve_default_out_dir(name))


def find_resume_point(out_dir: Path, info: DistInfo, *, resume: bool, overwrite: bool, say: Say) -> ResumePoint:
    """Check ``out_dir`` (rank 0 decides; nothing is written) and load the checkpoint to continue, if any."""

    def inspect() -> tuple[Any, Any]:
        plan = plan_run_dir(out_dir, resume=resume, overwrite=overwrite)
        return plan, (read_run_config(out_dir) if resume and plan.resume_from is None else None)

    plan, started = _on_rank0(info, inspect)
    if plan.notice:
        say(plan.notice)
    if started is not None:  # killed before its first checkpoint: start again with its settings
        say(f"using the settings of {out_dir / 'config.json'} (options given now take precedence)")
        return ResumePoint(saved_train=started[0], saved_model=started[1], strict=False)
    if plan.resume_from is None:
        return ResumePoint(replaced=plan.replaced)
    path = plan.resume_from
    checkpoint = load_checkpoint(path)
    check_run_config(out_dir, checkpoint.config, path)
    saved_world = checkpoint.trainer_state.get("world_size", 1)
    if saved_world != info.world_size:
        say(f"note: resuming a run of {plural(saved_world, 'process', 'es')} with {info.world_size}; "
            "the result equals an uninterrupted run to float tolerance, not bit for bit")
    return ResumePoint(path, checkpoint, checkpoint.trainer_state.get("train", {}), checkpoint.config)


def _use_tensorboard(cfg: TrainConfig) -> bool:
    if cfg.tensorboard is False:
        return False
    available = tensorboard_available()
    if cfg.tensorboard and not available:
        raise TrainError("--tensorboard: torch.utils.tensorboard cannot be imported; "
                         "pip install tensorboard, or pass --no-tensorboard")
    return available


def open_run_dir(out_dir: Path, setup: TrainingSetup, point: ResumePoint, *, tensorboard: bool, say: Say) -> MetricsLog:
    """Create the run directory (replacing ``point.replaced``), write config.json, open the metrics log (rank 0).

    A resumed run's metrics.jsonl is cut back to its size at the checkpoint, and TensorBoard drops
    the events after the checkpoint's step, so records a killed launch wrote are not duplicated.
    """
    notice = clear_run_files(out_dir, point.replaced)
    if notice:
        say(notice)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    write_run_config(out_dir, setup.cfg, setup.model.config, setup.info, setup.data.record)
    return MetricsLog(
        out_dir / "metrics.jsonl",
        truncate_to=setup.state.metrics_offset if point.path is not None else 0,
        tensorboard_dir=out_dir / "tensorboard" if tensorboard else None,
        purge_step=setup.state.step + 1,
    )


def _announce(say: Say, point: ResumePoint, trainer: Trainer) -> None:
    state = trainer.state
    how = "CUDA graphs" if isinstance(trainer.step, GraphedStep) else "eager"
    where = f"({plural(trainer.info.world_size, 'process', 'es')}, {trainer.device}, {how})"
    if point.path is not None:
        say(f"resuming {point.path} at step {state.step} (epoch {state.epoch + 1}, "
            f"batch {state.batch} of {trainer.num_batches}) {where}")
    else:
        say(f"training {trainer.model.config} in {trainer.out} {where}")
    say(f"learning rate: {describe_schedule(trainer.cfg)}")


def _run_launch(given: dict[str, Any], info: DistInfo, device: torch.device, out_dir: Path, *, resume: bool,
                overwrite: bool, say: Say) -> int:
    point = find_resume_point(out_dir, info, resume=resume, overwrite=overwrite, say=say)
    classes_from_data = given.get("num_classes") == CLASSES_FROM_DATA
    if classes_from_data:  # the data set's classes: known once it is loaded (a resumed run keeps its own)
        given = {k: v for k, v in given.items() if k != "num_classes"}
        if point.saved_model is not None and not point.saved_model.conditional:
            raise TrainError(f"--conditional: {point.path or out_dir / 'config.json'} holds an unconditional model; "
                             "drop --conditional to continue it, or start a new run with another --out")
    cfg, model_cfg = resolve_configs(given, point.saved_train, point.saved_model, str(point.path), strict=point.strict)
    resumed = point.state
    if resumed is not None and resumed.epoch >= cfg.epochs:
        say(f"{point.path} already finished {plural(resumed.epoch, 'epoch')} (--epochs {cfg.epochs}); "
            "nothing to do (pass a larger --epochs to continue)")
        return 0
    tensorboard = _use_tensorboard(cfg)
    checkpoint = None if point.checkpoint is None else (point.checkpoint, point.path)
    new_run = point.saved_model is None
    setup = build_setup(cfg, model_cfg, info, device, checkpoint,
                        fit_shape=new_run and not {"data_dim", "image_shape"} & given.keys(),
                        classes_from_data=classes_from_data and new_run)
    metrics = None
    if info.is_main:
        metrics = open_run_dir(out_dir, setup, point, tensorboard=tensorboard, say=say)
    try:
        trainer = Trainer(setup, out_dir, metrics=metrics, log=say)
        _announce(say, point, trainer)
        code = trainer.run()
    finally:
        if metrics is not None:
            metrics.close()
    dist_utils.barrier()  # leave together: a rank torn down while a peer still talks to it can abort
    return code


def train(
    given: dict[str, Any],
    *,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stream: TextIO | None = None,
) -> int:
    """Train a model (``avme train``): one launch of a run, from its start or its last checkpoint.

    Args:
        given: explicitly given options (fields of :class:`TrainConfig` and :class:`AVMEConfig`);
            on ``resume`` the others come from the checkpoint, else from the defaults. The model's image
            shape (``data_dim``, ``image_shape``) is the data's unless given; ``num_classes="data"``
            (:data:`~avme_ext.training.config.CLASSES_FROM_DATA`, ``--conditional``) takes the data set's
            number of classes.
        out: run directory (default ``runs/<name>``, or a new ``runs/<timestamp>``).
        name: name of the default run directory.
        resume: continue from ``out/last.safetensors`` (a notice and a new run when there is none yet).
        overwrite: replace the run files of an existing run directory.
        stream: where rank 0 prints messages (default stderr).

    Returns:
        the exit code: 0, or 130/143 after SIGINT/SIGTERM (checkpoint saved).

    Raises:
        TrainError (NonFiniteError, RunDirError), CheckpointError, ValueError, FileNotFoundError,
        DataFormatError: the run cannot start or continue; the message says why and what to do.
        KeyboardInterrupt: Ctrl-C before the training loop installed its handlers (nothing to save).
    """
    info = dist_utils.detect()
    say = _printer(info, stream or sys.stderr)
    try:
        device = dist_utils.resolve_device(str(given.get("device", "auto")), info)
    except ValueError as error:
        raise OptionError(str(error)) from None
    dist_utils.setup(info, device)
    lock = None
    try:
        out_dir = _choose_out_dir(out, name, resume, info)
        lock = RunLock(out_dir, say) if info.is_main else None  # one run per directory; rank 0 holds it
        _on_rank0(info, lambda: lock.acquire() and None)
        return _run_launch(given, info, device, out_dir, resume=resume, overwrite=overwrite, say=say)
    finally:
        if lock is not None:
            lock.release()
        dist_utils.teardown()
