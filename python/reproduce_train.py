"""Training stage of the reproduction: ``avme train`` runs side by side on one device, within a time budget.

* Every model trains in its own ``avme train`` process (``--resume``: a run continues exactly from
  its ``last.safetensors``). Up to ``jobs`` processes share the device; each writes its log to
  ``<model>/logs/``.
* Early stopping uses the validation split only: a run stops once ``patience`` epochs have passed
  without a better validation negative ELBO, or at its epoch cap. The selected weights are the
  best validation epoch's, exported to float16 (:func:`export_fp16`).
* With a deadline, :func:`plan_launch` starts only runs expected to finish before it, or else a
  single run that carries over to the next invocation: the optimizer state of one unfinished run
  (about 57 MiB at the paper's sizes) is all that can travel with the results of a call. At the
  deadline every process still running gets SIGTERM (``avme train`` saves a checkpoint and exits).
* The seconds per epoch are measured as the runs go (by number of concurrent runs, per device) and
  kept in the manifest; before any measurement :data:`DEFAULT_SECONDS_PER_EPOCH` is used.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reproduce_state import MODELS, REPO, Layout, Manifest, Plan, now_iso

#: Seconds per epoch (training and validation) of one run when N runs share the device, before
#: anything is measured: four eager ``avme train --impl ref`` processes side by side on an H100
#: trained 13 to 15 epochs each in 4 minutes (about 17.1 s per epoch with validation).
DEFAULT_SECONDS_PER_EPOCH = {4: 17.1}
#: Seconds from starting a process to its first epoch's work (imports, data, CUDA graph capture).
DEFAULT_STARTUP_SECONDS = 30.0
#: Plans multiply estimated times by this factor.
SAFETY = 1.15
#: Seconds a run gets to save its checkpoint after SIGTERM before it is killed (within the
#: 45 s that a call keeps back for stopping and packing).
STOP_GRACE_SECONDS = 30.0
POLL_SECONDS = 0.5

Log = Callable[[str], None]


# --------------------------------------------------------------------------- progress of a run
@dataclass
class RunProgress:
    """Where a run directory stands.

    Attributes:
        epochs_done: finished epochs of the checkpoint ``last.safetensors`` (0 without one).
        at_epoch_boundary: the checkpoint is at the end of an epoch (not mid-epoch).
        valid: validation negative ELBO by epoch, for the finished epochs.
    """

    epochs_done: int = 0
    at_epoch_boundary: bool = True
    valid: dict[int, float] = field(default_factory=dict)

    @property
    def best(self) -> tuple[int, float] | None:
        """(epoch, value) of the best validation bound (the first of equal ones), or None."""
        finite = [(value, epoch) for epoch, value in self.valid.items() if math.isfinite(value)]
        if not finite:
            return None
        value, epoch = min(finite)
        return epoch, value

    def epochs_since_best(self) -> int | None:
        best = self.best
        return None if best is None else self.epochs_done - best[0]


def read_trainer_state(run_dir: Path) -> dict[str, Any]:
    """The trainer counters of ``run_dir/last.safetensors``, from its readable twin ``last.json`` ({} without one)."""
    path = Path(run_dir) / "last.json"
    if not path.is_file():
        return {}
    document = json.loads(path.read_text(encoding="utf-8"))
    return dict(document.get("trainer", {}).get("state", {}))


def read_valid_records(metrics: Path, up_to_epoch: int | None = None) -> dict[int, float]:
    """Validation negative ELBO by epoch from a ``metrics.jsonl`` (records after ``up_to_epoch`` ignored)."""
    valid: dict[int, float] = {}
    if not Path(metrics).is_file():
        return valid
    for line in Path(metrics).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == "valid" and (up_to_epoch is None or record["epoch"] <= up_to_epoch):
            valid[int(record["epoch"])] = float(record["nelbo"]) if record["nelbo"] is not None else math.nan
    return valid


def read_progress(run_dir: Path) -> RunProgress:
    state = read_trainer_state(run_dir)
    epochs = int(state.get("epoch", 0))
    return RunProgress(epochs, int(state.get("batch", 0)) == 0, read_valid_records(Path(run_dir) / "metrics.jsonl", epochs))


def stop_reason(progress: RunProgress, target: int, patience: int) -> str | None:
    """Why the run is finished ("epochs": its cap; "patience": no better validation bound for
    ``patience`` epochs), or None while it should go on."""
    if progress.epochs_done >= target:
        return "epochs"
    since = progress.epochs_since_best()
    if since is not None and since >= patience:
        return "patience"
    return None


# --------------------------------------------------------------------------- rates and the plan
class RateModel:
    """Estimated seconds per epoch of one run when ``jobs`` runs share the device, and the start-up time.

    Measured values (by number of concurrent runs) are used where present. Elsewhere the
    estimate is conservative: fewer runs are assumed no faster per run than the nearest
    measured larger number, more runs no faster in total than the nearest measured smaller one.
    """

    def __init__(self, measured: dict[str, float] | None = None, startup: float | None = None) -> None:
        table = {int(k): float(v) for k, v in (measured or {}).items()}
        self.measured = bool(table)
        self.table = table or dict(DEFAULT_SECONDS_PER_EPOCH)
        self._startup = DEFAULT_STARTUP_SECONDS if startup is None else float(startup)

    def seconds_per_epoch(self, jobs: int) -> float:
        if jobs in self.table:
            return self.table[jobs]
        larger = [j for j in self.table if j > jobs]
        if larger:
            return self.table[min(larger)]
        nearest = max(self.table)
        return self.table[nearest] * jobs / nearest

    @property
    def startup(self) -> float:
        return self._startup


@dataclass(frozen=True)
class QueueItem:
    """An untrained model: epochs done and its epoch cap."""

    name: str
    epochs_done: int
    epochs_target: int

    @property
    def remaining(self) -> int:
        return max(0, self.epochs_target - self.epochs_done)


@dataclass(frozen=True)
class LaunchPlan:
    """Runs to start together: model name -> the ``--epochs`` to train to; ``finishing``: all are
    expected to reach their cap (False: a single run that carries over)."""

    targets: dict[str, int]
    finishing: bool


def plan_launch(
    queue: list[QueueItem],
    jobs: int,
    seconds_left: float,
    rates: RateModel,
    *,
    allow_carry_over: bool,
    epochs_per_call: int | None = None,
) -> LaunchPlan | None:
    """What to start next (None: nothing fits).

    * ``epochs_per_call`` given: the first ``jobs`` models, each for at most that many more epochs.
    * no deadline (``seconds_left`` infinite): every model to its cap (``jobs`` at a time).
    * otherwise the largest group of the first ``j <= jobs`` models that all reach their cap in
      ``seconds_left`` at the estimated rate for ``j`` concurrent runs; failing that, when
      ``allow_carry_over``, the first model alone for the epochs that fit (it stays unfinished).
    """
    if not queue:
        return None
    if epochs_per_call is not None:
        chosen = queue[:jobs]
        return LaunchPlan({q.name: min(q.epochs_target, q.epochs_done + epochs_per_call) for q in chosen},
                          all(q.remaining <= epochs_per_call for q in chosen))
    if math.isinf(seconds_left):
        return LaunchPlan({q.name: q.epochs_target for q in queue}, True)
    for j in range(min(jobs, len(queue)), 0, -1):
        group = queue[:j]
        need = rates.startup + max(q.remaining for q in group) * rates.seconds_per_epoch(j) * SAFETY
        if need <= seconds_left:
            return LaunchPlan({q.name: q.epochs_target for q in group}, True)
    if not allow_carry_over:
        return None
    first = queue[0]
    fit = math.floor((seconds_left - rates.startup) / (rates.seconds_per_epoch(1) * SAFETY))
    if fit < 1:
        return None
    return LaunchPlan({first.name: first.epochs_done + min(fit, max(first.remaining - 1, 1))}, False)


# --------------------------------------------------------------------------- processes
def schedule_args(plan: Plan, cap: int) -> list[str]:
    """The ``avme train`` schedule options of a model with epoch cap ``cap``: a cosine schedule holds
    ``plan.lr`` and decays it over the last ``plan.lr_decay_fraction`` of the cap (at least one epoch)."""
    if plan.lr_schedule == "constant":
        return ["--lr-schedule", "constant"]
    decay = min(cap, max(1, round(cap * plan.lr_decay_fraction)))
    return ["--lr-schedule", plan.lr_schedule, "--lr-final", repr(plan.lr_final), "--lr-decay-epochs", str(decay),
            "--lr-hold-epochs", str(cap - decay)]


def train_command(name: str, run_dir: Path, plan: Plan, target: int, device: str) -> list[str]:
    """The ``avme train`` command line of one launch (always ``--resume``: a new run starts, an old one continues)."""
    return [
        sys.executable, "-m", "avme_ext", "train", "--out", str(run_dir), "--resume", "--epochs", str(target),
        "--seed", str(plan.seed), "--lr", repr(plan.lr), "--clip-grad", repr(plan.clip_grad),
        "--kl-warmup-steps", str(plan.kl_warmup_steps), "--batch-size", str(plan.batch_size),
        "--device", device, "--impl", plan.impl, "--no-progress", "--no-tensorboard",
        *schedule_args(plan, plan.epochs[name]), *MODELS[name].train_args(), *plan.train_extra,
    ]


class MetricsTail:
    """New complete lines of a growing ``metrics.jsonl``, from a byte offset on."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset = path, offset

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return [json.loads(line) for line in data[: end + 1].splitlines() if line.strip()]


@dataclass
class Launch:
    """One ``avme train`` process of this invocation."""

    name: str
    target: int
    epochs_from: int
    progress: RunProgress
    run_dir: Path | None = None
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    tail: MetricsTail | None = None
    started: float = 0.0
    started_at: str = ""
    ended: float = 0.0
    ended_at: str = ""
    stopped: str | None = None  # "patience" or "budget" when this script sent SIGTERM
    signalled_at: float | None = None
    epoch_seconds: list[tuple[int, float]] = field(default_factory=list)  # (concurrent runs, seconds)
    first_record_after: float | None = None
    last_record_time: float | None = None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode


def start_launch(launch: Launch, plan: Plan, device: str, threads: int, extra: tuple[str, ...] = (),
                 client_env: dict[str, str] | None = None) -> None:
    """Start ``avme train`` for ``launch`` in its ``run_dir``, appending its output to its ``log_path``
    (``client_env``: more environment variables, e.g. those of an MPS daemon)."""
    run_dir, log_path = launch.run_dir, launch.log_path
    assert run_dir is not None and log_path is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    state = read_trainer_state(run_dir)
    launch.tail = MetricsTail(run_dir / "metrics.jsonl", int(state.get("metrics_offset", 0)))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(client_env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    command = [*train_command(launch.name, run_dir, plan, launch.target, device), *extra]
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(command[1:]) + "\n").encode())
        log.flush()
        launch.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    launch.started, launch.started_at = time.monotonic(), now_iso()


def _observe(launch: Launch, live: int, patience: int) -> None:
    """Read new validation records: epoch times, the best so far; SIGTERM once patience is exhausted."""
    assert launch.tail is not None and launch.process is not None
    for record in launch.tail.read():
        if record.get("kind") != "valid":
            continue
        epoch, value = int(record["epoch"]), record.get("nelbo")
        launch.progress.valid[epoch] = float(value) if value is not None else math.nan
        launch.progress.epochs_done = max(launch.progress.epochs_done, epoch)
        elapsed = record.get("time")
        if launch.first_record_after is None:
            launch.first_record_after = time.monotonic() - launch.started
        elif elapsed is not None and launch.last_record_time is not None:
            launch.epoch_seconds.append((live, float(elapsed) - launch.last_record_time))
        launch.last_record_time = None if elapsed is None else float(elapsed)
    since = launch.progress.epochs_since_best()
    if since is not None and since >= patience and launch.stopped is None and launch.process.poll() is None:
        launch.stopped = "patience"
        launch.signalled_at = time.monotonic()
        launch.process.send_signal(signal.SIGTERM)


def run_pool(
    pending: list[Launch],
    slots: int,
    deadline: float,
    patience: int,
    start: Callable[[Launch], None],
    log: Log,
) -> list[Launch]:
    """Run the launches, ``slots`` at a time, until all have exited.

    At ``deadline`` (a ``time.monotonic()`` value) every running process gets SIGTERM and no new one
    starts; a process that has not exited ``STOP_GRACE_SECONDS`` after its SIGTERM is killed.
    """
    waiting, running, done = deque(pending), [], []
    try:
        while waiting or running:
            now = time.monotonic()
            while waiting and len(running) < slots and now < deadline:
                launch = waiting.popleft()
                start(launch)
                log(f"{launch.name}: training to epoch {launch.target} (from {launch.epochs_from})")
                running.append(launch)
            if now >= deadline and waiting:
                log(f"time budget spent: not starting {[launch.name for launch in waiting]}")
                waiting.clear()
            for launch in list(running):
                _observe(launch, len(running), patience)
                if launch.process.poll() is not None:
                    _observe(launch, len(running), patience)
                    launch.ended, launch.ended_at = time.monotonic(), now_iso()
                    running.remove(launch)
                    done.append(launch)
                elif now >= deadline and launch.stopped is None:
                    launch.stopped, launch.signalled_at = "budget", now
                    launch.process.send_signal(signal.SIGTERM)
                elif launch.signalled_at is not None and now - launch.signalled_at > STOP_GRACE_SECONDS:
                    log(f"{launch.name}: no exit {STOP_GRACE_SECONDS:.0f} s after SIGTERM; killing it")
                    launch.process.kill()
            if running:
                time.sleep(POLL_SECONDS)
    except BaseException:
        for launch in running:
            if launch.process.poll() is None:
                launch.process.send_signal(signal.SIGTERM)
        for launch in running:
            try:
                launch.process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                launch.process.kill()
        raise
    return done


# --------------------------------------------------------------------------- weights
def export_fp16(source: Path, destination: Path) -> Path:
    """``avme_ext.checkpoint.export_weights(source, destination, dtype=torch.float16)``.

    Raises:
        RuntimeError: the installed package has no ``export_weights`` yet.
    """
    import torch

    from avme_ext import checkpoint

    export = getattr(checkpoint, "export_weights", None)
    if export is None:
        raise RuntimeError("avme_ext.checkpoint.export_weights is missing: this version of the package cannot "
                           "write float16 weights files; update avme_ext")
    return Path(export(source, destination, dtype=torch.float16))


def _file_info(path: Path) -> dict[str, Any]:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def locate_best(layout: Layout, entry: dict[str, Any], name: str, progress: RunProgress) -> Path | None:
    """The file holding the best validation epoch's weights of an unfinished or just finished run."""
    best = progress.best
    run_dir = layout.run_dir(name)
    if best is None:
        return run_dir / "last.safetensors" if (run_dir / "last.safetensors").is_file() else None
    kept = entry.get("best_so_far") or {}
    if kept.get("epoch") == best[0] and not kept.get("at_resume_point") and layout.best_so_far(name).is_file():
        return layout.best_so_far(name)
    if best[0] == progress.epochs_done and progress.at_epoch_boundary and (run_dir / "last.safetensors").is_file():
        return run_dir / "last.safetensors"
    if (run_dir / "best.safetensors").is_file():
        return run_dir / "best.safetensors"
    return None


def keep_best_before_resuming(layout: Layout, manifest: Manifest, name: str) -> None:
    """The best weights were the resume point of the last call: write them out before training moves on."""
    entry = manifest.model(name)
    kept = entry.get("best_so_far") or {}
    last = layout.run_dir(name) / "last.safetensors"
    if kept.get("at_resume_point") and last.is_file():
        export_fp16(last, layout.best_so_far(name))
        entry["best_so_far"] = {**kept, "at_resume_point": False}
        manifest.save()


def record_boundary(layout: Layout, manifest: Manifest, name: str, progress: RunProgress, log: Log) -> None:
    """An unfinished run at the end of a call: make sure its best weights travel with it (or are its resume point)."""
    entry = manifest.model(name)
    best = progress.best
    if best is None:
        return
    if best[0] == progress.epochs_done and progress.at_epoch_boundary:
        entry["best_so_far"] = {"epoch": best[0], "valid_nelbo": best[1], "at_resume_point": True}
        layout.best_so_far(name).unlink(missing_ok=True)
        return
    source = locate_best(layout, entry, name, progress)
    if source is None:
        log(f"{name}: the weights of the best validation epoch {best[0]} are not at hand")
        entry["best_so_far"] = {"epoch": best[0], "valid_nelbo": best[1], "lost": True}
        return
    if source != layout.best_so_far(name):
        export_fp16(source, layout.best_so_far(name))
    entry["best_so_far"] = {"epoch": best[0], "valid_nelbo": best[1], "at_resume_point": False}


def finish_model(layout: Layout, manifest: Manifest, name: str, progress: RunProgress, reason: str, log: Log) -> None:
    """Select the best validation epoch, export it in float16, keep the metrics, drop the optimizer state."""
    entry = manifest.model(name)
    run_dir = layout.run_dir(name)
    source = locate_best(layout, entry, name, progress)
    best = progress.best
    if source is None:
        fallback = layout.best_so_far(name) if layout.best_so_far(name).is_file() else run_dir / "last.safetensors"
        log(f"{name}: the best validation epoch's weights are not at hand; using {fallback.name}")
        source, entry["selection_note"] = fallback, f"best epoch {best[0] if best else None} not at hand; used {fallback.name}"
    weights = layout.weights(name)
    if source == layout.best_so_far(name):
        os.replace(source, weights)
    else:
        export_fp16(source, weights)
    shutil.copyfile(run_dir / "metrics.jsonl", layout.metrics(name))
    if (run_dir / "config.json").is_file():
        shutil.copyfile(run_dir / "config.json", layout.train_config(name))
    shutil.rmtree(run_dir)
    layout.best_so_far(name).unlink(missing_ok=True)
    entry.update({
        "status": "trained", "stop_reason": reason, "epochs_done": progress.epochs_done,
        "best_epoch": best[0] if best else None, "best_valid_nelbo": best[1] if best else None,
        "weights": _file_info(weights), "trained_at": now_iso(),
    })
    entry.pop("best_so_far", None)
    log(f"{name}: trained ({reason}): {progress.epochs_done} epochs, best validation -ELBO "
        f"{best[1] if best else float('nan'):.3f} at epoch {best[0] if best else '-'}; weights {weights}")


# --------------------------------------------------------------------------- the stage
def measured_rates(launches: list[Launch], scale: float = 1.0) -> tuple[dict[str, float], float | None]:
    """(median seconds per epoch by number of concurrent runs, times ``scale``; start-up seconds) of finished launches."""
    samples: dict[int, list[float]] = {}
    startups: list[float] = []
    for launch in launches:
        for live, seconds in launch.epoch_seconds:
            samples.setdefault(live, []).append(seconds)
        if launch.first_record_after is not None and launch.epoch_seconds:
            median = sorted(s for _, s in launch.epoch_seconds)[len(launch.epoch_seconds) // 2]
            startups.append(max(0.0, launch.first_record_after - median))
    per_epoch = {str(live): sorted(values)[len(values) // 2] * scale for live, values in samples.items()}
    return per_epoch, (max(startups) if startups else None)


def _update_rates(manifest: Manifest, device_name: str, launches: list[Launch]) -> None:
    rates = manifest.rates(device_name)
    per_epoch, startup = measured_rates(launches)
    rates["train_epoch"].update(per_epoch)
    if startup is not None:
        rates["train_startup"] = startup


#: Calibration runs: the paper's model on a subset, 3 epochs, in a temporary folder (thrown away).
CALIBRATION_TRAIN_IMAGES, CALIBRATION_VALID_IMAGES, CALIBRATION_EPOCHS = 5000, 1000, 3


def calibrate(manifest: Manifest, *, device: str, device_name: str, jobs: int, deadline: float, log: Log,
              client_env: dict[str, str] | None = None) -> None:
    """Measure the seconds per epoch of 1 and of ``jobs`` runs side by side on this device (about a minute
    on a GPU) with throw-away runs on 1/10 of the data, scaled by 10; kept in the manifest's rates."""
    import tempfile

    plan = manifest.plan
    scale = 50_000 / CALIBRATION_TRAIN_IMAGES
    extra = ("--train-subset", str(CALIBRATION_TRAIN_IMAGES), "--valid-subset", str(CALIBRATION_VALID_IMAGES))
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    rates = manifest.rates(device_name)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="avme-calibration-") as folder:
        for count in sorted({1, jobs}):
            names = [plan.models[i % len(plan.models)] for i in range(count)]
            launches = [Launch(name, CALIBRATION_EPOCHS, 0, RunProgress(), Path(folder) / f"{count}-{index}",
                               Path(folder) / f"{count}-{index}.log") for index, name in enumerate(names)]
            done = run_pool(launches, count, deadline, 10**6,
                            lambda launch: start_launch(launch, plan, device, threads, extra, client_env),
                            lambda message: None)
            if len(done) < count or any(launch.returncode != 0 for launch in done):
                log(f"calibration with {count} run(s) did not finish; planning with the default rates")
                rates["calibration_failed_at"] = now_iso()
                manifest.save()
                return
            per_epoch, startup = measured_rates(done, scale)
            if str(count) in per_epoch:
                rates["train_epoch"][str(count)] = per_epoch[str(count)]
            if startup is not None:
                rates["train_startup"] = max(startup, rates.get("train_startup") or 0.0)
    rates["calibrated_at"] = now_iso()
    manifest.save()
    log(f"calibrated in {time.monotonic() - start:.0f} s: seconds per epoch by runs side by side "
        f"{rates['train_epoch']}, start-up {rates['train_startup']:.0f} s")


def _queue(layout: Layout, manifest: Manifest) -> list[QueueItem]:
    queue = []
    for name in manifest.untrained():
        progress = read_progress(layout.run_dir(name))
        queue.append(QueueItem(name, progress.epochs_done, manifest.model(name)["epochs_target"]))
    # a run that carries over is continued first: at most one unfinished run may travel
    return sorted(queue, key=lambda q: 0 if manifest.model(q.name)["status"] == "training" else 1)


def train_stage(
    layout: Layout,
    manifest: Manifest,
    *,
    device: str,
    device_name: str,
    jobs: int,
    deadline: float,
    call: int,
    epochs_per_call: int | None,
    log: Log,
    client_env: dict[str, str] | None = None,
) -> bool:
    """Train what fits before ``deadline`` (``math.inf``: everything); returns True when every model is trained.

    ``client_env`` goes to every ``avme train`` process (an MPS daemon's variables, see reproduce_mps).
    """
    plan = manifest.plan
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    finished_here = 0
    failures: list[str] = []
    stored = manifest.rates(device_name)
    if (device.startswith("cuda") and not stored["train_epoch"] and "calibration_failed_at" not in stored
            and manifest.untrained() and not math.isinf(deadline)
            and epochs_per_call is None and deadline - time.monotonic() > 300
            and not {"--train-subset", "--valid-subset"} & set(plan.train_extra)):
        calibrate(manifest, device=device, device_name=device_name, jobs=jobs, deadline=deadline, log=log,
                  client_env=client_env)
    while True:
        for name in manifest.untrained():  # runs that already meet their stopping rule
            progress = read_progress(layout.run_dir(name))
            reason = stop_reason(progress, manifest.model(name)["epochs_target"], plan.patience)
            if reason is not None and progress.epochs_done > 0:
                finish_model(layout, manifest, name, progress, reason, log)
                finished_here += 1
        manifest.save()
        queue = _queue(layout, manifest)
        stored = manifest.rates(device_name)
        rates = RateModel(stored["train_epoch"], stored["train_startup"])
        seconds_left = deadline - time.monotonic()
        # what comes back from a call holds one unfinished run's state and at most one finished model
        choice = plan_launch(queue, jobs, seconds_left, rates, allow_carry_over=finished_here <= 1,
                             epochs_per_call=epochs_per_call)
        if choice is None:
            if queue:
                log(f"not enough time left ({seconds_left:.0f} s) to train any of {[q.name for q in queue]} "
                    f"to its cap at {rates.seconds_per_epoch(1):.1f} s per epoch"
                    f"{'' if rates.measured else ' (estimate)'}; run again to continue")
            break
        launches = []
        for name, target in choice.targets.items():
            keep_best_before_resuming(layout, manifest, name)
            progress = read_progress(layout.run_dir(name))
            log_path = layout.model_dir(name) / "logs" / f"train-call{call:03d}.log"
            launches.append(Launch(name, target, progress.epochs_done, progress, layout.run_dir(name), log_path))
        slots = min(jobs, len(launches))
        done = run_pool(launches, slots, deadline, plan.patience,
                        lambda launch: start_launch(launch, plan, device, threads, client_env=client_env), log)
        _update_rates(manifest, device_name, done)
        stopped_by_budget = False
        for launch in done:
            entry = manifest.model(launch.name)
            progress = read_progress(layout.run_dir(launch.name))
            code = launch.returncode
            expected = code == 0 or (launch.stopped is not None and code in (128 + signal.SIGTERM, -signal.SIGTERM))
            entry["launches"].append({
                "call": call, "epochs_from": launch.epochs_from, "epochs_to": progress.epochs_done,
                "target": launch.target, "started_at": launch.started_at, "ended_at": launch.ended_at,
                "seconds": round(launch.ended - launch.started, 3), "concurrent": slots, "exit_code": code,
                "stopped": launch.stopped or ("target" if code == 0 else "error"),
            })
            entry["train_seconds"] = round(entry["train_seconds"] + launch.ended - launch.started, 3)
            entry["epochs_done"] = progress.epochs_done
            best = progress.best
            entry["best_epoch"], entry["best_valid_nelbo"] = (best[0], best[1]) if best else (None, None)
            if not expected:
                failures.append(f"{launch.name}: avme train exited with {code} (log: "
                                f"{layout.model_dir(launch.name) / 'logs'})")
                continue
            stopped_by_budget |= launch.stopped == "budget"
            reason = stop_reason(progress, entry["epochs_target"], plan.patience)
            if launch.stopped == "patience" and reason is None:
                reason = "patience"
            if reason is not None:
                finish_model(layout, manifest, launch.name, progress, reason, log)
                finished_here += 1
            else:
                entry["status"] = "training"
                record_boundary(layout, manifest, launch.name, progress, log)
        manifest.save()
        if failures:
            raise RuntimeError("; ".join(failures))
        if stopped_by_budget or epochs_per_call is not None or math.isinf(deadline):
            break
    return manifest.all_trained()

