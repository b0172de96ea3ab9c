"""A tiny run of every fused kernel, for compute-sanitizer (not collected by pytest).

    compute-sanitizer --tool memcheck  python tests/sanitizer_case.py
    compute-sanitizer --tool racecheck python tests/sanitizer_case.py
    compute-sanitizer --tool initcheck python tests/sanitizer_case.py

Covers: forward (both encoder inputs, conditional and not, partial last block), backward
(with and without the gradient w.r.t. x), the sampler, float32 and float64. Exits non-zero if
the extension or a GPU is missing, or if a result disagrees with the reference.
"""

from __future__ import annotations

import sys

import torch

from avme_ext import ops
from avme_ext.loop_types import AVMEParams
from avme_ext.reference import avme_forward_reference, avme_sample_reference


def params(D, C, He, Hd, Z, dtype):
    def rnd(*shape):
        return (torch.randn(*shape, device="cuda", dtype=dtype) * 0.2).requires_grad_()

    return AVMEParams(
        rnd(4 * He, 2 * D + Hd + C), rnd(4 * He, He), rnd(4 * He), rnd(4 * He),
        rnd(2 * Z, He), rnd(2 * Z),
        rnd(4 * Hd, Z + C), rnd(4 * Hd, Hd), rnd(4 * Hd), rnd(4 * Hd),
        rnd(D, Hd), rnd(D),
    )  # fmt: skip


def main() -> int:
    if not ops.is_available():
        print(f"avme CUDA extension or GPU missing (loaded={ops.extension_loaded()})", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    worst = 0.0
    # B=5 is not a multiple of any rows-per-block > 1: exercises the partial last block.
    for dtype in (torch.float32, torch.float64):
        for C, encoder_input, need_x in ((0, "canvas", False), (3, "error", True)):
            D, He, Hd, Z, K, B = 20, 9, 7, 3, 3, 5
            p = params(D, C, He, Hd, Z, dtype)
            x = torch.rand(B, D, device="cuda", dtype=dtype).requires_grad_(need_x)
            y = torch.eye(C, device="cuda", dtype=dtype)[torch.arange(B) % C] if C else None
            eps = torch.randn(K, B, Z, device="cuda", dtype=dtype)
            out = ops.fused_forward(x, y, eps, p, encoder_input, True)
            ref = avme_forward_reference(x, y, eps, p, encoder_input, True)
            loss = out.canvas.sum() + out.mu.square().sum() + out.logvar.sum() + out.canvases.mean()
            ref_loss = ref.canvas.sum() + ref.mu.square().sum() + ref.logvar.sum() + ref.canvases.mean()
            inputs = ([x] if need_x else []) + list(p)
            grads = torch.autograd.grad(loss, inputs)
            ref_grads = torch.autograd.grad(ref_loss, inputs)
            with torch.no_grad():
                s = ops.fused_sample(eps, y, p, True)
                sref = avme_sample_reference(eps, y, p, True)
            pairs = [(out.canvas, ref.canvas), (out.mu, ref.mu), (out.canvases, ref.canvases),
                     (s.canvases, sref.canvases), *zip(grads, ref_grads)]
            for a, b in pairs:
                worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    torch.cuda.synchronize()
    print(f"sanitizer case done; worst relative error vs reference {worst:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
