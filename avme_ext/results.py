"""Results tables: the binarized-MNIST reproduction beside published numbers, and a sweep of runs.

Each published number is labelled with what it is: an exact negative log-likelihood, an
importance-sampled (or AIS) estimate, or a variational bound. The AVME paper's 80.50 is the
reconstruction term alone and is listed as such.

:func:`bits_per_dim` converts a bound in nats per image to bits per dimension;
:func:`render_sweep_markdown` is the table of ``python/sweep.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = ["PUBLISHED", "PublishedResult", "bits_per_dim", "render_results_markdown", "render_sweep_markdown"]


def bits_per_dim(nats: float, data_dim: int) -> float:
    """A negative log-likelihood (or bound) of one image in nats as bits per dimension: nats / (D ln 2).

    Args:
        nats: per image (NaN stays NaN).
        data_dim: D, the pixels (times channels) of an image.
    """
    if isinstance(data_dim, bool) or not isinstance(data_dim, int) or data_dim < 1:
        raise ValueError(f"data_dim must be an integer >= 1, got {data_dim!r}")
    return float(nats) / (data_dim * math.log(2.0))


class PublishedResult(NamedTuple):
    """A number from the literature on binarized MNIST, in nats (lower is better)."""

    model: str
    nats: float
    kind: str  # "exact NLL", "estimate", "bound (>= NLL)", or "reconstruction term (not a likelihood)"
    note: str


PUBLISHED: tuple[PublishedResult, ...] = (
    PublishedResult("DRAW, with attention", 80.97, "bound (>= NLL)", "negative ELBO"),
    PublishedResult("DRAW, no attention, 64 steps", 87.40, "bound (>= NLL)", "negative ELBO"),
    PublishedResult("NADE", 88.33, "exact NLL", "autoregressive, exact"),
    PublishedResult("DLGM", 86.60, "estimate", "importance-sampled"),
    PublishedResult("DBM, 2 hidden layers", 84.13, "estimate", "AIS estimate of the partition function"),
    PublishedResult("VAE, 2 layers", 85.33, "estimate", "IWAE paper, 5000 importance samples; dynamically binarized MNIST"),
    PublishedResult("IWAE, 2 layers, k=50", 82.90, "estimate", "IWAE paper, 5000 importance samples; dynamically binarized MNIST"),
    PublishedResult("PixelCNN", 81.30, "exact NLL", "autoregressive, exact"),
    PublishedResult(
        "AVME (paper's Table 1)", 80.50, "reconstruction term (not a likelihood)", "leaves out the KL of the latents"
    ),
)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def render_results_markdown(records: Sequence[dict[str, Any]], command: str = "") -> str:
    """Markdown for ``docs/results.md`` from the records of ``docs/results.json``."""
    lines = [
        "# Binarized MNIST: results",
        "",
        "All numbers in nats per image on the whole 10,000-image test split of the fixed binarization",
        "(lower is better). Ours are measured by `python/reproduce_paper.py`"
        + (f" (`{command}`)" if command else "")
        + ".",
        "",
        "## This package",
        "",
        "| model | conditional | encoder input | K | negative ELBO (bound) | IWAE (bound, S) | reconstruction term (not a likelihood) | -log p(x\\|y) (bound) | -log p(x) (bound) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        lines.append(
            f"| {r['name']} | {'yes' if r['conditional'] else 'no'} | {r['encoder_input']} | {r['steps']} | "
            f"{_fmt(r['test_nelbo'])} | {_fmt(r.get('test_iwae'))} (S={r.get('iwae_samples')}) | "
            f"{_fmt(r['test_reconstruction'])} | {_fmt(r.get('test_nll_given_y'))} | {_fmt(r.get('test_nll_marginal'))} |"
        )
    lines += [
        "",
        "## Published numbers on binarized MNIST",
        "",
        "| model | nats | what it is | note |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {p.model} | {p.nats:.2f} | {p.kind} | {p.note} |" for p in PUBLISHED]
    lines += [
        "",
        "A bound is an upper bound on -log p(x); an estimate may fall on either side; an exact NLL is exact.",
        "The AVME paper's 80.50 is the reconstruction term -log p(x|z) alone: it omits the KL cost of",
        "the latents and is not comparable with the likelihoods above. Compare it with our",
        "reconstruction-term column, and compare our negative ELBO and IWAE columns with the rest.",
        "",
    ]
    return "\n".join(lines)


def _fmt_optional(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_sweep_markdown(records: Sequence[dict[str, Any]], command: str = "") -> str:
    """Markdown table of a sweep (``python/sweep.py``): one row per run, in order of LSTM size and K.

    Every record has ``name``, ``steps``, ``enc_hidden``, ``dec_hidden``, ``parameters``, ``epochs``,
    ``train_seconds``, ``best_valid_nelbo``, ``test_nelbo``, ``bound``, ``bound_name``,
    ``bound_bits_per_dim``, ``likelihood`` and ``data_dim``.
    """
    first = records[0] if records else {}
    lines = [
        "# AVME sweep: drawing steps K and LSTM sizes",
        "",
        f"Bounds on -log p(x) on the test split, in nats per image and in bits per dimension (nats / (D ln 2),"
        f" D = {first.get('data_dim', 'n/a')}); {first.get('likelihood', 'n/a')} likelihood; lower is better."
        + (f" Made by `{command}`." if command else ""),
        "Training time is the optimisation time of all epochs (validation excluded).",
        "",
        "| run | K | LSTM units (enc/dec) | parameters | epochs | training time (s) | best valid negative ELBO "
        "| test negative ELBO | test bound | bound (nats) | bound (bits/dim) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(records, key=lambda r: (r["enc_hidden"], r["dec_hidden"], r["steps"])):
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['enc_hidden']}/{r['dec_hidden']} | {r['parameters']:,} | {r['epochs']} "
            f"| {r['train_seconds']:.1f} | {_fmt_optional(r['best_valid_nelbo'], '.2f')} | {r['test_nelbo']:.2f} "
            f"| {r['bound_name']} | {r['bound']:.2f} | {r['bound_bits_per_dim']:.4f} |"
        )
    lines.append("")
    return "\n".join(lines)
