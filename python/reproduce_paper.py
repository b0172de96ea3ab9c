"""Reproduce the paper's binarized-MNIST experiments with honest likelihoods, in one command.

For each model (unconditional and class-conditional, with the paper's encoder input "canvas"
and DRAW's "error" image as an ablation) this script

1. trains the paper's configuration (K=12, LSTMs of 400, Z=100, batch 100, Adam) on the fixed
   binarized MNIST train split, keeping the checkpoint with the best validation ELBO;
2. evaluates it on the whole 10,000-image test split: negative ELBO, the importance-weighted
   bound with S whole trajectories, the reconstruction term, per-step KL, and for conditional
   models -log p(x|y) and -log p(x);
3. makes the figures (training curve, unrolled samples, per-class samples, reconstructions,
   per-step KL);

then writes ``docs/results.json`` and ``docs/results.md`` (the table beside published numbers).

Every stage is resumable and skipped when its output exists, so the script can run in pieces
on a machine that limits the length of one command: ``--time-budget MIN`` stops training
cleanly (SIGTERM, a checkpoint is saved) when the budget is spent; run the same command again
to continue. Seeds are fixed.

    python python/reproduce_paper.py --out runs/paper                 # everything
    python python/reproduce_paper.py --out runs/paper --time-budget 9 # one slice of work
    python python/reproduce_paper.py --out runs/paper --models avme-canvas --epochs 2 --samples 10  # smoke
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avme_ext.results import render_results_markdown  # noqa: E402


@dataclass(frozen=True)
class ModelSpec:
    """One trained model of the reproduction."""

    name: str
    conditional: bool
    encoder_input: str

    def train_args(self) -> list[str]:
        return ["--num-classes", "10" if self.conditional else "0", "--encoder-input", self.encoder_input]


MODELS = {
    spec.name: spec
    for spec in (
        ModelSpec("avme-canvas", False, "canvas"),
        ModelSpec("avme-canvas-conditional", True, "canvas"),
        ModelSpec("avme-error", False, "error"),
        ModelSpec("avme-error-conditional", True, "error"),
    )
}


def avme(*args: str, timeout: float | None = None) -> int:
    """Run ``python -m avme_ext ARGS``; on timeout send SIGTERM (the trainer checkpoints) and wait."""
    command = [sys.executable, "-m", "avme_ext", *args]
    print("$", " ".join(command[2:]), flush=True)
    process = subprocess.Popen(command, cwd=REPO)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        return process.wait()


def train(spec: ModelSpec, run: Path, args: argparse.Namespace, deadline: float) -> bool:
    """Train (or continue training) one model; True when all epochs are done."""
    remaining = deadline - time.monotonic()
    if remaining <= 30:
        return False
    code = avme(
        "train", "--out", str(run), "--resume", "--epochs", str(args.epochs), "--seed", str(args.seed),
        "--lr", str(args.lr), "--clip-grad", str(args.clip_grad), "--kl-warmup-steps", str(args.kl_warmup_steps),
        "--device", args.device, *spec.train_args(), *args.train_extra,
        timeout=remaining,
    )
    if code == 0:
        return True
    if code in (128 + signal.SIGTERM, -signal.SIGTERM):
        print(f"{spec.name}: time budget spent; checkpoint saved, run again to continue", flush=True)
        return False
    raise SystemExit(f"{spec.name}: avme train failed with exit code {code}")


def evaluate(spec: ModelSpec, run: Path, args: argparse.Namespace) -> Path:
    out = run / f"eval-test-S{args.samples}.json"
    if not out.is_file():
        code = avme("eval", str(run), "--split", "test", "--samples", str(args.samples), "--seed", str(args.seed),
                    "--device", args.device, "--json", str(out), *(["--num-images", str(args.num_images)] if args.num_images else []))
        if code != 0:
            raise SystemExit(f"{spec.name}: avme eval failed with exit code {code}")
    return out


def figures(spec: ModelSpec, run: Path, figures_dir: Path, args: argparse.Namespace) -> None:
    """Samples (per class for a conditional model), unrolled strips, reconstructions, curves."""
    folder = figures_dir / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    seed = ["--seed", str(args.seed), "--device", args.device]
    jobs = [
        (folder / "samples.png", ["sample", str(run), "--out", str(folder / "samples.png"),
                                  "--reconstruct", "16", "--recon-out", str(folder / "reconstructions.png"), *seed]),
        (folder / "unrolled.png", ["sample", str(run), "--unroll", "--out", str(folder / "unrolled.png"), *seed]),
        (folder / "training_curve.png", ["plot", str(run), "--out-dir", str(folder)]),
    ]
    for output, command in jobs:
        if not output.is_file() and avme(*command) != 0:
            raise SystemExit(f"{spec.name}: avme {command[0]} failed")


def collect(spec: ModelSpec, eval_json: Path, args: argparse.Namespace) -> dict:
    """One object of docs/results.json from the JSON that ``avme eval --json`` wrote."""
    written = json.loads(eval_json.read_text())
    summary, provenance = written["summary"], written["provenance"]
    record = {
        "name": spec.name,
        "conditional": spec.conditional,
        "encoder_input": spec.encoder_input,
        "steps": provenance["model_config"]["steps"],
        "test_nelbo": summary["nelbo"],
        "test_iwae": summary.get("iwae_nll"),
        "iwae_samples": summary.get("iwae_samples"),
        "test_reconstruction": summary["reconstruction"],
        "test_kl_per_step": summary["kl_per_step"],
        "num_images": summary["num_images"],
        "checkpoint": str(Path(args.out) / spec.name),
        "provenance": provenance,
    }
    if spec.conditional:
        record["test_nll_given_y"] = summary.get("nll_given_y")
        record["test_nll_marginal"] = summary.get("nll_marginal")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/paper", help="folder of the run directories")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where results.md, results.json and figures go")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip-grad", type=float, default=10.0)
    parser.add_argument("--kl-warmup-steps", type=int, default=0)
    parser.add_argument("--samples", type=int, default=5000, help="IWAE samples per test image")
    parser.add_argument("--num-images", type=int, default=0, help="test images to evaluate (0: all 10,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--time-budget", type=float, default=0, help="minutes for this invocation (0: no limit)")
    parser.add_argument("train_extra", nargs=argparse.REMAINDER, help="after '--': more 'avme train' options")
    args = parser.parse_args(argv)
    args.train_extra = [a for a in args.train_extra if a != "--"]
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")

    start = time.monotonic()
    deadline = start + args.time_budget * 60 if args.time_budget else float("inf")
    records = []
    for name in args.models.split(","):
        spec, run = MODELS[name], Path(args.out) / name
        if not train(spec, run, args, deadline):
            print(f"stopped after {(time.monotonic() - start) / 60:.1f} min; run the same command to continue")
            return 3
        eval_json = evaluate(spec, run, args)
        figures(spec, run, Path(args.docs) / "figures", args)
        records.append(collect(spec, eval_json, args))

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    (docs / "results.md").write_text(render_results_markdown(records, command=" ".join(sys.argv)))
    print(f"wrote {docs / 'results.json'} and {docs / 'results.md'} in {(time.monotonic() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
