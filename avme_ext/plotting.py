"""Training plots from a run's ``metrics.jsonl`` (matplotlib, Agg backend: no display needed).

``metrics.jsonl`` (written by the trainer) holds one JSON object per line, each with a
``"kind"``:

* ``{"kind": "train", "epoch", "step", "loss", "reconstruction", "kl", "kl_weight", "lr", "examples_per_s", "time"}``
* ``{"kind": "valid", "epoch", "step", "nelbo", "nelbo_bits_per_dim", "likelihood", "reconstruction", "kl",
  "kl_per_step": [K floats], "best", "time"}`` (runs of earlier versions lack ``nelbo_bits_per_dim`` and
  ``likelihood``)
* ``{"kind": "epoch", "epoch", "step", "seconds", "train_loss", "examples"}``

:func:`plot_training_curve` draws the training loss per step and the validation negative ELBO
per epoch (the paper's Figure 7); :func:`plot_kl_per_step` draws the KL of every drawing step
of the best (or last) validation record. Unknown kinds and extra keys are ignored, so the
trainer may add records freely.

:func:`sweep_figure` draws the results of a grid of runs (``python/sweep.py``): the bound on
-log p(x) against the number of drawing steps K, the parameter count or the training time, in nats
per image with bits per dimension on a second axis; :func:`render_sweep_plots` renders all three.

Each plot also has a function returning the figure (``*_figure``); :func:`figure_png` renders a
figure to PNG bytes, so a command can render every plot before writing any file. Files are
written atomically (:func:`avme_ext.checkpoint.atomic_write_bytes`).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # noqa: E402  (no display; must precede pyplot)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullLocator  # noqa: E402
import numpy as np  # noqa: E402

from .checkpoint import atomic_write_bytes  # noqa: E402

__all__ = [
    "MetricsError",
    "figure_png",
    "find_metrics",
    "kl_per_step_figure",
    "plot_kl_per_step",
    "plot_training_curve",
    "read_metrics",
    "render_run_plots",
    "render_sweep_plots",
    "sweep_figure",
    "training_curve_figure",
]

METRICS_FILENAME = "metrics.jsonl"
_REQUIRED = {
    "train": ("step", "loss"),
    "valid": ("epoch", "step", "nelbo"),
    "epoch": ("epoch", "step"),
}


class MetricsError(ValueError):
    """A metrics file is missing, empty or malformed (the message names the file and line)."""


def find_metrics(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/metrics.jsonl`` for a run directory.

    Raises:
        MetricsError: nothing there.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / METRICS_FILENAME
        if not candidate.is_file():
            raise MetricsError(f"{path}: run directory has no {METRICS_FILENAME}")
        return candidate
    if not path.is_file():
        raise MetricsError(f"{path}: metrics file does not exist")
    return path


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a ``metrics.jsonl`` file (or a run directory's) into a list of records.

    Blank lines are skipped. Every other line must be a JSON object with a string ``"kind"``;
    ``train``/``valid``/``epoch`` records must carry their numeric keys (see the module docs).
    A torn last line (a run killed while writing) is an error too: the message says which line.

    Raises:
        MetricsError: missing file, empty file, or a malformed line (naming file and line number).
    """
    path = find_metrics(path)
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MetricsError(f"{path}: cannot read metrics file ({error})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MetricsError(f"{path}:{number}: not valid JSON ({error.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            raise MetricsError(f"{path}:{number}: expected a JSON object with a string \"kind\", got {line[:80]!r}")
        for key in _REQUIRED.get(record["kind"], ()):
            if not _number(record.get(key)):
                raise MetricsError(
                    f"{path}:{number}: {record['kind']!r} record needs a number {key!r}, got {record.get(key)!r}"
                )
        if record["kind"] == "valid" and "kl_per_step" in record:
            steps = record["kl_per_step"]
            if not isinstance(steps, list) or not all(_number(v) for v in steps):
                raise MetricsError(f"{path}:{number}: 'kl_per_step' must be a list of numbers, got {steps!r}")
        records.append(record)
    if not records:
        raise MetricsError(f"{path}: metrics file is empty")
    return records


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def figure_png(fig: plt.Figure) -> bytes:
    """Render ``fig`` to PNG bytes (120 dpi) and close it."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _save_figure(fig: plt.Figure, out_png: str | os.PathLike) -> Path:
    return atomic_write_bytes(Path(out_png), figure_png(fig))


def _add_epoch_axis(ax: plt.Axes, records: list[dict[str, Any]]) -> None:
    """Add a top axis of epochs completed when epochs have a constant number of steps.

    ``epoch``/``valid`` records mark the end of epoch ``e`` at ``step``; the axis is the linear
    map step -> step / steps_per_epoch, drawn only when every record agrees with it within 5%.
    """
    pairs = {(float(r["step"]), float(r["epoch"])) for r in records
             if r["kind"] in ("epoch", "valid") and _number(r.get("epoch")) and _number(r.get("step"))}
    pairs = sorted(p for p in pairs if p[0] > 0 and p[1] > 0)
    if not pairs:
        return
    steps_per_epoch = pairs[-1][0] / pairs[-1][1]
    if not all(abs(e * steps_per_epoch - s) <= 0.05 * s + 1 for s, e in pairs):
        return
    secax = ax.secondary_xaxis(
        "top", functions=(lambda v: np.asarray(v) / steps_per_epoch, lambda v: np.asarray(v) * steps_per_epoch)
    )
    secax.set_xlabel(f"epochs completed ({steps_per_epoch:g} steps per epoch)")


def _typical_gap(steps: np.ndarray) -> int | None:
    """The most common difference between consecutive logged steps (the logging interval), or None."""
    gaps = np.diff(steps)
    gaps = gaps[gaps > 0]
    if not gaps.size:
        return int(steps[0]) if steps.size == 1 and steps[0] > 0 else None
    values, counts = np.unique(gaps, return_counts=True)
    return int(values[np.argmax(counts)])


def training_curve_figure(records: list[dict[str, Any]], *, title: str = "AVME training") -> plt.Figure:
    """The training curve of parsed metrics records (see :func:`plot_training_curve`).

    Raises:
        MetricsError: neither ``train`` nor ``valid`` records.
    """
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    if not train and not valid:
        raise MetricsError("no 'train' or 'valid' records to plot")

    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        steps = np.array([r["step"] for r in train], dtype=float)
        loss = np.array([r["loss"] for r in train], dtype=float)
        gap = _typical_gap(steps)
        averaged = (f"mean over the {gap} steps before each point" if gap and gap > 1 else
                    "one step per point" if gap == 1 else "mean over the steps before each point")
        marker = "." if len(loss) <= 200 else None
        ax.plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=0.8, marker=marker,
                label=f"training loss ({averaged})")
        window = max(1, len(loss) // 50)
        if window > 1:
            ax.plot(steps, _moving_average(loss, window), color="tab:blue", linewidth=1.5,
                    label=f"training loss, moving mean of {window} points")
    if valid:
        vsteps = np.array([r["step"] for r in valid], dtype=float)
        nelbo = np.array([r["nelbo"] for r in valid], dtype=float)
        images = {r.get("num_images") for r in valid}
        over = (f"the {images.pop()} validation images" if len(images) == 1 and None not in images
                else "the validation images")
        ax.plot(vsteps, nelbo, "o-", color="tab:orange", markersize=4,
                label=f"validation negative ELBO (end of each epoch, mean over {over})")
        best = [r for r in valid if r.get("best")]
        if best:
            b = best[-1]
            ax.plot([b["step"]], [b["nelbo"]], "*", color="tab:red", markersize=14,
                    label=f"best validation: {b['nelbo']:.2f} nats (epoch {b['epoch']})")
    shown = np.array([r["loss"] for r in train] + [r["nelbo"] for r in valid], dtype=float)
    shown = shown[np.isfinite(shown)]
    if shown.size:  # every point in view, the first (highest) one included
        low, high = float(shown.min()), float(shown.max())
        margin = max(1.0, 0.05 * (high - low))
        ax.set_ylim(low - margin, high + margin)
    first = min(float(r["step"]) for r in train + valid)
    ax.set_xlim(left=min(0.0, first))

    _add_epoch_axis(ax, records)
    rate_axis = _add_learning_rate_axis(ax, train)

    ax.set_xlabel("training step")
    ax.set_ylabel("negative ELBO (nats per image)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if rate_axis is not None:  # the legend on the top axes, so the rate's line passes under it
        rate_lines, rate_labels = rate_axis.get_legend_handles_labels()
        rate_axis.legend(lines + rate_lines, labels + rate_labels, loc="upper right", fontsize=8)
    else:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def _add_learning_rate_axis(ax: plt.Axes, train: list[dict[str, Any]]) -> plt.Axes | None:
    """Draw the logged learning rate on a right-hand axis when it changes during the run
    (``--lr-schedule cosine``); returns that axis, or None for a constant rate."""
    points = [(float(r["step"]), float(r["lr"])) for r in train if _number(r.get("lr")) and _number(r.get("step"))]
    if len({lr for _, lr in points}) < 2:
        return None
    right = ax.twinx()
    steps, rates = zip(*points)
    right.plot(steps, rates, color="tab:gray", linewidth=1.0, linestyle="--", label="learning rate (right axis)")
    right.set_ylabel("learning rate")
    right.set_ylim(bottom=0.0, top=1.05 * max(rates))
    right.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    return right


def plot_training_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike, *, title: str | None = None) -> Path:
    """Plot the training loss per step and the validation negative ELBO per epoch (nats).

    The x axis is the training step, from 0; a secondary top axis shows epochs when ``epoch`` or
    ``valid`` records allow the mapping. Each training point is a logged record: the mean of
    reconstruction + kl_weight * KL (a negative ELBO once the KL warm-up ends) over the steps since
    the previous record, drawn raw and smoothed; each validation point is the mean negative ELBO
    over the validation images at the end of an epoch, the best one starred. The y range holds
    every point, the first (highest) one included. The legend says what each point averages. A
    learning rate that changes during the run (``--lr-schedule cosine``) is drawn on a right-hand axis.

    Returns:
        the PNG's path (written atomically).

    Raises:
        MetricsError: bad file, or neither ``train`` nor ``valid`` records.
    """
    path = find_metrics(metrics_path)
    try:
        fig = training_curve_figure(read_metrics(path), title=title or f"AVME training: {path.parent.name or path.name}")
    except MetricsError as error:
        raise MetricsError(f"{path}: {error}") from None
    return _save_figure(fig, out_png)


def _pick_valid_record(records: list[dict[str, Any]], which: str, path: Path) -> dict[str, Any]:
    valid = [r for r in records if r["kind"] == "valid" and isinstance(r.get("kl_per_step"), list)]
    if not valid:
        raise MetricsError(f"{path}: no 'valid' record with 'kl_per_step' to plot")
    if which == "best":
        best = [r for r in valid if r.get("best")]
        if best:
            return best[-1]
    return valid[-1]


def kl_per_step_figure(values: Sequence[float], *, title: str = "KL per drawing step") -> plt.Figure:
    """Bar chart of the KL (nats per image) of every drawing step t = 1..K.

    Raises:
        MetricsError: no values, or a non-finite one.
    """
    values = [float(v) for v in values]
    if not values:
        raise MetricsError("kl_per_step is empty: nothing to plot")
    if not all(math.isfinite(v) for v in values):
        raise MetricsError(f"kl_per_step has non-finite values: {values}")
    steps = np.arange(1, len(values) + 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(values) + 2), 4))
    bars = ax.bar(steps, values, color="tab:green", label=f"KL per step (total {sum(values):.2f} nats)")
    if len(values) <= 24:
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(steps)
    ax.set_xlabel("drawing step t")
    ax.set_ylabel("KL(q(z_t|·) || p(z_t)) (nats per image)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def plot_kl_per_step(
    source: str | os.PathLike | Sequence[float],
    out_png: str | os.PathLike,
    *,
    which: str = "best",
    title: str | None = None,
) -> Path:
    """Bar chart of the KL (nats per image) of every drawing step t = 1..K, written to ``out_png``.

    Args:
        source: a metrics file or run directory (the ``kl_per_step`` of its last validation record
            marked ``best``, or of its last one when ``which="last"`` or none is marked), or a list
            of K numbers (e.g. ``EvalResult.summary()["kl_per_step"]``).
        which: ``"best"`` or ``"last"`` validation record.

    Returns:
        the PNG's path (written atomically).
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if isinstance(source, (str, os.PathLike)):
        path = find_metrics(source)
        record = _pick_valid_record(read_metrics(path), which, path)
        values = record["kl_per_step"]
        label = f"{'best' if record.get('best') else 'last'} validation, epoch {record['epoch']}"
        default_title = f"KL per drawing step ({label}): {path.parent.name or path.name}"
    else:
        values = source
        default_title = "KL per drawing step"
    return _save_figure(kl_per_step_figure(values, title=title or default_title), out_png)


def render_run_plots(metrics_path: str | os.PathLike, *, which: str = "best") -> dict[str, bytes]:
    """Render a run's plots to PNG bytes without writing anything.

    Returns:
        ``{"training_curve.png": ..., "kl_per_step.png": ...}``; the KL plot only when a
        validation record has ``kl_per_step``.

    Raises:
        MetricsError: bad file, or nothing to plot.
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    path = find_metrics(metrics_path)
    records = read_metrics(path)
    name = path.parent.name or path.name
    try:
        pngs = {"training_curve.png": figure_png(training_curve_figure(records, title=f"AVME training: {name}"))}
    except MetricsError as error:
        raise MetricsError(f"{path}: {error}") from None
    if any(r["kind"] == "valid" and isinstance(r.get("kl_per_step"), list) for r in records):
        record = _pick_valid_record(records, which, path)
        label = f"{'best' if record.get('best') else 'last'} validation, epoch {record['epoch']}"
        figure = kl_per_step_figure(record["kl_per_step"], title=f"KL per drawing step ({label}): {name}")
        pngs["kl_per_step.png"] = figure_png(figure)
    return pngs


# --------------------------------------------------------------------------- sweeps
#: What a sweep plot can put on its x axis: record key -> (axis label, record key whose value makes one line,
#: how a line is named, file name).
SWEEP_AXES: dict[str, tuple[str, str, str, str]] = {
    "steps": ("drawing steps K", "hidden", "LSTM units {}", "bound_vs_steps.png"),
    "parameters": ("parameters", "steps", "K = {}", "bound_vs_parameters.png"),
    "train_seconds": ("training time (s)", "hidden", "LSTM units {}", "bound_vs_time.png"),
}
#: The keys a sweep record must have (see ``python/sweep.py``).
SWEEP_RECORD_KEYS = ("steps", "enc_hidden", "dec_hidden", "parameters", "train_seconds", "bound", "bound_name",
                     "data_dim")


def _hidden_label(record: dict[str, Any]) -> str:
    """The LSTM sizes of a record: ``"256"`` when encoder and decoder agree, else ``"256/128"``."""
    enc, dec = record["enc_hidden"], record["dec_hidden"]
    return str(enc) if enc == dec else f"{enc}/{dec}"


def sweep_figure(records: Sequence[dict[str, Any]], x: str, *, title: str = "AVME sweep") -> plt.Figure:
    """The bound of every run of a sweep against ``x`` (a key of :data:`SWEEP_AXES`), one line per group.

    Against K and against time, one line per LSTM size (its points in order of K); against the
    parameter count, one line per K (its points in order of size). The x axis is logarithmic (base 2
    for K). The left axis is nats per image; the right one the same bound in bits per dimension,
    nats / (D ln 2).

    Raises:
        MetricsError: no records, a record without a key of :data:`SWEEP_RECORD_KEYS`, runs of
            different D or different bounds, or an unknown ``x``.
    """
    if x not in SWEEP_AXES:
        raise MetricsError(f"x must be one of {tuple(SWEEP_AXES)}, got {x!r}")
    if not records:
        raise MetricsError("no sweep records to plot")
    for record in records:
        missing = [key for key in SWEEP_RECORD_KEYS if key not in record]
        if missing:
            raise MetricsError(f"sweep record {record.get('name', record)!r} lacks {missing}")
    for key in ("data_dim", "bound_name"):
        values = {r[key] for r in records}
        if len(values) > 1:
            raise MetricsError(f"sweep records of different {key} cannot share a plot: {sorted(values, key=str)}")
    label, group_key, group_name, _ = SWEEP_AXES[x]
    order_key = "enc_hidden" if group_key == "steps" else "steps"
    groups: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        group = _hidden_label(record) if group_key == "hidden" else record[group_key]
        groups.setdefault(group, []).append(record)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in sorted(groups, key=lambda g: tuple(int(v) for v in str(g).split("/"))):
        points = sorted(groups[group], key=lambda r: r[order_key])
        ax.plot([r[x] for r in points], [r["bound"] for r in points], "o-", markersize=4,
                label=group_name.format(group))
    ax.set_xscale("log", base=2 if x == "steps" else 10)
    if x == "steps":  # a tick at every K of the grid
        ax.set_xticks(sorted({r["steps"] for r in records}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
    data_dim = records[0]["data_dim"]
    ax.secondary_yaxis("right", functions=(lambda v: np.asarray(v) / (data_dim * math.log(2)),
                                           lambda v: np.asarray(v) * (data_dim * math.log(2)))
                       ).set_ylabel("bits per dimension")
    ax.set_xlabel(label)
    ax.set_ylabel(f"{records[0]['bound_name']} (nats per image)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def render_sweep_plots(records: Sequence[dict[str, Any]], *, title: str = "AVME sweep") -> dict[str, bytes]:
    """The three sweep plots as PNG bytes, by file name (see :data:`SWEEP_AXES`), without writing anything."""
    return {name: figure_png(sweep_figure(records, x, title=title)) for x, (_, _, _, name) in SWEEP_AXES.items()}
