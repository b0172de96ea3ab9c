"""``avme eval``: negative ELBO and IWAE likelihood bounds of a checkpoint on a data split."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import (
    EXIT_STATUS_HELP,
    CLIError,
    ModelSource,
    RawDefaultsFormatter,
    add_checkpoint_argument,
    add_device_arguments,
    add_seed_argument,
    add_switch,
    check_output_path,
    load_model_for_cli,
    nonnegative_int,
    positive_int,
    resolve_model_source,
)
from ._data_options import add_data_options, datasets_epilog, load_run_images
from ._memory import FLOAT_BYTES, check_fits

if TYPE_CHECKING:
    import torch

    from avme_ext.data import ImageSplit
    from avme_ext.distributed import DistInfo
    from avme_ext.model import AVME

DESCRIPTION = """\
Evaluate a checkpoint on a data split; all numbers are nats per image, lower is better.

  negative ELBO          reconstruction term + KL, one noise draw per image
  reconstruction term    -log p(x|z) of that draw (a term of the bound, not a likelihood)
  KL                     total and per drawing step t = 1..K
  IWAE bound (--samples S > 0)
                         -log p(x) <= -(logsumexp_s log w_s - log S) over S whole trajectories;
                         S = 5000 for reported numbers (S = 0: ELBO only)
  conditional models     -log p(x|y) with the true labels (IWAE), and -log p(x) over a
                         uniform label prior from one IWAE bound per class: C times the cost
                         (--no-marginal skips it)

Cost: before starting, a short timed pilot on the chosen device estimates the whole run and
the estimate is printed once to stderr (the IWAE costs S trajectories per image: on a CPU,
S = 5000 on the whole test set takes about a day; use --num-images or a GPU). The progress bar
counts images (image x class bounds for the marginal) and moves within each chunk.

Results are deterministic given --seed and --batch-size (each chunk of --batch-size images
has its own seeded noise). Under torchrun every rank evaluates its share of the chunks and
rank 0 reports the merged result, identical to a single-process run. --json writes the
summary with its provenance (checkpoint, split, images, samples, seed, device, versions,
wall-clock seconds), atomically at the end: a failed or interrupted run writes nothing.

Images: --split of the data set the checkpoint's run was trained on, with the data options it
recorded (the same held-out splits and binarization); data options given here override them, and
images that differ from the run's record or that the model cannot take are refused."""

EPILOG = (
    """\
examples:
  avme eval runs/mnist --num-images 100 --samples 100    # a quick look (seconds to minutes on a CPU)
  avme eval runs/mnist                                   # ELBO on the 10k test images
  avme eval runs/mnist --samples 5000 --json test.json   # the reported IWAE bound (use a GPU)
  avme eval runs/mnist/best.safetensors --split valid --num-images 500 --samples 100
  torchrun --nproc-per-node 4 -m avme_ext eval runs/mnist --samples 5000

"""
    + datasets_epilog()
    + "\n\n"
    + EXIT_STATUS_HELP
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="negative ELBO and IWAE likelihood bounds on a data split (table + JSON)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=RawDefaultsFormatter,
    )
    add_checkpoint_argument(parser)
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"), help="data split")
    parser.add_argument(
        "--samples",
        type=nonnegative_int,
        default=0,
        metavar="S",
        help="IWAE trajectories per image (0: ELBO only; 5000 for reported numbers)",
    )
    parser.add_argument(
        "--num-images",
        type=positive_int,
        default=None,
        metavar="N",
        help="evaluate a random subset of N images, seeded by --seed (default: the whole split)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per chunk")
    parser.add_argument(
        "--max-rows",
        type=positive_int,
        default=20000,
        help="IWAE trajectories evaluated at once (bounds memory for any S)",
    )
    add_switch(
        parser,
        "--marginal",
        default=True,
        help="conditional model with S > 0: also compute -log p(x) over all classes (C IWAE bounds per image)",
    )
    parser.add_argument("--json", default=None, metavar="OUT.json", help="write the summary and provenance here")
    add_switch(parser, "--progress", default=True, help="show a progress bar on stderr")
    add_seed_argument(parser)
    add_device_arguments(parser)
    add_data_options(parser, from_run=True)
    parser.set_defaults(func=run, memory_advice="lower --max-rows (trajectories at once) or --batch-size")


# --------------------------------------------------------------------------- distributed hook
# The only places that touch avme_ext.distributed: joining the torchrun job and leaving it.
def _join_job(device_arg: str) -> tuple[DistInfo, torch.device]:
    """(DistInfo, device) of this process; joins the process group under torchrun (nothing otherwise)."""
    from avme_ext import distributed as dist_utils

    try:
        info = dist_utils.detect()
        device = dist_utils.resolve_device(device_arg, info)
    except (RuntimeError, ValueError) as error:
        raise CLIError(error) from None
    dist_utils.setup(info, device)
    return info, device


def _leave_job(info: DistInfo) -> None:
    if info.distributed:
        from avme_ext import distributed as dist_utils

        dist_utils.teardown()


# --------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    json_out = check_output_path(args.json, "--json", suffix=".json") if args.json else None
    source = resolve_model_source(args.checkpoint)
    info, device = _join_job(args.device)
    try:
        code = _evaluate_and_report(args, info, device, source, json_out)
        if info.distributed:
            from avme_ext import distributed as dist_utils

            dist_utils.barrier()  # leave together: a rank torn down while a peer still talks to it can abort
        return code
    finally:
        _leave_job(info)


def _load_images(args: argparse.Namespace, model: AVME, source: ModelSource) -> ImageSplit:
    import torch

    split = load_run_images(args, source.path, model)
    if args.num_images is not None:
        if args.num_images > len(split):
            raise CLIError(f"--num-images {args.num_images}: {split.name} has only {len(split)} images")
        split = split.subset(args.num_images, torch.Generator().manual_seed(args.seed))
    if model.num_classes > 0 and not split.has_labels:
        raise CLIError(f"{split.name} has no labels, which this conditional model needs")
    return split


def _evaluate_and_report(
    args: argparse.Namespace, info: DistInfo, device: torch.device, source: ModelSource, json_out: Path | None
) -> int:
    import torch

    from avme_ext.checkpoint import atomic_write_json
    from avme_ext.evaluation import evaluate, gather_across_ranks

    rank, world = info.rank, info.world_size
    model = load_model_for_cli(args, device, source)
    split = _load_images(args, model, source)
    _check_memory(args, model, len(split), device)
    pace = _announce_cost(args, model, len(split), device, world) if rank == 0 else None

    start = time.perf_counter()
    try:
        result = evaluate(
            model,
            split,
            samples=args.samples,
            batch_size=args.batch_size,
            seed=args.seed,
            max_rows=args.max_rows,
            shard=(rank, world),
            marginal=args.marginal,
            progress=args.progress and rank == 0,
            observer=pace,
        )
    except ValueError as error:
        raise CLIError(error) from None
    if info.distributed:
        result = gather_across_ranks(result)
    seconds = time.perf_counter() - start
    if rank != 0:  # only rank 0 prints and writes files
        return 0

    summary = result.summary()
    print(format_table(summary, model, split.name, source.given))
    if json_out is not None:
        document = {
            "summary": summary,
            "provenance": {
                "checkpoint": str(source.path.resolve()),
                "pretrained": source.pretrained,
                "dataset": split.name.partition("/")[0],
                "split": args.split,
                "num_images": len(result),
                "subset": args.num_images is not None,
                "samples": args.samples,
                "marginal": bool(args.marginal and model.num_classes > 0 and args.samples > 0),
                "batch_size": args.batch_size,
                "max_rows": args.max_rows,
                "seed": args.seed,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "impl": args.impl,
                "precision": args.precision,
                "world_size": world,
                "model_config": model.config.to_dict(),
                "torch_version": torch.__version__,
                "python_version": sys.version.split()[0],
                "wall_clock_seconds": seconds,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        }
        print(atomic_write_json(json_out, _jsonable(document)))
    return 0


def _check_memory(args: argparse.Namespace, model: AVME, num_images: int, device: torch.device) -> None:
    """Refuse up front an evaluation whose trajectories at once cannot fit in memory (exit status 2)."""
    from avme_ext.evaluation import working_rows

    c = model.config
    rows = working_rows(num_images, args.samples, args.batch_size, args.max_rows)
    per_row = 3 * c.steps * c.latent_dim + 2 * c.data_dim  # noise, posterior means and variances; image, canvas
    what = (
        f"--max-rows {args.max_rows} with --samples {args.samples}"
        if args.samples
        else f"--batch-size {args.batch_size}"
    )
    check_fits(
        rows * per_row * FLOAT_BYTES,
        device,
        f"{what} ({rows} trajectories at once)",
        "lower --max-rows (it bounds memory for any --samples)" if args.samples else "lower --batch-size",
    )


#: Above this estimate (seconds) ``avme eval`` suggests a smaller --num-images or a GPU.
LONG_EVALUATION = 600


def _announce_cost(
    args: argparse.Namespace, model: AVME, num_images: int, device: torch.device, world: int
) -> PaceCheck:
    """Print once, to stderr, what this evaluation will cost on this machine (from a timed pilot);
    returns the :class:`PaceCheck` that compares it with the pace the evaluation then keeps."""
    from avme_ext.evaluation import estimate_cost

    estimate = estimate_cost(
        model,
        num_images,
        samples=args.samples,
        marginal=args.marginal,
        max_rows=args.max_rows,
        batch_size=args.batch_size,
    )
    seconds = estimate.seconds / world
    what = f"IWAE S={args.samples}" if args.samples else "ELBO"
    if args.samples and model.num_classes > 0 and args.marginal:
        what += f" x {model.num_classes} classes"
    where = describe_device(device) + (f", {world} processes" if world > 1 else "")
    advice = _advice(device)
    line = f"avme eval: {what} on {num_images} images: about {format_duration(seconds)} on {where}"
    if seconds > LONG_EVALUATION:
        line += advice
    print(line, file=sys.stderr, flush=True)
    return PaceCheck(seconds, advised=seconds > LONG_EVALUATION, advice=advice)


def _advice(device: torch.device) -> str:
    return "; use --num-images N" + (" or a GPU" if device.type == "cpu" else "") + " for a quicker look"


class PaceCheck:
    """Holds the announced estimate against the pace the evaluation keeps (``evaluate(observer=...)``).

    Once the work has run for ``settle_seconds`` (a pace measured over less is noise), the time the
    whole evaluation takes at the pace so far is compared with the estimate; when they differ by
    more than ``tolerance`` times (e.g. other processes took or released the CPU since the pilot),
    one line says so, with the advice for a long evaluation when the pace makes it long and it was
    not given yet. At most one such line is printed.

    Args:
        estimate: the announced seconds.
        advised: whether the announcement already gave the advice.
        advice: the advice, e.g. ``"; use --num-images N or a GPU for a quicker look"``.
        clock: seconds (monotonic), for tests.
    """

    def __init__(
        self,
        estimate: float,
        *,
        advised: bool,
        advice: str,
        tolerance: float = 2.0,
        settle_seconds: float = 5.0,
        clock: Callable[[], float] = time.perf_counter,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.estimate = estimate
        self.advised = advised
        self.advice = advice
        self.tolerance = tolerance
        self.settle_seconds = settle_seconds
        self.clock = clock
        self.say = say or _to_stderr
        self.started = clock()
        self.spoken = False

    def __call__(self, done: int, total: int) -> None:
        elapsed = self.clock() - self.started
        if self.spoken or done <= 0 or done >= total or elapsed < self.settle_seconds:
            return
        projected = elapsed * total / done
        if 1 / self.tolerance <= projected / self.estimate <= self.tolerance:
            return
        self.spoken = True
        line = (
            f"avme eval: at the pace of the first {done} of {total}, about {format_duration(projected)} in all "
            f"({format_duration(projected - elapsed)} more), not {format_duration(self.estimate)}: "
            "the machine is " + ("busier" if projected > self.estimate else "less busy") + " than during the pilot"
        )
        if projected > LONG_EVALUATION and not self.advised:
            line += self.advice
        self.say(line)


def _to_stderr(line: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)  # above the progress bar, which stays intact
    except ImportError:  # pragma: no cover
        print(line, file=sys.stderr, flush=True)


def describe_device(device: torch.device) -> str:
    """``"this CPU (2 threads)"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"this CPU ({threads} thread{'s' if threads != 1 else ''})"


def format_duration(seconds: float) -> str:
    """A rough, readable duration: ``"3 s"``, ``"12 min"``, ``"2.6 h"``, ``"1.1 days"``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _jsonable(value: object) -> object:
    """Replace non-finite floats by None so the JSON stays standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def format_table(summary: dict[str, Any], model: AVME, split_name: str, checkpoint: str | Path) -> str:
    """The human-readable table printed by ``avme eval``: nats per image, and bits per dimension beside
    every bound."""

    def fmt(value: float, sem: float | None = None, bits_key: str | None = None) -> str:
        text = f"{value:10.3f}"
        if bits_key is not None and bits_key in summary:
            text += f"  ({summary[bits_key]:.4f} bits/dim)"
        if sem is not None and math.isfinite(sem):
            text += f"  ± {sem:.3f} (s.e.)"
        return text

    rows = [
        ("negative ELBO", fmt(summary["nelbo"], summary.get("nelbo_sem"), "nelbo_bits_per_dim")),
        ("reconstruction term -log p(x|z) (not a likelihood)", fmt(summary["reconstruction"])),
        ("KL total", fmt(summary["kl"])),
    ]
    for t, value in enumerate(summary["kl_per_step"], start=1):
        rows.append((f"  KL step {t}", fmt(value)))
    if "iwae_nll" in summary:
        what = "-log p(x|y)" if model.num_classes > 0 else "-log p(x)"
        rows.append(
            (
                f"IWAE bound {what}, S={summary['iwae_samples']}",
                fmt(summary["iwae_nll"], summary.get("iwae_nll_sem"), "iwae_nll_bits_per_dim"),
            )
        )
    if "nll_marginal" in summary:
        rows.append(
            (
                f"-log p(x), all {model.num_classes} classes, S={summary['iwae_samples']}",
                fmt(summary["nll_marginal"], None, "nll_marginal_bits_per_dim"),
            )
        )
    width = max(len(name) for name, _ in rows)
    likelihood = summary.get("likelihood", model.config.likelihood)
    header = (
        f"{checkpoint} on {split_name}: {summary['num_images']} images, {likelihood} likelihood "
        f"(nats per image, lower is better; bits/dim = nats / (D ln 2), D = {model.config.data_dim})"
    )
    lines = [header, "-" * max(len(header), width + 12)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
