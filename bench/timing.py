"""Timing helpers: a device timer, robust statistics and round-robin interleaving.

The method (see bench/README.md):

- every call is timed on its own: CUDA events on a GPU (the device is synchronized before the
  start event so no earlier work and no queued launches of another implementation leak into
  the interval), ``time.perf_counter`` on the CPU;
- warm-up calls are made first and not recorded;
- implementations are interleaved: in every round each implementation runs once, and the
  order rotates from round to round, so slow drifts of the machine (clocks, temperature,
  other tenants) hit every implementation alike;
- the summary is the median with the interquartile range and the min/max.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = ["Stats", "Timer", "summarize", "quantile", "interleave", "round_order"]


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in the unit of the samples (seconds here).

    Attributes:
        median, q1, q3, min, max: order statistics.
        iqr: q3 - q1.
        n: number of samples.
    """

    median: float
    q1: float
    q3: float
    iqr: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Quantile ``q`` in [0, 1] of already sorted values, linear interpolation (numpy's default)."""
    if not sorted_values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    position = q * (len(sorted_values) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = position - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def summarize(samples: Sequence[float]) -> Stats:
    """Median, quartiles, IQR, min and max of ``samples`` (at least one)."""
    values = sorted(float(v) for v in samples)
    if not values:
        raise ValueError("summarize needs at least one sample")
    q1, med, q3 = quantile(values, 0.25), quantile(values, 0.5), quantile(values, 0.75)
    return Stats(median=med, q1=q1, q3=q3, iqr=q3 - q1, min=values[0], max=values[-1], n=len(values))


class Timer:
    """Times one call at a time on ``device``: CUDA events on a GPU, ``perf_counter`` otherwise."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def synchronize(self) -> None:
        """Wait for all work queued on the device (no-op on the CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        """Run ``fn()`` once and return its duration in seconds (device time on a GPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            milliseconds: float = start.elapsed_time(end)
            return milliseconds / 1000.0
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s

    def wall(self, fn: Callable[[], object]) -> float:
        """Host wall-clock seconds of ``fn()`` including the device work it queued (compile timing)."""
        self.synchronize()
        start_s = time.perf_counter()
        fn()
        self.synchronize()
        return time.perf_counter() - start_s


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of ``names`` in round ``round_index``: rotated by one position per round."""
    if not names:
        return []
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


def interleave(
    cases: Mapping[str, Callable[[int], object]],
    repeats: int,
    warmup: int,
    timer: Timer,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, list[float]]:
    """Time every case ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Args:
        cases: name -> callable taking the repetition index ``i`` (warm-up calls get
            ``0..warmup-1``, timed calls ``warmup..warmup+repeats-1``) so it can pick fresh
            pre-generated inputs for every call.
        repeats: timed rounds.
        warmup: untimed rounds first.
        timer: the :class:`Timer`.
        should_stop: checked before every timed round; when it returns True the rounds
            stop early (a time budget). At least one timed round always runs.

    Returns:
        name -> list of durations in seconds (one per completed round).
    """
    names = list(cases)
    for i in range(warmup):
        for name in round_order(names, i):
            cases[name](i)
    timer.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        if r > 0 and should_stop is not None and should_stop():
            break
        i = warmup + r
        for name in round_order(names, r):
            samples[name].append(timer.time(functools.partial(cases[name], i)))
    return samples
