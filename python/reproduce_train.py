"""Training stage of the reproduction: one ``avme train`` process per model, side by side on one device.

* Each process runs ``avme train --resume`` in ``<model>/train`` with the plan's options: a new run
  starts, an interrupted one continues exactly from its last checkpoint. ``--patience`` ends a run
  after that many epochs without a better validation negative ELBO; the epoch cap ends the others.
* A finished run's best validation epoch (``best.safetensors``) is exported to float16 weights
  (``avme_ext.checkpoint.export_weights``, as ``avme export`` does) and ``training.json`` is
  written last: only then is the model trained.
* The processes run in sessions of their own, so a Ctrl-C or a scheduler's SIGTERM reaches this
  command alone; it then passes one SIGINT to every process (each saves a checkpoint at its next
  step and exits) and waits for them. Each process also gets SIGINT if this command dies without
  a chance to pass it on (SIGKILL; Linux), and inherits the directory's lock, so a rerun waits until
  every process of the previous run has saved its checkpoint and exited.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reproduce_plan import REPO, TRAINING_FORMAT, Layout, Plan, read_json, write_json

POLL_SECONDS = 0.5
#: Seconds the processes get to save their checkpoints after SIGINT before they are killed.
STOP_GRACE_SECONDS = 120.0
#: Runs the child: it asks the kernel for SIGINT when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``),
#: then becomes ``python -m avme_ext`` with the remaining arguments.
CHILD_BOOT = (
    "import ctypes, os, runpy, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGINT)\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(130)\n"
    "sys.argv = ['avme'] + sys.argv[2:]\n"
    "runpy.run_module('avme_ext', run_name='__main__', alter_sys=True)\n"
)

Log = Callable[[str], None]


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop, keeping what is saved; a rerun continues."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# --------------------------------------------------------------------------- where a run stands
@dataclass
class RunStatus:
    """A run's progress from its ``metrics.jsonl``.

    Attributes:
        epochs: finished epochs (validated).
        best: (epoch, validation negative ELBO) of the best epoch so far, or None.
        seconds_per_epoch: measured wall time of an epoch with its validation, or None.
    """

    epochs: int = 0
    best: tuple[int, float] | None = None
    seconds_per_epoch: float | None = None


def read_run_status(metrics: Path) -> RunStatus:
    """Read the validation records of a ``metrics.jsonl`` (a torn last line is ignored)."""
    valid: list[dict[str, Any]] = []
    try:
        lines = Path(metrics).read_text(encoding="utf-8").splitlines()
    except OSError:
        return RunStatus()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") == "valid":
            valid.append(record)
    if not valid:
        return RunStatus()
    finite = [(r["nelbo"], r["epoch"]) for r in valid if isinstance(r.get("nelbo"), float) and math.isfinite(r["nelbo"])]
    best = (min(finite)[1], min(finite)[0]) if finite else None
    first, last = valid[0], valid[-1]
    if last["epoch"] > first["epoch"]:
        seconds = (last["time"] - first["time"]) / (last["epoch"] - first["epoch"])
    else:
        seconds = last["time"] / last["epoch"]
    return RunStatus(int(last["epoch"]), best, seconds if seconds > 0 else None)


def trained_summary(layout: Layout, plan: Plan, name: str) -> dict[str, Any] | None:
    """``training.json`` of a model when it is trained with the plan's options and its weights file
    is the one it names; else None."""
    summary = read_json(layout.training(name))
    if not isinstance(summary, dict) or summary.get("format") != TRAINING_FORMAT:
        return None
    weights = layout.weights(name)
    if summary.get("train_args") != plan.train_args(name) or not weights.is_file():
        return None
    return summary if weights.stat().st_size == summary["weights"]["bytes"] else None


# --------------------------------------------------------------------------- a finished run
def checkpoint_state(layout: Layout, name: str) -> dict[str, Any] | None:
    """The trainer counters of a run's last checkpoint (None without one)."""
    from avme_ext.checkpoint import load_checkpoint

    last = layout.run_dir(name) / "last.safetensors"
    return load_checkpoint(last).trainer_state.get("state", {}) if last.is_file() else None


def stop_reason(plan: Plan, name: str, state: dict[str, Any]) -> str | None:
    """Why a run with these counters (a checkpoint's) is finished: its epoch cap, or ``--patience``; else None."""
    from avme_ext.training import TrainState

    counters = TrainState.from_dict(state)
    if counters.epoch >= plan.epochs[name]:
        return "epoch cap"
    if counters.patience_spent(plan.patience):
        return f"patience ({plan.patience} epochs without a better bound)"
    return None


def finish_model(layout: Layout, plan: Plan, name: str, device: str) -> dict[str, Any] | None:
    """When the run of ``name`` is finished: export its best validation epoch's weights to float16, keep its
    curve, and write ``training.json``; returns that summary (None: the run is not finished)."""
    from avme_ext.checkpoint import atomic_write_bytes, export_weights, sha256_of

    state = checkpoint_state(layout, name)
    reason = None if state is None else stop_reason(plan, name, state)
    if state is None or reason is None:
        return None
    run_dir = layout.run_dir(name)
    source = run_dir / "best.safetensors"
    if not source.is_file():  # no finite validation bound: the last weights
        source = run_dir / "last.safetensors"
    weights = export_weights(source, layout.weights(name), dtype="float16")
    atomic_write_bytes(layout.metrics(name), (run_dir / "metrics.jsonl").read_bytes())
    history = state.get("history", [])
    summary = {
        "format": TRAINING_FORMAT,
        "name": name,
        "train_args": plan.train_args(name),
        "epochs": int(state["epoch"]),
        "epoch_cap": plan.epochs[name],
        "stop_reason": reason,
        "best_epoch": state.get("best_epoch"),
        "best_valid_nelbo": state.get("best_nelbo"),
        "selection": "best validation negative ELBO (validation split only)",
        "seconds": round(float(state.get("elapsed", 0.0)), 1),
        "seconds_per_epoch": round(sum(h["seconds"] + h["valid_seconds"] for h in history) / len(history), 3)
        if history else None,
        "device": device,
        "weights": {"file": weights.name, "bytes": weights.stat().st_size, "sha256": sha256_of(weights),
                    "dtype": "float16"},
    }
    write_json(layout.training(name), summary)
    return summary


def _finished_line(name: str, summary: dict[str, Any]) -> str:
    best = summary["best_valid_nelbo"]
    return (f"{name}: trained, {summary['epochs']} epochs ({summary['stop_reason']}), best validation -ELBO "
            f"{'n/a' if best is None else f'{best:.3f}'} at epoch {summary['best_epoch']}")


# --------------------------------------------------------------------------- the processes
@dataclass
class Child:
    """The ``avme train`` process of one model."""

    name: str
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


def start_child(layout: Layout, plan: Plan, name: str, *, device: str, threads: int, lock_fd: int | None,
                client_env: dict[str, str] | None = None) -> Child:
    """Start ``avme train --resume`` for ``name`` (its output appended to ``<model>/train.log``)."""
    command = [sys.executable, "-c", CHILD_BOOT, str(os.getpid()), "train", "--out", str(layout.run_dir(name)),
               "--resume", *plan.train_args(name), "--device", device, "--no-progress", "--no-tensorboard"]
    env = {**os.environ, **(client_env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    log_path = layout.train_log(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ avme " + " ".join(command[4:]) + "\n").encode())
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, pass_fds=() if lock_fd is None else (lock_fd,))
    return Child(name, process)


def stop_children(children: list[Child], log: Log) -> None:
    """SIGINT to every live process (each saves a checkpoint and exits), then wait; kill the late ones."""
    live = [c for c in children if c.process.poll() is None]
    for child in live:
        child.process.send_signal(signal.SIGINT)
    if live:
        log(f"saving the checkpoints of {', '.join(c.name for c in live)}")
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in live:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"{child.name}: no exit {STOP_GRACE_SECONDS:.0f} s after SIGINT; killing it (it resumes from its "
                "last checkpoint)")
            child.process.kill()
            child.process.wait()


def train_models(layout: Layout, plan: Plan, names: list[str], *, device: str, device_label: str, jobs: int,
                 lock_fd: int | None, client_env: dict[str, str] | None, log: Log,
                 report: Callable[[dict[str, Any]], None]) -> list[str]:
    """Train ``names`` (``jobs`` at a time) until each is trained; returns the failures (one line each).

    ``report`` is called about every :data:`POLL_SECONDS` with the children's names (``"running"``), the
    models not started yet (``"waiting"``) and those finished in this call (``"finished"``).

    Raises:
        Interrupted: SIGINT or SIGTERM (here, or a process stopped by a signal): the processes
            saved their checkpoints.
    """
    waiting: list[str] = []
    running: list[Child] = []
    failures: list[str] = []
    finished: list[str] = []
    for name in names:  # runs that finished before an interruption need no process
        summary = finish_model(layout, plan, name, device_label)
        if summary is None:
            waiting.append(name)
        else:
            finished.append(name)
            log(_finished_line(name, summary))
    threads = max(1, (os.cpu_count() or 1) // max(1, min(jobs, len(names))))
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                name = waiting.pop(0)
                running.append(start_child(layout, plan, name, device=device, threads=threads, lock_fd=lock_fd,
                                           client_env=client_env))
                log(f"{name}: training (avme train, log {layout.train_log(name)})")
            time.sleep(POLL_SECONDS)
            for child in [c for c in running if c.process.poll() is not None]:
                running.remove(child)
                code = child.process.returncode
                summary = finish_model(layout, plan, child.name, device_label) if code == 0 else None
                if summary is not None:
                    finished.append(child.name)
                    log(_finished_line(child.name, summary))
                elif code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
                    raise Interrupted(code - 128 if code > 0 else -code)
                else:  # an error, or (exit 0) a run short of its cap and of its patience
                    tail = layout.train_log(child.name).read_text(errors="replace").strip().splitlines()[-3:]
                    failures.append(f"{child.name}: avme train exited with {code}: {' / '.join(tail)}")
                    log(failures[-1])
            report({"running": [c.name for c in running], "waiting": waiting, "finished": finished})
    except BaseException:
        stop_children(running, log)
        raise
    return failures
