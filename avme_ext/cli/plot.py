"""``avme plot``: training curve and per-step KL plots from a run's metrics.jsonl."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import EXIT_STATUS_HELP, RawDefaultsFormatter, check_output_path

DESCRIPTION = """\
Plot a training run from its metrics.jsonl (written by 'avme train').

Writes two PNGs into --out-dir (default: the run directory, or the metrics file's directory):
  training_curve.png  training loss and validation negative ELBO (nats) against the step, the
                      paper's Figure 7. Each training point is the mean loss over the steps
                      since the previous point (train --log-every), each validation point the
                      mean over the validation images at the end of an epoch; the legend says
                      so, and the y range holds every point, the first one included;
  kl_per_step.png     bar chart of the KL of every drawing step t = 1..K of the best
                      validation record (--which last: the last one).
Both plots are drawn before either file is written. Prints the path of every file written."""

EPILOG = (
    """\
examples:
  avme plot runs/mnist
  avme plot runs/mnist/metrics.jsonl --out-dir figures/

"""
    + EXIT_STATUS_HELP
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot training curves (training_curve.png, kl_per_step.png) from metrics.jsonl",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RawDefaultsFormatter,
    )
    parser.add_argument("run", metavar="RUN_DIR_OR_METRICS", help="a run directory or its metrics.jsonl file")
    parser.add_argument(
        "--out-dir", metavar="DIR", default=None, help="directory for the PNGs (default: beside metrics.jsonl)"
    )
    parser.add_argument("--which", default="best", choices=("best", "last"), help="validation record for the KL plot")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from avme_ext.checkpoint import atomic_write_bytes
    from avme_ext.plotting import find_metrics, render_run_plots

    metrics = find_metrics(args.run)
    out_dir = Path(args.out_dir) if args.out_dir else metrics.parent
    for name in ("training_curve.png", "kl_per_step.png"):
        check_output_path(out_dir / name, "--out-dir")
    pngs = render_run_plots(metrics, which=args.which)
    if "kl_per_step.png" not in pngs:
        print(
            f"avme plot: note: {metrics} has no validation record with kl_per_step; kl_per_step.png not written",
            file=sys.stderr,
        )
    for name, data in pngs.items():
        print(atomic_write_bytes(out_dir / name, data))
    return 0
