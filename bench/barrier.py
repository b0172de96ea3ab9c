"""Cost of one grid-wide barrier round on this GPU: what the persistent design pays per stage.

The persistent kernels (csrc/persistent/) pass 4 grid barriers per step in the forward and 4 in
the backward, so at K=12 a training step holds 96 of them; at a few microseconds each they bound
how fast a small-batch step can be. This script times ``torch.ops.avme_bench.grid_barrier_loop``
(csrc/microbench/grid_barrier.cu): one cooperative launch of ``blocks`` blocks that runs N
rounds of "thread 0 of each block writes a float, every block passes the barrier, every block
reads its neighbour's float", for the barrier the kernels use (``cooperative_groups``) and a
hand-made generation-counting one (``flag``). The cost of a round is
``(time(N rounds) - time(0 rounds)) / N``, each the median of ``--repeats`` CUDA-event timings,
so the launch itself does not count.

Each configuration is printed as it is measured (a hang in one barrier still leaves the lines
before it); ``--out FILE`` also writes them as JSON with the device, versions, commit and date.

    python bench/barrier.py                               # blocks = SMs; threads 128, 256, 512
    python bench/barrier.py --blocks 132,264 --threads 256 --out barrier.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from avme_ext import ops  # noqa: E402
from bench.run import device_name, driver_version, source_revision  # noqa: E402
from bench.timing import Timer, summarize  # noqa: E402

BARRIERS = ("cooperative_groups", "flag")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _barriers(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(BARRIERS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(BARRIERS)}, got {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--blocks",
        type=_ints,
        default=None,
        help="grid sizes, comma-separated (default: the number of SMs, one block per SM as the "
        "persistent kernels launch)",
    )
    parser.add_argument("--threads", type=_ints, default=[128, 256, 512], help="block sizes (default: 128,256,512)")
    parser.add_argument(
        "--barriers", type=_barriers, default=list(BARRIERS), help=f"which barriers (default: {','.join(BARRIERS)})"
    )
    parser.add_argument("--rounds", type=int, default=2000, help="barrier rounds per timed launch (default: 2000)")
    parser.add_argument("--repeats", type=int, default=11, help="timed launches per point (default: 11)")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be >= 1, got {args.rounds} and {args.repeats}")
    return args


def time_rounds(barrier: str, blocks: int, threads: int, rounds: int, repeats: int, device: torch.device) -> float:
    """Median seconds of one launch of ``rounds`` rounds (fresh zeroed counters for every launch)."""
    timer = Timer(device)
    counters = torch.zeros(2, dtype=torch.int32, device=device)
    sink = torch.zeros(3 * blocks, dtype=torch.float32, device=device)

    def launch() -> None:
        torch.ops.avme_bench.grid_barrier_loop(counters, sink, blocks, threads, rounds, barrier)

    launch()  # warm-up (module load, first launch)
    samples = []
    for _ in range(repeats):
        counters.zero_()
        samples.append(timer.time(launch))
    if not torch.isfinite(sink).all():
        raise RuntimeError(f"grid_barrier_loop ({barrier}) left non-finite values in its sink")
    return summarize(samples).median


def measure(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    results = []
    for barrier in args.barriers:
        for blocks in args.blocks or [sms]:
            for threads in args.threads:
                empty = time_rounds(barrier, blocks, threads, 0, args.repeats, device)
                full = time_rounds(barrier, blocks, threads, args.rounds, args.repeats, device)
                record = {
                    "barrier": barrier,
                    "blocks": blocks,
                    "threads": threads,
                    "rounds": args.rounds,
                    "launch_us": round(empty * 1e6, 3),
                    "round_us": round(max(full - empty, 0.0) / args.rounds * 1e6, 4),
                }
                print(
                    f"{barrier:>18}  blocks {blocks:4d}  threads {threads:4d}: {record['round_us']:8.3f} us per "
                    f"round (empty launch {record['launch_us']:.1f} us)",
                    flush=True,
                )
                results.append(record)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/barrier.py: error: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if not ops.is_available() or not hasattr(torch.ops.avme_bench, "grid_barrier_loop"):
        print(
            "bench/barrier.py: error: the CUDA extension avme_ext._C is not built (see README: Install)",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    results = measure(args, device)
    if args.out:
        commit, dirty = source_revision()
        document = {
            "device": device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "driver": driver_version(),
            "python": platform.python_version(),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": commit,
            "git_dirty": dirty,
            "command": " ".join([sys.executable, "bench/barrier.py", *(argv if argv is not None else sys.argv[1:])]),
            "results": results,
        }
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
