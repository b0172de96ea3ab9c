"""Accuracy of the persistent design's float32 products against float64, over the whole K-step
loop at the paper's sizes, on the CPU emulator: CUDA-core FMA, 3xTF32 and (for scale) TF32.

The evidence behind the precision="fp32" policy (csrc/README.md, "Precision policy"): fp32 may
run on 3xTF32 tensor cores where its errors are within twice those of FMA.

For each seed the weights and inputs are drawn in float64 (tests/ops/helpers.py) and rounded to
float32; the forward kernel runs all K steps in float32, saving its state, and the backward
kernel runs backward through time on that state with random output gradients; the host's
weight-gradient products (float32) finish the gradients. Every tensor is compared with the
float64 reference on the same rounded inputs (the float32 reference's own error is printed for
scale). Errors of a tensor: max |got - ref| / max |ref| and mean |got - ref| / mean |ref|.

The emulator's mma rounds each product exactly and accumulates in float, k ascending, within an
instruction (csrc/emulation/cuda_emulation.h); a GPU's tensor cores may round inside an mma
differently, so these are the numbers of the algorithm, to be confirmed on hardware
(tools/gpu). The launch is the one an H100 gets (256 threads, the default batch chunk and tile)
on fewer, larger blocks (--ctas, emulator threads are OS threads): every output's sum runs over
the same k splits and tree as on the GPU.

    python -m tests.ops.precision_error                 # seeds 0,1,2, B=32: 15-40 min per seed
    python -m tests.ops.precision_error --seeds 0 --out precision.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from avme_ext.loop_types import AVMEParams
from avme_ext.reference import avme_forward_reference

from .helpers import PAPER
from .persistent_runs import (
    FMA,
    TF32,
    TF32X3,
    host_weight_gradients,
    load_pemu,
    loss_grads,
    per_step_gradients,
    reference_run,
    run_backward,
    run_forward,
    stacked,
)

MATHS = {"fma": FMA, "3xtf32": TF32X3, "tf32": TF32}
FORWARD = ("canvas", "canvases", "mu", "logvar", "z", "h_enc", "c_enc", "gates_enc", "h_dec",
           "c_dec", "gates_dec")  # fmt: skip
PER_STEP = ("d_canvas", "d_q", "d_gates_enc", "d_gates_dec")


#: One seed's errors: per math (and the float32 reference), per tensor, (max, mean) relative error.
SeedErrors = dict[str, dict[str, tuple[float, float]]]


def errors(got: Tensor, ref: Tensor) -> tuple[float, float]:
    """(max |got - ref| / max |ref|, mean |got - ref| / mean |ref|), in float64 (0 where both are
    zero, e.g. the recurrent weights' gradients at K = 1)."""
    diff = (got.double() - ref.double()).abs()
    scale = ref.double().abs()
    if scale.max() == 0:
        return (0.0, 0.0) if diff.max() == 0 else (float("inf"), float("inf"))
    return (diff.max() / scale.max()).item(), (diff.mean() / scale.mean()).item()


def weight_gradients(x, y, eps, p: AVMEParams, grads, mode) -> dict[str, Tensor]:
    """Gradients of the test loss w.r.t. every parameter and x, by autograd through the
    reference in the tensors' dtype."""
    x = x.detach().clone().requires_grad_(True)
    ref = avme_forward_reference(x, y, eps, p, mode, True)
    loss = sum((getattr(ref, k) * g.to(x.dtype)).sum() for k, g in grads.items())
    names = [*list(AVMEParams._fields), "x"]
    return dict(zip(names, torch.autograd.grad(loss, [*list(p), x]), strict=True))


def measure_seed(ns, seed: int, B: int, K: int, maths: Iterable[str], ctas: int, mode: str) -> SeedErrors:
    s, C = PAPER, 0
    p64, x64, y64, eps64, rec64 = reference_run(s, C, B, K, mode, torch.float64, seed)
    p32, x32, y32, eps32, rec32 = reference_run(s, C, B, K, mode, torch.float32, seed)
    grads = loss_grads(B, K, s, seed + 9)
    want = stacked(rec64)
    want.update(per_step_gradients(rec64, grads, mode))
    want.update({f"grad_{k}": v for k, v in weight_gradients(x64, y64, eps64, p64, grads, mode).items()})
    # The float32 reference for scale (per-step and weight gradients by autograd in float32).
    grads32 = {k: g.float() for k, g in grads.items()}
    ref32 = stacked(rec32)
    ref32.update(per_step_gradients(rec32, grads32, mode))
    ref32.update({f"grad_{k}": v for k, v in weight_gradients(x32, y32, eps32, p32, grads32, mode).items()})
    result: SeedErrors = {"float32 reference": {k: errors(ref32[k], want[k]) for k in want}}
    config, limits = [ctas, 256, 0, 0], [ctas, 1 << 30]
    for name in maths:
        start = time.time()
        fwd = run_forward(ns, x32, y32, eps32, p32, mode, [*config, MATHS[name]], limits)
        bwd = run_backward(ns, grads32, fwd, eps32, p32, mode, [*config, MATHS[name]], limits)
        got = {k: fwd[k] for k in FORWARD}
        got.update(bwd)
        with torch.no_grad():
            host = host_weight_gradients(fwd, bwd, x32, y32, p32, mode)
        got.update({f"grad_{k}": v for k, v in host.items()})
        bad = [k for k, v in got.items() if not torch.isfinite(v).all()]
        assert not bad, f"{name}: non-finite values in {bad}"
        result[name] = {k: errors(got[k], want[k]) for k in want}
        print(f"  seed {seed} {name}: {time.time() - start:.0f} s", flush=True)
    return result


def summary(results: list[SeedErrors], maths: list[str]) -> dict[str, dict[str, Any]]:
    """Per math: the largest max- and mean-error over seeds for each tensor, and the worst ratio
    of each math to FMA."""
    names = list(results[0]["float32 reference"])
    out: dict[str, dict[str, Any]] = {}
    for m in ["float32 reference", *maths]:
        out[m] = {k: [max(r[m][k][0] for r in results), max(r[m][k][1] for r in results)]
                  for k in names}  # fmt: skip
    if "fma" in maths:
        for m in maths:
            ratios = [[r[m][k][i] / r["fma"][k][i] for r in results for k in names
                       if r["fma"][k][i] > 0] for i in (0, 1)]  # fmt: skip
            out[f"{m} / fma"] = {"max error ratio": max(ratios[0]), "mean error ratio": max(ratios[1])}
    return out


def print_table(summ: dict[str, dict[str, Any]], maths: list[str]) -> None:
    cols = ["float32 reference", *maths]
    print(f"{'tensor':18s}" + "".join(f"{c:>26s}" for c in cols))
    print(f"{'':18s}" + "".join(f"{'max / mean rel. error':>26s}" for _ in cols))
    for k in summ[cols[0]]:
        print(f"{k:18s}" + "".join(f"{summ[c][k][0]:13.2e}{summ[c][k][1]:13.2e}" for c in cols))
    for m in maths:
        if f"{m} / fma" in summ:
            r = summ[f"{m} / fma"]
            print(f"{m} / fma, worst over tensors and seeds: max error x{r['max error ratio']:.2f}, "
                  f"mean error x{r['mean error ratio']:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    ap.add_argument("--batch", type=int, default=32, help="batch rows (default 32: one chunk)")
    ap.add_argument("--steps", type=int, default=12, help="K (default 12, the paper's)")
    ap.add_argument("--maths", default="fma,3xtf32", help="comma list of fma, 3xtf32, tf32")
    ap.add_argument("--mode", default="canvas", choices=["canvas", "error"], help="encoder input")
    ap.add_argument("--ctas", type=int, default=16, help="emulated blocks (default 16)")
    ap.add_argument("--out", help="also write the per-seed errors and the summary as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ns = load_pemu()
    maths = args.maths.split(",")
    seeds = [int(v) for v in args.seeds.split(",")]
    results = []
    for seed in seeds:
        print(f"seed {seed}: B={args.batch} K={args.steps} {PAPER} {args.mode}", flush=True)
        results.append(measure_seed(ns, seed, args.batch, args.steps, maths, args.ctas, args.mode))
    summ = summary(results, maths)
    print_table(summ, maths)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"sizes": dataclasses.asdict(PAPER),
                       "batch": args.batch, "steps": args.steps, "mode": args.mode,
                       "seeds": seeds, "per_seed": results, "summary": summ}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
