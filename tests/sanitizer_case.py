"""A tiny run of every fused kernel, for compute-sanitizer (not collected by pytest).

    compute-sanitizer --tool memcheck  python tests/sanitizer_case.py
    compute-sanitizer --tool racecheck python tests/sanitizer_case.py
    compute-sanitizer --tool initcheck python tests/sanitizer_case.py

Covers: forward (both encoder inputs, conditional and not, partial last block), backward
(with and without the gradients w.r.t. x, y and eps), the sampler, float32 and float64.
Exits non-zero if the extension or a GPU is missing, or if a result is not finite or
disagrees with the float64 reference by more than 1e-3 (relative; a gross-error check: the
precise bounds are tests/ops/'s).
"""

from __future__ import annotations

import math
import sys

import torch

from avme_ext import ops as avme_ops
from avme_ext.reference import avme_forward_reference, avme_sample_reference
from ops.helpers import (  # tests/ops/
    Sizes,
    make_inputs,
    make_params,
    rel_err,
    to_reference,
)


def main() -> int:
    if not avme_ops.is_available():
        print(f"avme CUDA extension or GPU missing (loaded={avme_ops.extension_loaded()})", file=sys.stderr)
        return 2
    worst = 0.0
    # B=5 is not a multiple of any rows-per-block > 1: exercises the partial last block.
    sizes, K, B = Sizes(D=20, He=9, Hd=7, Z=3), 3, 5
    for dtype in (torch.float32, torch.float64):
        for C, encoder_input, need_inputs in ((0, "canvas", False), (3, "error", True)):
            p = make_params(sizes, C, dtype=dtype, device="cuda", scale=0.2)
            x, y, eps = make_inputs(B, K, sizes, C, dtype=dtype, device="cuda")
            inputs = [t for t in (x, y, eps) if t is not None and need_inputs]
            for t in inputs:
                t.requires_grad_(True)
            pref = to_reference(p, dtype)
            out = avme_ops.fused_forward(x, y, eps, p, encoder_input, True)
            ref = avme_forward_reference(x, y, eps, pref, encoder_input, True)

            def loss(o):
                assert o.canvases is not None
                return o.canvas.sum() + o.mu.square().sum() + o.logvar.sum() + o.canvases.mean()

            grads = torch.autograd.grad(loss(out), inputs + list(p))
            ref_grads = torch.autograd.grad(loss(ref), inputs + list(pref))
            with torch.no_grad():
                s = avme_ops.fused_sample(eps, y, p, True)
                sref = avme_sample_reference(eps, y, p, True)
            assert out.canvases is not None
            assert ref.canvases is not None
            assert s.canvases is not None
            assert sref.canvases is not None
            pairs = [(out.canvas, ref.canvas), (out.mu, ref.mu), (out.canvases, ref.canvases),
                     (s.canvases, sref.canvases), *zip(grads, ref_grads, strict=True)]  # fmt: skip
            for a, b in pairs:
                worst = max(worst, rel_err(a, b))  # rel_err is inf (never NaN) for non-finite input
    torch.cuda.synchronize()
    print(f"sanitizer case done; worst relative error vs reference {worst:.2e}")
    return 0 if math.isfinite(worst) and worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
