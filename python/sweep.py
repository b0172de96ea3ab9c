"""The paper's other question: how the bound depends on the number of drawing steps K and the LSTM sizes.

Trains a grid of models, one ``avme train`` run per (LSTM units H, steps K) with encoder and decoder
of H units each, evaluates every run on the test split with ``avme eval``, and writes:

    OUT/runs/K<K>_H<H>/         each run directory (checkpoints, metrics.jsonl, test_eval.json, sweep_record.json)
    OUT/sweep.json              one record per run (sizes, parameters, epochs, training time, bounds)
    OUT/sweep.md                the same as a markdown table
    OUT/bound_vs_steps.png      the test bound against K, one line per LSTM size
    OUT/bound_vs_parameters.png the test bound against the parameter count, one line per K
    OUT/bound_vs_time.png       the test bound against the training time, one line per LSTM size

The bound is the IWAE bound with ``--samples S`` (S > 0) or else the negative ELBO, in nats per
image, with bits per dimension (nats / (D ln 2)) beside it. The training time is the optimisation
time of the epochs (validation excluded) as ``avme train`` logs it.

Every option after ``--`` goes to every ``avme train`` unchanged (the data set, the likelihood, the
epochs, the device, ...), so the sweep runs on any data set ``avme train`` reads; the sweep sets
``--out``, ``--steps``, ``--enc-hidden``, ``--dec-hidden`` and ``--resume`` itself. ``avme eval``
reads the data set from the run; ``--eval-args`` adds options of its own.

Resumable: a run whose ``sweep_record.json`` was made with the same options is skipped; any other is
continued exactly from its last checkpoint (``avme train --resume``), then evaluated. Kill the sweep
at any time and run the same command again. The plots and tables are rewritten from every finished
run at the end.

Examples:

    # the default grid on binarized MNIST, on a GPU: K = 1..64, three LSTM sizes
    python python/sweep.py --out sweeps/mnist --samples 1000 -- --epochs 50 --device cuda

    # any data set and likelihood avme train reads, e.g. 8-bit grey MNIST
    python python/sweep.py --out sweeps/grey --steps 4 16 64 --hidden 128 256 -- \\
        --dataset mnist --download --likelihood logistic --epochs 20

    # the whole pipeline, tiny, on a CPU (the test of this script)
    python python/sweep.py --smoke --out /tmp/avme-sweep
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

DEFAULT_STEPS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_HIDDEN = (100, 200, 400)
RECORD = "sweep_record.json"
EVAL_JSON = "test_eval.json"
#: Options of ``avme train`` that the sweep sets for every run.
SET_BY_SWEEP = ("--out", "--steps", "--enc-hidden", "--dec-hidden", "--resume", "--overwrite", "--name")
#: The tiny grid and options of ``--smoke`` (a CPU run of the whole pipeline in seconds).
SMOKE_STEPS, SMOKE_HIDDEN = (1, 3), (8, 12)
SMOKE_TRAIN = (
    "--epochs",
    "1",
    "--batch-size",
    "50",
    "--train-subset",
    "100",
    "--valid-subset",
    "50",
    "--latent-dim",
    "4",
    "--device",
    "cpu",
    "--impl",
    "ref",
    "--no-progress",
    "--no-tensorboard",
)
SMOKE_EVAL = ("--num-images", "20", "--device", "cpu", "--impl", "ref")
SMOKE_SAMPLES = 2


class SweepError(RuntimeError):
    """A run of the sweep failed or its directory holds another run; the message names it."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's options and the ``avme train`` options given after ``--``."""
    if "--" in argv:
        cut = argv.index("--")
        argv, train_options = argv[:cut], argv[cut + 1 :]
    else:
        train_options = []
    parser = argparse.ArgumentParser(
        description="Train a grid of K and LSTM sizes with avme train, evaluate each run, plot the bound "
        "against K, parameters and time. Options after -- go to every avme train.",
        epilog="example: python python/sweep.py --out sweeps/mnist --samples 1000 -- --epochs 50 --device cuda",
    )
    parser.add_argument("--out", required=True, help="sweep directory (runs/, sweep.json, sweep.md, PNGs)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help=f"drawing steps K of the grid (default: {' '.join(map(str, DEFAULT_STEPS))})",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=None,
        metavar="H",
        help=f"LSTM units H of encoder and decoder (default: {' '.join(map(str, DEFAULT_HIDDEN))})",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="S",
        help="IWAE samples per test image (0: the negative ELBO; default: 0)",
    )
    parser.add_argument(
        "--eval-args",
        default="",
        metavar="ARGS",
        help='more options for avme eval, one string (e.g. "--num-images 1000 --device cuda")',
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a tiny grid (K {SMOKE_STEPS}, H {SMOKE_HIDDEN}) on a few images on the CPU, "
        "to check the pipeline in seconds",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = args.steps or list(SMOKE_STEPS)
        args.hidden = args.hidden or list(SMOKE_HIDDEN)
        args.samples = args.samples or SMOKE_SAMPLES
        train_options = [*SMOKE_TRAIN, *train_options]
        args.eval_args = " ".join([*SMOKE_EVAL, args.eval_args])
    args.steps = sorted(set(args.steps or DEFAULT_STEPS))
    args.hidden = sorted(set(args.hidden or DEFAULT_HIDDEN))
    for name, values in (("--steps", args.steps), ("--hidden", args.hidden)):
        if min(values) < 1:
            parser.error(f"{name} must be integers >= 1, got {values}")
    if args.samples < 0:
        parser.error(f"--samples must be >= 0, got {args.samples}")
    clashing = [o for o in train_options if o.split("=")[0] in SET_BY_SWEEP]
    if clashing:
        parser.error(f"the sweep sets {', '.join(SET_BY_SWEEP)} itself; drop {clashing} after --")
    return args, train_options


def run_name(steps: int, hidden: int) -> str:
    return f"K{steps:02d}_H{hidden}"


def avme(argv: list[str]) -> int:
    """Run an ``avme`` command in this process (the same code as the command line); its exit status."""
    from avme_ext.cli import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's errors
        return int(stop.code or 0)


def train_command(run_dir: Path, steps: int, hidden: int, train_options: list[str]) -> list[str]:
    return [
        "train",
        "--out",
        str(run_dir),
        "--resume",
        "--steps",
        str(steps),
        "--enc-hidden",
        str(hidden),
        "--dec-hidden",
        str(hidden),
        *train_options,
    ]


def eval_command(run_dir: Path, samples: int, eval_args: str) -> list[str]:
    return [
        "eval",
        str(run_dir),
        "--split",
        "test",
        "--samples",
        str(samples),
        "--json",
        str(run_dir / EVAL_JSON),
        "--no-progress",
        *shlex.split(eval_args),
    ]


def read_json(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def training_facts(run_dir: Path) -> dict[str, Any]:
    """Epochs, training seconds and best validation negative ELBO from the run's metrics.jsonl."""
    from avme_ext.plotting import read_metrics

    records = read_metrics(run_dir)
    epochs = [r for r in records if r["kind"] == "epoch"]
    valid = [r["nelbo"] for r in records if r["kind"] == "valid"]
    return {
        "epochs": max((int(r["epoch"]) for r in epochs), default=0),
        "train_seconds": float(sum(r.get("seconds", 0.0) for r in epochs)),
        "best_valid_nelbo": min(valid) if valid else None,
    }


def make_record(run_dir: Path, command: dict[str, Any]) -> dict[str, Any]:
    """The sweep record of a trained and evaluated run (its checkpoint, metrics and test_eval.json)."""
    from avme_ext.checkpoint import load_checkpoint
    from avme_ext.training.run_dir import read_run_config

    checkpoint = load_checkpoint(run_dir)
    config = checkpoint.config
    evaluation = read_json(run_dir / EVAL_JSON)
    summary, provenance = evaluation["summary"], evaluation["provenance"]
    trained_on = (read_run_config(run_dir) or ({}, None))[0].get("dataset")
    if trained_on is not None and provenance.get("dataset") != trained_on:
        raise SweepError(
            f"{run_dir}: avme eval read {provenance.get('dataset')!r} but the run trained on "
            f"{trained_on!r}; pass the data options with --eval-args"
        )
    iwae = "iwae_nll" in summary
    bound_key = "iwae_nll" if iwae else "nelbo"
    return {
        "name": run_dir.name,
        "steps": config.steps,
        "enc_hidden": config.enc_hidden,
        "dec_hidden": config.dec_hidden,
        "latent_dim": config.latent_dim,
        "likelihood": config.likelihood,
        "data_dim": config.data_dim,
        "parameters": sum(t.numel() for t in checkpoint.model_state.values()),
        **training_facts(run_dir),
        "dataset": trained_on,
        "test_images": summary["num_images"],
        "test_nelbo": summary["nelbo"],
        "test_iwae": summary.get("iwae_nll"),
        "iwae_samples": summary.get("iwae_samples"),
        "bound_name": f"IWAE bound (S={summary['iwae_samples']})" if iwae else "negative ELBO",
        "bound": summary[bound_key],
        "bound_bits_per_dim": summary.get(f"{bound_key}_bits_per_dim"),
        "command": command,
    }


def sweep_run(
    out: Path, steps: int, hidden: int, args: argparse.Namespace, train_options: list[str], say: Callable[[str], None]
) -> dict[str, Any]:
    """Train (or continue) and evaluate one run of the grid, unless it is already done; its record."""
    from avme_ext.checkpoint import atomic_write_json

    run_dir = out / "runs" / run_name(steps, hidden)
    train = train_command(run_dir, steps, hidden, train_options)
    evaluate = eval_command(run_dir, args.samples, args.eval_args)
    command = {"train": train[1:], "eval": evaluate[1:]}
    record_path = run_dir / RECORD
    if record_path.is_file():
        record = read_json(record_path)
        if record.get("command") == command:
            say(f"{run_dir.name}: done before, skipped")
            return record
        say(f"{run_dir.name}: its record was made by other options; continuing it with these")
    say(f"{run_dir.name}: avme {shlex.join(train)}")
    if avme(train) != 0:
        raise SweepError(f"{run_dir.name}: avme train failed (see above); fix and rerun the sweep to continue it")
    say(f"{run_dir.name}: avme {shlex.join(evaluate)}")
    if avme(evaluate) != 0:
        raise SweepError(f"{run_dir.name}: avme eval failed (see above); rerun the sweep to retry")
    record = make_record(run_dir, command)
    atomic_write_json(record_path, record)
    return record


def write_outputs(out: Path, records: list[dict[str, Any]], command: str) -> list[Path]:
    """sweep.json, sweep.md and the three plots, rendered first and then written."""
    from avme_ext.checkpoint import atomic_write_bytes, atomic_write_json
    from avme_ext.plotting import render_sweep_plots
    from avme_ext.results import render_sweep_markdown

    pngs = render_sweep_plots(records, title=f"AVME sweep: {out.name}")
    markdown = render_sweep_markdown(records, command)
    written = [
        atomic_write_json(out / "sweep.json", {"command": command, "records": records}),
        atomic_write_bytes(out / "sweep.md", markdown.encode()),
    ]
    written += [atomic_write_bytes(out / name, data) for name, data in pngs.items()]
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, train_options = parse_args(argv)
    out = Path(args.out)
    grid = [(hidden, steps) for hidden in args.hidden for steps in args.steps]

    def say(message: str) -> None:
        print(f"sweep: {message}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    records = []
    for index, (hidden, steps) in enumerate(grid, start=1):
        say(f"run {index}/{len(grid)}: K={steps}, H={hidden}")
        try:
            records.append(sweep_run(out, steps, hidden, args, train_options, say))
        except SweepError as error:
            say(f"error: {error}")
            return 1
    command = shlex.join(["python", "python/sweep.py", *argv])
    for path in write_outputs(out, records, command):
        print(path)
    say(f"{len(records)} runs in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
