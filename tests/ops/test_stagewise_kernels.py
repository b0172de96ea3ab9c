"""The "stagewise" kernel design (csrc/stagewise/) under the CPU emulator.

csrc/emulation/stagewise_emulation.cpp compiles the design's host code and pointwise kernels as
C++ (the kernels run by the thread-per-CUDA-thread emulator of csrc/emulation/cuda_emulation.h,
the per-stage GEMMs by ATen on the CPU) and registers ``torch.ops.avme_swemu.forward`` /
``backward``, which take exactly the tensors behind LoopParams / BackwardParams and write into
caller-provided outputs (None: not written). The inputs are prepared as csrc/avme_ops.cpp
prepares them; the outputs are NaN-poisoned first.

What is compared, against float64 (``avme_ext.reference``):

- forward outputs (canvas, canvases, mu, logvar) with ``avme_forward_reference`` and the saved
  states (h, c, activated gates, z) with :func:`trace`, a step-by-step float64 run of the same
  loop that also yields the per-step gradients the backward must produce (d_canvas, d_q,
  d_gates_enc, d_gates_dec);
- the weight and x gradients obtained from those per-step gradients by csrc/avme_ops.cpp's
  formulas (mirrored in :func:`weight_grads`) with autograd through ``avme_forward_reference``.

Bounds: float64 ops: ``1e3 * 2**-53 * K * (widest product)``; float32 ops: 3x the error of the
same computation run in float32 by the reference, plus 16 * 2**-24 (the reference's own float32
error measures the conditioning). bf16: (a) within 3e-2 of the float64 reference (8 bf16 units
of roundoff; the operands of every GEMM are rounded), and (b) within 3e-3 of :func:`trace` run in
float64 with the documented bf16 policy applied (every GEMM operand rounded to bf16, straight
through for the gradients, fp32-exact pointwise math and recurrent state): this pins down where
the design rounds (a bf16 canvas or cell state, or an unrounded operand, gives errors of the
order of the bf16 roundoff, about 1e-2 to 4e-3 here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from avme_ext.loop_types import AVMEParams
from avme_ext.reference import avme_forward_reference, avme_sample_reference

from . import backends
from .helpers import Sizes

NAN = float("nan")
FP64_BOUND_SCALE = 1e3 * 2.0**-53
FP32_FACTOR, FP32_FLOOR = 3.0, 16 * 2.0**-24
BF16_VS_FP64, BF16_STEPWISE = 3e-2, 1e-5
STEP_GRADS = ("d_canvas", "d_q", "d_gates_enc", "d_gates_dec")
STATES = ("h_enc", "c_enc", "gates_enc", "z", "h_dec", "c_dec", "gates_dec")


# ---------------------------------------------------------------------------------------
# The emulated ops
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swemu():
    """torch.ops.avme_swemu, built on first use (skipped without a C++ compiler or ninja, or with
    AVME_EMULATION=0)."""
    try:
        return backends.load_emulation("stagewise_emulation.cpp", "avme_swemu")
    except backends.UnavailableError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------------------------------
# Sizes, weights, inputs
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    B: int
    K: int
    sizes: Sizes
    C: int
    encoder_input: str

    @property
    def id(self) -> str:
        s = self.sizes
        return f"B{self.B}-K{self.K}-D{s.D}-He{s.He}-Hd{s.Hd}-Z{s.Z}-C{self.C}-{self.encoder_input}"


SMALL = Sizes(D=10, He=6, Hd=5, Z=2)
ODD = Sizes(D=37, He=21, Hd=19, Z=5)
PAPER = Sizes(D=784, He=400, Hd=400, Z=100)


def make_params(sizes: Sizes, C: int, dtype: torch.dtype, seed: int = 0) -> AVMEParams:
    """Random weights (std about nn.LSTMCell's 1/sqrt(H), at most 0.3), drawn in float64."""
    gen = torch.Generator().manual_seed(seed)
    D, He, Hd, Z = sizes.D, sizes.He, sizes.Hd, sizes.Z
    scale = min(0.3, 1.0 / math.sqrt(max(He, Hd)))

    def rnd(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return AVMEParams(
        rnd(4 * He, 2 * D + Hd + C), rnd(4 * He, He), rnd(4 * He), rnd(4 * He),
        rnd(2 * Z, He), rnd(2 * Z),
        rnd(4 * Hd, Z + C), rnd(4 * Hd, Hd), rnd(4 * Hd), rnd(4 * Hd),
        rnd(D, Hd), rnd(D),
    )  # fmt: skip


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 1):
    """x (B, D) binary pixels, y (B, C) one-hot or None, eps (K, B, Z), and the float64 loss
    weights [w_canvas (B, D), w_mu, w_logvar (K, B, Z), w_canvases (K, B, D)]."""
    gen = torch.Generator().manual_seed(seed)
    B, K, s = case.B, case.K, case.sizes
    x = (torch.rand(B, s.D, generator=gen, dtype=torch.float64) < 0.3).to(dtype)
    y = None
    if case.C:
        y = F.one_hot(torch.randint(0, case.C, (B,), generator=gen), case.C).to(dtype)
    eps = torch.randn(K, B, s.Z, generator=gen, dtype=torch.float64).to(dtype)
    shapes = [(B, s.D), (K, B, s.Z), (K, B, s.Z), (K, B, s.D)]
    weights = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]
    return x, y, eps, weights


def cast_params(p: AVMEParams, dtype: torch.dtype) -> AVMEParams:
    return AVMEParams(*[t.detach().to(dtype) for t in p])


# ---------------------------------------------------------------------------------------
# Running the emulated ops (inputs prepared as csrc/avme_ops.cpp prepares them)
# ---------------------------------------------------------------------------------------
def mm_p(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """csrc/avme_ops.cpp's mm_p on the CPU: bf16 products of float32 operands, else plain."""
    if precision == "bf16" and a.dtype == torch.float32:
        return (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).to(torch.float32)
    return a @ b


def loop_tensors(x: Tensor | None, y: Tensor | None, p: AVMEParams, Z: int, precision: str) -> dict[str, Tensor]:
    """The LoopParams inputs of the stagewise design: hoisted x/y products with both biases, and
    the weights in their nn layouts (the design reads those, not the (in, out) copies)."""
    D, Hd, C = p.write_w.shape[0], p.dec_w_hh.shape[1], p.dec_w_ih.shape[1] - Z
    enc_b, dec_b = p.enc_b_ih + p.enc_b_hh, p.dec_b_ih + p.dec_b_hh
    out = {}
    if x is not None:
        in_enc = 2 * D + Hd + C
        enc_static = mm_p(x, p.enc_w_ih[:, :D].t(), precision) + enc_b
        if C:
            assert y is not None, "a conditional model takes y"
            enc_static = enc_static + mm_p(y, p.enc_w_ih[:, in_enc - C :].t(), precision)
        out["enc_static"] = enc_static.contiguous()
        out["enc_w_ih"], out["enc_w_hh"] = p.enc_w_ih.contiguous(), p.enc_w_hh.contiguous()
        out["q_w"], out["q_b"] = p.q_w.contiguous(), p.q_b.contiguous()
    dec_static = dec_b
    if C:
        assert y is not None, "a conditional model takes y"
        dec_static = mm_p(y, p.dec_w_ih[:, Z:].t(), precision) + dec_b
    out["dec_static"] = dec_static.contiguous()
    out["dec_w_ih"], out["dec_w_hh"] = p.dec_w_ih.contiguous(), p.dec_w_hh.contiguous()
    out["write_w"], out["write_b"] = p.write_w.contiguous(), p.write_b.contiguous()
    return out


def encoder_args(t: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
    """The encoder inputs of avme_swemu.forward after x, eps and z_in (enc_static ... q_b)."""
    return (t["enc_static"], t["enc_w_ih"], t["enc_w_hh"], t["q_w"], t["q_b"])


def decoder_args(t: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
    """The decoder inputs of avme_swemu.forward (dec_static ... write_b)."""
    return (t["dec_static"], t["dec_w_ih"], t["dec_w_hh"], t["write_w"], t["write_b"])


def nans(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.full(shape, NAN, dtype=dtype)


def run_forward(
    ns,
    x: Tensor,
    y: Tensor | None,
    eps: Tensor,
    p: AVMEParams,
    encoder_input: str,
    precision: str = "fp32",
    *,
    want: tuple[str, ...] = ("canvas", "canvases", "mu", "logvar", *STATES),
) -> dict[str, Tensor]:
    """avme_swemu.forward with NaN-poisoned outputs for the names in ``want`` (None for the rest)."""
    K, B, Z = eps.shape
    D, He, Hd = p.write_w.shape[0], p.enc_w_hh.shape[1], p.dec_w_hh.shape[1]
    shapes = {
        "canvas": (B, D), "canvases": (K, B, D), "mu": (K, B, Z), "logvar": (K, B, Z),
        "h_enc": (K, B, He), "c_enc": (K, B, He), "gates_enc": (K, B, 4 * He), "z": (K, B, Z),
        "h_dec": (K, B, Hd), "c_dec": (K, B, Hd), "gates_dec": (K, B, 4 * Hd),
    }  # fmt: skip
    out = {name: nans(*shapes[name], dtype=x.dtype) if name in want else None for name in shapes}
    t = loop_tensors(x, y, p, Z, precision)
    ns.forward(
        x, eps, None, *encoder_args(t), *decoder_args(t), encoder_input == "error", precision,
        *out.values(),
    )  # fmt: skip
    return {name: value for name, value in out.items() if value is not None}


def run_backward(
    ns,
    fwd: Mapping[str, Tensor],
    eps: Tensor,
    p: AVMEParams,
    grads: Mapping[str, Tensor | None],
    encoder_input: str,
    precision: str = "fp32",
) -> dict[str, Tensor]:
    """avme_swemu.backward with NaN-poisoned per-step outputs."""
    K, B, Z = eps.shape
    D, He, Hd = p.write_w.shape[0], p.enc_w_hh.shape[1], p.dec_w_hh.shape[1]
    dtype = eps.dtype
    out = {
        "d_canvas": nans(K, B, D, dtype=dtype),
        "d_q": nans(K, B, 2 * Z, dtype=dtype),
        "d_gates_enc": nans(K, B, 4 * He, dtype=dtype),
        "d_gates_dec": nans(K, B, 4 * Hd, dtype=dtype),
    }
    ns.backward(
        grads.get("canvas"), grads.get("canvases"), grads.get("mu"), grads.get("logvar"),
        eps, fwd["logvar"], fwd["canvases"], fwd["c_enc"], fwd["gates_enc"], fwd["c_dec"],
        fwd["gates_dec"], p.enc_w_ih, p.enc_w_hh, p.q_w, p.dec_w_ih, p.dec_w_hh, p.write_w,
        encoder_input == "error", precision, *out.values(),
    )  # fmt: skip
    return out


def as_grads(weights: list[Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return dict(zip(("canvas", "mu", "logvar", "canvases"), (w.to(dtype) for w in weights), strict=True))


# ---------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------
def _cell(pre: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """nn.LSTMCell from its pre-activations [i | f | g | o] (last dim): (h, c, activated gates)."""
    i, f, g, o = pre.chunk(4, dim=-1)
    ig, fg, gg, og = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = fg * c + ig * gg
    return og * torch.tanh(c), c, torch.cat([ig, fg, gg, og], -1)


def trace(
    x: Tensor,
    y: Tensor | None,
    eps: Tensor,
    p: AVMEParams,
    encoder_input: str,
    weights: list[Tensor],
) -> dict[str, Tensor]:
    """The loop of avme_forward_reference step by step in x's dtype, with one GEMM per stage as
    the design computes it; returns its outputs, the saved states and (after backward of the
    weighted loss) the per-step gradients, each stacked to (K, B, N)."""
    K, B, Z = eps.shape
    D, He, Hd, C = p.write_w.shape[0], p.enc_w_hh.shape[1], p.dec_w_hh.shape[1], p.dec_w_ih.shape[1] - Z
    x = x.detach().clone().requires_grad_(True)
    w_x, w_r, w_h, w_y = p.enc_w_ih.split([D, D, Hd, C], 1)
    w_z, w_dy = p.dec_w_ih.split([Z, C], 1)
    enc_static = F.linear(x, w_x, p.enc_b_ih + p.enc_b_hh)
    dec_static = (p.dec_b_ih + p.dec_b_hh).expand(B, -1)
    if C:
        assert y is not None, "a conditional model takes y"
        enc_static = enc_static + F.linear(y, w_y)
        dec_static = dec_static + F.linear(y, w_dy)
    enc_w, dec_w = torch.cat([w_r, w_h, p.enc_w_hh], 1), torch.cat([w_z, p.dec_w_hh], 1)
    zeros = x.new_zeros
    h_enc, c_enc, h_dec, c_dec, s = zeros(B, He), zeros(B, He), zeros(B, Hd), zeros(B, Hd), zeros(B, D)
    rec: dict[str, list[Tensor]] = {k: [] for k in ("pre_enc", "q", "pre_dec", "s", *STATES)}
    for t in range(K):
        r = s if encoder_input == "canvas" else x - torch.sigmoid(s)
        pre_enc = enc_static + F.linear(torch.cat([r, h_dec, h_enc], 1), enc_w)
        h_enc, c_enc, gates_enc = _cell(pre_enc, c_enc)
        q = F.linear(h_enc, p.q_w, p.q_b)
        mu, logvar = q[:, :Z], q[:, Z:]
        z = mu + torch.exp(0.5 * logvar) * eps[t]
        pre_dec = dec_static + F.linear(torch.cat([z, h_dec], 1), dec_w)
        h_dec, c_dec, gates_dec = _cell(pre_dec, c_dec)
        s = s + F.linear(h_dec, p.write_w, p.write_b)
        for name, value in zip(
            rec, (pre_enc, q, pre_dec, s, h_enc, c_enc, gates_enc, z, h_dec, c_dec, gates_dec), strict=True
        ):
            if value.requires_grad:
                value.retain_grad()
            rec[name].append(value)
    qs = torch.stack(rec["q"])
    out = {
        "canvas": s, "canvases": torch.stack(rec["s"]), "mu": qs[..., :Z], "logvar": qs[..., Z:],
        **{name: torch.stack(rec[name]) for name in STATES},
    }  # fmt: skip
    names = ("canvas", "mu", "logvar", "canvases")
    loss = _sum([(out[k].double() * w).sum() for k, w in zip(names, weights, strict=True)])
    loss.backward()
    out = {k: v.detach() for k, v in out.items()}
    out["d_canvas"] = torch.stack(_grads(rec["s"]))
    out["d_q"] = torch.stack(_grads(rec["q"]))
    out["d_gates_enc"] = torch.stack(_grads(rec["pre_enc"]))
    out["d_gates_dec"] = torch.stack(_grads(rec["pre_dec"]))
    return out


def _sum(tensors: list[Tensor]) -> Tensor:
    """The tensors added from left to right (as Python's ``sum``, without its start value 0)."""
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _grads(values: list[Tensor]) -> list[Tensor]:
    """The gradients that the backward left in ``values`` (each retains its grad)."""
    grads = []
    for v in values:
        assert v.grad is not None, "a value the loss depends on has no gradient"
        grads.append(v.grad)
    return grads


def _bf16(t: Tensor) -> Tensor:
    """A GEMM operand as the bf16 mode stores it (round to nearest even), in float64."""
    return t.to(torch.bfloat16).double()


def _shift(t: Tensor) -> Tensor:
    """(K, B, N) values of the previous step; zero (the initial state) at t = 0."""
    return torch.cat([torch.zeros_like(t[:1]), t[:-1]])


def _cell_backward(dh, dc_carry, gates, c, c_prev):
    """nn.LSTMCell backward from the activated gates: (d pre-activations, dL/dc_prev)."""
    ig, fg, gg, og = gates.chunk(4, dim=-1)
    tc = torch.tanh(c)
    dc = dh * og * (1 - tc * tc) + dc_carry
    d_pre = torch.cat(
        [
            dc * gg * ig * (1 - ig),
            dc * c_prev * fg * (1 - fg),
            dc * ig * (1 - gg * gg),
            dh * tc * og * (1 - og),
        ],
        -1,
    )
    return d_pre, dc * fg


def bf16_policy_steps(
    got: Mapping[str, Tensor],
    statics: tuple[Tensor, Tensor],
    eps: Tensor,
    p: AVMEParams,
    grads: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """The canvas-mode bf16 policy in float64, step by step with teacher forcing: every GEMM
    takes as operands the op's own float32 values of the previous stage (saved states and
    per-step gradients in ``got``) rounded to bf16, as the op rounds them, so both sides round
    identical values and differ only by float32 arithmetic; the recurrent state (c, the
    canvas, dc) is carried in float64 from the op's saved values. Returns each stage's outputs."""
    g = {k: v.double() for k, v in got.items()}
    p = cast_params(p, torch.float64)
    K, Z = eps.shape[0], eps.shape[2]
    D, Hd = p.write_w.shape
    enc_static, dec_static = (t.double() for t in statics)
    w_r, w_hd = p.enc_w_ih[:, D : 2 * D], p.enc_w_ih[:, 2 * D : 2 * D + Hd]
    w_enc = _bf16(torch.cat([w_r, w_hd, p.enc_w_hh], 1))
    w_dec = _bf16(torch.cat([p.dec_w_ih[:, :Z], p.dec_w_hh], 1))
    ref: dict[str, Tensor] = {}
    e_in = torch.cat([_shift(g["canvases"]), _shift(g["h_dec"]), _shift(g["h_enc"])], -1)
    ref["h_enc"], ref["c_enc"], ref["gates_enc"] = _cell(enc_static + _bf16(e_in) @ w_enc.t(), _shift(g["c_enc"]))
    q = _bf16(g["h_enc"]) @ _bf16(p.q_w).t() + p.q_b
    ref["mu"], ref["logvar"] = q[..., :Z], q[..., Z:]
    ref["z"] = ref["mu"] + torch.exp(0.5 * ref["logvar"]) * eps.double()
    d_in = torch.cat([g["z"], _shift(g["h_dec"])], -1)
    ref["h_dec"], ref["c_dec"], ref["gates_dec"] = _cell(dec_static + _bf16(d_in) @ w_dec.t(), _shift(g["c_dec"]))
    ref["canvases"] = _shift(g["canvases"]) + _bf16(g["h_dec"]) @ _bf16(p.write_w).t() + p.write_b

    gr = {k: v.double() for k, v in grads.items()}
    steps = {k: torch.zeros_like(g[k]) for k in STEP_GRADS}
    dc_enc, dc_dec = torch.zeros_like(g["c_enc"][0]), torch.zeros_like(g["c_dec"][0])
    for t in reversed(range(K)):
        # carries from step t+1, through the op's own step t+1 gradients
        dge_next = _bf16(g["d_gates_enc"][t + 1]) if t < K - 1 else None
        steps["d_canvas"][t] = gr["canvases"][t] + (
            g["d_canvas"][t + 1] + dge_next @ _bf16(w_r) if dge_next is not None else gr["canvas"]
        )
        dh_dec = _bf16(g["d_canvas"][t]) @ _bf16(p.write_w)
        if dge_next is not None:
            dh_dec = dh_dec + dge_next @ _bf16(w_hd) + _bf16(g["d_gates_dec"][t + 1]) @ _bf16(p.dec_w_hh)
        c_prev = g["c_dec"][t - 1] if t else torch.zeros_like(dc_dec)
        steps["d_gates_dec"][t], dc_dec = _cell_backward(dh_dec, dc_dec, g["gates_dec"][t], g["c_dec"][t], c_prev)
        dz = _bf16(g["d_gates_dec"][t]) @ _bf16(p.dec_w_ih[:, :Z])
        dlv = dz * eps[t].double() * 0.5 * torch.exp(0.5 * g["logvar"][t])
        steps["d_q"][t] = torch.cat([gr["mu"][t] + dz, gr["logvar"][t] + dlv], -1)
        dh_enc = _bf16(g["d_q"][t]) @ _bf16(p.q_w)
        if dge_next is not None:
            dh_enc = dh_enc + dge_next @ _bf16(p.enc_w_hh)
        c_prev = g["c_enc"][t - 1] if t else torch.zeros_like(dc_enc)
        steps["d_gates_enc"][t], dc_enc = _cell_backward(dh_enc, dc_enc, g["gates_enc"][t], g["c_enc"][t], c_prev)
    return {**ref, **steps}


def weight_grads(
    x: Tensor,
    y: Tensor | None,
    states: Mapping[str, Tensor],
    steps: Mapping[str, Tensor],
    encoder_input: str,
    p: AVMEParams,
) -> dict[str, Tensor]:
    """Weight and x gradients from the per-step gradients, by csrc/avme_ops.cpp's formulas
    (in float64)."""
    s = {k: v.double() for k, v in {**states, **steps}.items()}
    x, y, p = x.double(), None if y is None else y.double(), cast_params(p, torch.float64)
    K, D = s["d_canvas"].shape[0], s["d_canvas"].shape[2]
    C = 0 if y is None else y.shape[1]

    def flat(t: Tensor) -> Tensor:  # (steps, B, N) -> (steps * B, N)
        return t.reshape(-1, t.shape[-1])

    def carried(d_gates: Tensor, state: Tensor) -> Tensor:
        """Gradient of a recurrent input: steps 2..K's gate gradients times steps 1..K-1's states."""
        if K == 1:
            return d_gates.new_zeros(d_gates.shape[-1], state.shape[-1])
        return flat(d_gates[1:]).t() @ flat(state[:-1])

    dS, dQ, dGe, dGd = (flat(s[k]) for k in STEP_GRADS)
    sum_ge, sum_gd = s["d_gates_enc"].sum(0), s["d_gates_dec"].sum(0)
    if encoder_input == "error":
        r = torch.cat([(x - 0.5)[None], x - torch.sigmoid(s["canvases"][:-1])])
        g_r = dGe.t() @ flat(r)
    else:
        g_r = carried(s["d_gates_enc"], s["canvases"])
    g_enc_w_ih = [sum_ge.t() @ x, g_r, carried(s["d_gates_enc"], s["h_dec"])]
    g_dec_w_ih = [dGd.t() @ flat(s["z"])]
    if C:
        assert y is not None, "a conditional model takes y"
        g_enc_w_ih.append(sum_ge.t() @ y)
        g_dec_w_ih.append(sum_gd.t() @ y)
    grad_x = sum_ge @ p.enc_w_ih[:, :D]
    if encoder_input == "error":  # r_t = x - sigmoid(s_{t-1}): dL/dx += sum_t dL/dr_t = sum_ge W_r
        grad_x = grad_x + sum_ge @ p.enc_w_ih[:, D : 2 * D]
    return {
        "enc_w_ih": torch.cat(g_enc_w_ih, 1), "enc_w_hh": carried(s["d_gates_enc"], s["h_enc"]),
        "enc_b_ih": dGe.sum(0), "enc_b_hh": dGe.sum(0), "q_w": dQ.t() @ flat(s["h_enc"]),
        "q_b": dQ.sum(0), "dec_w_ih": torch.cat(g_dec_w_ih, 1),
        "dec_w_hh": carried(s["d_gates_dec"], s["h_dec"]), "dec_b_ih": dGd.sum(0),
        "dec_b_hh": dGd.sum(0), "write_w": dS.t() @ flat(s["h_dec"]), "write_b": dS.sum(0),
        "x": grad_x,
    }  # fmt: skip


def reference_grads(x, y, eps, p: AVMEParams, encoder_input: str, weights) -> dict[str, Tensor]:
    """Autograd of avme_forward_reference (float64) for the weighted loss: weights and x."""
    p64 = AVMEParams(*[t.detach().double().requires_grad_() for t in p])
    x64 = x.detach().double().requires_grad_()
    out = avme_forward_reference(x64, None if y is None else y.double(), eps.double(), p64, encoder_input, True)
    terms = (out.canvas, out.mu, out.logvar, out.canvases)
    loss = sum((t * w).sum() for t, w in zip(terms, weights, strict=True))
    grads = torch.autograd.grad(loss, [*p64, x64])
    return dict(zip([*AVMEParams._fields, "x"], grads, strict=True))


# ---------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------
def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b == 0); inf when either is not finite."""
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    num, den = float((a - b).norm()), float(b.norm())
    return num if den == 0.0 else num / den


def assert_close(got: Mapping[str, Tensor], ref: Mapping[str, Tensor], bounds) -> dict[str, float]:
    """Every tensor of ``got`` finite (NaN = an element never written), then each relative error
    within its bound (a float or a per-name mapping). Returns the errors."""
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    bad_values = [k for k, v in got.items() if not torch.isfinite(v).all()]
    assert not bad_values, f"non-finite (never written?) elements in {bad_values}"
    errors = {k: rel_err(got[k], ref[k]) for k in ref}
    limit = bounds if isinstance(bounds, Mapping) else dict.fromkeys(ref, bounds)
    bad = {k: (e, limit[k]) for k, e in errors.items() if not e <= limit[k]}
    assert not bad, f"relative errors above their bounds (error, bound): {bad}; all: {errors}"
    return errors


def fp64_bound(case: Case) -> float:
    s = case.sizes
    return FP64_BOUND_SCALE * case.K * max(2 * s.D + s.Hd + case.C, s.He, s.Hd + s.Z + case.C, s.D)


def pick(d: Mapping[str, Tensor], names) -> dict[str, Tensor]:
    return {k: d[k] for k in names if k in d}


OUTPUTS = ("canvas", "canvases", "mu", "logvar")


def emulated_and_reference(ns, case: Case, dtype: torch.dtype, precision: str = "fp32", seed: int = 0):
    """Run forward + backward on the emulator; return (got, ref64, ref32-or-None) dicts of outputs,
    states, per-step gradients and weight/x gradients (ref from trace and avme_forward_reference)."""
    p = make_params(case.sizes, case.C, dtype, seed)
    x, y, eps, weights = make_inputs(case, dtype, seed + 1)
    mode = case.encoder_input
    fwd = run_forward(ns, x, y, eps, p, mode, precision)
    steps = run_backward(ns, fwd, eps, p, as_grads(weights, dtype), mode, precision)
    got = {**fwd, **steps}
    got.update({f"grad_{k}": v for k, v in weight_grads(x, y, fwd, steps, mode, p).items()})

    def reference(ref_dtype):
        px = cast_params(p, ref_dtype)
        yx = None if y is None else y.to(ref_dtype)
        tr = trace(x.to(ref_dtype), yx, eps.to(ref_dtype), px, mode, weights)
        tr.update({f"grad_{k}": v for k, v in weight_grads(x, y, tr, tr, mode, p).items()})
        return tr

    ref64 = reference(torch.float64)
    # the end-to-end truth for the weight gradients: autograd through avme_forward_reference
    ref64.update({f"grad_{k}": v for k, v in reference_grads(x, y, eps, p, mode, weights).items()})
    ref32 = reference(torch.float32) if dtype == torch.float32 else None
    return got, ref64, ref32


# ---------------------------------------------------------------------------------------
# Tests: forward + backward against float64
# ---------------------------------------------------------------------------------------
FP64_CASES = [
    Case(3, 4, SMALL, 3, "error"),
    Case(1, 1, SMALL, 0, "canvas"),  # B = 1, K = 1
    Case(1, 1, SMALL, 2, "error"),  # K = 1
    Case(5, 3, Sizes(D=13, He=9, Hd=7, Z=3), 0, "canvas"),
    Case(2, 3, Sizes(D=300, He=70, Hd=60, Z=9), 2, "error"),  # > 512 elements: grid-stride loops
    Case(4, 2, Sizes(D=16, He=8, Hd=8, Z=8), 1, "canvas"),  # slots already 8-aligned: no padding
]


@pytest.mark.parametrize("case", FP64_CASES, ids=lambda c: c.id)
def test_fp64_matches_reference(swemu, case):
    got, ref64, _ = emulated_and_reference(swemu, case, torch.float64)
    assert_close(got, ref64, fp64_bound(case))


def test_trace_is_the_reference_loop():
    """The step-by-step reference used for states and per-step gradients computes exactly what
    avme_forward_reference computes."""
    for case in (Case(3, 3, ODD, 2, "error"), Case(2, 2, SMALL, 0, "canvas")):
        p = make_params(case.sizes, case.C, torch.float64)
        x, y, eps, weights = make_inputs(case, torch.float64)
        tr = trace(x, y, eps, p, case.encoder_input, weights)
        ref = avme_forward_reference(x, y, eps, p, case.encoder_input, True)
        assert_close(pick(tr, OUTPUTS), ref._asdict(), 1e-13)
        tr_grads = weight_grads(x, y, tr, tr, case.encoder_input, p)
        assert_close(tr_grads, reference_grads(x, y, eps, p, case.encoder_input, weights), 1e-12)


FP32_CASES = [
    Case(4, 3, ODD, 2, "error"),
    Case(3, 4, ODD, 0, "canvas"),
    pytest.param(Case(3, 2, PAPER, 10, "canvas"), marks=pytest.mark.slow),
    pytest.param(Case(2, 2, PAPER, 0, "error"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", FP32_CASES, ids=lambda c: c.id)
def test_fp32_matches_reference(swemu, case):
    got, ref64, ref32 = emulated_and_reference(swemu, case, torch.float32)
    bounds = {k: FP32_FACTOR * rel_err(ref32[k], ref64[k]) + FP32_FLOOR for k in ref64}
    assert_close(got, ref64, bounds)


# ---------------------------------------------------------------------------------------
# Tests: optional outputs, sampler, options
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "want",
    [("canvas", "mu", "logvar"), ("canvases", "mu"), ("canvas", "canvases", "logvar"), ("logvar",)],
    ids="+".join,
)
def test_forward_optional_outputs(swemu, want):
    """Outputs passed as None are not written, the others are all written; the cell and canvas
    states then live in the design's own buffers."""
    case = Case(3, 3, ODD, 2, "error")
    p = make_params(case.sizes, case.C, torch.float64)
    x, y, eps, _ = make_inputs(case, torch.float64)
    got = run_forward(swemu, x, y, eps, p, case.encoder_input, want=want)
    ref = avme_forward_reference(x, y, eps, p, case.encoder_input, True)._asdict()
    assert_close(got, pick(ref, want), fp64_bound(case))


def test_backward_without_optional_gradients(swemu):
    """grad_canvases / grad_mu absent (None) read as zero."""
    case = Case(3, 3, ODD, 1, "error")
    p = make_params(case.sizes, case.C, torch.float64)
    x, y, eps, weights = make_inputs(case, torch.float64)
    weights[1].zero_()  # mu
    weights[3].zero_()  # canvases
    fwd = run_forward(swemu, x, y, eps, p, case.encoder_input)
    grads = {"canvas": weights[0], "logvar": weights[2]}
    got = run_backward(swemu, fwd, eps, p, grads, case.encoder_input)
    ref = trace(x, y, eps, p, case.encoder_input, weights)
    assert_close(got, pick(ref, STEP_GRADS), fp64_bound(case))


@pytest.mark.parametrize("error_mode", [False, True])
@pytest.mark.parametrize("C", [0, 3])
@pytest.mark.parametrize("K", [1, 3])
def test_sampler(swemu, C, K, error_mode):
    """encoder=false: z_in drives the decoder; dec_static is one bias row (C = 0, stride 0) or
    per-row (C > 0). error_mode concerns only the encoder input: the sampler (no x) ignores it."""
    case = Case(5, K, ODD, C, "canvas")
    p = make_params(case.sizes, C, torch.float64)
    _, y, z, _ = make_inputs(case, torch.float64)
    t = loop_tensors(None, y, p, case.sizes.Z, "fp32")
    B, D = case.B, case.sizes.D
    canvas, canvases = nans(B, D, dtype=torch.float64), nans(K, B, D, dtype=torch.float64)
    swemu.forward(
        None, None, z, *[None] * 5, *decoder_args(t), error_mode, "fp32", canvas, canvases,
        *[None] * 9,
    )  # fmt: skip
    ref = avme_sample_reference(z, y, p, True)
    assert_close({"canvas": canvas, "canvases": canvases}, ref._asdict(), fp64_bound(case))


def test_tf32_on_cpu_is_fp32_and_restores_global_state(swemu):
    """TF32 changes only cuBLAS: on the CPU the result equals fp32's; the global float32 matmul
    settings are restored after the call."""
    case = Case(3, 2, ODD, 2, "canvas")
    p = make_params(case.sizes, case.C, torch.float32)
    x, y, eps, weights = make_inputs(case, torch.float32)
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    outs = {}
    for precision in ("fp32", "tf32"):
        fwd = run_forward(swemu, x, y, eps, p, case.encoder_input, precision)
        outs[precision] = {
            **fwd,
            **run_backward(swemu, fwd, eps, p, as_grads(weights, torch.float32), case.encoder_input, precision),
        }
    assert (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32) == before
    assert_close(outs["tf32"], outs["fp32"], 1e-6)


@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
def test_bf16_accuracy(swemu, encoder_input):
    """bf16 GEMM operands: within the bf16 bound of float64, and measurably different from
    fp32 (the rounding happens)."""
    case = Case(4, 3, Sizes(D=64, He=40, Hd=32, Z=8), 2, encoder_input)
    p = make_params(case.sizes, case.C, torch.float32)
    x, y, eps, weights = make_inputs(case, torch.float32)
    grads = as_grads(weights, torch.float32)
    got = {}
    for precision in ("bf16", "fp32"):
        fwd = run_forward(swemu, x, y, eps, p, encoder_input, precision)
        got[precision] = {**fwd, **run_backward(swemu, fwd, eps, p, grads, encoder_input, precision)}
    names = (*OUTPUTS, *STATES, *STEP_GRADS)
    exact = trace(x.double(), y.double(), eps.double(), cast_params(p, torch.float64), encoder_input, weights)
    assert_close(pick(got["bf16"], names), pick(exact, names), BF16_VS_FP64)
    differs = {k: rel_err(got["bf16"][k], got["fp32"][k]) for k in ("canvas", "mu", "d_gates_enc")}
    assert all(e > 1e-4 for e in differs.values()), differs


@pytest.mark.parametrize("C", [0, 2])
def test_bf16_rounds_exactly_the_gemm_operands(swemu, C):
    """Stage by stage, the bf16 mode equals float64 arithmetic on bf16-rounded GEMM operands
    with float32 state (see bf16_policy_steps) to float32 accuracy: a bf16 cell state or canvas,
    or an operand not rounded, would be off by about the bf16 roundoff (1e-3 and more)."""
    case = Case(4, 3, Sizes(D=64, He=40, Hd=32, Z=8), C, "canvas")
    p = make_params(case.sizes, case.C, torch.float32)
    x, y, eps, weights = make_inputs(case, torch.float32)
    grads = as_grads(weights, torch.float32)
    fwd = run_forward(swemu, x, y, eps, p, "canvas", "bf16")
    got = {**fwd, **run_backward(swemu, fwd, eps, p, grads, "canvas", "bf16")}
    t = loop_tensors(x, y, p, case.sizes.Z, "bf16")  # the op's own hoisted products
    statics = (t["enc_static"], t["dec_static"].expand(case.B, -1))
    ref = bf16_policy_steps(got, statics, eps, p, grads)
    assert_close(pick(got, ref), ref, BF16_STEPWISE)


# ---------------------------------------------------------------------------------------
# Tests: edge cases and bad input
# ---------------------------------------------------------------------------------------
def test_batch_zero_writes_nothing(swemu):
    case = Case(0, 2, SMALL, 2, "error")
    p = make_params(case.sizes, case.C, torch.float64)
    x, y, eps, weights = make_inputs(case, torch.float64)
    fwd = run_forward(swemu, x, y, eps, p, case.encoder_input)
    steps = run_backward(swemu, fwd, eps, p, as_grads(weights, torch.float64), case.encoder_input)
    assert fwd["canvas"].shape == (0, case.sizes.D)
    assert steps["d_q"].shape == (2, 0, 2 * case.sizes.Z)


def test_bad_input_names_the_problem(swemu):
    case = Case(2, 2, SMALL, 0, "canvas")
    p = make_params(case.sizes, case.C, torch.float32)
    x, y, eps, _ = make_inputs(case, torch.float32)
    with pytest.raises(RuntimeError, match="precision must be one of 'fp32', 'tf32', 'bf16', got 'fp16'"):
        run_forward(swemu, x, y, eps, p, "canvas", "fp16")
    with pytest.raises(RuntimeError, match="bad sizes B=2 K=0"):
        run_forward(swemu, x, y, eps[:0], p, "canvas")
    t = loop_tensors(x, y, p, case.sizes.Z, "fp32")
    with pytest.raises(RuntimeError, match=r"LoopParams\.enc_static is null"):
        swemu.forward(
            x, eps, None, None, *encoder_args(t)[1:], *decoder_args(t), False, "fp32", *[None] * 11,
        )  # fmt: skip
    fwd = run_forward(swemu, x, y, eps, p, "error")
    fwd_without = dict(fwd, canvases=None)
    with pytest.raises(RuntimeError, match=r"BackwardParams\.canvases is null"):
        run_backward(swemu, fwd_without, eps, p, {}, "error")  # type: ignore[arg-type]  # the missing tensor on purpose


@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
def test_no_allocation_inside_the_step_loop(swemu, encoder_input):
    """Every buffer is allocated once per call: the ATen allocations (and weight copies) of an
    fp32 forward + backward do not grow with K. Per step: 4 GEMMs and 4 pointwise launches each
    way, except at t = 0: in canvas mode the forward's encoder GEMM (its inputs are all zero), and
    in both modes the backward's input-gradient GEMM (nothing to carry). Error mode adds one
    launch before the forward's loop (r_1 = x - 1/2)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    error = encoder_input == "error"

    def work(K: int) -> tuple[Counter[str], int]:
        case = Case(3, K, ODD, 2, encoder_input)
        p = make_params(case.sizes, case.C, torch.float32)
        x, y, eps, weights = make_inputs(case, torch.float32)
        fwd = run_forward(swemu, x, y, eps, p, encoder_input)
        forward_args, backward_args = op_arguments(x, y, eps, p, fwd, as_grads(weights, torch.float32), error)
        launches = swemu.kernel_launches()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            swemu.forward(*forward_args)
            swemu.backward(*backward_args)
        return Counter(e.name for e in prof.events()), swemu.kernel_launches() - launches

    calls = {K: work(K) for K in (2, 6)}
    allocating = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::copy_")
    per_call = {K: {name: c[name] for name in allocating} for K, (c, _) in calls.items()}
    assert per_call[2] == per_call[6], per_call
    assert per_call[2]["aten::empty"] > 0, per_call
    gemms = {K: 8 * K - (1 if error else 2) for K in calls}
    assert {K: c["aten::mm"] for K, (c, _) in calls.items()} == gemms
    assert {K: n for K, (_, n) in calls.items()} == {K: 8 * K + error for K in calls}


def op_arguments(x, y, eps, p, fwd, grads, error_mode: bool) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """Arguments of one fp32 forward and backward call on preallocated outputs."""
    t = loop_tensors(x, y, p, eps.shape[2], "fp32")
    outs = [torch.empty_like(fwd[k]) for k in ("canvas", "canvases", "mu", "logvar", *STATES)]
    forward_args = (x, eps, None, *encoder_args(t), *decoder_args(t), error_mode, "fp32", *outs)
    K, B, Z = eps.shape
    He, Hd, D = p.enc_w_hh.shape[1], p.dec_w_hh.shape[1], p.write_w.shape[0]
    backward_args = (
        grads["canvas"], grads["canvases"], grads["mu"], grads["logvar"], eps, fwd["logvar"],
        fwd["canvases"], fwd["c_enc"], fwd["gates_enc"], fwd["c_dec"], fwd["gates_dec"],
        p.enc_w_ih, p.enc_w_hh, p.q_w, p.dec_w_ih, p.dec_w_hh, p.write_w, error_mode, "fp32",
        torch.empty(K, B, D), torch.empty(K, B, 2 * Z), torch.empty(K, B, 4 * He),
        torch.empty(K, B, 4 * Hd),
    )  # fmt: skip
    return forward_args, backward_args
