"""``Trainer``: the epoch loop of a run (steps, logging, validation, checkpoints, signals).

The trainer gets everything it works with when it is made (:class:`TrainingSetup`: data, model,
step, counters; the metrics log; the message printer) and creates none of it; see
:func:`avme_ext.training.entry.train` for how a launch assembles them.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from .. import distributed as dist_utils
from .. import evaluation
from ..checkpoint import save_checkpoint
from ..distributed import DistInfo
from ..model import AVME
from ..seeds import derive_seed
from .config import TrainConfig
from .cost import CostEstimate, plural
from .errors import NonFiniteError
from .metrics import MetricsLog
from .schedule import SEED_NAMESPACE, epoch_permutation, kl_weight_at, learning_rate_at, step_noise
from .signals import StopFlag
from .splits import TrainingData
from .state import TrainState, empty_window
from .step import StepStats, TrainStep

__all__ = ["Trainer", "TrainingSetup", "MAX_CONSECUTIVE_SKIPS"]

#: ``--skip-nonfinite`` gives up after this many non-finite steps in a row.
MAX_CONSECUTIVE_SKIPS = 100


@dataclass
class TrainingSetup:
    """What one process trains, and where.

    Attributes:
        cfg: the training options.
        info: this process's place in the job.
        device: this process's device.
        data: the splits (on ``device``) and the batches per epoch.
        model: the model (on ``device``).
        step: the optimisation step (:class:`EagerStep` or :class:`GraphedStep`), holding the optimizer.
        state: the counters (restored from a checkpoint, or fresh).
    """

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    data: TrainingData
    model: AVME
    step: TrainStep
    state: TrainState


def describe_device(device: torch.device) -> str:
    """``"cpu"``, or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


class Trainer:
    """Trains an AVME model in a run directory; see :mod:`avme_ext.training` for the guarantees.

    Args:
        setup: data, model, step and counters of this process.
        out: the run directory (rank 0 writes checkpoints there).
        metrics: the run's metrics log (rank 0), or None (other ranks, or tests).
        log: prints a message (rank 0 decides whether to show it).
    """

    def __init__(self, setup: TrainingSetup, out: Path, *, metrics: MetricsLog | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.setup = setup
        self.cfg, self.info, self.device = setup.cfg, setup.info, setup.device
        self.model, self.step, self.state = setup.model, setup.step, setup.state
        self.train_split, self.valid_split = setup.data.train, setup.data.valid
        self.num_batches = setup.data.num_batches
        self.out = out
        self.metrics = metrics
        self._print = log or (lambda message: None)
        self.noise_generator = torch.Generator(device=self.device)
        self.data_generator = torch.Generator(device=self.train_split.images.device)
        self.stop = StopFlag()
        self.cost = CostEstimate(self.num_batches, self.state.steps_left(self.cfg.epochs, self.num_batches),
                                 describe_device(self.device))
        self._consecutive_skips = 0
        self._launch_time = time.perf_counter()
        self._launch_elapsed = self.state.elapsed

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer

    # ----------------------------------------------------------------- checkpoints
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
            "data": self.setup.data.record,
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
        if not split.dynamic:
            x, y = split.batch(index[rows], device=self.device)
        else:  # dynamic binarization: draw the global batch, so the draw does not depend on the sharding
            self.data_generator.manual_seed(derive_seed(SEED_NAMESPACE, cfg.seed, "data", step))
            x, y = split.batch(index, generator=self.data_generator, device=self.device)
            x, y = x[rows], y[rows]
        eps = step_noise(self.model, cfg.seed, step, size, self.noise_generator)[:, rows].contiguous()
        return x, (y if self.model.config.num_classes else None), eps, size

    def train_step(self, x: Tensor, y: Tensor | None, eps: Tensor, global_size: int, kl_weight: float) -> StepStats:
        """Forward, backward, all-reduce, gradient norm of one batch (the update is applied by the caller).

        Sums are over the global batch (all ranks); ``stop`` is true when any rank got a signal.
        """
        return self.step.gradients(x, y, eps, global_size, kl_weight, bool(self.stop))

    def learning_rate(self, step: int) -> float:
        """The learning rate of the update after ``step`` completed steps (``--lr-schedule``)."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant":
            return cfg.lr
        return learning_rate_at(step, cfg.lr, cfg.lr_schedule, final=cfg.lr_final,
                                decay_steps=cfg.lr_decay_epochs * self.num_batches,
                                hold_steps=cfg.lr_hold_epochs * self.num_batches)

    def _nonfinite(self, stats: StepStats, size: int, epoch: int, batch: int) -> None:
        """Stop (or, with ``--skip-nonfinite``, skip this update) after a non-finite loss or gradient."""
        loss = stats.loss_sum / size
        what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({stats.grad_norm})"
        where = f"step {self.state.step + 1} (epoch {epoch + 1}, batch {batch + 1} of {self.num_batches})"
        self.step.skip()
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

    def _accumulate(self, stats: StepStats, size: int) -> None:
        window, state = self.state.window, self.state
        window["loss"] += stats.loss_sum
        window["reconstruction"] += stats.reconstruction_sum
        window["kl"] += stats.kl_sum
        window["examples"] += size
        window["steps"] += 1
        state.epoch_loss += stats.loss_sum
        state.epoch_examples += size

    def _run_step(self, perm: Tensor, epoch: int, batch: int) -> bool:
        """One step of global batch ``batch``; returns True when a signal asks to stop after it."""
        state = self.state
        x, y, eps, size = self._batch(perm, batch, state.step)
        stats = self.train_step(x, y, eps, size, kl_weight_at(state.step, self.cfg.kl_warmup_steps))
        if not stats.finite:
            self._nonfinite(stats, size, epoch, batch)
        else:
            self._consecutive_skips = 0
            self.step.set_learning_rate(self.learning_rate(state.step))
            self.step.update()
            self._accumulate(stats, size)
        state.step += 1
        state.batch = batch + 1
        estimate = self.cost.step_done()
        if estimate is not None:
            self._print(estimate)
        return stats.stop

    # ----------------------------------------------------------------- logging
    def _log_train(self, epoch: int, window_start: float) -> None:
        window = self.state.window
        if window["steps"] == 0 or self.metrics is None:
            self.state.window = empty_window()
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
            "lr": self.learning_rate(self.state.step - 1),  # the schedule's, not read back from the device
            "examples_per_s": window["examples"] / seconds,
            "time": self._elapsed(),
        })
        self.state.window = empty_window()

    def validate(self, epoch: int) -> dict[str, Any] | None:
        """Validation ELBO over the (sharded) validation split, merged exactly over ranks; logs a record."""
        if self.valid_split is None:
            return None
        result = evaluation.evaluate(
            self.model, self.valid_split, batch_size=self.cfg.valid_batch_size, seed=self.cfg.seed,
            shard=(self.info.rank, self.info.world_size),
        )
        summary = evaluation.gather_across_ranks(result).summary()
        nelbo = summary["nelbo"]
        best = math.isfinite(nelbo) and (self.state.best_nelbo is None or nelbo < self.state.best_nelbo)
        if best:
            self.state.best_nelbo, self.state.best_epoch = nelbo, epoch + 1
        if self.metrics is not None:
            self.metrics.write({
                "kind": "valid", "epoch": epoch + 1, "step": self.state.step, "nelbo": nelbo,
                "nelbo_bits_per_dim": summary["nelbo_bits_per_dim"], "likelihood": summary["likelihood"],
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
                stop = self._run_step(perm, epoch, batch)
                if bar is not None:
                    bar.update(1)
                    if state.epoch_examples:
                        bar.set_postfix(loss=f"{state.epoch_loss / state.epoch_examples:.2f}", refresh=False)
                if state.step % cfg.log_every == 0:
                    self._log_train(epoch, window_start)
                    window_start = time.perf_counter()
                if stop:
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
        train_loss = state.epoch_loss / max(state.epoch_examples, 1)
        if self.metrics is not None:
            self.metrics.write({
                "kind": "epoch", "epoch": epoch + 1, "step": state.step, "seconds": state.epoch_seconds,
                "train_loss": train_loss, "examples": state.epoch_examples,
            })
        message = f"epoch {epoch + 1}/{self.cfg.epochs}: train loss {train_loss:.3f} ({state.epoch_seconds:.1f} s)"
        if summary is not None:
            best = " (best)" if summary["best"] else ""
            message += (f", valid nelbo {summary['nelbo']:.3f} nats = {summary['nelbo_bits_per_dim']:.4f} bits/dim"
                        f"{best} ({valid_seconds:.1f} s)")
        state.history.append({"epoch": epoch + 1, "seconds": state.epoch_seconds, "valid_seconds": valid_seconds})
        state.epoch, state.batch = epoch + 1, 0
        state.epoch_seconds, state.epoch_loss, state.epoch_examples = 0.0, 0.0, 0
        if summary is not None and summary["best"]:
            self._save("best")  # before last: a kill in between redoes this epoch and rewrites best
        self._save("last")
        self._print(message)

    def patience_spent(self) -> bool:
        """``--patience N`` with validation: N finished epochs since the best validation bound."""
        return self.valid_split is not None and self.state.patience_spent(self.cfg.patience)

    def run(self) -> int:
        """Train up to ``cfg.epochs`` (or until ``--patience`` is spent); returns the exit code (0, or 128 +
        signal number)."""
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        show = cfg.progress and self.info.is_main

        def bar_factory(epoch: int) -> Any:
            if not show:
                return None
            return tqdm(total=self.num_batches, initial=state.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                        unit="batch", dynamic_ncols=True, leave=False)

        self._print(self.cost.plan(cfg.epochs - state.epoch))
        with self.stop.installed():
            for epoch in range(state.epoch, cfg.epochs):
                if self.patience_spent():
                    self._print(f"early stop after epoch {state.epoch}: no better validation nelbo for "
                                f"{plural(state.epoch - (state.best_epoch or 0), 'epoch')} (--patience {cfg.patience})")
                    break
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
        lines = [f"done: {plural(self.state.epoch, 'epoch')}, {plural(self.state.step, 'step')} in "
                 f"{self._elapsed():.1f} s ({plural(self.info.world_size, 'process', 'es')} on {self.device.type})"]
        if history:
            seconds = [h["seconds"] for h in history]
            valid = [h["valid_seconds"] for h in history]
            lines.append(f"seconds per epoch (training, {len(self.train_split)} images): "
                         f"mean {sum(seconds) / len(seconds):.2f}, last {seconds[-1]:.2f}; "
                         f"validation: mean {sum(valid) / len(valid):.2f}")
        if self.state.skipped:
            lines.append(f"skipped non-finite steps: {self.state.skipped}")
        if self.state.best_nelbo is not None:
            lines.append(f"best validation nelbo: {self.state.best_nelbo:.4f} ({self.out / 'best.safetensors'})")
        return "\n".join(lines)
