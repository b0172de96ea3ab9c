"""The reproduction's plan (four models, how each is trained, how the test split is evaluated) and
the files of a reproduction directory, shared by the stages of ``python/reproduce_paper.py``.

Files under ``--out DIR`` (each written atomically; a stage is done when its outputs exist and are
valid, so a rerun skips it)::

    plan.json                        the plan, fixed by the first run (--smoke and --impl)
    reproduce.log                    everything the command printed, over every run
    progress.json                    the stage, each model's progress, the measured rates, the time left
    <model>/train/                   the ``avme train`` run directory: its checkpoints are the exact
                                     resume point of an unfinished model
    <model>/train.log                the output of ``avme train``
    <model>/weights.fp16.safetensors the selected weights (best validation epoch), float16
    <model>/metrics.jsonl            the training curve
    <model>/training.json            the training summary, written last: the model is trained when it
                                     is valid (its options are the plan's, its weights file matches)
    <model>/eval/<pass>/chunk-NNNNN.safetensors
                                     the test results of one chunk of images (a pass is done when
                                     every chunk is)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PLAN_FORMAT = "avme-reproduction-plan"
TRAINING_FORMAT = "avme-reproduction-training"


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """One model of the reproduction: binarized MNIST, unconditional or class-conditional, and what
    the encoder reads besides x (the paper's ``canvas`` or DRAW's ``error`` image)."""

    name: str
    conditional: bool
    encoder_input: str

    @property
    def num_classes(self) -> int:
        return 10 if self.conditional else 0


#: The four models; the unconditional canvas model is the paper's headline.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("avme-canvas", False, "canvas"),
        ModelSpec("avme-canvas-conditional", True, "canvas"),
        ModelSpec("avme-error", False, "error"),
        ModelSpec("avme-error-conditional", True, "error"),
    )
}


@dataclass(frozen=True)
class EvalPass:
    """One evaluation of a model over the test split.

    Attributes:
        name: ``main`` (negative ELBO, reconstruction term, per-step KL, IWAE bound) or ``marginal``
            (conditional models: -log p(x) under a uniform label prior, one IWAE bound per class).
        samples: IWAE trajectories per image (per class for ``marginal``).
        marginal: compute the class marginal.
    """

    name: str
    samples: int
    marginal: bool

    def trajectories(self, images: int, num_classes: int) -> int:
        """K-step trajectories run for ``images`` images (the cost of a chunk)."""
        return images * self.samples * (num_classes if self.marginal else 1)


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """What the reproduction does (see docs/reproduction.md for the choices).

    Attributes:
        epochs: each model's epoch cap.
        patience: stop a model after this many epochs without a better validation negative ELBO.
        lr, lr_final, lr_decay_fraction: Adam's rate, held, then decayed along a cosine to ``lr_final``
            over the last ``lr_decay_fraction`` of each model's epoch cap.
        clip_grad, batch_size, seed, impl: ``avme train`` options (``impl`` also for the evaluation).
        enc_hidden, dec_hidden, latent_dim, steps: the model's sizes.
        train_subset, valid_subset: train and validate on seeded subsets (None: the whole splits).
        samples: IWAE trajectories per test image.
        marginal_samples: conditional models: trajectories per class for -log p(x) (0: not computed).
        eval_batch_size: images per evaluation chunk (the unit of seeding and of resuming).
        max_rows: trajectories evaluated at once.
        num_images: test images, a seeded subset (0: all 10,000).
        smoke: the tiny sizes of ``--smoke``.
    """

    epochs: dict[str, int] = field(
        default_factory=lambda: {
            "avme-canvas": 150,
            "avme-canvas-conditional": 100,
            "avme-error": 100,
            "avme-error-conditional": 100,
        }
    )
    patience: int = 10
    lr: float = 1e-3
    lr_final: float = 0.0
    lr_decay_fraction: float = 1 / 3
    clip_grad: float = 10.0
    batch_size: int = 100
    seed: int = 0
    impl: str = "ref"
    enc_hidden: int = 400
    dec_hidden: int = 400
    latent_dim: int = 100
    steps: int = 12
    train_subset: int | None = None
    valid_subset: int | None = None
    samples: int = 5000
    marginal_samples: int = 500
    eval_batch_size: int = 100
    max_rows: int = 20000
    num_images: int = 0
    smoke: bool = False

    @property
    def models(self) -> list[str]:
        return list(self.epochs)

    def schedule(self, name: str) -> tuple[int, int]:
        """(epochs at ``lr``, epochs of the cosine decay) of a model: the decay spans the last
        ``lr_decay_fraction`` of its epoch cap (at least one epoch)."""
        cap = self.epochs[name]
        decay = min(cap, max(1, round(cap * self.lr_decay_fraction)))
        return cap - decay, decay

    def train_args(self, name: str) -> list[str]:
        """The ``avme train`` options that define a model's run (all but the run directory and the device)."""
        spec = MODELS[name]
        hold, decay = self.schedule(name)
        args = [
            "--epochs",
            str(self.epochs[name]),
            "--patience",
            str(self.patience),
            "--lr",
            repr(self.lr),
            "--lr-schedule",
            "cosine",
            "--lr-final",
            repr(self.lr_final),
            "--lr-hold-epochs",
            str(hold),
            "--lr-decay-epochs",
            str(decay),
            "--clip-grad",
            repr(self.clip_grad),
            "--kl-warmup-steps",
            "0",
            "--batch-size",
            str(self.batch_size),
            "--seed",
            str(self.seed),
            "--impl",
            self.impl,
            "--num-classes",
            str(spec.num_classes),
            "--encoder-input",
            spec.encoder_input,
            "--enc-hidden",
            str(self.enc_hidden),
            "--dec-hidden",
            str(self.dec_hidden),
            "--latent-dim",
            str(self.latent_dim),
            "--steps",
            str(self.steps),
        ]
        for option, value in (("--train-subset", self.train_subset), ("--valid-subset", self.valid_subset)):
            if value is not None:
                args += [option, str(value)]
        return args

    def model_sizes(self, name: str) -> dict[str, Any]:
        """Keyword arguments of :class:`avme_ext.AVME` for a model of the plan."""
        spec = MODELS[name]
        return {
            "num_classes": spec.num_classes,
            "enc_hidden": self.enc_hidden,
            "dec_hidden": self.dec_hidden,
            "latent_dim": self.latent_dim,
            "steps": self.steps,
            "encoder_input": spec.encoder_input,
        }

    def passes(self, name: str) -> list[EvalPass]:
        """The evaluation passes of a model."""
        passes = [EvalPass("main", self.samples, False)]
        if MODELS[name].conditional and self.marginal_samples > 0:
            passes.append(EvalPass("marginal", self.marginal_samples, True))
        return passes

    @property
    def test_images(self) -> int:
        return self.num_images or 10_000

    @property
    def num_chunks(self) -> int:
        return -(-self.test_images // self.eval_batch_size)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**{k: v for k, v in data.items() if k != "format"})


def make_plan(*, smoke: bool, impl: str) -> Plan:
    """The paper's plan, or the tiny one of ``--smoke`` (a whole run in about a minute on a CPU)."""
    if not smoke:
        return Plan(impl=impl)
    return Plan(
        epochs={"avme-canvas": 3, "avme-canvas-conditional": 2, "avme-error": 2, "avme-error-conditional": 2},
        impl=impl,
        enc_hidden=16,
        dec_hidden=16,
        latent_dim=4,
        steps=3,
        train_subset=300,
        valid_subset=100,
        samples=4,
        marginal_samples=2,
        eval_batch_size=10,
        num_images=20,
        smoke=True,
    )


# --------------------------------------------------------------------------- files
@dataclass(frozen=True)
class Layout:
    """Paths of a reproduction directory (see the module docstring)."""

    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def log(self) -> Path:
        return self.root / "reproduce.log"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    def run_dir(self, name: str) -> Path:
        return self.root / name / "train"

    def train_log(self, name: str) -> Path:
        return self.root / name / "train.log"

    def weights(self, name: str) -> Path:
        return self.root / name / "weights.fp16.safetensors"

    def metrics(self, name: str) -> Path:
        return self.root / name / "metrics.jsonl"

    def training(self, name: str) -> Path:
        return self.root / name / "training.json"

    def chunk(self, name: str, pass_name: str, index: int) -> Path:
        return self.root / name / "eval" / pass_name / f"chunk-{index:05d}.safetensors"


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    from avme_ext.checkpoint import atomic_write_json

    return atomic_write_json(path, data)


def read_json(path: Path) -> Any:
    """The JSON document in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- provenance
def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def source_commit() -> str:
    """The commit of the code that runs (``git rev-parse HEAD``, "+modified" when the tracked files
    differ), else ``$AVME_GIT_COMMIT``, else "unknown"."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        return commit + ("+modified" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("AVME_GIT_COMMIT", "unknown")
