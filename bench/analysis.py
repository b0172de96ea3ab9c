"""Reading results records: which implementation a record is, and the best of each family.

Shared by bench/report.py (tables and targets) and bench/crossover.py (the ``impl="auto"``
table). A record (see bench/README.md) has ``workload``, ``impl``, ``batch``, ``steps``,
``value`` (None when skipped) and extras; records of bench/run.py carry ``fused``, ``design``
and ``core_precision``, and older ones are recognised by their implementation's name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from avme_ext.loop_types import DESIGNS, PRECISIONS

__all__ = [
    "Record",
    "load_results",
    "is_fused",
    "is_reference",
    "design_of",
    "core_precision_of",
    "is_graph",
    "impl_sort_key",
    "budget_skipped",
    "best",
    "ConfigSummary",
    "summarize_configs",
]

Record = dict[str, Any]

_FUSED_NAME = re.compile(r"^fused-(?:(?P<design>[a-z]+)-)?(?P<precision>fp32|tf32|bf16)(?P<graph>-graph)?$")
#: The reason prefix of a configuration left out because the time budget was spent.
BUDGET_REASON = "time budget"


def load_results(paths: Iterable[str | os.PathLike[str]]) -> dict[str, Any]:
    """Load and merge results files (header of the first, records of all, later ones winning).

    A later file's record replaces an earlier one with the same workload, impl, B and K.

    Raises:
        ValueError: no file given, or a file that is not a results file.
    """
    merged: dict[str, Any] | None = None
    records: dict[tuple[Any, ...], Record] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise ValueError(f"{path}: not a bench results file (no 'records' list)")  # noqa: TRY004 - a malformed file
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


def is_fused(r: Record) -> bool:
    """Whether ``r`` measures the fused CUDA ops."""
    if "fused" in r:
        return bool(r["fused"])
    return str(r.get("impl", "")).startswith("fused-")


def is_reference(r: Record) -> bool:
    """Whether ``r`` measures a mode of the pure-PyTorch reference."""
    return str(r.get("impl", "")).startswith("ref-") and not is_fused(r)


def _name_match(r: Record) -> re.Match[str] | None:
    return _FUSED_NAME.match(str(r.get("impl", "")))


def design_of(r: Record) -> str | None:
    """The fused design of ``r`` (``"auto"`` for the extension's default); None for the reference."""
    if not is_fused(r):
        return None
    if r.get("design"):
        return str(r["design"])
    match = _name_match(r)
    return (match.group("design") or "auto") if match else None


def core_precision_of(r: Record) -> str | None:
    """The precision of the fused ops in ``r`` (fp32, tf32, bf16); None for the reference."""
    if not is_fused(r):
        return None
    if r.get("core_precision"):
        return str(r["core_precision"])
    match = _name_match(r)
    return match.group("precision") if match else r.get("precision")


def is_graph(r: Record) -> bool:
    """Whether the whole training step of ``r`` was replayed from one CUDA graph."""
    if "mode" in r:
        return bool(r["mode"] == "cudagraph")
    return str(r.get("impl", "")).endswith("-graph") or r.get("impl") == "ref-cudagraph"


_REFERENCE_ORDER = (
    "ref-eager",
    "ref-eager-tf32",
    "ref-eager-bf16",
    "ref-compile",
    "ref-compile-reduce-overhead",
    "ref-compile-max-autotune",
    "ref-cudagraph",
)
_DESIGN_ORDER = DESIGNS
_PRECISION_ORDER = PRECISIONS


def impl_sort_key(name: str) -> tuple[int, int, int, int, str]:
    """Table order: reference modes (eager first), then fused by design, precision, eager before graph."""
    if name in _REFERENCE_ORDER:
        return (0, _REFERENCE_ORDER.index(name), 0, 0, name)
    match = _FUSED_NAME.match(name)
    if match:
        design = match.group("design") or "auto"
        d = _DESIGN_ORDER.index(design) if design in _DESIGN_ORDER else len(_DESIGN_ORDER)
        p = _PRECISION_ORDER.index(match.group("precision"))
        return (1, d, p, 1 if match.group("graph") else 0, name)
    return (0 if name.startswith("ref-") else 2, len(_REFERENCE_ORDER), 0, 0, name)


def budget_skipped(r: Record) -> bool:
    """Whether ``r`` was left out only because the run's time budget was spent."""
    return r.get("value") is None and str(r.get("skipped", "")).startswith(BUDGET_REASON)


def best(records: Iterable[Record]) -> Record | None:
    """The measured record of highest value (None when none was measured)."""
    measured = [r for r in records if r.get("value") is not None]
    return max(measured, key=lambda r: r["value"]) if measured else None


@dataclass
class ConfigSummary:
    """The fused ops against the reference at one (B, K) of one workload.

    Attributes:
        batch, steps: the configuration (batch is None for iwae).
        best_fused: the fastest fused record (any design, precision and mode), or None.
        best_reference: the fastest reference record, or None.
        ref_eager: the ``ref-eager`` record, or None.
        reference_left_out: reference implementations attempted but left out by the time budget:
            the best reference mode may be among them.
    """

    batch: int | None
    steps: int | None
    best_fused: Record | None
    best_reference: Record | None
    ref_eager: Record | None
    reference_left_out: list[str]

    @property
    def ratio(self) -> float | None:
        """best fused / best reference (None unless both were measured)."""
        if self.best_fused is None or self.best_reference is None:
            return None
        return float(self.best_fused["value"]) / float(self.best_reference["value"])

    @property
    def over_ref_eager(self) -> float | None:
        """best fused / ref-eager."""
        if self.best_fused is None or self.ref_eager is None or self.ref_eager.get("value") is None:
            return None
        return float(self.best_fused["value"]) / float(self.ref_eager["value"])


def summarize_configs(records: Iterable[Record], workload: str) -> list[ConfigSummary]:
    """One :class:`ConfigSummary` per (B, K) of ``workload``, ordered by K then B."""
    rs = [r for r in records if r.get("workload") == workload]
    configs = sorted({(r.get("batch"), r.get("steps")) for r in rs}, key=lambda c: (c[1] or 0, c[0] or 0))
    out = []
    for batch, steps in configs:
        here = [r for r in rs if r.get("batch") == batch and r.get("steps") == steps]
        refs = [r for r in here if is_reference(r)]
        out.append(
            ConfigSummary(
                batch=batch,
                steps=steps,
                best_fused=best(r for r in here if is_fused(r)),
                best_reference=best(refs),
                ref_eager=next((r for r in refs if r.get("impl") == "ref-eager"), None),
                reference_left_out=[r["impl"] for r in refs if budget_skipped(r)],
            )
        )
    return out
