"""What one fused op call issues, counted on the CPU emulator: products, allocations, device
operations and emulated kernel launches.

The host code (csrc/avme_ops.cpp) and the stagewise design issue their device work through ATen;
the kernels go through the emulator's launches (``avme_emu.kernel_launches``). On a GPU each
ATen device operation below is one CUDA kernel (a cuBLAS product sometimes two), so the counts
are the launch plan of a call; the times are not (nothing here runs on a GPU).

Counted from ``torch.profiler`` events (outermost ATen calls only, so ``zeros`` = one fill):

- ``products``: ``mm`` / ``addmm`` (cuBLAS GEMMs);
- ``device_ops``: every outermost ATen call that launches device work (fills, copies, products,
  reductions, element-wise ops); the emulator's NaN fill of outputs (``uninit``: ``at::empty``
  on CUDA) is left out;
- ``allocations``: ATen calls that leave newly allocated memory (their own net allocation, not
  their callees', is positive): one per new tensor, whether made by ``empty`` or inside an op
  such as ``mm`` or ``sum`` (a temporary freed within the same call does not count, nor does
  the CPU's staging buffer of a transposing ``copy_``, which CUDA does not make);
- ``kernels``: the design's own kernel launches (emulated).

Run ``python -m tests.ops.work_counts`` for the table at the paper's sizes.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

PRODUCTS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"})
DEVICE_OPS = PRODUCTS | frozenset({
    "aten::fill_", "aten::zero_", "aten::copy_", "aten::clone", "aten::cat", "aten::sum",
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div",
    "aten::exp", "aten::exp_", "aten::sigmoid", "aten::neg", "aten::rsub",
})  # fmt: skip


def _outermost(event, names: frozenset[str]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names or parent.name == "aten::full":
            return False
        parent = parent.cpu_parent
    return True


def _allocates(event) -> bool:
    if not event.name.startswith("aten::") or event.self_cpu_memory_usage <= 0:
        return False
    while event is not None:
        if event.name == "aten::copy_":
            return False
        event = event.cpu_parent
    return True


def count_work(call: Callable[[], object], launches: Callable[[], int]) -> dict[str, int]:
    """The work ``call()`` issues (see the module docstring); ``launches()`` reads the emulator's
    kernel-launch counter."""
    before = launches()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = prof.events()
    kinds: Counter[str] = Counter()
    for e in events:
        if _allocates(e):
            kinds["allocations"] += 1
        if e.name in DEVICE_OPS and _outermost(e, DEVICE_OPS):
            kinds["device_ops"] += 1
            kinds["products"] += e.name in PRODUCTS
    kinds["kernels"] = launches() - before
    return {k: kinds[k] for k in ("products", "device_ops", "allocations", "kernels")}


def paper_table(design: str, encoder_input: str, C: int, K: int = 12, B: int = 2) -> dict[str, dict[str, int]]:
    """The counts of one forward (saving its state) and one backward (every gradient) at the
    paper's sizes on the emulator, with ``design`` forced."""
    from . import backends
    from .helpers import PAPER, forward_args, make_inputs, make_params

    emu = backends.emulator()
    params = make_params(PAPER, C, grad=False)
    x, y, eps = make_inputs(B, K, PAPER, C)
    args = forward_args(x, y, eps, params)
    out = {}

    def forward():
        return emu.ns.forward(*args, encoder_input, False, True, "fp32", design)

    out["forward"] = count_work(forward, emu.ns.kernel_launches)
    canvas, _mu, logvar, canvases, *state = forward()
    grads = (torch.ones_like(canvas), torch.ones_like(logvar), torch.ones_like(logvar), None)
    p = params

    def backward():
        return emu.ns.backward(
            *grads, x, y, eps, logvar, canvases, *state, p.enc_w_ih, p.enc_w_hh, p.q_w,
            p.dec_w_ih, p.dec_w_hh, p.write_w, encoder_input, True, C > 0, True, "fp32", design,
        )  # fmt: skip

    out["backward"] = count_work(backward, emu.ns.kernel_launches)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", nargs="+", default=["stagewise", "rowtile"])
    parser.add_argument("--K", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("design     mode    C  direction  products  device_ops  allocations  kernels")
    for design in args.designs:
        for mode in ("canvas", "error"):
            for C in (0, 10):
                for direction, c in paper_table(design, mode, C, args.K).items():
                    print(
                        f"{design:<10} {mode:<7} {C:<2} {direction:<10} {c['products']:>8}  "
                        f"{c['device_ops']:>10}  {c['allocations']:>11}  {c['kernels']:>7}"
                    )


if __name__ == "__main__":
    main()
