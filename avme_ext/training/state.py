"""``TrainState``: the counters and running sums a checkpoint holds besides the weights and Adam's state."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainState", "empty_window"]


def empty_window() -> dict[str, float]:
    """The running sums of a logging window before its first step."""
    return {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0, "examples": 0, "steps": 0}


@dataclass
class TrainState:
    """Counters and running sums saved in every checkpoint (all JSON-able).

    Attributes:
        epoch: current epoch (0-based); equals the number of finished epochs when ``batch`` is 0.
        batch: global batches of ``epoch`` already done.
        step: training iterations done (optimizer updates plus skipped non-finite steps).
        skipped: non-finite steps skipped with ``--skip-nonfinite``.
        best_nelbo: best validation negative ELBO so far (None: none yet).
        best_epoch: the epoch (1-based) of ``best_nelbo`` (None: none yet).
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
    best_epoch: int | None = None
    elapsed: float = 0.0
    epoch_seconds: float = 0.0
    epoch_loss: float = 0.0
    epoch_examples: int = 0
    window: dict[str, float] = field(default_factory=empty_window)
    metrics_offset: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_checkpoint(cls, trainer_state: dict[str, Any]) -> TrainState:
        """The state stored in a checkpoint's trainer metadata (``Checkpoint.trainer_state``)."""
        return cls.from_dict(trainer_state.get("state", {}))

    def patience_spent(self, patience: int) -> bool:
        """At an epoch boundary, whether ``patience`` > 0 epochs have passed since the best validation
        bound (since the start, without one); False for a checkpoint that predates ``best_epoch``."""
        if patience <= 0 or self.batch != 0 or (self.best_epoch is None and self.best_nelbo is not None):
            return False
        return self.epoch - (self.best_epoch or 0) >= patience

    def steps_left(self, epochs: int, batches_per_epoch: int) -> int:
        """Training steps from here to the end of epoch ``epochs``."""
        return max(0, (epochs - self.epoch) * batches_per_epoch - self.batch)
