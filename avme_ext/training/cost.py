"""What a launch will cost: steps per epoch up front, then a measured time per epoch and in all."""

from __future__ import annotations

import time

__all__ = ["CostEstimate", "format_duration", "plural"]


def plural(count: int, word: str, suffix: str = "s") -> str:
    """``"1 epoch"``, ``"2 epochs"``; ``plural(2, "process", "es")`` is ``"2 processes"``."""
    return f"{count} {word}{'' if count == 1 else suffix}"


def format_duration(seconds: float) -> str:
    """``"42.0 s"``, ``"6.5 min"``, ``"3.2 h"``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class CostEstimate:
    """Times the steps of a launch and, once, turns them into a time per epoch and for the rest of the run.

    The first ``skip`` steps are not timed (they include one-time work: CUDA graph capture, cuBLAS
    and allocator start-up); the next ``measure`` steps are. The step's own host synchronisation
    (reading the loss) makes the wall-clock time of a step its device time too.

    Args:
        steps_per_epoch: global batches per epoch.
        steps_left: steps from the start of this launch to the end of the run.
        where: the device, in words (e.g. ``"cuda:0 (NVIDIA H100 80GB HBM3)"``).
    """

    def __init__(self, steps_per_epoch: int, steps_left: int, where: str, *, skip: int = 2, measure: int = 5) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.steps_left = steps_left
        self.where = where
        self.skip = skip
        self.measure = measure
        self._seen = 0
        self._start: float | None = None
        self._done = False

    def plan(self, epochs_left: int) -> str:
        """The up-front line: how many steps the rest of the run takes."""
        return (
            f"{plural(self.steps_per_epoch, 'step')} per epoch, {plural(self.steps_left, 'step')} to go "
            f"({plural(epochs_left, 'epoch')}) on {self.where}"
        )

    def step_done(self, now: float | None = None) -> str | None:
        """Call after every step; returns the estimate line once, after ``skip + measure`` steps."""
        if self._done:
            return None
        now = time.perf_counter() if now is None else now
        self._seen += 1
        if self._seen == self.skip:
            self._start = now
        if self._seen < self.skip + self.measure or self._start is None:
            return None
        self._done = True
        per_step = (now - self._start) / self.measure
        return (
            f"measured {per_step * 1000:.1f} ms per step on {self.where}: about "
            f"{format_duration(per_step * self.steps_per_epoch)} per epoch and "
            f"{format_duration(per_step * self.steps_left)} for the {plural(self.steps_left, 'step')} to go "
            "(training only; validation comes on top)"
        )
