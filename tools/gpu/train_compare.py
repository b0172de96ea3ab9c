#!/usr/bin/env python
"""The precision policy check: every fast mode trains as well as fp32.

Reads the run directories of ``avme train`` runs that differ only in ``--impl``/``--precision``
(same seed, same data, same epochs; tools/gpu/train_check.sh launches them) and compares their
validation negative ELBO (the ``valid`` records of ``metrics.jsonl``) at the last epoch that every
run completed. Pass: every run within ``--tolerance`` nats (default 0.3) of the baseline run.

Usage::

    python3 tools/gpu/train_compare.py --runs /tmp/avme-train --baseline cuda-fp32 --out $OUT/train_check.json

Each run is the folder ``--runs/<name>``; ``--runs/<name>.rc`` may hold its exit code (written by
the launching script). Exit code 0 when the check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def read_run(folder: Path) -> dict[str, Any]:
    """Epoch -> validation nelbo and seconds per epoch of one run, with its exit code."""
    metrics = folder / "metrics.jsonl"
    valid: dict[int, float] = {}
    seconds: dict[int, float] = {}
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("kind") == "valid" and isinstance(record.get("nelbo"), (int, float)):
                valid[int(record["epoch"])] = float(record["nelbo"])
            elif record.get("kind") == "epoch" and isinstance(record.get("seconds"), (int, float)):
                seconds[int(record["epoch"])] = float(record["seconds"])
    rc_file = folder.with_name(folder.name + ".rc")
    code = int(rc_file.read_text().strip()) if rc_file.is_file() and rc_file.read_text().strip() else None
    return {"exit_code": code, "valid_nelbo": valid, "epoch_seconds": seconds, "epochs_done": max(valid, default=0)}


def compare(runs: dict[str, dict[str, Any]], baseline: str, tolerance: float) -> dict[str, Any]:
    """The comparison at the last epoch every run completed (see the module docstring)."""
    common = set.intersection(*(set(r["valid_nelbo"]) for r in runs.values())) if runs else set()
    result: dict[str, Any] = {
        "baseline": baseline,
        "tolerance_nats": tolerance,
        "epoch_compared": max(common) if common else None,
        "checks": {},
    }
    if baseline not in runs:
        result["pass"] = False
        result["reason"] = f"no run folder of the baseline {baseline!r} (runs: {sorted(runs)})"
        return result
    if not common:
        result["pass"] = False
        result["reason"] = "no epoch was completed (with validation) by every run"
        return result
    epoch = result["epoch_compared"]
    reference = runs[baseline]["valid_nelbo"][epoch]
    passed = math.isfinite(reference)
    for name, run in runs.items():
        if name == baseline:
            continue
        value = run["valid_nelbo"][epoch]
        difference = value - reference
        ok = math.isfinite(value) and math.isfinite(reference) and abs(difference) <= tolerance
        result["checks"][name] = {"nelbo": value, "baseline_nelbo": reference, "difference": difference, "pass": ok}
        passed = passed and ok
    result["pass"] = passed
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", required=True, help="folder holding one run folder per mode")
    p.add_argument("--baseline", default="cuda-fp32", help="the run the others are compared with (default cuda-fp32)")
    p.add_argument("--tolerance", type=float, default=0.3, help="largest |nelbo - baseline| in nats (default 0.3)")
    p.add_argument("--epochs", type=int, help="epochs asked for (recorded; runs cut by the deadline do fewer)")
    p.add_argument("--out", required=True, help="the summary JSON to write")
    args = p.parse_args(argv)

    folders = sorted(f for f in Path(args.runs).iterdir() if f.is_dir()) if Path(args.runs).is_dir() else []
    runs = {f.name: read_run(f) for f in folders}
    result = compare(runs, args.baseline, args.tolerance)
    result["epochs_requested"] = args.epochs
    result["runs"] = {
        name: {
            "exit_code": r["exit_code"],
            "epochs_done": r["epochs_done"],
            "valid_nelbo": {str(k): v for k, v in sorted(r["valid_nelbo"].items())},
            "epoch_seconds": {str(k): v for k, v in sorted(r["epoch_seconds"].items())},
        }
        for name, r in runs.items()
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    baseline_value = runs[args.baseline]["valid_nelbo"].get(result["epoch_compared"]) if args.baseline in runs else None
    print(
        f"epoch compared: {result['epoch_compared']} (asked for {args.epochs}); baseline {args.baseline}: "
        f"{baseline_value}"
    )
    for name, check in result["checks"].items():
        print(
            f"  {name:12s} nelbo {check['nelbo']:.4f}  difference {check['difference']:+.4f}  "
            f"{'ok' if check['pass'] else 'FAIL'} (tolerance {args.tolerance:g})"
        )
    for name, r in runs.items():
        print(
            f"  {name:12s} exit {r['exit_code']}, epochs {r['epochs_done']}, s/epoch "
            f"{[round(v, 1) for _, v in sorted(r['epoch_seconds'].items())]}"
        )
    print("PASS" if result["pass"] else f"FAIL{': ' + result['reason'] if 'reason' in result else ''}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
