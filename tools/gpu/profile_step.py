#!/usr/bin/env python
"""One training step of the paper-size model, bracketed for a profiler (Nsight Compute).

Builds the step of ``bench/workloads.py`` (zero_grad, forward, loss, backward, Adam) for the fused
ops forced to ``--design``, runs ``--warmup`` steps, then one step between
``torch.cuda.profiler.start()`` and ``stop()``, so that ``ncu --profile-from-start off`` sees the
kernels of exactly one step (an NVTX range names it)::

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        python3 tools/gpu/profile_step.py --design persistent --batch 100 --precision bf16

``--impl ref --device cpu --tiny`` checks the script on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from avme_ext.data import load_split  # noqa: E402
from bench.flops import PAPER_SIZE, ModelSize  # noqa: E402
from bench.workloads import IMPLS, build_train_case, make_train_inputs, unavailable_reason  # noqa: E402

#: The batch size each design is meant for, profiled when --batch is not given.
DESIGN_BATCH = {"persistent": 100, "rowtile": 1024, "stagewise": 4096, "auto": 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--design", default="auto", help="fused design to force (default auto)")
    p.add_argument("--precision", default="bf16", help="fp32, tf32 or bf16 (default bf16)")
    p.add_argument("--batch", type=int, help=f"B (default by design: {DESIGN_BATCH})")
    p.add_argument("--steps", type=int, default=12, help="K (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="steps before the profiled one (default 2)")
    p.add_argument("--impl", choices=("cuda", "ref"), default="cuda", help="cuda (fused, default) or ref")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model sizes (CPU checks)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    name = f"fused-{args.design}-{args.precision}" if args.impl == "cuda" else "ref-eager"
    if name not in IMPLS:
        p.error(f"no implementation {name!r} (designs: auto, rowtile, persistent, stagewise)")
    spec = IMPLS[name]
    reason = unavailable_reason(spec, device)
    if reason:
        print(f"profile_step: {name} cannot run: {reason}", file=sys.stderr)
        return 3
    size = ModelSize(784, 16, 16, 4) if args.tiny else PAPER_SIZE
    batch = args.batch or DESIGN_BATCH.get(args.design, 1024)
    images = load_split("binarized_mnist", "train").images.to(device)
    inputs = make_train_inputs(images, batch, args.steps, size, args.warmup + 1, device, seed=0)
    case = build_train_case(spec, size, args.steps, inputs, device)
    for i in range(args.warmup):
        case.step(i)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    start = time.perf_counter()
    with _NvtxRange(cuda, f"{name} B={batch} K={args.steps}"):
        case.step(args.warmup)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(
        f"profile_step: {name} B={batch} K={args.steps}: one step in {time.perf_counter() - start:.4f} s (wall, "
        f"profiler overhead included)"
    )
    return 0


class _NvtxRange:
    """An NVTX range on CUDA, nothing on the CPU."""

    def __init__(self, cuda: bool, label: str) -> None:
        self.cuda, self.label = cuda, label

    def __enter__(self) -> None:
        if self.cuda:
            torch.cuda.nvtx.range_push(self.label)

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    sys.exit(main())
