#!/usr/bin/env python
"""Turn a results file of ``bench/run.py`` into Markdown tables in bench/README.md and a plot.

Usage::

    python bench/report.py bench/results/2026-01-01-nvidia-h100-80gb-hbm3.json
    python bench/report.py results.json --readme /tmp/README.md --plot-dir /tmp

Writes the tables between ``<!-- results:start -->`` and ``<!-- results:end -->`` in the README
(``--readme``, default bench/README.md), and ``<stem>-train-throughput.png`` (training
throughput against batch size per implementation, log-log) next to the results file
(``--plot-dir`` to put it elsewhere). Several results files may be given: their records are
merged (a later file's record replaces an earlier one with the same workload, impl, B and K);
the header and the plot's name come from the first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

START = "<!-- results:start -->"
END = "<!-- results:end -->"
ROOT = Path(__file__).resolve().parent.parent
REFERENCE_IMPL = "ref-eager"

__all__ = ["load_results", "render_markdown", "replace_between_markers", "plot_train_throughput", "main"]


def load_results(paths: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Load and merge results files (header of the first, records of all, later ones winning)."""
    merged: dict[str, Any] | None = None
    records: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise ValueError(f"{path}: not a bench results file (no 'records' list)")
        if merged is None:
            merged = dict(data)
            merged["sources"] = []
        merged["sources"].append(str(path))
        for r in data["records"]:
            records[(r.get("workload"), r.get("impl"), r.get("batch"), r.get("steps"))] = r
    if merged is None:
        raise ValueError("no results file given")
    merged["records"] = list(records.values())
    return merged


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


def _impl_order(records: list[dict[str, Any]]) -> list[str]:
    order: list[str] = []
    for r in records:
        if r["impl"] not in order:
            order.append(r["impl"])
    if REFERENCE_IMPL in order:
        order.remove(REFERENCE_IMPL)
        order.insert(0, REFERENCE_IMPL)
    return order


def _notes(r: dict[str, Any]) -> str:
    notes = []
    if r.get("skipped"):
        notes.append(f"skipped: {r['skipped']}")
    if r.get("workload") == "iwae" and r.get("images") is not None:
        notes.append(f"images={r['images']}, S={r.get('samples')}, extrapolated={str(bool(r.get('extrapolated'))).lower()}")
        if r.get("seconds_full_test") is not None:
            notes.append(f"{fmt(r['seconds_full_test'], 3)} s for {fmt(r.get('target_images'))} images")
    if r.get("what") and r.get("workload") in ("compile", "memory", "roofline"):
        notes.append(str(r["what"]))
    if r.get("workload") == "memory" and r.get("value") is not None:
        notes.append(f"persistent {fmt(r.get('persistent_mib'), 3)} MiB, step transient "
                     f"{fmt(r.get('step_transient_mib'), 3)} MiB, reserved {fmt(r.get('reserved_mib'), 3)} MiB")
    if r.get("graph_breaks"):
        notes.append(f"{r['graph_breaks']} graph breaks")
    return "; ".join(notes)


def _pivot(records: list[dict[str, Any]], workload: str, unit_label: str, speedup: bool) -> list[str]:
    """Rows (B, K) x columns impl of one workload's values, with speed-ups over the reference."""
    rs = [r for r in records if r["workload"] == workload]
    if not rs:
        return []
    impls = _impl_order(rs)
    configs = sorted({(r.get("batch") or 0, r.get("steps") or 0) for r in rs}, key=lambda c: (c[1], c[0]))
    cell = {(r.get("batch") or 0, r.get("steps") or 0, r["impl"]): r for r in rs}
    rows = []
    for batch, steps in configs:
        ref = cell.get((batch, steps, REFERENCE_IMPL))
        row = [fmt(batch) if batch else "", fmt(steps) if steps else ""]
        for impl in impls:
            r = cell.get((batch, steps, impl))
            if r is None:
                row.append("")
            elif r.get("value") is None:
                row.append("skipped")
            else:
                text = fmt(r["value"])
                if speedup and ref is not None and ref.get("value"):
                    text += f" ({r['value'] / ref['value']:.2f}x)"
                row.append(text)
        rows.append(row)
    header = ["B", "K", *impls]
    return [f"{unit_label}", "", *_table(header, rows), ""]


def render_markdown(data: dict[str, Any], source: str | None = None, plot: str | None = None) -> str:
    """The README section for a results dict (see :func:`load_results`)."""
    records = data["records"]
    lines = [
        f"Results on **{data.get('device')}** ({data.get('date')}): torch {data.get('torch')}, "
        f"CUDA {data.get('cuda')}, driver {data.get('driver')}, commit `{str(data.get('git_commit'))[:12]}`"
        f"{' (dirty tree)' if data.get('git_dirty') else ''}, fused ops built: "
        f"{'yes' if data.get('avme_ops_available') else 'no'}.",
        "",
    ]
    if source:
        lines += [f"Source: `{source}`. Command: `{data.get('command')}`", ""]
    for extra in data.get("commands", [])[1:]:
        lines += [f"Records added by: `{extra}`", ""]
    if data.get("config", {}).get("smoke"):
        lines += ["**Smoke run (tiny sizes): these numbers say nothing about performance.**", ""]
    lines += _pivot(records, "train", "**Training step**, samples/s (median; in brackets: speed-up over ref-eager):",
                    speedup=True)
    if plot:
        lines += [f"![training throughput against batch size]({plot})", ""]
    lines += _pivot(records, "compile", "**Compile / capture time**, s (wall clock, excluded from the timings):",
                    speedup=False)
    lines += _pivot(records, "sample", "**Sampling**, images/s:", speedup=True)
    lines += _pivot(records, "memory", "**Peak GPU memory of a training step**, MiB:", speedup=False)

    rows = []
    workloads = ["roofline", "train", "compile", "sample", "iwae", "memory"]
    impls = _impl_order(records)

    def key(r: dict[str, Any]) -> tuple:
        w = workloads.index(r["workload"]) if r["workload"] in workloads else len(workloads)
        return (w, r.get("steps") or 0, r.get("batch") or 0, impls.index(r["impl"]))

    for r in sorted(records, key=key):
        value = "skipped" if r.get("value") is None else fmt(r["value"])
        spread = ""
        if r.get("value_min") is not None and r.get("value_max") is not None:
            spread = f"{fmt(r['value_min'], 3)}–{fmt(r['value_max'], 3)}"
        frac = r.get("fraction_of_peak")
        rows.append([
            r["workload"], r["impl"], fmt(r.get("batch")), fmt(r.get("steps")), value, r.get("unit", ""),
            fmt(r.get("iqr"), 3), spread, fmt(r.get("repeats")), fmt(r.get("tflops"), 3),
            "" if frac is None else f"{100 * frac:.1f}% {r.get('precision', '')}", _notes(r),
        ])
    lines += ["**All records** (value: median rate; IQR and min–max of the rate over the repeats; "
              "TFLOP/s: algorithmic FLOPs over the median time; % of peak: over the measured matmul "
              "rate of the same precision):", ""]
    lines += _table(["workload", "impl", "B", "K", "value", "unit", "IQR", "min–max", "n", "TFLOP/s", "of peak", "notes"],
                    rows)
    return "\n".join(lines).rstrip() + "\n"


def replace_between_markers(text: str, content: str) -> str:
    """Replace what lies between the results markers of ``text`` with ``content``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"the README needs the markers {START} and {END} (in this order)")
    return text[: start + len(START)] + "\n" + content.rstrip() + "\n" + text[end:]


# --------------------------------------------------------------------------- plot


def plot_train_throughput(data: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Log-log plot of training samples/s against B per implementation (K = the first K); None if no data."""
    import matplotlib

    matplotlib.use("Agg")
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
    for impl in _impl_order(train):
        rs = sorted((r for r in train if r["impl"] == impl), key=lambda r: r["batch"])
        xs = [r["batch"] for r in rs]
        ys = [r["value"] for r in rs]
        lo = [max(0.0, y - (r.get("value_min") or y)) for y, r in zip(ys, rs)]
        hi = [max(0.0, (r.get("value_max") or y) - y) for y, r in zip(ys, rs)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=impl)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results .json file(s) written by bench/run.py")
    p.add_argument("--readme", default=str(ROOT / "bench" / "README.md"), help="the Markdown file to update")
    p.add_argument("--plot-dir", help="where to write <stem>-train-throughput.png (default: beside the results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--print", action="store_true", help="also print the Markdown")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
