"""The persistent design's kernels (csrc/persistent/) under the CPU emulator.

csrc/emulation/persistent_emulation.cpp compiles the kernels and their launchers as C++ and
registers ``torch.ops.avme_pemu.*``, which take exactly the tensors behind ``LoopParams`` /
``BackwardParams`` plus a launch configuration ``[ctas, threads, nbl, kc(, math)]`` (0 = chosen)
and device limits ``[num_sms, smem_optin]``. Each launch is a cooperative grid: every thread of
every block runs at once as an OS thread and the grid barrier is a barrier over all of them. The
tensor-core products (math 3xTF32 / TF32) run the emulator's mma.sync, which rebuilds each
instruction's matrices from the 32 lanes' fragment registers (PTX layouts): a wrong fragment
index fails the comparisons. The emulated cp.async and the weights' vector loads abort the process
when an address is not 16-byte aligned, as the GPU faults (odd batch sizes, partial tiles and the
shared-memory carve-up of every case below are checked that way).

The tests prepare the inputs as csrc/avme_ops.cpp does (hoisted step-invariant products,
transposed weights), run the kernels on fresh random inputs with NaN-filled outputs, and compare
against the float64 reference: the forward's outputs and saved state, the backward's per-step
gradients (autograd through :func:`unrolled_reference`, itself checked against
:func:`avme_ext.reference.avme_forward_reference`), and the weight gradients the host computes
from them. Sizes are small and blocks few (2-8 blocks of 32-256 threads) so that each test
takes seconds; the cases cover K = 1, B = 1, odd sizes, units not divisible by the block count,
blocks without units, partial batch chunks and k tiles, several row passes, one and two column
slices per batch chunk, split-K trees of 1 to 4 splits (and an idle warp), both encoder inputs,
conditional and unconditional models, and the sampler. The weights reach the kernels packed in
shared-memory order by the launcher (pack_stage), so every case checks the packing too; with
plain TF32 the emulator also aborts on any operand its producer did not round to TF32.

Bounds (tests/ops/helpers.py): float64 kernels ``fp64_bound``; float32 kernels (FMA, 3xTF32)
FP32_FACTOR x the float32 reference's own error + FP32_FLOOR; TF32 the documented tensor-core
bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from avme_ext.loop_types import AVMEParams
from avme_ext.reference import avme_forward_reference, avme_sample_reference

from . import backends
from .helpers import (
    FP32_FACTOR,
    FP32_FLOOR,
    PAPER,
    TENSOR_CORE_BOUNDS,
    Sizes,
    fp64_bound,
    make_inputs,
    make_params,
    rel_err,
)
from .persistent_runs import (
    FMA,
    FORWARD_OUTPUTS,
    FP32,
    H100,
    TF32,
    TF32X3,
    host_weight_gradients,
    load_pemu,
    loop_tensors,
    loss_grads,
    per_step_gradients,
    reference_run,
    run_backward,
    run_forward,
    stacked,
)


# ---------------------------------------------------------------------------------------
# The emulated ops
# ---------------------------------------------------------------------------------------
def _build():
    try:
        return load_pemu()
    except backends.UnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pemu():
    return _build()


LAUNCH_FIELDS = ("ctas", "threads", "nbl", "kc", "smem", "workspace", "state_in_smem", "barriers",
                 "math")  # fmt: skip


def describe(
    ns, kind, B, K, s: Sizes, C, mode="canvas", config=(0, 0, 0, 0), limits=H100, *, fp64=True
) -> dict[str, int]:
    """The launch the launcher would make (persistent::LaunchInfo), by field name."""
    info = ns.describe(kind, B, K, s.D, s.He, s.Hd, s.Z, C, mode == "error", fp64,
                       list(config), list(limits))  # fmt: skip
    return dict(zip(LAUNCH_FIELDS, info, strict=True))


def check(got: dict[str, Tensor], ref64: dict[str, Tensor], bounds: dict[str, float]) -> None:
    bad = [k for k, v in got.items() if not torch.isfinite(v).all()]
    assert not bad, f"non-finite values (NaN: an element was never written) in {bad}"
    errors = {k: rel_err(got[k], ref64[k]) for k in ref64}
    over = {k: (e, bounds[k]) for k, e in errors.items() if not e <= bounds[k]}
    assert not over, f"errors above bounds (error, bound): {over}; all: {errors}"


def fp32_bounds_of(ref32: dict[str, Tensor], ref64: dict[str, Tensor]) -> dict[str, float]:
    """FP32_FACTOR x the float32 reference's own error + FP32_FLOOR (tests/ops/helpers.py)."""
    return {k: FP32_FACTOR * rel_err(ref32[k], ref64[k]) + FP32_FLOOR for k in ref64}


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    B: int
    K: int
    sizes: Sizes
    C: int
    mode: str
    config: tuple[int, int, int, int]  # ctas, threads, nbl, kc
    note: str

    @property
    def id(self) -> str:
        s, c = self.sizes, self.config
        return (f"B{self.B}-K{self.K}-D{s.D}-He{s.He}-Hd{s.Hd}-Z{s.Z}-C{self.C}-{self.mode}"
                f"-g{c[0]}t{c[1]}n{c[2]}k{c[3]}")  # fmt: skip


CASES = [
    Case(1, 1, Sizes(10, 6, 5, 2), 0, "canvas", (3, 64, 1, 8), "K = 1, B = 1"),
    Case(5, 3, Sizes(13, 9, 7, 3), 3, "error", (4, 64, 1, 8), "units not divisible by 4 blocks"),
    Case(37, 2, Sizes(11, 5, 6, 2), 0, "canvas", (8, 64, 1, 4),
         "two batch chunks (partial); blocks without encoder/latent units; 4-row tiles"),
    Case(70, 2, Sizes(9, 7, 4, 3), 2, "error", (3, 128, 2, 16), "nbl 2, 4 warps, partial chunk"),
    Case(6, 2, Sizes(40, 30, 20, 4), 0, "canvas", (3, 64, 4, 8),
         "several row passes per stage; 2 column slices on 2 warps"),
    Case(3, 3, Sizes(12, 8, 6, 5), 1, "error", (5, 32, 1, 3), "one warp per block, kc 3"),
    Case(70, 2, Sizes(50, 24, 20, 5), 2, "canvas", (3, 256, 4, 16),
         "8 warps: 2 column slices x 4 k splits (two tree rounds); partial chunk; row passes"),
    Case(9, 2, Sizes(12, 8, 6, 5), 1, "canvas", (2, 96, 1, 8), "3 warps: 3 k splits (uneven tree)"),
    Case(40, 2, Sizes(12, 8, 6, 5), 0, "error", (3, 96, 4, 8), "3 warps: 2 column slices, one idle"),
]  # fmt: skip
FP32_CASES = [CASES[1], CASES[3], CASES[6]]
# Tensor-core tiles (kc a multiple of 8): batch chunks of 32, 64 and 128 columns (1 or 2 column
# slices of 2 or 4 m-tiles), one warp with partial k blocks of the stages (K = 12, 8, 5 rows),
# row passes, the split-K trees of 2, 3 and 4 splits, an idle warp.
TENSOR_CORE_CASES = [
    CASES[1], CASES[3], CASES[4], CASES[6], CASES[7], CASES[8],
    Case(3, 3, Sizes(12, 8, 6, 5), 1, "error", (5, 32, 1, 8), "one warp per block, partial k blocks"),
]  # fmt: skip


# Tensor-core cases over ~10 s each on a busy 2-core CPU (every mma is a 32-thread exchange).
SLOW_TENSOR_CORE_CASES = {CASES[4], CASES[6]}


def _params(cases, slow=frozenset()):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c in slow else []) for c in cases]


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
def test_unrolled_reference_is_the_reference():
    """The instrumented loop the per-step checks use computes avme_forward_reference."""
    for mode in ("canvas", "error"):
        p, x, y, eps, rec = reference_run(Sizes(9, 5, 4, 2), 2, 3, 3, mode, torch.float64, 5)
        ref = avme_forward_reference(x, y, eps, p, mode, True)
        got = stacked(rec)
        for name in ("canvas", "mu", "logvar", "canvases"):
            assert rel_err(got[name], getattr(ref, name)) < 1e-14, name


@pytest.mark.parametrize("case", _params(CASES))
def test_forward_fp64(pemu, case):
    p, x, y, eps, rec = reference_run(case.sizes, case.C, case.B, case.K, case.mode, torch.float64, 0)
    got = run_forward(pemu, x, y, eps, p, case.mode, list(case.config))
    check(got, stacked(rec), dict.fromkeys(FORWARD_OUTPUTS, fp64_bound(case.K, case.sizes, case.C)))


@pytest.mark.parametrize("case", _params(FP32_CASES))
def test_forward_fp32(pemu, case):
    *_, rec64 = reference_run(case.sizes, case.C, case.B, case.K, case.mode, torch.float64, 0)
    p, x, y, eps, rec32 = reference_run(case.sizes, case.C, case.B, case.K, case.mode, torch.float32, 0)
    got = run_forward(pemu, x, y, eps, p, case.mode, list(case.config))
    assert all(t.dtype == torch.float32 for t in got.values())
    ref64, ref32 = stacked(rec64), stacked(rec32)
    check(got, ref64, fp32_bounds_of(ref32, ref64))


def float32_bounds(math, ref32, ref64):
    """FMA and 3xTF32 are held to the float32 bounds; TF32 to its documented bound
    (tests/ops/helpers.py)."""
    if math in (FMA, TF32X3):
        return fp32_bounds_of(ref32, ref64)
    return dict.fromkeys(ref64, TENSOR_CORE_BOUNDS["tf32"])


@pytest.mark.parametrize("math", [TF32X3, pytest.param(TF32, marks=pytest.mark.slow)], ids=["3xtf32", "tf32"])
@pytest.mark.parametrize("case", _params(TENSOR_CORE_CASES, SLOW_TENSOR_CORE_CASES))
def test_forward_tensor_cores(pemu, case, math):
    """mma.sync m16n8k8 tiles; the emulator rebuilds each mma's matrices from the lanes'
    fragment registers (PTX layouts), so wrong fragment indexing fails here."""
    *_, rec64 = reference_run(case.sizes, case.C, case.B, case.K, case.mode, torch.float64, 0)
    p, x, y, eps, rec32 = reference_run(case.sizes, case.C, case.B, case.K, case.mode, torch.float32, 0)
    got = run_forward(pemu, x, y, eps, p, case.mode, [*list(case.config), math])
    ref64, ref32 = stacked(rec64), stacked(rec32)
    check(got, ref64, float32_bounds(math, ref32, ref64))


def test_tensor_cores_take_float32_only(pemu):
    case = CASES[0]
    p, x, y, eps, _ = reference_run(case.sizes, case.C, case.B, case.K, case.mode, torch.float64, 0)
    with pytest.raises(RuntimeError, match=r"tensor-core math .* takes float32"):
        run_forward(pemu, x, y, eps, p, case.mode, [*list(case.config), TF32X3])
    with pytest.raises(RuntimeError, match="math must be"):
        run_forward(pemu, x, y, eps, p, case.mode, [*list(case.config), 7])
    s = case.sizes
    assert not pemu.supports("forward", case.B, case.K, s.D, s.He, s.Hd, s.Z, True, *H100, TF32X3)
    assert pemu.supports("forward", case.B, case.K, s.D, s.He, s.Hd, s.Z, False, *H100, TF32X3)


def test_forward_without_saving_or_canvases(pemu):
    case = CASES[1]
    p, x, y, eps, rec = reference_run(case.sizes, case.C, case.B, case.K, case.mode, torch.float64, 3)
    got = run_forward(pemu, x, y, eps, p, case.mode, list(case.config), save=False, canvases=False)
    for name in FORWARD_OUTPUTS[3:]:
        assert got[name].shape[0] == 0, name
    ref = stacked(rec)
    kept = {k: got[k] for k in ("canvas", "mu", "logvar")}
    check(kept, {k: ref[k] for k in kept}, dict.fromkeys(kept, fp64_bound(case.K, case.sizes, case.C)))


def test_forward_state_in_global_memory(pemu):
    """With too little shared memory for the per-block state next to the weights, the state
    moves to the global workspace (same results)."""
    case = CASES[3]
    s, cfg = case.sizes, list(case.config)
    roomy = describe(pemu, "forward", case.B, case.K, s, case.C, case.mode, cfg)
    assert roomy["state_in_smem"]
    limits = [H100[0], roomy["smem"] - 1]
    tight = describe(pemu, "forward", case.B, case.K, s, case.C, case.mode, cfg, limits)
    assert not tight["state_in_smem"]
    assert tight["smem"] <= limits[1]
    p, x, y, eps, rec = reference_run(s, case.C, case.B, case.K, case.mode, torch.float64, 4)
    got = run_forward(pemu, x, y, eps, p, case.mode, cfg, limits)
    check(got, stacked(rec), dict.fromkeys(FORWARD_OUTPUTS, fp64_bound(case.K, s, case.C)))


def test_forward_default_configuration(pemu):
    """Configuration chosen by the launcher: 256 threads, 1 batch column per lane (B <= 32),
    16 KiB tiles (kc = 128 rows of 32 columns), and 3 blocks on 4 SMs: 3 blocks give every
    stage the same padded rows per block as 4 (E 8, Q 12, D 8, W 20)."""
    s, B, K, C = Sizes(12, 6, 5, 3), 9, 2, 2
    info = describe(pemu, "forward", B, K, s, C, limits=[4, 232448])
    assert [info[k] for k in LAUNCH_FIELDS[:4]] == [3, 256, 1, 128]
    p, x, y, eps, rec = reference_run(s, C, B, K, "canvas", torch.float64, 6)
    got = run_forward(pemu, x, y, eps, p, "canvas", [0, 0, 0, 0], [4, 232448])
    check(got, stacked(rec), dict.fromkeys(FORWARD_OUTPUTS, fp64_bound(K, s, C)))


def test_forward_batch_zero(pemu):
    s = Sizes(8, 5, 4, 2)
    p = make_params(s, 0, dtype=torch.float64, grad=False)
    x, y, eps = make_inputs(0, 3, s, 0, dtype=torch.float64)
    got = run_forward(pemu, x, y, eps, p, "canvas", [2, 64, 1, 8])
    assert got["canvas"].shape == (0, s.D)
    assert got["h_enc"].shape == (3, 0, s.He)


# ---------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [0, 3])
@pytest.mark.parametrize("return_canvases", [False, True])
def test_sample_fp64(pemu, C, return_canvases):
    s, B, K = Sizes(11, 4, 6, 3), 35, 3
    p = make_params(s, C, dtype=torch.float64, grad=False)
    _, y, z = make_inputs(B, K, s, C, dtype=torch.float64, seed=7)
    t = loop_tensors(None, y, p, s.Z)
    canvas, canvases = pemu.sample(z, t["dec_static"], t["dec_wT"], t["write_wT"], t["write_b"],
                                   return_canvases, [3, 64, 1, 4], H100)  # fmt: skip
    ref = avme_sample_reference(z, y, p, return_canvases)
    bound = fp64_bound(K, s, C)
    assert torch.isfinite(canvas).all()
    assert rel_err(canvas, ref.canvas) <= bound
    if return_canvases:
        assert ref.canvases is not None
        assert torch.isfinite(canvases).all()
        assert rel_err(canvases, ref.canvases) <= bound
    else:
        assert canvases.shape[0] == 0


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------
def _backward_case(pemu, case, dtype, seed, present=("canvas", "mu", "logvar", "canvases"), math=FMA):
    *_, rec64 = reference_run(case.sizes, case.C, case.B, case.K, case.mode, torch.float64, seed)
    p, _, _, eps, rec = reference_run(case.sizes, case.C, case.B, case.K, case.mode, dtype, seed)
    grads = loss_grads(case.B, case.K, case.sizes, seed + 9, present)
    saved = stacked(rec)
    got = run_backward(pemu, {k: g.to(dtype) for k, g in grads.items()}, saved, eps, p,
                       case.mode, [*list(case.config), math])  # fmt: skip
    want64 = per_step_gradients(rec64, grads, case.mode)
    if dtype == torch.float64:
        bounds = dict.fromkeys(want64, fp64_bound(case.K, case.sizes, case.C))
    else:
        want32 = per_step_gradients(rec, grads, case.mode)
        bounds = float32_bounds(math, {k: want32[k] for k in want64}, want64)
    check(got, want64, bounds)


@pytest.mark.parametrize("case", _params(CASES))
def test_backward_fp64(pemu, case):
    _backward_case(pemu, case, torch.float64, 10)


@pytest.mark.parametrize("case", _params(FP32_CASES))
def test_backward_fp32(pemu, case):
    _backward_case(pemu, case, torch.float32, 11)


@pytest.mark.parametrize("math", [TF32X3, pytest.param(TF32, marks=pytest.mark.slow)], ids=["3xtf32", "tf32"])
@pytest.mark.parametrize("case", _params(TENSOR_CORE_CASES, SLOW_TENSOR_CORE_CASES))
def test_backward_tensor_cores(pemu, case, math):
    _backward_case(pemu, case, torch.float32, 13, math=math)


@pytest.mark.parametrize("case", _params([CASES[1], CASES[2]]))
def test_backward_partial_gradients(pemu, case):
    """Only some outputs have gradients (the others are None: zero)."""
    _backward_case(pemu, case, torch.float64, 12, present=("canvas", "logvar"))


@pytest.mark.parametrize(("mode", "C"), [("error", 2), ("canvas", 0)])
def test_weight_gradients_end_to_end(pemu, mode, C):
    """The forward kernel's saved state and the backward kernel's per-step gradients, turned
    into weight gradients by the host's products (csrc/avme_ops.cpp), equal autograd through
    avme_forward_reference."""
    s, B, K = Sizes(10, 7, 6, 3), 5, 3
    config = [4, 64, 1, 8]
    p = make_params(s, C, dtype=torch.float64, seed=20)
    x, y, eps = make_inputs(B, K, s, C, dtype=torch.float64, seed=21)
    x.requires_grad_(True)
    grads = loss_grads(B, K, s, 22)
    fwd = run_forward(pemu, x.detach(), y, eps, p, mode, config)
    bwd = run_backward(pemu, grads, fwd, eps, p, mode, config)
    got = host_weight_gradients(fwd, bwd, x.detach(), y, p, mode)

    ref = avme_forward_reference(x, y, eps, p, mode, True)
    loss = sum((getattr(ref, k) * g).sum() for k, g in grads.items())
    names = [*list(AVMEParams._fields), "x"]
    want = dict(zip(names, torch.autograd.grad(loss, [*list(p), x]), strict=True))
    check(got, want, dict.fromkeys(want, fp64_bound(K, s, C)))


# ---------------------------------------------------------------------------------------
# Planning, limits and bad configurations
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["forward", "sample", "backward"])
def test_paper_sizes_fit_an_h100(pemu, kind):
    """float32 fits; float64 only for the sampler (its decoder and write rows are a third of
    the forward's weights)."""
    s = PAPER
    assert pemu.supports(kind, 100, 12, s.D, s.He, s.Hd, s.Z, False, *H100)
    assert pemu.supports(kind, 100, 12, s.D, s.He, s.Hd, s.Z, True, *H100) == (kind == "sample")
    assert not pemu.supports(kind, 100, 12, s.D, s.He, s.Hd, s.Z, False, H100[0], 48 * 1024)
    info = describe(pemu, kind, 100, 12, s, 10, "error", fp64=False)
    assert 1 <= info["ctas"] <= H100[0]
    assert info["threads"] == 256
    assert info["nbl"] == 4
    assert info["smem"] <= H100[1]
    assert info["barriers"] == {"forward": 48, "sample": 24, "backward": 47}[kind]
    assert pemu.supports(kind, 100, 12, s.D, s.He, s.Hd, s.Z, False, *H100, TF32X3)


@pytest.mark.parametrize("kind", ["forward", "sample", "backward"])
def test_supports_answers_for_a_batch_beyond_the_launch_limit(pemu, kind):
    """supports() answers False (it does not raise) for a batch beyond what one launch takes
    (2^30 rows), and still answers True just below the limit."""
    s = Sizes(8, 5, 4, 2)
    assert not pemu.supports(kind, 2**31, 2, s.D, s.He, s.Hd, s.Z, True, *H100)
    assert not pemu.supports(kind, 2**30, 2, s.D, s.He, s.Hd, s.Z, True, *H100)
    assert pemu.supports(kind, 2**30 - 1, 2, s.D, s.He, s.Hd, s.Z, True, *H100)


STAGE_FIELDS = ("k", "rows", "ld", "passes", "slices", "splits", "busy_warps")


def stages(ns, kind, B, s: Sizes, math, fp64=False, config=(0, 0, 0, 0), limits=H100):
    """The stages of the launch (persistent::StageSplit), by field name."""
    flat = ns.stages(kind, B, 12, s.D, s.He, s.Hd, s.Z, 10, fp64, [*list(config), math], list(limits))
    n = len(STAGE_FIELDS)
    return [dict(zip(STAGE_FIELDS, flat[i : i + n], strict=True)) for i in range(0, len(flat), n)]


@pytest.mark.parametrize("math", [FMA, TF32X3, TF32], ids=["fma", "3xtf32", "tf32"])
@pytest.mark.parametrize("B", [16, 32, 64, 100, 256])
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_paper_sizes_keep_every_warp_busy(pemu, kind, B, math):
    """At the paper's sizes on an H100 every stage is one pass (the activation streams once per
    step) and all 8 warps of a block have the same share of every full tile, for every batch
    chunk width; and the launch fits the shared memory."""
    info = describe(pemu, kind, B, 12, PAPER, 10, config=(0, 0, 0, 0, math), fp64=False)
    assert info["threads"] == 256
    assert info["smem"] <= H100[1]
    for stage in stages(pemu, kind, B, PAPER, math):
        if stage["rows"] == 0:
            continue
        assert stage["passes"] == 1, stage
        assert stage["busy_warps"] == 8, stage
        assert stage["slices"] * stage["splits"] == 8, stage


def test_tensor_core_tiles_take_k_blocks_of_eight(pemu):
    case = CASES[1]
    p, x, y, eps, _ = reference_run(case.sizes, case.C, case.B, case.K, case.mode, torch.float32, 0)
    with pytest.raises(RuntimeError, match=r"kc .* multiple of 8 for tensor-core math"):
        run_forward(pemu, x, y, eps, p, case.mode, [4, 64, 1, 12, TF32])
    with pytest.raises(RuntimeError, match="threads must be >= 64"):
        run_forward(pemu, x, y, eps, p, case.mode, [4, 32, 4, 8])


def test_fp32_takes_3xtf32_where_it_fits(pemu):
    """Precision "fp32" (math FP32) runs 3xTF32 for float tensors where its plan fits the shared
    memory, FMA where only FMA's does (tensor-core weights pad each stage to 8 rows, FMA's to 4:
    at D = 3072 and 2 decoder units per block, the backward's write columns double), and FMA for
    float64."""
    fp32 = (0, 0, 0, 0, FP32)
    assert describe(pemu, "forward", 100, 12, PAPER, 10, config=fp32, fp64=False)["math"] == TF32X3
    assert describe(pemu, "forward", 100, 12, PAPER, 10, config=fp32, fp64=True)["math"] == FMA
    colour, limits = Sizes(3072, 8, 8, 4), [4, H100[1]]
    sizes = (colour.D, colour.He, colour.Hd, colour.Z)
    x3 = describe(pemu, "backward", 2, 2, colour, 2, config=(0, 0, 0, 0, TF32X3), limits=limits,
                  fp64=False)  # fmt: skip
    assert x3["smem"] > H100[1]
    chosen = describe(pemu, "backward", 2, 2, colour, 2, config=fp32, limits=limits, fp64=False)
    assert chosen["math"] == FMA
    assert chosen["smem"] <= H100[1]
    assert pemu.supports("backward", 2, 2, *sizes, False, *limits, FP32)
    assert not pemu.supports("backward", 2, 2, *sizes, False, *limits, TF32X3)


def test_fewest_blocks_with_the_same_rows_per_block(pemu):
    """At the paper's sizes 100 blocks give every stage the rows per block of 132 (4 units of
    400 per block): the launcher takes 100."""
    assert describe(pemu, "forward", 100, 12, PAPER, 0, fp64=False)["ctas"] == 100


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ([2, 48, 1, 8], "threads must be a multiple of 32"),
        ([2, 512, 1, 8], "threads must be a multiple of 32"),
        ([2, 64, 3, 8], "nbl"),
        ([200, 64, 1, 8], "ctas must be in"),
        ([2, 64, 1, -1], "kc"),
    ],
)
def test_bad_configuration(pemu, config, match):
    s = Sizes(8, 5, 4, 2)
    p = make_params(s, 0, dtype=torch.float64, grad=False)
    x, y, eps = make_inputs(3, 2, s, 0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=match):
        run_forward(pemu, x, y, eps, p, "canvas", config)


def test_not_enough_shared_memory(pemu):
    s = Sizes(64, 32, 32, 8)
    p = make_params(s, 0, dtype=torch.float64, grad=False)
    x, y, eps = make_inputs(3, 2, s, 0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="bytes of shared memory"):
        run_forward(pemu, x, y, eps, p, "canvas", [2, 64, 1, 8], [4, 4096])
    assert not pemu.supports("forward", 3, 2, s.D, s.He, s.Hd, s.Z, True, 4, 4096)
