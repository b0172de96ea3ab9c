"""The run directory (``--out DIR``): deciding how to use it, its ``config.json``, stale temporary files.

Everything here runs on rank 0 only; other ranks learn the outcome by a broadcast.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoint import atomic_write_bytes
from ..config import AVMEConfig
from ..distributed import DistInfo
from .config import TrainConfig
from .errors import RunDirError, TrainError

__all__ = [
    "RUN_FILES",
    "RunDirPlan",
    "plan_run_dir",
    "clear_run_files",
    "reserve_default_out_dir",
    "remove_stale_temp_files",
    "write_run_config",
    "read_run_config",
    "check_run_config",
]

#: Files (and the tensorboard folder) that make a directory a run directory.
RUN_FILES = ("config.json", "metrics.jsonl", "last.safetensors", "last.json", "best.safetensors", "best.json",
             "tensorboard")


def _run_files_in(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


@dataclass(frozen=True)
class RunDirPlan:
    """How a launch uses its run directory (decided before anything is written).

    Attributes:
        resume_from: the checkpoint to continue, or None for a new run.
        notice: a message to print (None: nothing to say).
        replaced: run files of a previous run that ``--overwrite`` replaces (removed by
            :func:`clear_run_files` once the new run has everything it needs to start).
    """

    resume_from: Path | None = None
    notice: str | None = None
    replaced: tuple[str, ...] = ()


def plan_run_dir(out: Path, *, resume: bool, overwrite: bool) -> RunDirPlan:
    """Decide how to use ``out``; reads only.

    Raises:
        RunDirError: ``out`` is a file, or it holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory")
    last = out / "last.safetensors"
    if resume:
        if overwrite:
            raise RunDirError("--resume and --overwrite contradict each other; choose one")
        if last.is_file():
            return RunDirPlan(resume_from=last)
        return RunDirPlan(notice=f"--resume: no checkpoint {last} yet; starting a new run there "
                                 "(normal for the first launch of an elastic torchrun job)")
    existing = _run_files_in(out) if out.is_dir() else []
    if existing and not overwrite:
        raise RunDirError(
            f"--out {out} already holds a run ({', '.join(existing)}); refusing to overwrite it. Pass --resume to "
            "continue it, --overwrite to replace it, or choose another --out."
        )
    return RunDirPlan(replaced=tuple(existing))


def clear_run_files(out: Path, names: tuple[str, ...]) -> str | None:
    """Remove the run files ``names`` of ``out`` (``--overwrite``; nothing else is touched).

    Returns:
        a notice naming what was removed, or None when there was nothing.
    """
    if not names:
        return None
    for name in names:
        path = out / name
        if path.is_dir():
            for child in sorted(path.rglob("*"), reverse=True):
                child.rmdir() if child.is_dir() else child.unlink()
            path.rmdir()
        elif path.exists():
            path.unlink()
    return f"--overwrite: removed the previous run's files in {out} ({', '.join(names)})"


def reserve_default_out_dir(name: str | None, parent: Path = Path("runs")) -> Path:
    """Create and return the default run directory: ``runs/<name>``, or ``runs/<YYYYmmdd-HHMMSS>``.

    A timestamped directory is created exclusively (``-2``, ``-3``, ... appended when it exists), so
    several ``avme train`` processes started in the same second each get their own directory.
    ``runs/<name>`` is the user's choice and is only returned (an existing run there is refused later).
    """
    if name:
        return parent / name
    stem = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RunDirError(f"cannot create a new run directory {parent / stem}-N; pass --out DIR")


def remove_stale_temp_files(out: Path) -> None:
    """Delete temporary files left by a write that was killed before its atomic rename."""
    for name in RUN_FILES:
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def write_run_config(out: Path, cfg: TrainConfig, model_cfg: AVMEConfig, info: DistInfo,
                     data: dict[str, Any] | None = None) -> None:
    """Write ``out/config.json`` atomically: model config, training options, the data's record (pixels,
    image shape, splits and their rule, see :meth:`avme_ext.data.DataSource.record`), world size, versions."""
    document = {
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "data": data or {},
        "world_size": info.world_size,
        "avme_version": __version__,
        "torch_version": torch.__version__,
    }
    data = (json.dumps(document, indent=2) + "\n").encode()
    atomic_write_bytes(out / "config.json", lambda tmp: Path(tmp).write_bytes(data))


def read_run_config(out: Path) -> tuple[dict[str, Any], AVMEConfig] | None:
    """The training arguments and model config in ``out/config.json``, or None when there is none."""
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
        return dict(document["train"]), AVMEConfig.from_dict(document["model"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainError(f"{path} is not a readable run config ({error}); move it away or fix it") from None


def check_run_config(out: Path, checkpoint_cfg: AVMEConfig, checkpoint: Path) -> None:
    """Refuse a run directory whose config.json describes another model than its checkpoint."""
    saved = read_run_config(out)
    if saved is not None and saved[1] != checkpoint_cfg:
        raise TrainError(f"{out / 'config.json'} describes {saved[1]} but {checkpoint} holds {checkpoint_cfg}; "
                         "the run directory mixes two runs")
