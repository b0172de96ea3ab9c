"""Inputs, reference runs and NaN-safe comparisons of the fused-op tests.

Every comparison is the relative Frobenius error ``||fused - ref|| / ||ref||`` of one tensor
(an output or a gradient) against the float64 reference
(:func:`avme_ext.reference.avme_forward_reference`) run on the same weights, inputs and noise.
:func:`assert_within` first asserts that every fused tensor is finite (Python's ``max`` and
``<`` skip or hide a NaN), then that every error is within its bound.

Tolerances, and why:

- float64 op (:func:`fp64_bound`): both sides round only at float64's unit roundoff
  u = 2**-53 (about 1.1e-16). A dot product of length n has a relative error of at most
  about n*u, the recurrence chains K steps of such products, and the gradients go through
  the same chain backwards, so the bound is ``FP64_SAFETY * u * K * n`` with n the widest
  input of any product (2*D + Hd + C, the encoder's). ``FP64_SAFETY`` (100) covers the
  condition of the recurrence (a gradient whose norm results from cancellation) and the
  different summation orders (kernel loops, BLAS, the reference's separate products). A
  real defect (a wrong index, a missing term, an unwritten element) gives errors of order 1.
- float32 op, precision "fp32" (:func:`fp32_bounds`): as flash-attention's tests do, the
  fused op's error against float64 must be at most ``FP32_FACTOR`` (5) times the error of
  the reference itself run in float32 on the same inputs and weights (both compute the same
  function with float32 rounding; the kernels sum each dot product in one sequential order,
  BLAS in blocks, hence a factor above 1), plus ``FP32_FLOOR`` = 16 * 2**-24 (about 1e-6)
  for tensors that the float32 reference happens to get almost exactly. The bound follows
  the problem (sizes, K, conditioning) instead of being one number for every size.
- precisions "tf32" and "bf16" (:data:`TENSOR_CORE_BOUNDS`): the fused op rounds the
  operands of its step-invariant input products and of its gradient matmuls to that format
  (unit roundoff u = 2**-11 for tf32, 2**-8 for bf16); the step recurrences stay in float32.
  Each rounded product is off by up to about 2u relative; the bounds, about 10u (tf32:
  5e-3) and 8u (bf16: 3e-2), leave room for the propagation through the K steps and for
  cancellation in the gradients. The reference has no such mode to compare with (its
  in-loop products would round too), so these are fixed bounds.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from avme_ext.loop_types import AVMEParams, ForwardOutput
from avme_ext.reference import avme_forward_reference, avme_sample_reference

FP64_UNIT_ROUNDOFF = 2.0**-53
FP64_SAFETY = 1e2
FP32_FACTOR = 5.0
FP32_FLOOR = 16 * 2.0**-24
TENSOR_CORE_BOUNDS = {"tf32": 5e-3, "bf16": 3e-2}


# ---------------------------------------------------------------------------------------
# Sizes and cases
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Model sizes: data D, encoder/decoder hidden He/Hd, latent Z."""

    D: int
    He: int
    Hd: int
    Z: int


#: The paper's MNIST sizes (CUDA only: the emulator runs one OS thread per CUDA thread).
PAPER = Sizes(D=784, He=400, Hd=400, Z=100)
#: Odd sizes, none a multiple of the warp size.
ODD = Sizes(D=100, He=48, Hd=40, Z=7)
#: Tiny sizes for the emulator and the argument checks.
TINY = Sizes(D=6, He=4, Hd=3, Z=2)


@dataclass(frozen=True)
class Case:
    """One forward/backward comparison: B rows, K steps, sizes, C classes, encoder input.

    ``sms`` is the emulated SM count (it steers the rows per block: B / SMs rounded up to a
    power of two <= 8); ``on`` names the backends that run the case; ``slow`` marks it
    ``@pytest.mark.slow`` (run by ``pytest --runslow``).
    """

    B: int
    K: int
    sizes: Sizes
    C: int
    encoder_input: str
    sms: int = 4
    on: tuple[str, ...] = ("emulator", "cuda")
    note: str = ""
    slow: bool = False

    @property
    def id(self) -> str:
        s = self.sizes
        return f"B{self.B}-K{self.K}-D{s.D}-He{s.He}-Hd{s.Hd}-Z{s.Z}-C{self.C}-{self.encoder_input}" + (
            f"-sm{self.sms}" if "emulator" in self.on else ""
        )


_EMU = ("emulator",)
_CUDA = ("cuda",)

#: Forward/backward comparisons. The emulator's are small (it runs one OS thread per CUDA
#: thread); each steers the rows per block with its emulated SM count.
CASES = [
    Case(1, 1, Sizes(10, 6, 5, 2), 0, "canvas", sms=4, on=_EMU, note="K=1, B=1"),
    Case(3, 4, Sizes(10, 6, 5, 2), 3, "error", sms=4, on=_EMU),
    Case(7, 3, Sizes(9, 7, 4, 3), 0, "error", sms=1, on=_EMU, note="8 rows per block, one partial block"),
    Case(11, 2, Sizes(9, 7, 4, 3), 2, "canvas", sms=2, on=_EMU, note="a full and a partial block of 8"),
    Case(5, 2, Sizes(13, 6, 9, 4), 2, "canvas", sms=3, on=_EMU, note="2 rows per block, partial last block"),
    Case(6, 2, Sizes(300, 270, 260, 3), 2, "error", sms=2, on=_EMU, note="every size > 256 threads", slow=True),
    Case(3, 8, Sizes(20, 12, 10, 3), 2, "error", sms=2, on=_EMU, note="K=8", slow=True),
    *[
        Case(B, K, ODD, C, mode, on=_CUDA)
        for B in (1, 7, 100, 4097)
        for K in (1, 2, 12)
        for C in (0, 10)
        for mode in ("canvas", "error")
    ],
    *[Case(B, 12, PAPER, C, mode, on=_CUDA) for B in (1, 100) for C in (0, 10) for mode in ("canvas", "error")],
    Case(7, 64, ODD, 10, "error", on=_CUDA),
    Case(100, 64, ODD, 0, "canvas", on=_CUDA),
    Case(7, 64, PAPER, 0, "canvas", on=_CUDA),
    Case(4097, 12, PAPER, 10, "error", on=_CUDA),
    Case(4097, 2, PAPER, 0, "canvas", on=_CUDA),
]
#: The float64 comparisons: every emulator case, and a few on CUDA.
FP64_CASES = [c for c in CASES if c.on == _EMU] + [
    *[Case(B, 12, ODD, 10, mode, on=_CUDA) for B in (1, 7, 100) for mode in ("canvas", "error")],
    Case(9, 3, PAPER, 10, "error", on=_CUDA),
]
#: The tensor-core precisions (tf32, bf16).
PRECISION_CASES = [
    Case(5, 4, Sizes(40, 24, 20, 4), 3, "error", sms=2, on=_EMU),
    Case(5, 4, Sizes(40, 24, 20, 4), 3, "canvas", sms=2, on=_EMU, slow=True),
    *[Case(100, 12, PAPER, 10, mode, on=_CUDA) for mode in ("canvas", "error")],
]


def backend_params(cases):
    """pytest params ``(backend_name, case)`` for every backend each case runs on."""
    import pytest

    return [
        pytest.param(name, case, id=f"{name}-{case.id}", marks=pytest.mark.slow if case.slow else ())
        for case in cases
        for name in case.on
    ]


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def make_params(
    sizes: Sizes,
    C: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    grad: bool = True,
    scale: float | None = None,
) -> AVMEParams:
    """Random AVMEParams: normal with std ``scale`` (default: 0.3 for small layers, about
    nn.LSTMCell's init scale 1/sqrt(H) for large ones), drawn in float64 on the CPU so that
    every dtype and device gets the same values."""
    D, He, Hd, Z = sizes.D, sizes.He, sizes.Hd, sizes.Z
    gen = torch.Generator().manual_seed(seed)
    if scale is None:
        scale = min(0.3, 1.0 / max(He, Hd) ** 0.5)

    def rnd(*shape: int) -> Tensor:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    return AVMEParams(
        rnd(4 * He, 2 * D + Hd + C), rnd(4 * He, He), rnd(4 * He), rnd(4 * He),
        rnd(2 * Z, He), rnd(2 * Z),
        rnd(4 * Hd, Z + C), rnd(4 * Hd, Hd), rnd(4 * Hd), rnd(4 * Hd),
        rnd(D, Hd), rnd(D),
    )  # fmt: skip


def make_inputs(
    B: int,
    K: int,
    sizes: Sizes,
    C: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 1,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """x (B, D) binary pixels, y (B, C) one-hot labels or None, eps (K, B, Z) standard normal."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, sizes.D, generator=gen, dtype=torch.float64) < 0.3).to(dtype)
    y = None
    if C:
        labels = torch.randint(0, C, (B,), generator=gen)
        y = torch.nn.functional.one_hot(labels, C).to(dtype)
    eps = torch.randn(K, B, sizes.Z, generator=gen, dtype=torch.float64).to(dtype)
    return x.to(device), None if y is None else y.to(device), eps.to(device)


def to_reference(params: AVMEParams, dtype: torch.dtype = torch.float64) -> AVMEParams:
    """Detached copies of ``params`` in ``dtype`` that require grad (the reference's weights)."""
    return AVMEParams(*[t.detach().to(dtype).requires_grad_() for t in params])


def merged_biases(p: AVMEParams) -> tuple[Tensor, Tensor]:
    """The ops take one bias per LSTM: b_ih + b_hh."""
    return p.enc_b_ih + p.enc_b_hh, p.dec_b_ih + p.dec_b_hh


def forward_args(x: Tensor, y: Tensor | None, eps: Tensor, p: AVMEParams) -> tuple[Tensor | None, ...]:
    """The tensor arguments of ``avme::forward`` (x ... write_b)."""
    enc_b, dec_b = merged_biases(p)
    return (
        x, y, eps, p.enc_w_ih, p.enc_w_hh, enc_b, p.q_w, p.q_b,
        p.dec_w_ih, p.dec_w_hh, dec_b, p.write_w, p.write_b,
    )  # fmt: skip


def sample_args(z: Tensor, y: Tensor | None, p: AVMEParams) -> tuple[Tensor | None, ...]:
    """The tensor arguments of ``avme::sample`` (z ... write_b)."""
    _, dec_b = merged_biases(p)
    return (z, y, p.dec_w_ih, p.dec_w_hh, dec_b, p.write_w, p.write_b)


def loss_weights(B: int, K: int, sizes: Sizes, *, device, seed: int = 2) -> list[Tensor]:
    """Random float64 weights of the canvas, mu, logvar and canvases terms of the test loss."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, sizes.D), (K, B, sizes.Z), (K, B, sizes.Z), (K, B, sizes.D)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(device) for s in shapes]


def weighted_loss(out: ForwardOutput, weights: list[Tensor]) -> Tensor:
    """A float64 loss that touches every output, so only the op's own rounding is compared."""
    assert out.canvases is not None, "the loss needs every step's canvas"
    terms = (out.canvas, out.mu, out.logvar, out.canvases)
    return torch.stack([(t.double() * w).sum() for t, w in zip(terms, weights, strict=True)]).sum()


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------
ForwardFn = Callable[..., ForwardOutput]


def run_and_grad(
    forward: ForwardFn,
    params: AVMEParams,
    x: Tensor,
    y: Tensor | None,
    eps: Tensor,
    weights: list[Tensor] | None,
    *,
    input_grads: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Outputs and, unless ``weights`` is None, the gradients of the weighted loss w.r.t.
    every parameter and (when ``input_grads``) x, y and eps, by name. ``dtype`` casts x, y,
    eps first. With ``weights=None`` the forward runs under ``torch.no_grad()`` (the
    inference path: nothing saved for the backward).

    (The scalar loss itself is not compared: it is a function of the outputs, and a sum of
    terms of both signs whose relative error says more about its cancellation than about
    the op.)"""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    grads_wanted = weights is not None
    x = cast(x.detach()).requires_grad_(input_grads and grads_wanted)
    eps = cast(eps.detach()).requires_grad_(input_grads and grads_wanted)
    y = None if y is None else cast(y.detach()).requires_grad_(input_grads and grads_wanted)
    with torch.set_grad_enabled(grads_wanted):
        out = forward(x, y, eps, params)
    assert out.canvases is not None, "the runs compared return every step's canvas"
    named = {"canvas": out.canvas, "mu": out.mu, "logvar": out.logvar, "canvases": out.canvases}
    if weights is None:
        return named
    inputs = dict(zip(AVMEParams._fields, params, strict=True))
    if input_grads:
        inputs.update({"x": x, "eps": eps} | ({} if y is None else {"y": y}))
    grads = torch.autograd.grad(weighted_loss(out, weights), list(inputs.values()))
    named.update({f"grad_{name}": g for name, g in zip(inputs, grads, strict=True)})
    return named


def reference_forward(encoder_input: str) -> ForwardFn:
    def forward(x, y, eps, p):
        return avme_forward_reference(x, y, eps, p, encoder_input, True)

    return forward


# ---------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------
def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b is 0); inf when either is not finite."""
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    num = float((a - b).norm())
    den = float(b.norm())
    return num if den == 0.0 else num / den


def assert_finite(named: Mapping[str, Tensor]) -> None:
    """Every tensor is free of NaN and inf (a NaN means an output element was never written)."""
    bad = [name for name, t in named.items() if not torch.isfinite(t.detach()).all()]
    assert not bad, f"non-finite values (NaN/inf) in {bad}"


def assert_within(
    got: Mapping[str, Tensor], ref: Mapping[str, Tensor], bounds: float | Mapping[str, float]
) -> dict[str, float]:
    """All of ``got`` finite, then rel_err(got[k], ref[k]) <= bound for every k (a NaN error
    fails: ``not err <= bound``). Returns the errors."""
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    assert_finite(got)
    errors = {k: rel_err(got[k], ref[k]) for k in ref}
    limit = bounds if isinstance(bounds, Mapping) else dict.fromkeys(ref, bounds)
    bad = {k: (e, limit[k]) for k, e in errors.items() if not e <= limit[k]}
    assert not bad, f"relative errors above their bounds (error, bound): {bad}; all errors: {errors}"
    return errors


def fp64_bound(K: int, sizes: Sizes, C: int) -> float:
    """Bound of a float64 op against the float64 reference (see the module docstring)."""
    widest = 2 * sizes.D + sizes.Hd + C
    widest = max(widest, sizes.He, sizes.Hd + sizes.Z + C)
    return FP64_SAFETY * FP64_UNIT_ROUNDOFF * K * widest


def fp32_bounds(ref32: Mapping[str, Tensor], ref64: Mapping[str, Tensor]) -> dict[str, float]:
    """Per-tensor bounds of a float32 op: FP32_FACTOR * (float32 reference's error) + FP32_FLOOR."""
    assert_finite(ref32)
    return {k: FP32_FACTOR * rel_err(ref32[k], ref64[k]) + FP32_FLOOR for k in ref64}


@contextlib.contextmanager
def design_may_not_fit() -> Iterator[None]:
    """Skip the test when a design forced by name says it cannot run the case's sizes on this
    device (e.g. the persistent design's weight slices do not fit the emulated shared memory):
    that refusal is the design's own documented error, not a wrong result."""
    try:
        yield
    except RuntimeError as exc:
        if "cannot run these sizes" not in str(exc):
            raise
        pytest.skip(str(exc).splitlines()[0])


def compare_with_reference(
    backend,
    case: Case,
    *,
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
    grads: bool = True,
    input_grads: bool = True,
    seed: int = 0,
    scale: float | None = None,
    design: str | None = None,
    refusal_skips: bool = True,
) -> dict[str, float]:
    """Run ``case`` on ``backend`` and on the float64 reference and assert the bounds of the
    module docstring for the outputs and (``grads``) the gradients. Returns the errors.

    ``scale``: the weights' standard deviation (:func:`make_params`); ``design``: the ops'
    design argument (None: the one forced by :func:`avme_ext.ops.design`, else "auto");
    ``refusal_skips``: a forced design that cannot run the sizes skips the test
    (:func:`design_may_not_fit`) instead of failing it."""
    sizes, device = case.sizes, backend.device
    params = make_params(sizes, case.C, dtype=dtype, device=device, seed=seed, grad=grads, scale=scale)
    x, y, eps = make_inputs(case.B, case.K, sizes, case.C, dtype=dtype, device=device, seed=seed + 1)
    weights = loss_weights(case.B, case.K, sizes, device=device, seed=seed + 2) if grads else None

    def fused(x, y, eps, p):
        return backend.forward(x, y, eps, p, case.encoder_input, True, precision, design)

    def reference(ref_dtype: torch.dtype) -> dict[str, Tensor]:
        return run_and_grad(
            reference_forward(case.encoder_input), to_reference(params, ref_dtype), x, y, eps,
            weights, input_grads=input_grads, dtype=ref_dtype,
        )  # fmt: skip

    backend.poison()
    with design_may_not_fit() if refusal_skips else contextlib.nullcontext():
        got = run_and_grad(fused, params, x, y, eps, weights, input_grads=input_grads)
    backend.synchronize()
    ref = reference(torch.float64)
    if dtype == torch.float64:
        bounds: float | dict[str, float] = fp64_bound(case.K, sizes, case.C)
    elif precision == "fp32":
        bounds = fp32_bounds(reference(torch.float32), ref)
    else:
        bounds = TENSOR_CORE_BOUNDS[precision]
    return assert_within(got, ref, bounds)


def _sample_run(sample, z: Tensor, y: Tensor | None, params: AVMEParams, dtype: torch.dtype) -> dict[str, Tensor]:
    """Both outputs of the sampler (canvases returned), with z, y, params in ``dtype``."""
    y = None if y is None else y.to(dtype)
    out = sample(z.to(dtype), y, AVMEParams(*[t.detach().to(dtype) for t in params]), True)
    return {"canvas": out.canvas, "canvases": out.canvases}


def compare_sample_with_reference(
    backend, B: int, K: int, sizes: Sizes, C: int, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    """Run the sampler on ``backend`` (z (K, B, Z), y (B, C) or None) and on the float64 reference,
    and assert the module docstring's bounds on the final canvas (B, D) and the K canvases; the
    call without canvases returns the same final canvas. Returns the errors."""
    params = make_params(sizes, C, dtype=dtype, device=backend.device, grad=False)
    _, y, z = make_inputs(B, K, sizes, C, dtype=dtype, device=backend.device)
    backend.poison()
    with torch.no_grad(), design_may_not_fit():
        got = _sample_run(backend.sample, z, y, params, dtype)
        last = backend.sample(z, y, params, return_canvases=False)
        ref = _sample_run(avme_sample_reference, z, y, params, torch.float64)
        if dtype == torch.float64:
            bounds: float | dict[str, float] = fp64_bound(K, sizes, C)
        else:
            bounds = fp32_bounds(_sample_run(avme_sample_reference, z, y, params, torch.float32), ref)
    errors = assert_within(got, ref, bounds)
    assert last.canvases is None
    assert torch.equal(last.canvas, got["canvas"])
    return errors
