#!/usr/bin/env python
"""Turn a results file of ``bench/run.py`` into Markdown tables in bench/README.md and a plot.

Usage::

    python bench/report.py bench/results/2026-01-01-nvidia-h100-80gb-hbm3.json
    python bench/report.py results.json --readme /tmp/README.md --plot-dir /tmp

Writes between ``<!-- results:start -->`` and ``<!-- results:end -->`` in the README
(``--readme``, default bench/README.md): the targets and whether the run meets them, the
training step of every implementation side by side per (B, K) with the ratio "best fused /
best non-fused", the fraction of the measured matmul peak, sampling, IWAE, compile times,
memory and every record. Also ``<stem>-train-throughput.png`` (training throughput against
batch size, log-log) next to the results file (``--plot-dir`` to put it elsewhere). Several
results files may be given: their records are merged (a later file's record replaces an earlier
one with the same workload, impl, B and K); the header and the plot's name come from the first.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.append(str(ROOT))

from avme_ext.loop_types import PRECISIONS  # noqa: E402
from bench.analysis import (  # noqa: E402
    ConfigSummary,
    Record,
    core_precision_of,
    impl_sort_key,
    is_fused,
    is_reference,
    load_results,
    summarize_configs,
)

START = "<!-- results:start -->"
END = "<!-- results:end -->"
REFERENCE_IMPL = "ref-eager"

__all__ = [
    "load_results",
    "Check",
    "check_targets",
    "render_markdown",
    "replace_between_markers",
    "plot_train_throughput",
    "main",
]

#: The performance goals checked on every results file: (workload, what, threshold).
TRAIN_RATIO_TARGET = 1.5
B100_OVER_EAGER_TARGET = 10.0
B100_RATE_AIM = 100_000.0
B4096_BF16_RATE_AIM = 500_000.0
INFERENCE_RATIO_TARGET = 1.5


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits and thousands separators; '' for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _impl_order(records: list[Record]) -> list[str]:
    return sorted({r["impl"] for r in records}, key=impl_sort_key)


def _config_label(batch: int | None, steps: int | None, workload: str = "train") -> str:
    if workload == "iwae":
        return f"K={steps}"
    size = f"N={batch}" if workload == "sample" else f"B={batch}"
    return f"{size} K={steps}" if steps else size


def _cell(r: Record | None) -> str:
    if r is None:
        return ""
    if r.get("value") is None:
        reason = str(r.get("skipped", ""))
        return "left out (budget)" if reason.startswith("time budget") else "skipped"
    return fmt(r["value"])


def _peak_text(r: Record | None) -> str:
    if r is None or r.get("fraction_of_peak") is None:
        return ""
    return f"{fmt(r.get('tflops'), 3)} TFLOP/s, {100 * r['fraction_of_peak']:.1f}% of {r.get('precision')} peak"


def _notes(r: Record) -> str:
    notes = []
    if r.get("skipped"):
        notes.append(f"skipped: {r['skipped']}")
    if r.get("workload") == "iwae" and r.get("images") is not None:
        notes.append(
            f"images={r['images']}, S={r.get('samples')}, extrapolated={str(bool(r.get('extrapolated'))).lower()}"
        )
        if r.get("seconds_full_test") is not None:
            notes.append(f"{fmt(r['seconds_full_test'], 3)} s for {fmt(r.get('target_images'))} images")
    if r.get("what") and r.get("workload") in ("compile", "memory", "roofline"):
        notes.append(str(r["what"]))
    if r.get("workload") == "memory" and r.get("value") is not None:
        notes.append(
            f"persistent {fmt(r.get('persistent_mib'), 3)} MiB, step transient "
            f"{fmt(r.get('step_transient_mib'), 3)} MiB, reserved {fmt(r.get('reserved_mib'), 3)} MiB"
        )
    if r.get("anchor_ref_eager") is not None:
        notes.append(
            f"ref-eager alongside: {fmt(r['anchor_ref_eager'])} (first pass "
            f"{fmt(r.get('anchor_ref_eager_first_pass'))})"
        )
    if r.get("design_note"):
        notes.append(str(r["design_note"]))
    if r.get("graph_breaks"):
        notes.append(f"{r['graph_breaks']} graph breaks")
    return "; ".join(notes)


# --------------------------------------------------------------------------- targets


@dataclass
class Check:
    """One performance goal and what the results say about it.

    Attributes:
        goal: what is asked, in words.
        kind: ``"target"`` (required) or ``"aim"``.
        measured: the measured quantity, formatted ('' when not measured).
        status: ``"met"``, ``"not met"`` or ``"not measured"``.
        note: the records it comes from, or why it is incomplete.
    """

    goal: str
    kind: str
    measured: str
    status: str
    note: str = ""


def _status(value: float | None, threshold: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value >= threshold else "not met"


def _left_out_note(summary: ConfigSummary) -> str:
    if not summary.reference_left_out:
        return ""
    return f"reference modes left out by the time budget: {', '.join(summary.reference_left_out)}"


def _pair_note(summary: ConfigSummary) -> str:
    parts = []
    if summary.best_fused is not None:
        parts.append(f"best fused {summary.best_fused['impl']} {fmt(summary.best_fused['value'])}")
    if summary.best_reference is not None:
        parts.append(f"best non-fused {summary.best_reference['impl']} {fmt(summary.best_reference['value'])}")
    left = _left_out_note(summary)
    return "; ".join(parts + ([left] if left else []))


def _primary_steps(data: dict[str, Any], records: list[Record]) -> int | None:
    steps = (data.get("config") or {}).get("steps") or []
    if steps:
        return int(steps[0])
    train = [int(r["steps"]) for r in records if r.get("workload") == "train" and r.get("steps")]
    return min(train) if train else None


def check_targets(data: dict[str, Any]) -> list[Check]:
    """The performance goals, checked on the records of ``data`` (see bench/README.md)."""
    records = data["records"]
    k = _primary_steps(data, records)
    checks: list[Check] = []
    train = summarize_configs(records, "train")
    for summary in train:
        ratio = summary.ratio
        checks.append(
            Check(
                f"training {_config_label(summary.batch, summary.steps)}: best fused / best non-fused >= "
                f"{TRAIN_RATIO_TARGET:g}x",
                "target",
                "" if ratio is None else f"{ratio:.2f}x",
                _status(ratio, TRAIN_RATIO_TARGET),
                _pair_note(summary),
            )
        )
    at = {(s.batch, s.steps): s for s in train}
    b100 = at.get((100, k))
    over = None if b100 is None else b100.over_ref_eager
    checks.append(
        Check(
            f"training B=100 K={k}: best fused / ref-eager >= {B100_OVER_EAGER_TARGET:g}x",
            "target",
            "" if over is None else f"{over:.2f}x",
            _status(over, B100_OVER_EAGER_TARGET),
            "" if b100 is None or b100.ref_eager is None else f"ref-eager {fmt(b100.ref_eager.get('value'))}",
        )
    )
    top = None if b100 is None else b100.best_fused
    rate = None if top is None else top["value"]
    checks.append(
        Check(
            f"training B=100 K={k}: best fused >= {fmt(B100_RATE_AIM)} samples/s",
            "aim",
            fmt(rate),
            _status(rate, B100_RATE_AIM),
            "" if top is None else str(top["impl"]),
        )
    )
    bf16 = [
        r
        for r in records
        if r.get("workload") == "train"
        and r.get("batch") == 4096
        and r.get("steps") == k
        and is_fused(r)
        and core_precision_of(r) == "bf16"
        and r.get("value") is not None
    ]
    top = max(bf16, key=lambda r: r["value"]) if bf16 else None
    checks.append(
        Check(
            f"training B=4096 K={k}: best fused bf16 >= {fmt(B4096_BF16_RATE_AIM)} samples/s",
            "aim",
            fmt(None if top is None else top["value"]),
            _status(None if top is None else top["value"], B4096_BF16_RATE_AIM),
            "" if top is None else str(top["impl"]),
        )
    )
    for workload, label in (("sample", "sampling"), ("iwae", "IWAE")):
        summaries = summarize_configs(records, workload)
        if not summaries:
            checks.append(
                Check(
                    f"{label}: best fused / best reference mode >= {INFERENCE_RATIO_TARGET:g}x",
                    "target",
                    "",
                    "not measured",
                )
            )
        for summary in summaries:
            ratio = summary.ratio
            checks.append(
                Check(
                    f"{label} {_config_label(summary.batch, summary.steps, workload)}: best fused / best reference "
                    f"mode >= {INFERENCE_RATIO_TARGET:g}x",
                    "target",
                    "" if ratio is None else f"{ratio:.2f}x",
                    _status(ratio, INFERENCE_RATIO_TARGET),
                    _pair_note(summary),
                )
            )
    return checks


# --------------------------------------------------------------------------- tables


def _side_by_side(records: list[Record], workload: str, label: str) -> list[str]:
    """Rows: implementations; columns: configurations; then best fused / best non-fused per column."""
    rs = [r for r in records if r.get("workload") == workload]
    if not rs:
        return []
    summaries = summarize_configs(rs, workload)
    columns = [(s.batch, s.steps) for s in summaries]
    cell = {(r.get("batch"), r.get("steps"), r["impl"]): r for r in rs}
    rows = [[impl, *(_cell(cell.get((b, k, impl))) for b, k in columns)] for impl in _impl_order(rs)]
    rows.append(["**best non-fused**", *(_best_cell(s.best_reference, s.reference_left_out) for s in summaries)])
    rows.append(["**best fused**", *(_best_cell(s.best_fused, []) for s in summaries)])
    rows.append(
        ["**best fused / best non-fused**", *("" if s.ratio is None else f"**{s.ratio:.2f}x**" for s in summaries)]
    )
    if workload == "train":
        rows.append(
            [
                "best fused / ref-eager",
                *("" if s.over_ref_eager is None else f"{s.over_ref_eager:.2f}x" for s in summaries),
            ]
        )
    rows.append(["best fused: of measured peak", *(_peak_text(s.best_fused) for s in summaries)])
    rows.append(["best non-fused: of measured peak", *(_peak_text(s.best_reference) for s in summaries)])
    header = ["impl", *(_config_label(b, k, workload) for b, k in columns)]
    return [label, "", *_table(header, rows), ""]


def _best_cell(r: Record | None, left_out: list[str]) -> str:
    if r is None:
        return ""
    text = f"{fmt(r['value'])} ({r['impl']})"
    return text + (" (some left out)" if left_out else "")


def _pivot(records: list[Record], workload: str, label: str) -> list[str]:
    """Rows: implementations; columns: configurations; plain values (compile times, memory)."""
    rs = [r for r in records if r.get("workload") == workload]
    if not rs:
        return []
    columns = sorted({(r.get("batch"), r.get("steps")) for r in rs}, key=lambda c: (c[1] or 0, c[0] or 0))
    cell = {(r.get("batch"), r.get("steps"), r["impl"]): r for r in rs}
    rows = [[impl, *(_cell(cell.get((b, k, impl))) for b, k in columns)] for impl in _impl_order(rs)]
    return [label, "", *_table(["impl", *(_config_label(b, k) for b, k in columns)], rows), ""]


def _all_records(records: list[Record]) -> list[str]:
    workloads = ["roofline", "train", "compile", "sample", "iwae", "memory"]

    def key(r: Record) -> tuple[Any, ...]:
        w = workloads.index(r["workload"]) if r["workload"] in workloads else len(workloads)
        return (w, r.get("steps") or 0, r.get("batch") or 0, impl_sort_key(r["impl"]))

    rows = []
    for r in sorted(records, key=key):
        value = "skipped" if r.get("value") is None else fmt(r["value"])
        spread = ""
        if r.get("value_min") is not None and r.get("value_max") is not None:
            spread = f"{fmt(r['value_min'], 3)}–{fmt(r['value_max'], 3)}"
        frac = r.get("fraction_of_peak")
        rows.append(
            [
                r["workload"],
                r["impl"],
                fmt(r.get("batch")),
                fmt(r.get("steps")),
                value,
                r.get("unit", ""),
                fmt(r.get("iqr"), 3),
                spread,
                fmt(r.get("repeats")),
                fmt(r.get("tflops"), 3),
                "" if frac is None else f"{100 * frac:.1f}% {r.get('precision', '')}",
                _notes(r),
            ]
        )
    return [
        (
            "<details><summary>All records (value: median rate; IQR and min–max of the rate over the repeats; "
            "TFLOP/s: algorithmic FLOPs over the median time; of peak: over the measured matmul rate of the "
            "same precision)</summary>"
        ),
        "",
        *_table(
            ["workload", "impl", "B", "K", "value", "unit", "IQR", "min–max", "n", "TFLOP/s", "of peak", "notes"], rows
        ),
        "",
        "</details>",
    ]


def render_markdown(data: dict[str, Any], source: str | None = None, plot: str | None = None) -> str:
    """The README section for a results dict (see :func:`bench.analysis.load_results`)."""
    records = data["records"]
    designs = data.get("avme_designs")
    lines = [
        (
            f"Results on **{data.get('device')}** ({data.get('date')}): torch {data.get('torch')}, "
            f"CUDA {data.get('cuda')}, driver {data.get('driver')}, commit `{str(data.get('git_commit'))[:12]}`"
            f"{' (dirty tree)' if data.get('git_dirty') else ''}, fused ops built: "
            f"{'yes' if data.get('avme_ops_available') else 'no'}, designs: "
            f"{', '.join(designs) if designs else 'the default only (no avme_ext.ops.design)'}."
        ),
        "",
    ]
    if source:
        lines += [f"Source: `{source}`. Command: `{data.get('command')}`", ""]
    for extra in data.get("commands", [])[1:]:
        lines += [f"Records added by: `{extra}`", ""]
    if data.get("config", {}).get("smoke"):
        lines += ["**Smoke run (tiny sizes): these numbers say nothing about performance.**", ""]
    peaks = data.get("peaks") or {}
    if peaks:
        lines += ["Measured matmul peaks (TFLOP/s): " + ", ".join(f"{k} {fmt(v)}" for k, v in peaks.items()), ""]
    checks = check_targets(data)
    lines += ["**Targets** (checked by bench/report.py on this file):", ""]
    lines += _table(
        ["goal", "kind", "measured", "status", "from"],
        [
            [c.goal, c.kind, c.measured, f"**{c.status}**" if c.status == "not met" else c.status, c.note]
            for c in checks
        ],
    )
    lines += [""]
    lines += _side_by_side(
        records, "train", "**Training step** (zero_grad, forward, loss, backward, Adam), samples/s, median:"
    )
    if plot:
        lines += [f"![training throughput against batch size]({plot})", ""]
    lines += _side_by_side(records, "sample", "**Sampling**, images/s:")
    lines += _side_by_side(
        records,
        "iwae",
        "**IWAE bound**, images/s (see the notes of the records: "
        "extrapolated from a subset of the test images where marked):",
    )
    lines += _pivot(records, "compile", "**Compile / capture time**, s (wall clock, excluded from the timings):")
    lines += _pivot(records, "memory", "**Peak GPU memory of a training step**, MiB:")
    lines += _all_records(records)
    return "\n".join(lines).rstrip() + "\n"


def replace_between_markers(text: str, content: str) -> str:
    """Replace what lies between the results markers of ``text`` with ``content``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"the README needs the markers {START} and {END} (in this order)")
    return text[: start + len(START)] + "\n" + content.rstrip() + "\n" + text[end:]


# --------------------------------------------------------------------------- plot


def _plot_series(train: list[Record]) -> list[tuple[str, list[Record]]]:
    """Every reference mode, and per precision the fastest fused record at each B (any design, any mode)."""
    series = []
    for impl in _impl_order([r for r in train if is_reference(r)]):
        series.append((impl, sorted((r for r in train if r["impl"] == impl), key=lambda r: r["batch"])))
    for precision in PRECISIONS:
        fused = [r for r in train if is_fused(r) and core_precision_of(r) == precision]
        tops: dict[int, Record] = {}
        for r in fused:
            if r["batch"] not in tops or r["value"] > tops[r["batch"]]["value"]:
                tops[r["batch"]] = r
        if tops:
            series.append((f"fused, best design, {precision}", [tops[b] for b in sorted(tops)]))
    return series


def plot_train_throughput(data: dict[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Log-log plot of training samples/s against B (K = the first K); None if no data.

    One line per reference mode, and one per precision for the fused ops: the fastest design and
    mode (eager or whole-step graph) measured at each B.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    train = [r for r in data["records"] if r["workload"] == "train" and r.get("value") is not None]
    if not train:
        return None
    config_steps = data.get("config", {}).get("steps") or []
    steps = config_steps[0] if config_steps else min(r["steps"] for r in train)
    train = [r for r in train if r["steps"] == steps]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, rs in _plot_series(train):
        xs = [r["batch"] for r in rs]
        ys = [r["value"] for r in rs]
        lo = [max(0.0, y - (r.get("value_min") or y)) for y, r in zip(ys, rs, strict=True)]
        hi = [max(0.0, (r.get("value_max") or y) - y) for y, r in zip(ys, rs, strict=True)]
        ax.errorbar(
            xs,
            ys,
            yerr=[lo, hi],
            marker="o",
            capsize=3,
            label=label,
            linestyle="-" if label.startswith("fused") else "--",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    batches = sorted({r["batch"] for r in train})
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch size B")
    ax.set_ylabel("training samples / s")
    ax.set_title(f"AVME training step, K={steps} ({data.get('device')}); bars: min-max", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", nargs="+", help="results .json file(s) written by bench/run.py")
    p.add_argument("--readme", default=str(ROOT / "bench" / "README.md"), help="the Markdown file to update")
    p.add_argument("--plot-dir", help="where to write <stem>-train-throughput.png (default: beside the results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--print", action="store_true", help="also print the Markdown")
    p.add_argument("--print-targets", action="store_true", help="also print the targets and their status")
    args = p.parse_args(argv)

    data = load_results(args.results)
    first = Path(args.results[0]).resolve()
    readme = Path(args.readme).resolve()
    plot_rel = None
    if not args.no_plot:
        plot_path = Path(args.plot_dir or first.parent).resolve() / f"{first.stem}-train-throughput.png"
        if plot_train_throughput(data, plot_path) is not None:
            plot_rel = os.path.relpath(plot_path, readme.parent)
            print(f"wrote {plot_path}")
    sources = ", ".join(os.path.relpath(Path(p).resolve(), readme.parent) for p in args.results)
    markdown = render_markdown(data, source=sources, plot=plot_rel)
    text = readme.read_text(encoding="utf-8")
    readme.write_text(replace_between_markers(text, markdown), encoding="utf-8")
    print(f"updated {readme}")
    if args.print:
        print(markdown)
    if args.print_targets:
        for check in check_targets(data):
            print(
                f"{check.status:>12s}  {check.kind:6s}  {check.goal}: {check.measured or '-'}"
                f"{'  (' + check.note + ')' if check.note else ''}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
