"""The state of the paper reproduction: the models, the plan, the directory layout and the manifest.

Everything the reproduction keeps between invocations lives under one directory (``--out``,
default ``.carry/repro``, ignored by git) so that it can travel to a machine with a GPU and back:

    manifest.json                          the plan, what is done, timings, devices, commits
    <model>/train/                         the ``avme train`` run directory while the model trains:
                                           config.json, metrics.jsonl, last.safetensors (weights,
                                           Adam state, counters: the exact resume point), last.json
    <model>/train-best.fp16.safetensors    the best validation weights so far of an unfinished run,
                                           when they are not its resume point
    <model>/weights.fp16.safetensors       the selected (best validation) weights of a trained model
    <model>/metrics.jsonl, <model>/train-config.json
                                           the finished run's metrics and options (figures, provenance)
    <model>/eval/<pass>/chunk-NNNNN.safetensors
                                           per-chunk results on the test split (resume per chunk)

A finished model keeps only its float16 weights (about 10 MB at the paper's sizes); the optimizer
state (about 57 MiB per model in float32) exists only while a run is unfinished.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avme_ext.checkpoint import atomic_write_bytes
from avme_ext.training.config import LR_SCHEDULES

REPO = Path(__file__).resolve().parents[1]

MANIFEST_FORMAT = "avme-reproduction-manifest"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """One model of the reproduction (binarized MNIST, the paper's sizes unless ``train_extra`` says otherwise)."""

    name: str
    conditional: bool
    encoder_input: str

    def train_args(self) -> list[str]:
        """The ``avme train`` options that define this model."""
        return ["--num-classes", "10" if self.conditional else "0", "--encoder-input", self.encoder_input]


#: The four models, in order of priority (the unconditional canvas model is the paper's headline).
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("avme-canvas", False, "canvas"),
        ModelSpec("avme-canvas-conditional", True, "canvas"),
        ModelSpec("avme-error", False, "error"),
        ModelSpec("avme-error-conditional", True, "error"),
    )
}

#: Epoch caps of the plan (see docs/reproduction.md): the headline model gets more.
DEFAULT_EPOCHS = {"avme-canvas": 150, "avme-canvas-conditional": 100, "avme-error": 100, "avme-error-conditional": 100}


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """What the reproduction does; fixed when the manifest is created (a later invocation may not change it).

    Attributes:
        models: model names in order of priority.
        epochs: the epoch cap of every model.
        patience: stop a model after this many epochs without a better validation bound.
        lr, clip_grad, kl_warmup_steps, batch_size, seed, impl: ``avme train`` options.
        lr_schedule, lr_final, lr_decay_fraction: ``avme train --lr-schedule``; a cosine schedule
            holds ``lr`` and then decays it to ``lr_final`` over the last ``lr_decay_fraction`` of
            each model's epoch cap (see :func:`reproduce_train.schedule_args`).
        train_extra: more ``avme train`` options (e.g. tiny sizes for a smoke run).
        samples: IWAE trajectories per test image (-log p(x), and -log p(x|y) of conditional models).
        marginal_samples: IWAE trajectories per class for -log p(x) of conditional models (0: skip).
        eval_batch_size: images per evaluation chunk (the unit of seeding and of resuming).
        max_rows: trajectories evaluated at once.
        num_images: evaluate a seeded random subset of the test split (0: all 10,000 images).
    """

    models: tuple[str, ...] = tuple(MODELS)
    epochs: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_EPOCHS))
    patience: int = 10
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_final: float = 0.0
    lr_decay_fraction: float = 1 / 3
    clip_grad: float = 10.0
    kl_warmup_steps: int = 0
    batch_size: int = 100
    seed: int = 0
    impl: str = "ref"
    train_extra: tuple[str, ...] = ()
    samples: int = 5000
    marginal_samples: int = 500
    eval_batch_size: int = 100
    max_rows: int = 20000
    num_images: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise ValueError(f"models must be a non-empty subset of {list(MODELS)}, got {list(self.models)}")
        for name in self.models:
            if not isinstance(self.epochs.get(name), int) or self.epochs[name] < 1:
                raise ValueError(f"epochs of {name} must be an integer >= 1, got {self.epochs.get(name)!r}")
        for name in ("patience", "batch_size", "samples", "eval_batch_size", "max_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("kl_warmup_steps", "seed", "marginal_samples", "num_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.lr_final <= self.lr:
            raise ValueError(f"lr_final must be in [0, lr={self.lr:g}], got {self.lr_final!r}")
        if not 0 < self.lr_decay_fraction <= 1:
            raise ValueError(f"lr_decay_fraction must be in (0, 1], got {self.lr_decay_fraction!r}")

    @property
    def specs(self) -> list[ModelSpec]:
        return [MODELS[name] for name in self.models]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"], data["train_extra"] = list(self.models), list(self.train_extra)
        data["epochs"] = {name: self.epochs[name] for name in self.models}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        data["models"] = tuple(data["models"])
        data["train_extra"] = tuple(data.get("train_extra", ()))
        data.setdefault("lr_schedule", "constant")  # manifests made before the schedule was an option
        data.setdefault("lr_final", 0.0)
        data.setdefault("lr_decay_fraction", 1.0)
        return cls(**data)


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Paths of the reproduction state under ``root``."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def run_dir(self, name: str) -> Path:
        """The ``avme train`` run directory (exists only while the model trains)."""
        return self.root / name / "train"

    def best_so_far(self, name: str) -> Path:
        return self.root / name / "train-best.fp16.safetensors"

    def weights(self, name: str) -> Path:
        return self.root / name / "weights.fp16.safetensors"

    def metrics(self, name: str) -> Path:
        return self.root / name / "metrics.jsonl"

    def train_config(self, name: str) -> Path:
        return self.root / name / "train-config.json"

    def eval_dir(self, name: str, pass_name: str) -> Path:
        return self.root / name / "eval" / pass_name

    def chunk(self, name: str, pass_name: str, index: int) -> Path:
        return self.eval_dir(name, pass_name) / f"chunk-{index:05d}.safetensors"

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()


# --------------------------------------------------------------------------- files
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, with the package's one atomic writer."""
    atomic_write_bytes(path, text.encode("utf-8"))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------- provenance
def device_description(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def source_commit() -> dict[str, Any]:
    """The commit of the code that runs: ``AVME_COMMIT`` when set (the GPU machine has no git
    metadata), else ``git rev-parse HEAD`` and whether the working tree differs from it."""
    given = os.environ.get("AVME_COMMIT")
    if given:
        return {"commit": given, "source": "AVME_COMMIT"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=True).stdout
        return {"commit": commit, "modified": bool(status.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "source": "none"}


def provenance(device: str) -> dict[str, Any]:
    import torch

    return {
        "device": device,
        "device_name": device_description(device),
        "host": socket.gethostname(),
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        **source_commit(),
    }


# --------------------------------------------------------------------------- manifest
class ManifestError(RuntimeError):
    """The state directory does not hold the manifest this command needs, or holds another plan."""


class Manifest:
    """``manifest.json``: the plan, each model's state, evaluation progress, measured rates and the calls.

    Keys of :attr:`data`:
        ``plan``: :meth:`Plan.to_dict`.
        ``models``: per model ``{"status": "pending" | "training" | "trained", "epochs_done",
        "epochs_target", "best_epoch", "best_valid_nelbo", "stop_reason", "train_seconds",
        "launches": [...], "weights": {...}, "best_so_far": {...}}``.
        ``evaluation``: per model and pass ``{"samples", "marginal", "num_chunks", "chunks_done", "seconds",
        "devices"}``.
        ``rates``: per device name, measured seconds (``train_epoch`` by number of concurrent runs,
        ``train_startup``, ``eval_chunk`` by pass).
        ``stages``: ``train``, ``eval``, ``figures``, ``report``, ``publish``: ``{"done", "finished_at",
        "seconds"}``.
        ``calls``: one record per invocation that changed the state (what it did, how long, where, which commit).
    """

    def __init__(self, layout: Layout, data: dict[str, Any]) -> None:
        self.layout = layout
        self.data = data

    # ----------------------------------------------------------------- files
    @classmethod
    def exists(cls, layout: Layout) -> bool:
        return layout.manifest.is_file()

    @classmethod
    def create(cls, layout: Layout, plan: Plan) -> Manifest:
        data = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "created_at": now_iso(),
            "plan": plan.to_dict(),
            "models": {
                name: {"status": "pending", "epochs_done": 0, "epochs_target": plan.epochs[name], "best_epoch": None,
                       "best_valid_nelbo": None, "stop_reason": None, "train_seconds": 0.0, "launches": []}
                for name in plan.models
            },
            "evaluation": {},
            "rates": {},
            "stages": {},
            "calls": [],
        }
        manifest = cls(layout, data)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, layout: Layout) -> Manifest:
        path = layout.manifest
        if not path.is_file():
            raise ManifestError(f"{path} does not exist: no reproduction state here (start one with --init)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ManifestError(f"{path}: unreadable manifest ({error})") from None
        if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"{path}: not a version {MANIFEST_VERSION} {MANIFEST_FORMAT}")
        return cls(layout, data)

    def save(self) -> None:
        atomic_write_text(self.layout.manifest, json.dumps(self.data, indent=2, sort_keys=False) + "\n")

    # ----------------------------------------------------------------- views
    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self.data["plan"])

    def model(self, name: str) -> dict[str, Any]:
        return self.data["models"][name]

    def untrained(self) -> list[str]:
        """Models whose training is not finished, in order of priority."""
        return [name for name in self.plan.models if self.model(name)["status"] != "trained"]

    def all_trained(self) -> bool:
        return not self.untrained()

    def eval_entry(self, name: str, pass_name: str) -> dict[str, Any]:
        return self.data["evaluation"].setdefault(name, {}).setdefault(pass_name, {})

    def rates(self, device_name: str) -> dict[str, Any]:
        return self.data["rates"].setdefault(device_name, {"train_epoch": {}, "train_startup": None, "eval_chunk": {}})

    def mark_stage(self, stage: str, done: bool, seconds: float | None = None, **extra: Any) -> None:
        entry = self.data["stages"].setdefault(stage, {"done": False, "seconds": 0.0})
        entry["done"] = done
        if seconds is not None:
            entry["seconds"] = entry.get("seconds", 0.0) + seconds
        if done:
            entry["finished_at"] = now_iso()
        entry.update(extra)

    def stage_done(self, stage: str) -> bool:
        return bool(self.data["stages"].get(stage, {}).get("done"))

    def begin_call(self, what: str, info: dict[str, Any], argv: Iterable[str]) -> dict[str, Any]:
        record = {"number": len(self.data["calls"]) + 1, "stage": what, "started_at": now_iso(),
                  "argv": list(argv), **info, "work": [], "seconds": None, "outcome": None}
        self.data["calls"].append(record)
        self.save()
        return record
