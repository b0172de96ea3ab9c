"""Honest evaluation of an AVME model: per-image negative ELBO, IWAE bounds, class marginals.

:func:`evaluate` returns an :class:`EvalResult` of per-image values (all in nats, lower is
better) for the images of an :class:`~avme_ext.data.ImageSplit`:

* ``nelbo`` = ``reconstruction`` + ``kl.sum(1)``: the negative ELBO for one draw of the noise.
  ``reconstruction`` is -log p(x | z) of that draw, a term of the bound, **not** a likelihood.
* ``iwae_nll`` (``samples`` = S > 0): -(logsumexp_s log w_s - log S) over S whole trajectories,
  an upper bound on -log p(x) (or -log p(x | y) for a conditional model) that tightens as S
  grows; S = 5000 for reported numbers.
* conditional models (``num_classes`` = C > 0) with S > 0: ``nll_given_y`` = -log p(x | y) with the
  true labels, and, when ``marginal=True``, ``nll_marginal`` = -log p(x) =
  -(logsumexp_c log p(x | c) - log C) under a uniform label prior, from one IWAE bound per class
  (``class_nll``, (N, C)). The marginal costs C IWAE bounds per image (C times the cost of
  ``nll_given_y``); with ``marginal=True`` ``nll_given_y`` is read from the true-label column of
  that table rather than computed again, so -log p(x) <= -log p(x | y) + log C holds exactly.

Bits per dimension. A result knows the model's likelihood (``"bernoulli"`` or ``"logistic"``, see
:mod:`avme_ext.likelihoods`) and D, its pixels per image; its :meth:`EvalResult.summary` names the
likelihood and gives every bound also in bits per dimension, nats / (D ln 2) (the unit of
likelihoods on 8-bit images). The per-image values stay in nats.

Determinism and sharding. The split is cut into fixed chunks of ``batch_size`` consecutive
images. Chunk ``i`` draws all its randomness from fresh generators seeded by
``derive_seed("avme-eval", seed, i, stream)`` (:mod:`avme_ext.seeds`), one stream each for
the dynamic binarization (gray-level data sets),
the ELBO noise, the IWAE noise and the per-class IWAE noise. Rank ``r`` of ``W`` evaluates the
chunks with ``i % W == r`` (``shard=(r, W)``), so ``merge_results`` of all shards equals the
unsharded result exactly (same ``seed``, ``batch_size``, ``max_rows`` and device);
:func:`gather_across_ranks` does that merge under torchrun. Because each quantity has its own
stream, turning the IWAE on or off does not change the ELBO values.

Cost. The IWAE runs S whole trajectories of the K-step loop per image (C times that for the
class marginal): :func:`estimate_cost` times a short pilot on the model's device and
extrapolates, so a caller can say what an evaluation will cost before starting it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .data import ImageSplit
from .model import AVME, iwae_chunking
from .results import bits_per_dim
from .seeds import derive_seed

__all__ = [
    "STREAMS",
    "CostEstimate",
    "EvalResult",
    "chunk_generator",
    "chunk_seed",
    "estimate_cost",
    "evaluate",
    "evaluation_calls",
    "gather_across_ranks",
    "merge_results",
    "working_rows",
]

#: Random streams of a chunk (see the module docstring).
STREAMS = ("data", "elbo", "iwae", "class")


def chunk_seed(seed: int, chunk: int, stream: str = "elbo") -> int:
    """A 63-bit seed for chunk ``chunk`` and random ``stream`` derived from ``seed`` (stable across runs)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; expected one of {STREAMS}")
    return derive_seed("avme-eval", seed, int(chunk), stream)


def chunk_generator(seed: int, chunk: int, device: torch.device | str, stream: str = "elbo") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` for ``stream`` of chunk ``chunk`` (see :func:`chunk_seed`)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(chunk_seed(seed, chunk, stream))
    return generator


@dataclass
class EvalResult:
    """Per-image evaluation values (nats, lower is better) for a set of images of a split.

    Attributes:
        indices: (N,) int64 positions of the images in the evaluated split (sorted after a merge).
        nelbo: (N,) float64 negative ELBO = reconstruction + kl.sum(1), one noise draw.
        reconstruction: (N,) float64 -log p(x | z) of that draw (a term of the bound, not a likelihood).
        kl: (N, K) float64 KL of every drawing step.
        iwae_nll: (N,) IWAE upper bound on -log p(x) (-log p(x | y) for a conditional model), or None.
        nll_given_y: (N,) conditional model: -log p(x | y) with the true labels (IWAE), else None.
        nll_marginal: (N,) conditional model: -log p(x) over a uniform label prior (IWAE), else None.
        class_nll: (N, C) conditional model with the marginal: -log p(x | y=c) for every class c.
        samples: S, the IWAE samples per image (0: ELBO only).
        likelihood: the model's likelihood (``"bernoulli"``, ``"logistic"``), or None if unknown.
        data_dim: D, pixels per image (for bits per dimension), or None if unknown.
    """

    indices: Tensor
    nelbo: Tensor
    reconstruction: Tensor
    kl: Tensor
    iwae_nll: Tensor | None = None
    nll_given_y: Tensor | None = None
    nll_marginal: Tensor | None = None
    class_nll: Tensor | None = None
    samples: int = 0
    likelihood: str | None = None
    data_dim: int | None = None

    _PER_IMAGE = ("indices", "nelbo", "reconstruction", "kl", "iwae_nll", "nll_given_y", "nll_marginal", "class_nll")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def steps(self) -> int:
        """K, the number of drawing steps."""
        return int(self.kl.shape[1])

    def to(self, device: torch.device | str) -> EvalResult:
        """A copy with every tensor on ``device``."""
        values: dict[str, Any] = {  # field name -> tensor or None
            name: (None if getattr(self, name) is None else getattr(self, name).to(device)) for name in self._PER_IMAGE
        }
        return EvalResult(**values, **self._settings())

    def _settings(self) -> dict[str, Any]:
        """The fields that are not per image (what two results to merge must share)."""
        return {"samples": self.samples, "likelihood": self.likelihood, "data_dim": self.data_dim}

    def summary(self) -> dict[str, Any]:
        """Means over the images, in nats per image, as plain JSON-able numbers.

        Keys: ``num_images``, ``nelbo`` (+ ``nelbo_sem``, its standard error), ``reconstruction``,
        ``kl``, ``kl_per_step`` (list of K), ``samples``; with IWAE samples also ``iwae_nll``
        (+ ``iwae_nll_sem``) and ``iwae_samples``; for a conditional model ``nll_given_y`` and,
        when computed, ``nll_marginal``. A mean over zero images is NaN.

        When the result knows them (:func:`evaluate` sets both): ``likelihood``, ``data_dim`` (D) and,
        beside each bound in nats, the same bound in bits per dimension (nats / (D ln 2)):
        ``nelbo_bits_per_dim``, ``iwae_nll_bits_per_dim``, ``nll_given_y_bits_per_dim``,
        ``nll_marginal_bits_per_dim``.
        """

        def mean(t: Tensor) -> float:
            return float(t.double().mean()) if t.numel() else math.nan

        def sem(t: Tensor) -> float:
            n = t.numel()
            return float(t.double().std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan

        out: dict[str, Any] = {
            "num_images": len(self),
            "nelbo": mean(self.nelbo),
            "nelbo_sem": sem(self.nelbo),
            "reconstruction": mean(self.reconstruction),
            "kl": mean(self.kl.sum(dim=1)) if len(self) else math.nan,
            "kl_per_step": [mean(self.kl[:, t]) for t in range(self.steps)],
            "samples": self.samples,
        }
        if self.iwae_nll is not None:
            out["iwae_nll"] = mean(self.iwae_nll)
            out["iwae_nll_sem"] = sem(self.iwae_nll)
            out["iwae_samples"] = self.samples
        if self.nll_given_y is not None:
            out["nll_given_y"] = mean(self.nll_given_y)
        if self.nll_marginal is not None:
            out["nll_marginal"] = mean(self.nll_marginal)
        if self.likelihood is not None:
            out["likelihood"] = self.likelihood
        if self.data_dim is not None:
            out["data_dim"] = self.data_dim
            for key in ("nelbo", "iwae_nll", "nll_given_y", "nll_marginal"):
                if key in out:
                    out[f"{key}_bits_per_dim"] = bits_per_dim(out[key], self.data_dim)
        return out


def _empty_result(model: AVME, samples: int, conditional: bool, marginal: bool) -> EvalResult:
    f64 = torch.float64
    steps, num_classes = model.steps, model.num_classes
    return EvalResult(
        indices=torch.zeros(0, dtype=torch.int64),
        nelbo=torch.zeros(0, dtype=f64),
        reconstruction=torch.zeros(0, dtype=f64),
        kl=torch.zeros(0, steps, dtype=f64),
        iwae_nll=torch.zeros(0, dtype=f64) if samples > 0 else None,
        nll_given_y=torch.zeros(0, dtype=f64) if samples > 0 and conditional else None,
        nll_marginal=torch.zeros(0, dtype=f64) if samples > 0 and conditional and marginal else None,
        class_nll=torch.zeros(0, num_classes, dtype=f64) if samples > 0 and conditional and marginal else None,
        **_model_settings(model, samples),
    )


def _model_settings(model: AVME, samples: int) -> dict[str, Any]:
    """The non-per-image fields of a result of ``model`` with ``samples`` IWAE samples."""
    return {"samples": samples, "likelihood": model.config.likelihood, "data_dim": model.config.data_dim}


def _concat(results: Sequence[EvalResult]) -> EvalResult:
    values: dict[str, Any] = {}  # field name -> tensor or None
    for name in EvalResult._PER_IMAGE:
        parts = [getattr(r, name) for r in results]
        present = [p is not None for p in parts]
        if any(present) and not all(present):
            raise ValueError(f"cannot merge results: {name!r} is present in some results and missing in others")
        values[name] = torch.cat([p.cpu() for p in parts]) if all(present) else None
    return EvalResult(**values, **results[0]._settings())


def merge_results(results: Sequence[EvalResult]) -> EvalResult:
    """Concatenate results (e.g. the shards of several ranks) and sort them by image index.

    Raises:
        ValueError: no results, mismatched settings (samples, K, likelihood, D, computed fields) or
            duplicate indices.
    """
    results = list(results)
    if not results:
        raise ValueError("merge_results needs at least one EvalResult")
    samples = {r.samples for r in results}
    steps = {r.steps for r in results}
    if len(samples) > 1 or len(steps) > 1:
        raise ValueError(f"cannot merge results with different samples {sorted(samples)} or steps {sorted(steps)}")
    models = {(r.likelihood, r.data_dim) for r in results}
    if len(models) > 1:
        raise ValueError(f"cannot merge results of different models (likelihood, data_dim): {sorted(models, key=str)}")
    merged = _concat(results)
    order = torch.argsort(merged.indices, stable=True)
    sorted_indices = merged.indices[order]
    if sorted_indices.numel() > 1 and bool((sorted_indices[1:] == sorted_indices[:-1]).any()):
        raise ValueError("cannot merge results: some image indices appear in more than one result")
    values: dict[str, Any] = {  # field name -> tensor or None
        name: (None if getattr(merged, name) is None else getattr(merged, name)[order])
        for name in EvalResult._PER_IMAGE
    }
    return EvalResult(**values, **merged._settings())


def gather_across_ranks(result: EvalResult) -> EvalResult:
    """The merge of every rank's :class:`EvalResult` shard (the same on every rank).

    Collective: every rank of the torchrun job must call it. With one process it returns the
    result merged with itself alone (sorted by image index).
    """
    from . import distributed  # imported here: avme_ext.distributed must not be needed to import this module

    return merge_results(distributed.all_gather_objects(result.to("cpu")))


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    try:
        rank, world = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard must be a pair (rank, world_size), got {shard!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must satisfy 0 <= rank < world_size, got {shard!r}")
    return rank, world


class _Progress:
    """A tqdm bar counting image bounds (images x classes for the marginal), with running means."""

    def __init__(
        self, enabled: bool, total: int, description: str, unit: str, observer: Callable[[int, int], None] | None = None
    ) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)
        self.images = 0
        self.sums = {"nelbo": 0.0, "iwae_nll": 0.0}
        self.total = total
        self.done = 0
        self.observer = observer

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)
        self.done += count
        if self.observer is not None:
            self.observer(self.done, self.total)

    def chunk_done(self, part: EvalResult) -> None:
        if self.bar is None:
            return
        self.images += len(part)
        self.sums["nelbo"] += float(part.nelbo.sum())
        postfix = {"nelbo": f"{self.sums['nelbo'] / self.images:.2f}"}
        if part.iwae_nll is not None:
            self.sums["iwae_nll"] += float(part.iwae_nll.sum())
            postfix["iwae_nll"] = f"{self.sums['iwae_nll'] / self.images:.2f}"
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def evaluate(
    model: AVME,
    split: ImageSplit,
    *,
    samples: int = 0,
    batch_size: int = 100,
    seed: int = 0,
    max_rows: int = 20000,
    shard: tuple[int, int] = (0, 1),
    marginal: bool = True,
    progress: bool = False,
    device: torch.device | str | None = None,
    observer: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on the images of ``split`` (or this rank's shard of them).

    Args:
        model: the model (its training/eval mode is restored afterwards).
        split: the images; labels are needed for a conditional model.
        samples: S, IWAE trajectories per image (0: ELBO only; 5000 for reported numbers).
        batch_size: images per chunk (also the unit of seeding and sharding, see the module docs).
        seed: base seed of every chunk's random streams.
        max_rows: trajectories evaluated at once by the IWAE (bounds memory for any S).
        shard: ``(rank, world_size)``: evaluate the chunks ``i`` with ``i % world_size == rank``.
        marginal: conditional model with S > 0: also compute -log p(x) over all C classes
            (C IWAE bounds per image, i.e. C times the cost of -log p(x | y)).
        progress: show a tqdm bar with the running means. It counts images (image x class bounds
            for the marginal) and moves after every group of at most ``max_rows`` trajectories,
            not only at chunk ends.
        device: where to compute (default: the model's device); the model must already be there.
        observer: called as ``observer(done, total)`` whenever the progress bar's count moves (with or
            without a bar), e.g. to compare the pace with an estimate.

    Returns:
        :class:`EvalResult` for the evaluated images, ``indices`` being positions in ``split``.
    """
    if not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an integer >= 0, got {samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
    rank, world = _check_shard(shard)
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    if device != param.device and not (device.type == param.device.type and device.index is None):
        raise ValueError(f"model is on {param.device} but device={device}; move the model first")
    device = param.device
    conditional = model.num_classes > 0
    if conditional and not split.has_labels:
        raise ValueError(f"{split.name}: a conditional model needs labels, but this split has none")
    do_marginal = samples > 0 and conditional and marginal

    num_chunks = math.ceil(len(split) / batch_size)
    my_chunks = list(range(rank, num_chunks, world))
    my_images = sum(min((i + 1) * batch_size, len(split)) - i * batch_size for i in my_chunks)
    passes = model.num_classes if do_marginal else 1
    description = f"eval {split.name}" + (f" S={samples}" if samples else "")
    meter = _Progress(progress, my_images * passes, description, "img x class" if do_marginal else "img", observer)
    parts: list[EvalResult] = []
    was_training = model.training
    model.eval()
    try:
        for i in my_chunks:
            start, stop = i * batch_size, min((i + 1) * batch_size, len(split))
            index = torch.arange(start, stop, dtype=torch.int64)
            x, labels = split.batch(
                index, generator=chunk_generator(seed, i, split.images.device, "data"), device=device, dtype=param.dtype
            )
            y = labels if conditional else None
            terms = model(x, y, generator=chunk_generator(seed, i, device, "elbo"))
            recon = terms.reconstruction.double()
            kl = terms.kl.double()
            part = EvalResult(index, recon + kl.sum(dim=1), recon, kl, **_model_settings(model, samples))
            if samples == 0:
                meter.advance(len(index))
            elif do_marginal:
                class_ll = model.class_log_likelihoods(
                    x,
                    samples,
                    max_rows=max_rows,
                    generator=chunk_generator(seed, i, device, "class"),
                    progress=meter.advance,
                ).double()
                part.class_nll = -class_ll
                part.nll_given_y = -class_ll.gather(1, labels.view(-1, 1)).squeeze(1)
                part.nll_marginal = -AVME.marginal_from_class_bounds(class_ll)
                part.iwae_nll = part.nll_given_y
            else:
                bound = model.iwae_bound(
                    x,
                    y,
                    samples,
                    max_rows=max_rows,
                    generator=chunk_generator(seed, i, device, "iwae"),
                    progress=meter.advance,
                ).double()
                part.iwae_nll = -bound
                if conditional:
                    part.nll_given_y = part.iwae_nll
            part = part.to("cpu")
            parts.append(part)
            meter.chunk_done(part)
    finally:
        meter.close()
        model.train(was_training)
    if not parts:
        return _empty_result(model, samples, conditional, do_marginal)
    return _concat(parts)


# --------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class CostEstimate:
    """What an evaluation will cost, from a timed pilot on the model's device.

    The time of one call of the K-step loop on ``r`` trajectories is modelled as
    ``seconds_per_call + r / trajectories_per_second``: a fixed cost per call (its operator
    launches and, on a busy CPU, the waits of its threads for each other at every operator) and
    a cost per trajectory. On an idle machine the first is small; with other processes
    competing for the cores it can be most of a small call's time, which is why the estimate
    counts the evaluation's calls as well as its trajectories.

    Attributes:
        trajectories: K-step passes in all: one per image for the ELBO, plus S per image (times C
            for a conditional model's marginal) for the IWAE.
        seconds: the estimated wall-clock time, ``calls * seconds_per_call + trajectories /
            trajectories_per_second``.
        trajectories_per_second: the measured rate of the per-trajectory cost.
        pilot_seconds: how long the pilot took.
        calls: calls of the K-step loop the evaluation makes.
        seconds_per_call: the measured fixed cost of a call.
    """

    trajectories: int
    seconds: float
    trajectories_per_second: float
    pilot_seconds: float
    calls: int = 0
    seconds_per_call: float = 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def working_rows(num_images: int, samples: int, batch_size: int, max_rows: int) -> int:
    """Trajectories :func:`evaluate` runs in one call at most: a chunk's ELBO pass, or a group of the IWAE."""
    images = max(1, min(batch_size, num_images))
    if samples == 0:
        return images
    images_per_group, samples_per_call = iwae_chunking(samples, max_rows)
    return min(images, images_per_group) * samples_per_call


def evaluation_calls(num_images: int, samples: int, batch_size: int, max_rows: int, passes: int = 1) -> int:
    """Calls of the K-step loop :func:`evaluate` makes: per chunk of ``batch_size`` images, one ELBO pass
    and, for the IWAE, one per group of images and slice of samples (see :meth:`AVME.iwae_bound`),
    ``passes`` times (the classes of a conditional model's marginal)."""
    calls = 0
    for start in range(0, num_images, batch_size):
        images = min(batch_size, num_images - start)
        calls += 1
        if samples > 0:
            images_per_group, samples_per_call = iwae_chunking(samples, max_rows)
            calls += passes * math.ceil(images / images_per_group) * math.ceil(samples / samples_per_call)
    return calls


@torch.no_grad()
def estimate_cost(
    model: AVME,
    num_images: int,
    *,
    samples: int = 0,
    marginal: bool = True,
    max_rows: int = 20000,
    batch_size: int = 100,
    pilot_seconds: float = 0.2,
    repeats: int = 3,
) -> CostEstimate:
    """Estimate the time :func:`evaluate` takes on ``num_images`` images with these settings.

    Times the IWAE's unit of work (whole trajectories of the K-step loop, on a random binary
    image, with a private generator: no global random state is touched) and fits the cost model
    of :class:`CostEstimate`: a small call of 16 rows, then calls growing from 64 rows by
    factors of 4 up to the most the evaluation runs at once (``max_rows``, or a chunk of
    ``batch_size`` images for the ELBO) until one takes at least ``pilot_seconds`` and four
    times the small one. The model is fitted to the two largest sizes (the cost per trajectory
    falls with the size of a call, most of all on a busy CPU), each timed ``repeats`` times, its
    fastest run counting: the one least disturbed by other processes on a shared machine.
    """
    if not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be an integer >= 0, got {num_images!r}")
    if not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an integer >= 0, got {samples!r}")
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    passes = model.num_classes if samples > 0 and model.num_classes > 0 and marginal else 1
    trajectories = num_images * (1 + samples * passes)
    calls = evaluation_calls(num_images, samples, batch_size, max_rows, passes)
    largest = working_rows(num_images, samples, batch_size, max_rows)
    param = next(model.parameters())
    generator = torch.Generator(device=param.device).manual_seed(0)
    x = torch.rand(1, model.config.data_dim, generator=generator, device=param.device).round().to(param.dtype)
    y = torch.zeros(1, dtype=torch.int64, device=param.device) if model.num_classes > 0 else None

    def seconds_for(rows: int) -> float:
        _synchronize(param.device)
        start = time.perf_counter()
        model.iwae_bound(x, y, rows, max_rows=rows, generator=generator)
        _synchronize(param.device)
        return max(time.perf_counter() - start, 1e-9)

    was_training = model.training
    model.eval()
    began = time.perf_counter()
    try:
        small = min(16, largest)
        seconds_for(small)  # warm-up (allocations, kernel loads)
        times = {small: min(seconds_for(small) for _ in range(repeats))}
        rows = small
        while rows < largest and times[rows] < max(pilot_seconds, 4 * times[small]):
            rows = min(max(64, rows * 4), largest)
            times[rows] = seconds_for(rows)
        sizes = sorted(times)[-2:]  # the slope near the sizes the evaluation runs
        if len(sizes) == 2:  # a single size is the small one, already timed `repeats` times
            for size in sizes:
                times[size] = min([times[size], *(seconds_for(size) for _ in range(repeats - 1))])
    finally:
        model.train(was_training)
    (r1, t1), (r2, t2) = (sizes[0], times[sizes[0]]), (sizes[-1], times[sizes[-1]])
    if r2 > r1 and t2 > t1:
        per_row = (t2 - t1) / (r2 - r1)
        per_call = max(t1 - per_row * r1, 0.0)
    else:  # one size only (a tiny evaluation), or noise: no fixed cost
        per_row, per_call = t2 / r2, 0.0
    return CostEstimate(
        trajectories,
        calls * per_call + trajectories * per_row,
        1 / per_row,
        time.perf_counter() - began,
        calls,
        per_call,
    )
