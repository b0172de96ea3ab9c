"""What every step of a run sees, as pure functions of the seed and the step: the epoch's order,
the KL weight, the learning rate, the number of batches, and the reparameterisation noise.

Every random stream of a run is seeded by ``derive_seed(SEED_NAMESPACE, seed, *tags)``
(:func:`avme_ext.seeds.derive_seed`): no generator state has to survive a restart.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from avme_ext.model import AVME
from avme_ext.seeds import derive_seed

from .config import TrainConfig
from .cost import plural

__all__ = [
    "SEED_NAMESPACE",
    "epoch_permutation",
    "kl_weight_at",
    "learning_rate_at",
    "describe_schedule",
    "batches_per_epoch",
    "step_noise",
]

#: The namespace of the training streams: tags "init", "epoch", "noise", "data", "train-subset", "valid-subset".
SEED_NAMESPACE = "avme-train"


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> Tensor:
    """The training order of ``epoch``: a CPU int64 permutation of ``num_examples``, a function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed(SEED_NAMESPACE, seed, "epoch", epoch))
    return torch.randperm(num_examples, generator=generator)


def kl_weight_at(step: int, warmup_steps: int) -> float:
    """KL weight of the update after ``step`` completed steps: ``min(1, step / warmup_steps)`` (1 without warm-up)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def learning_rate_at(
    step: int,
    lr: float,
    schedule: str,
    *,
    final: float | None = None,
    decay_steps: int | None = None,
    hold_steps: int = 0,
) -> float:
    """Learning rate of the update after ``step`` completed steps.

    ``constant``: ``lr``. ``cosine``: ``lr`` for the first ``hold_steps`` updates, then
    ``final + (lr - final) * (1 + cos(pi * t / decay_steps)) / 2`` with ``t = step - hold_steps``
    while ``t < decay_steps``, then ``final``.
    """
    if schedule == "constant":
        return float(lr)
    if schedule != "cosine" or final is None or decay_steps is None or decay_steps < 1:
        raise ValueError(
            f"learning_rate_at: schedule {schedule!r} needs a final rate and decay_steps >= 1, "
            f"got final={final!r}, decay_steps={decay_steps!r}"
        )
    progress = min(max(step - hold_steps, 0), decay_steps) / decay_steps
    return float(final + 0.5 * (lr - final) * (1.0 + math.cos(math.pi * progress)))


def describe_schedule(cfg: TrainConfig) -> str:
    """``"1e-3 (constant)"`` or ``"1e-3 for 20 epochs, then half a cosine down to 0 over 10 epochs"``."""
    if cfg.lr_schedule == "constant":
        return f"{cfg.lr:g} (constant)"
    hold_epochs, decay_epochs, final = cfg.cosine_phase()
    hold = f" for {plural(hold_epochs, 'epoch')}, then" if hold_epochs else ","
    return f"{cfg.lr:g}{hold} half a cosine down to {final:g} over {plural(decay_epochs, 'epoch')}"


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
    generator.manual_seed(derive_seed(SEED_NAMESPACE, seed, "noise", step))
    return model.core.draw_noise(batch_size, generator)
