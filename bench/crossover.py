#!/usr/bin/env python
"""Write the crossover table of ``impl="auto"`` (avme_ext/dispatch.py) from a results file.

Usage::

    python bench/crossover.py bench/results/2026-01-01-nvidia-h100-80gb-hbm3.json
    python bench/crossover.py results.json --dispatch avme_ext/dispatch.py --out /tmp/dispatch.py --print

For the results file's GPU, dtype float32 and each precision (fp32, tf32, bf16), the training
records decide, per measured batch size B, whether a fused design is faster than every
reference mode:

- a design's rate at (B, K) is the lowest of its measured variants (eager, whole-step CUDA
  graph), so it wins however the host runs it; a design with a variant that failed there does
  not count; ``auto`` (the host's own choice) counts only where no named design was measured;
- it must beat the fastest reference mode measured at (B, K) (times ``--margin``) at every K
  measured at that B; if a reference mode was left out there by the run's time budget, nothing
  is known and B gets ``"ref"``;
- among the winners, the fastest at the first K is the choice for B; with no winner, ``"ref"``.

Between two measured batch sizes the choice is a design that wins at both (the faster at the
larger one), else ``"ref"``; below the smallest and above the largest measured B, ``"ref"``.
The entries replace those of the same (GPU, dtype, precision) in the table between the markers
of ``--dispatch`` (other GPUs' entries are kept), with the source named beside them and the model
they were measured at (the run's ``--model-size`` and the K of its training records): ``auto``
uses them only for a model of those sizes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.append(str(ROOT))

from avme_ext.dispatch import (  # noqa: E402
    DESIGN_NAMES,
    MODEL_FIELDS,
    REF,
    MeasuredModel,
    TableBlock,
    check_models,
    check_table,
    marker_span,
    parse_table,
)
from avme_ext.loop_types import PRECISIONS  # noqa: E402
from bench.analysis import (  # noqa: E402
    Record,
    budget_skipped,
    core_precision_of,
    design_of,
    is_fused,
    is_reference,
    load_results,
)

__all__ = [
    "PointDecision",
    "decide_point",
    "decide",
    "entries_from_points",
    "measured_model",
    "render_block",
    "update_source",
    "main",
]

DTYPE = "float32"


@dataclass
class PointDecision:
    """What the records say at one measured batch size.

    Attributes:
        batch: B.
        winners: design -> its rate at the first K, for every design faster than every
            reference mode at every K measured at B.
        notes: why designs did not count, or why nothing is known.
    """

    batch: int
    winners: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def choice(self) -> str:
        return max(self.winners, key=self.winners.__getitem__) if self.winners else REF


def decide_point(records: list[Record], batch: int, precision: str, margin: float = 1.0) -> PointDecision:
    """The :class:`PointDecision` of ``precision`` at ``batch`` from the training ``records``."""
    here = [r for r in records if r.get("workload") == "train" and r.get("batch") == batch]
    steps_list = sorted({int(r["steps"]) for r in here if r.get("steps")})
    decision = PointDecision(batch)
    candidates: dict[str, float] | None = None
    for steps in steps_list:
        at = [r for r in here if r.get("steps") == steps]
        refs = [r for r in at if is_reference(r)]
        left_out = [r["impl"] for r in refs if budget_skipped(r)]
        measured_refs = [r for r in refs if r.get("value") is not None]
        if left_out:
            decision.notes.append(f"K={steps}: reference modes left out by the time budget: {', '.join(left_out)}")
            return decision
        if not measured_refs:
            decision.notes.append(f"K={steps}: no reference mode measured")
            return decision
        best_ref = max(measured_refs, key=lambda r: r["value"])
        rates = _design_rates(at, precision, decision.notes, steps)
        if not rates:
            decision.notes.append(f"K={steps}: no fused design measured in {precision}")
        beating = {d: v for d, v in rates.items() if v > margin * best_ref["value"]}
        for design in sorted(set(rates) - set(beating)):
            decision.notes.append(
                f"K={steps}: {design} {rates[design]:,.0f} <= {margin:g} x {best_ref['impl']} {best_ref['value']:,.0f}"
            )
        if candidates is None:
            candidates = beating  # ranked by the first K's rates
        else:
            candidates = {d: v for d, v in candidates.items() if d in beating}
    decision.winners = candidates or {}
    return decision


def _design_rates(records: list[Record], precision: str, notes: list[str], steps: int) -> dict[str, float]:
    """design -> lowest measured rate of its variants; designs with a failed variant are left out."""
    by_design: dict[str, list[Record]] = {}
    for r in records:
        if is_fused(r) and core_precision_of(r) == precision:
            by_design.setdefault(str(design_of(r)), []).append(r)
    if any(design != "auto" for design in by_design):
        by_design.pop("auto", None)  # the host's own choice is one of the named designs measured beside it
    rates = {}
    for design, rs in by_design.items():
        failed = [r["impl"] for r in rs if r.get("value") is None and "failed" in str(r.get("skipped", ""))]
        measured = [r["value"] for r in rs if r.get("value") is not None]
        if failed:
            notes.append(f"K={steps}: {design} does not count: {', '.join(failed)} failed")
        elif measured and design in DESIGN_NAMES:
            rates[design] = min(measured)
    return rates


def entries_from_points(points: list[PointDecision]) -> list[tuple[int, str]]:
    """Table entries (max batch ascending, adjacent equal choices merged) from per-B decisions."""
    raw: list[tuple[int, str]] = []
    previous: PointDecision | None = None
    for point in sorted(points, key=lambda p: p.batch):
        low = previous.batch if previous is not None else 0
        if point.batch - 1 > low:
            gap = REF
            if previous is not None:
                common = set(previous.winners) & set(point.winners)
                if common:
                    gap = max(common, key=point.winners.__getitem__)
            raw.append((point.batch - 1, gap))
        raw.append((point.batch, point.choice))
        previous = point
    merged: list[tuple[int, str]] = []
    for max_batch, choice in raw:
        if merged and merged[-1][1] == choice:
            merged[-1] = (max_batch, choice)
        else:
            merged.append((max_batch, choice))
    return merged


def decide(data: dict[str, Any], margin: float = 1.0) -> dict[str, list[PointDecision]]:
    """precision -> the decisions at every batch size with training records."""
    records = [r for r in data["records"] if r.get("workload") == "train"]
    batches = sorted({r["batch"] for r in records if r.get("batch")})
    return {p: [decide_point(records, b, p, margin) for b in batches] for p in PRECISIONS}


def gpu_pattern(device: str) -> str:
    """The table's GPU pattern for a device name: the name itself (glob characters escaped)."""
    return glob.escape(device)


def measured_training(data: dict[str, Any]) -> list[Record]:
    """The training records of a results file that hold a measurement (not skipped)."""
    return [r for r in data["records"] if r.get("workload") == "train" and r.get("value") is not None]


def source_line(data: dict[str, Any], path: str) -> str:
    """Where the entries come from: results file, device, commit, torch, date, what was measured."""
    commit = str(data.get("git_commit") or "unknown")[:12]
    dirty = " (dirty tree)" if data.get("git_dirty") else ""
    train = measured_training(data)
    steps = sorted({r["steps"] for r in train})
    batches = sorted({r["batch"] for r in train})
    return (
        f"{path}: {data.get('device')}, commit {commit}{dirty}, torch {data.get('torch')}, {data.get('date')}; "
        f"training step, K={'/'.join(map(str, steps))}, B={'/'.join(map(str, batches))}"
    )


def measured_model(data: dict[str, Any]) -> MeasuredModel:
    """The model a results file measured: its ``--model-size`` (D, He, Hd, Z; C = 0 unless recorded)
    and the K of its measured training records."""
    size = (data.get("config") or {}).get("model_size") or {}
    missing = [name for name in MODEL_FIELDS if name != "num_classes" and name not in size]
    if missing:
        raise ValueError(f"the results file does not record the model size ({', '.join(missing)} missing)")
    steps = sorted({r["steps"] for r in measured_training(data)})
    model: MeasuredModel = {name: int(size.get(name, 0)) for name in MODEL_FIELDS}
    model["steps"] = steps
    return model


def _py(value: Any) -> str:
    """Python source of a literal of strings, ints, tuples and lists, with double-quoted strings."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_py(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} into the table")


def _literal(text: str, indent: str) -> str:
    """A string literal, split over lines of about 100 characters when long."""
    if len(text) <= 90:
        return _py(text)
    chunks = textwrap.wrap(text, 90, drop_whitespace=False, break_on_hyphens=False)
    inner = "\n".join(f"{indent}    {_py(chunk)}" for chunk in chunks)
    return f"(\n{inner}\n{indent})"


def render_block(block: TableBlock) -> str:
    """The Python text between the markers: ``CROSSOVER_SOURCES``, ``CROSSOVER_MODELS`` and
    ``CROSSOVER``, with comments."""
    sources, models, table = block
    check_table(table)
    check_models(models, table)
    lines = ["CROSSOVER_SOURCES: dict[TableKey, str] = {"]
    for key in table:
        lines.append(f"    {_py(key)}: {_literal(sources.get(key, 'source not recorded'), '    ')},")
    lines += ["}", "CROSSOVER_MODELS: dict[TableKey, MeasuredModel] = {"]
    lines += [f"    {_py(key)}: {_py(dict(models[key]))}," for key in table]
    lines += ["}", "CROSSOVER: dict[TableKey, list[tuple[int, str]]] = {"]
    for key, entries in table.items():
        for comment in textwrap.wrap(sources.get(key, "source not recorded"), 110):
            lines.append(f"    # {comment}")
        lines.append(f"    {_py(key)}: {_py([tuple(e) for e in entries])},")
    lines.append("}")
    return "\n".join(lines) + "\n"


def update_source(text: str, block: TableBlock) -> str:
    """``text`` (avme_ext/dispatch.py) with the block between the markers replaced; checked by parsing it back."""
    start, end = marker_span(text)
    new = text[:start] + render_block(block) + text[end:]
    compile(new, "dispatch.py", "exec")
    parsed = parse_table(new)
    expected = TableBlock(
        {k: block.sources[k] for k in block.table},
        {k: dict(block.models[k]) for k in block.table},
        {k: list(v) for k, v in block.table.items()},
    )
    if parsed != expected:
        raise RuntimeError("the written crossover table does not read back as written")
    return new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", nargs="+", help="results .json file(s) of bench/run.py (merged, later ones winning)")
    p.add_argument(
        "--dispatch",
        default=str(ROOT / "avme_ext" / "dispatch.py"),
        help="the module holding the table (default avme_ext/dispatch.py)",
    )
    p.add_argument("--out", help="write the updated module here instead of over --dispatch")
    p.add_argument(
        "--margin",
        type=float,
        default=1.0,
        help="a fused design must be faster than MARGIN x the best reference mode (default 1.0)",
    )
    p.add_argument(
        "--allow-smoke",
        action="store_true",
        help="accept a smoke or CPU results file (to check the pipeline; such a table says nothing)",
    )
    p.add_argument("--print", action="store_true", help="print the decisions and the table")
    args = p.parse_args(argv)
    if not args.margin >= 1.0:
        p.error("--margin must be >= 1")

    data = load_results(args.results)
    if not args.allow_smoke and (data.get("device_type") != "cuda" or (data.get("config") or {}).get("smoke")):
        p.error(
            f"{args.results[0]}: not a full-size GPU run (device_type {data.get('device_type')!r}, smoke "
            f"{(data.get('config') or {}).get('smoke')}); --allow-smoke to use it anyway"
        )
    if not measured_training(data):
        p.error(f"{args.results[0]}: no measured training records")
    dispatch = Path(args.dispatch)
    text = dispatch.read_text(encoding="utf-8")
    sources, models, table = parse_table(text)
    model = measured_model(data)
    first = Path(args.results[0]).resolve()
    source = source_line(data, str(first.relative_to(ROOT)) if first.is_relative_to(ROOT) else first.name)
    pattern = gpu_pattern(str(data.get("device")))
    decisions = decide(data, args.margin)
    for precision, points in decisions.items():
        key = (pattern, DTYPE, precision)
        table[key] = entries_from_points(points)
        sources[key] = source
        models[key] = model
        if args.print:
            for point in points:
                print(
                    f"{precision} B={point.batch}: {point.choice}"
                    + (
                        f" (winners: {', '.join(f'{d} {v:,.0f}' for d, v in point.winners.items())})"
                        if point.winners
                        else ""
                    )
                    + "".join(f"\n    {note}" for note in point.notes)
                )
            print(f"  -> {key}: {table[key]}")
    new = update_source(text, TableBlock(sources, models, table))
    out = Path(args.out) if args.out else dispatch
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote the crossover table for {data.get('device')} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
