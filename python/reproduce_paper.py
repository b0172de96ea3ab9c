"""Reproduce the paper's binarized-MNIST experiments with honest likelihoods, in one command.

    python python/reproduce_paper.py --out runs/paper

1. trains the four models (unconditional and class-conditional, with the paper's encoder input
   "canvas" and DRAW's "error" image) side by side on the GPU, one ``avme train`` process each
   (under a private NVIDIA MPS daemon where one can be started), with the paper's sizes (K=12,
   LSTMs of 400, Z=100, batch 100) and Adam; each stops at its epoch cap (150 for the headline
   model, 100 for the others) or after 10 epochs without a better validation bound, and keeps its
   best validation epoch as float16 weights;
2. once every model is trained, evaluates them on the 10,000 test images: negative ELBO, IWAE
   bound with S=5000, reconstruction term, per-step KL, and -log p(x|y) and -log p(x) for the
   conditional models, each labelled as what it is;
3. draws the figures (training curves, unrolled drawing steps, samples per class) into
   DOCS/images/<model>/ and writes DOCS/results.json and DOCS/results.md beside the published
   numbers.

Run the same command again after any interruption (Ctrl-C, a scheduler's SIGTERM, a crash, a
kill): it continues exactly where it stopped and skips finished work. It prints the plan, the
progress of each stage and the time left, estimated from the rates it measures. --smoke runs the
whole pipeline at tiny sizes (about a minute on a CPU). docs/reproduction.md describes the protocol.

Exit status: 0 done; 1 a stage failed; 2 bad options; 130 or 143 stopped by SIGINT or SIGTERM
(rerun to continue).
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(HERE), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from reproduce_eval import (
    PassWork,
    evaluate_models,
    measure_device,
    measure_device_in_child,
    pending_work,
)
from reproduce_mps import MPS_MODES, mps_daemon
from reproduce_plan import (
    MODELS,
    Layout,
    Plan,
    device_name,
    make_plan,
    read_json,
    source_commit,
    write_json,
)
from reproduce_report import make_figures, write_results
from reproduce_train import Interrupted, read_run_status, train_models, trained_summary

from avme_ext.choices import IMPLS

EXIT_DONE, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Seconds to wait for the lock of --out held by another run (or by the processes of an interrupted one).
LOCK_WAIT_SECONDS = 300


class UsageError(RuntimeError):
    """Options that do not fit the reproduction directory."""


# --------------------------------------------------------------------------- output
class Console:
    """Prints timestamped lines to stdout and appends them to ``reproduce.log``."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "not measured yet"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Progress:
    """The time left, from measured rates, printed every ``interval`` seconds and kept in ``progress.json``.

    Training: per model, its epochs left times its measured seconds per epoch (runs side by side,
    ``jobs`` at a time, a model not measured yet at the slowest measured rate; an upper bound, since a
    run may stop early). Evaluation: the trajectories left divided by the measured trajectories per
    second (of the chunks done, else of a short pilot).
    """

    def __init__(self, layout: Layout, plan: Plan, names: list[str], jobs: int, log, interval: float) -> None:
        self.layout, self.plan, self.names, self.jobs, self.log, self.interval = layout, plan, names, jobs, log, interval
        self.stage = "plan"
        self.trained: set[str] = set()
        self.eval_left = 0  # trajectories
        self.eval_rate: float | None = None
        self.eval_measured = False
        self.eval_done = (0, 0.0)  # trajectories, seconds (this run)
        self.last_print = -math.inf

    # ----------------------------------------------------------------- training
    def training_left(self) -> tuple[float | None, dict[str, Any]]:
        models: dict[str, Any] = {}
        remaining = []
        for name in self.names:
            status = read_run_status(self.layout.run_dir(name) / "metrics.jsonl")
            models[name] = {"trained": name in self.trained, "epochs": status.epochs, "epoch_cap": self.plan.epochs[name],
                            "best": status.best, "seconds_per_epoch": status.seconds_per_epoch}
            if name not in self.trained:
                remaining.append((self.plan.epochs[name] - status.epochs, status.seconds_per_epoch))
        known = [m["seconds_per_epoch"] for m in models.values() if m["seconds_per_epoch"] is not None]
        if not remaining:
            return 0.0, models
        if not known:
            return None, models
        work = sorted(((epochs * (s if s is not None else max(known))) for epochs, s in remaining), reverse=True)
        slots = [0.0] * max(1, self.jobs)
        for seconds in work:  # the runs start as slots free up
            slots[slots.index(min(slots))] += seconds
        return max(slots), models

    def evaluation_left(self) -> float | None:
        return None if self.eval_rate is None else self.eval_left / self.eval_rate

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_print < self.interval:
            return
        self.last_print = now
        train_left, models = self.training_left()
        eval_left = self.evaluation_left()
        rate = "measured" if self.eval_measured else "pilot"
        total = None if train_left is None or eval_left is None else train_left + eval_left
        if self.stage == "training":
            shown = [f"{n} {m['epochs']}/{m['epoch_cap']}" + (" done" if m["trained"] else "")
                     + (f" ({m['best'][1]:.2f})" if m["best"] and not m["trained"] else "") for n, m in models.items()]
            parts = ["training: " + ", ".join(shown),
                     (f"time left: training {'at most ' if train_left else ''}{minutes(train_left)}, evaluation "
                      f"about {minutes(eval_left)} ({rate} rate), in all {minutes(total)}")]
        elif self.stage == "evaluation":
            parts = [f"evaluation: {self.eval_left:,} trajectories left",
                     f"time left about {minutes(eval_left)} ({rate} rate)"]
        else:
            parts = []
        if parts:
            self.log(" | ".join(parts))
        write_json(self.layout.progress, {
            "stage": self.stage, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": self.jobs, "models": models,
            "evaluation": {"trajectories_left": self.eval_left, "trajectories_per_second": self.eval_rate,
                           "measured": self.eval_measured},
            "seconds_left": {"training": train_left, "evaluation": eval_left}})

    def train_tick(self, info: dict[str, Any]) -> None:
        newly = set(info["finished"]) - self.trained
        self.trained |= newly
        self.update(force=bool(newly))

    def eval_tick(self, work: PassWork, chunks_left: int, trajectories: int, seconds: float) -> None:
        done, spent = self.eval_done
        self.eval_done = (done + trajectories, spent + seconds)
        self.eval_left = max(0, self.eval_left - trajectories)
        self.eval_rate, self.eval_measured = self.eval_done[0] / max(self.eval_done[1], 1e-9), True
        self.update(force=chunks_left == 0)


# --------------------------------------------------------------------------- set-up
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the reproduction's working directory: checkpoints, weights, test results, logs")
    parser.add_argument("--docs", default=str(REPO / "docs"), metavar="DIR",
                        help="where results.md, results.json and images/<model>/*.png go (default: the repository's docs/)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, few epochs, few images: the whole pipeline in about a minute on a CPU")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu (default: auto)")
    parser.add_argument("--impl", default="ref", choices=IMPLS,
                        help="K-step loop of training and evaluation: ref (pure PyTorch, CUDA graphs on a GPU), "
                             "cuda (fused kernels), auto; fixed by the first run in DIR (default: ref)")
    parser.add_argument("--mps", default="auto", choices=MPS_MODES,
                        help="run the training processes under a private NVIDIA MPS daemon, so that their kernels "
                             "run concurrently: auto (when it can start), on (or fail), off (default: auto)")
    parser.add_argument("--models", default=",".join(MODELS), metavar="A,B",
                        help="the models to work on, a subset of the four (default: all)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="training processes side by side (default: one per model)")
    return parser


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def selected_models(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise UsageError(f"--models must name some of {', '.join(MODELS)}; got {text!r}")
    return [n for n in MODELS if n in names]


def fix_plan(layout: Layout, plan: Plan) -> None:
    """Write ``plan.json``, or check that the one in ``layout`` is ``plan``."""
    saved = read_json(layout.plan)
    if saved is None:
        write_json(layout.plan, plan.to_dict())
        return
    if saved != plan.to_dict():
        differ = sorted(k for k, v in plan.to_dict().items() if saved.get(k) != v)
        raise UsageError(f"{layout.root} holds a reproduction with another plan ({', '.join(differ)} differ: "
                         f"--smoke and --impl must be those of its first run), or use another --out")


def acquire_lock(layout: Layout, log) -> int:
    """Lock ``--out`` for this run; the training processes inherit the lock, so a rerun waits until the
    processes of an interrupted run have saved their checkpoints and exited."""
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
    waited = 0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if waited == 0:
                log(f"{layout.root} is in use by another run, or by the training processes of an interrupted one "
                    "while they save their checkpoints; waiting")
            if waited >= LOCK_WAIT_SECONDS:
                os.close(fd)
                raise UsageError(f"{layout.root} is still in use after {LOCK_WAIT_SECONDS} s (process "
                                 f"{layout.lock.read_text().strip() or '?'} holds {layout.lock})") from None
            time.sleep(1)
            waited += 1
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def print_plan(plan: Plan, names: list[str], device: str, jobs: int, mps: str, docs: Path, log) -> None:
    hold, decay = plan.schedule(names[0])
    log(f"plan{' (smoke: tiny sizes)' if plan.smoke else ''}: {', '.join(f'{n} ({plan.epochs[n]} epochs at most)' for n in names)}")
    log(f"  model: K={plan.steps}, LSTMs of {plan.enc_hidden}/{plan.dec_hidden}, Z={plan.latent_dim}, --impl {plan.impl}; "
        f"training: Adam {plan.lr:g}, batch {plan.batch_size}, clip {plan.clip_grad:g}, the rate held for 2/3 of the "
        f"cap then a cosine decay to {plan.lr_final:g} (e.g. {hold} + {decay} epochs); early stop after "
        f"{plan.patience} epochs without a better validation bound; best validation epoch kept, float16")
    log(f"  test: {plan.test_images} images in chunks of {plan.eval_batch_size}, IWAE S={plan.samples}, conditional "
        f"models also -log p(x) with {plan.marginal_samples} per class")
    log(f"  on {device}: {jobs} training process(es) side by side (MPS {mps}); results to {docs}")


# --------------------------------------------------------------------------- the stages
def show_state(layout: Layout, names: list[str], trained: dict[str, Any], log) -> None:
    """One line per model: trained, epochs done, or not started."""
    for name in names:
        started = (layout.run_dir(name) / "last.safetensors").is_file()
        epochs = read_run_status(layout.run_dir(name) / "metrics.jsonl").epochs
        log(f"  {name}: " + ("trained" if name in trained else f"{epochs} epochs done" if started else "not started"))


def trajectories_left(layout: Layout, plan: Plan, names: list[str], trained: dict[str, Any]) -> int:
    """The evaluation's work left: every pass of the untrained models, the missing chunks of the others."""
    untrained = sum(p.trajectories(plan.test_images, MODELS[n].num_classes) for n in names if n not in trained
                    for p in plan.passes(n))
    work = pending_work(layout, plan, {n: s["weights"]["sha256"] for n, s in trained.items()})
    return untrained + sum(w.trajectories(plan) for w in work)


def run(args: argparse.Namespace, layout: Layout, plan: Plan, names: list[str], device: str, lock_fd: int,
        log) -> int:
    jobs = max(1, args.jobs or len(names))
    docs = Path(args.docs).resolve()
    print_plan(plan, names, device, jobs, args.mps, docs, log)
    progress = Progress(layout, plan, names, jobs, log, interval=5.0 if plan.smoke else 30.0)
    trained = {n: s for n in names if (s := trained_summary(layout, plan, n)) is not None}
    show_state(layout, names, trained, log)
    progress.trained = set(trained)
    untrained = [n for n in names if n not in trained]
    progress.eval_left = trajectories_left(layout, plan, names, trained)
    if progress.eval_left:  # on a GPU that the training will use, in a child process (see measure_device_in_child)
        measured = (measure_device_in_child if untrained and device.startswith("cuda") else measure_device)(plan, device)
        progress.eval_rate, label = measured["trajectories_per_second"], measured["device"]
    else:  # everything is trained and evaluated
        label = device_name(device)

    if untrained:
        progress.stage = "training"
        log(f"training {len(untrained)} model(s): {', '.join(untrained)}")
        with mps_daemon(args.mps, device, log) as mps:
            failures = train_models(layout, plan, untrained, device=device, device_label=label, jobs=jobs,
                                    lock_fd=lock_fd, client_env=mps.env, log=log, report=progress.train_tick)
        if failures:
            log(f"training failed for {len(failures)} model(s); fix the cause and run the same command again")
            return EXIT_FAILED
        trained = {n: s for n in names if (s := trained_summary(layout, plan, n)) is not None}

    work = pending_work(layout, plan, {n: s["weights"]["sha256"] for n, s in trained.items()})
    if work:
        progress.stage = "evaluation"
        progress.eval_left = sum(w.trajectories(plan) for w in work)
        progress.update(force=True)
        evaluate_models(layout, plan, work, device=device, device_label=label, log=log, report=progress.eval_tick)
    progress.stage = "figures"
    progress.update(force=True)
    make_figures(layout, plan, names, docs / "images", log)
    records = write_results(layout, plan, trained, docs, source_commit())
    progress.stage = "done"
    progress.update(force=True)
    for r in records:
        log(f"{r['name']}: test -ELBO {r['test_nelbo']:.2f}, IWAE (S={r['iwae_samples']}) {r['test_iwae']:.2f}"
            + (f", -log p(x) {r['test_nll_marginal']:.2f}" if r.get("test_nll_marginal") is not None else "")
            + f", reconstruction term {r['test_reconstruction']:.2f} (not a likelihood)")
    log(f"wrote {docs / 'results.md'}, {docs / 'results.json'} and the figures in {docs / 'images'}")
    return EXIT_DONE


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout(Path(args.out).resolve())
    try:
        names = selected_models(args.models)
        plan = make_plan(smoke=args.smoke, impl=args.impl)
        if args.jobs is not None and args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
        device = resolve_device(args.device)
    except UsageError as error:
        print(f"reproduce_paper: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    layout.root.mkdir(parents=True, exist_ok=True)
    log = Console(layout.log)
    started = time.monotonic()
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        lock_fd = acquire_lock(layout, log)
        fix_plan(layout, plan)
        code = run(args, layout, plan, names, device, lock_fd, log)
    except Interrupted as stop:
        log(f"{stop} after {minutes(time.monotonic() - started)}: what was done is saved; run the same command "
            "again to continue")
        return 128 + stop.signum
    except UsageError as error:
        log(f"error: {error}")
        return EXIT_USAGE
    except (RuntimeError, OSError, ValueError) as error:
        log(f"error: {type(error).__name__}: {error}")
        return EXIT_FAILED
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == EXIT_DONE:
        log(f"done in {minutes(time.monotonic() - started)}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
