"""``avme plot``: training curve and per-step KL plots from a run's metrics.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import RawDefaultsFormatter, fail

DESCRIPTION = """\
Plot a training run from its metrics.jsonl (written by 'avme train').

Writes two PNGs into --out-dir (default: the run directory, or the metrics file's directory):
  training_curve.png  training loss per step and validation negative ELBO per epoch (nats),
                      the paper's Figure 7;
  kl_per_step.png     bar chart of the KL of every drawing step t = 1..K of the best
                      validation record (--which last: the last one).
Prints the path of every file written."""

EPILOG = """\
examples:
  avme plot runs/mnist
  avme plot runs/mnist/metrics.jsonl --out-dir figures/"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot training curves (training_curve.png, kl_per_step.png) from metrics.jsonl",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RawDefaultsFormatter,
    )
    parser.add_argument("run", metavar="RUN_DIR_OR_METRICS", help="a run directory or its metrics.jsonl file")
    parser.add_argument("--out-dir", default=None, help="directory for the PNGs (default: beside metrics.jsonl)")
    parser.add_argument("--which", default="best", choices=("best", "last"), help="validation record for the KL plot")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plotting import (
        MetricsError,
        find_metrics,
        plot_kl_per_step,
        plot_training_curve,
    )

    try:
        metrics = find_metrics(args.run)
        out_dir = Path(args.out_dir) if args.out_dir else metrics.parent
        written = [plot_training_curve(metrics, out_dir / "training_curve.png")]
        if any(r["kind"] == "valid" and "kl_per_step" in r for r in _records(metrics)):
            written.append(plot_kl_per_step(metrics, out_dir / "kl_per_step.png", which=args.which))
        else:
            print(f"avme: note: {metrics} has no validation record with kl_per_step; kl_per_step.png not written")
    except (MetricsError, OSError) as error:
        return fail(error)
    for path in written:
        print(path)
    return 0


def _records(metrics: Path) -> list[dict]:
    from ..plotting import read_metrics

    return read_metrics(metrics)
