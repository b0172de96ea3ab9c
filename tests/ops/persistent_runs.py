"""Runs of the persistent design's kernels on the CPU emulator (``torch.ops.avme_pemu``, built
from csrc/emulation/persistent_emulation.cpp) next to the float64 reference with every per-step
intermediate: inputs prepared as csrc/avme_ops.cpp prepares them, the reference's per-step
gradients by autograd, and the host's weight-gradient products. Shared by
tests/ops/test_persistent_kernels.py and tests/ops/precision_error.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from avme_ext.loop_types import AVMEParams

from . import backends
from .helpers import Sizes, make_inputs, make_params, merged_biases

H100 = [132, 232448]  # SMs, opt-in shared memory per block (bytes)
# Config::math (csrc/persistent/plan.h): CUDA-core FMA, 3xTF32 and TF32 tensor cores; FP32 is
# precision "fp32" (3xTF32 where it fits, else FMA).
FMA, TF32X3, TF32, FP32 = 0, 1, 2, -1


def load_pemu():
    """``torch.ops.avme_pemu``, built on first use (raises backends.UnavailableError when it cannot be)."""
    return backends.load_emulation("persistent_emulation.cpp", "avme_pemu")


# ---------------------------------------------------------------------------------------
# Inputs as csrc/avme_ops.cpp prepares them
# ---------------------------------------------------------------------------------------
def loop_tensors(x: Tensor | None, y: Tensor | None, p: AVMEParams, Z: int) -> dict[str, Tensor]:
    """The LoopParams tensors: hoisted x/y products with both biases, transposed weights.
    (x None: the sampler's.)"""
    D, Hd, C = p.data_dim, p.dec_hidden, p.num_classes
    enc_b, dec_b = merged_biases(p)
    out = {}
    if x is not None:
        enc_static = x @ p.enc_w_ih[:, :D].t() + enc_b
        if C:
            assert y is not None, "a conditional model takes y"
            enc_static = enc_static + y @ p.enc_w_ih[:, 2 * D + Hd :].t()
        out["enc_static"] = enc_static.contiguous()
        out["enc_wT"] = torch.cat([p.enc_w_ih[:, D : 2 * D + Hd], p.enc_w_hh], 1).t().contiguous()
        out["q_wT"] = p.q_w.t().contiguous()
        out["q_b"] = p.q_b.contiguous()
    dec_static = dec_b
    if C:
        assert y is not None, "a conditional model takes y"
        dec_static = y @ p.dec_w_ih[:, Z:].t() + dec_b
    out["dec_static"] = dec_static.contiguous()
    out["dec_wT"] = torch.cat([p.dec_w_ih[:, :Z], p.dec_w_hh], 1).t().contiguous()
    out["write_wT"] = p.write_w.t().contiguous()
    out["write_b"] = p.write_b.contiguous()
    return out


FORWARD_OUTPUTS = (
    "canvas", "mu", "logvar", "canvases", "h_enc", "c_enc", "gates_enc", "z", "h_dec", "c_dec",
    "gates_dec",
)  # fmt: skip


def run_forward(ns, x, y, eps, p, mode, config, limits=H100, *, save=True, canvases=True):
    with torch.no_grad():
        t = loop_tensors(x, y, p, eps.shape[2])
        out = ns.forward(
            x, eps, t["enc_static"], t["enc_wT"], t["q_wT"], t["q_b"], t["dec_static"],
            t["dec_wT"], t["write_wT"], t["write_b"], mode == "error", canvases, save, config, limits,
        )  # fmt: skip
    return dict(zip(FORWARD_OUTPUTS, out, strict=True))


def run_backward(ns, grads, saved, eps, p, mode, config, limits=H100):
    """The per-step gradients (d_canvas, d_q, d_gates_enc, d_gates_dec)."""
    with torch.no_grad():
        out = ns.backward(
            grads.get("canvas"), grads.get("canvases"), grads.get("mu"), grads.get("logvar"),
            eps, saved["logvar"], saved["canvases"], saved["c_enc"], saved["gates_enc"],
            saved["c_dec"], saved["gates_dec"], p.enc_w_ih, p.enc_w_hh, p.q_w, p.dec_w_ih,
            p.dec_w_hh, p.write_w, mode == "error", config, limits,
        )  # fmt: skip
    return dict(zip(("d_canvas", "d_q", "d_gates_enc", "d_gates_dec"), out, strict=True))


# ---------------------------------------------------------------------------------------
# Reference with every intermediate
# ---------------------------------------------------------------------------------------
def unrolled_reference(x, y, eps, p: AVMEParams, mode: str) -> dict[str, list[Tensor]]:
    """The reference loop (the equations of avme_forward_reference), keeping every per-step
    tensor: pre-activations, activated gates, states, r_t and s_t, each a list over t."""
    K, B, Z = eps.shape
    D, Hd, C = p.data_dim, p.dec_hidden, p.num_classes
    w_x, w_r, w_h, w_y = p.enc_w_ih.split([D, D, Hd, C], dim=1)
    w_z, w_dy = p.dec_w_ih.split([Z, C], dim=1)
    enc_static = F.linear(x, w_x, p.enc_b_ih + p.enc_b_hh)
    dec_static = p.dec_b_ih + p.dec_b_hh
    if C:
        enc_static = enc_static + F.linear(y, w_y)
        dec_static = dec_static + F.linear(y, w_dy)
    h_enc = c_enc = x.new_zeros(B, p.enc_hidden)
    h_dec = c_dec = x.new_zeros(B, Hd)
    canvas = x.new_zeros(B, D)
    rec: dict[str, list[Tensor]] = {}

    def keep(**named):
        for k, v in named.items():
            rec.setdefault(k, []).append(v)

    def cell(pre, c):
        i, f, g, o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        return o * torch.tanh(c), c, torch.cat([i, f, g, o], dim=1)

    for t in range(K):
        r = canvas if mode == "canvas" else x - torch.sigmoid(canvas)
        if mode == "error" and not r.requires_grad:
            r.requires_grad_()  # r_1 = x - 1/2: a leaf, so that dL/dr_1 is defined
        enc_pre = enc_static + F.linear(r, w_r) + F.linear(h_dec, w_h) + F.linear(h_enc, p.enc_w_hh)
        h_enc, c_enc, gates_enc = cell(enc_pre, c_enc)
        q = F.linear(h_enc, p.q_w, p.q_b)
        mu, logvar = q[:, :Z], q[:, Z:]
        z = mu + torch.exp(0.5 * logvar) * eps[t]
        dec_pre = dec_static + F.linear(z, w_z) + F.linear(h_dec, p.dec_w_hh)
        h_dec, c_dec, gates_dec = cell(dec_pre, c_dec)
        canvas = canvas + F.linear(h_dec, p.write_w, p.write_b)
        keep(r=r, enc_pre=enc_pre, h_enc=h_enc, c_enc=c_enc, gates_enc=gates_enc, mu=mu,
             logvar=logvar, z=z, dec_pre=dec_pre, h_dec=h_dec, c_dec=c_dec, gates_dec=gates_dec,
             canvases=canvas)  # fmt: skip
    return rec


def stacked(rec: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    out = {k: torch.stack(v).detach() for k, v in rec.items() if k in FORWARD_OUTPUTS}
    out["canvas"] = rec["canvases"][-1].detach()
    return out


def loss_grads(B, K, s: Sizes, seed, present=("canvas", "mu", "logvar", "canvases")):
    """Random float64 output gradients (the weights of a linear test loss)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"canvas": (B, s.D), "mu": (K, B, s.Z), "logvar": (K, B, s.Z), "canvases": (K, B, s.D)}
    return {k: torch.randn(*shapes[k], generator=gen, dtype=torch.float64) for k in present}


def per_step_gradients(rec, grads, mode) -> dict[str, Tensor]:
    """What BackwardParams asks of the kernel, by autograd through the unrolled reference."""
    terms = {"canvas": rec["canvases"][-1], "mu": torch.stack(rec["mu"]),
             "logvar": torch.stack(rec["logvar"]), "canvases": torch.stack(rec["canvases"])}  # fmt: skip
    loss = sum((terms[k] * g.to(terms[k].dtype)).sum() for k, g in grads.items())
    K = len(rec["mu"])
    wrt = rec["canvases"] + rec["mu"] + rec["logvar"] + rec["enc_pre"] + rec["dec_pre"]
    g = torch.autograd.grad(loss, wrt, allow_unused=True)
    g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(g, wrt, strict=True)]
    return {
        "d_canvas": torch.stack(g[:K]),
        "d_q": torch.cat([torch.stack(g[K : 2 * K]), torch.stack(g[2 * K : 3 * K])], dim=2),
        "d_gates_enc": torch.stack(g[3 * K : 4 * K]),
        "d_gates_dec": torch.stack(g[4 * K : 5 * K]),
    }


def reference_run(sizes, C, B, K, mode, dtype, seed):
    """Weights, inputs and the unrolled reference in `dtype` (weights and inputs are drawn in
    float64 and rounded, so every dtype sees the same values)."""
    p64 = make_params(sizes, C, dtype=torch.float64, seed=seed, grad=True)
    x, y, eps = make_inputs(B, K, sizes, C, dtype=torch.float64, seed=seed + 1)
    p = AVMEParams(*[t.detach().to(dtype).requires_grad_() for t in p64])
    x, eps = x.to(dtype), eps.to(dtype)
    y = None if y is None else y.to(dtype)
    return p, x, y, eps, unrolled_reference(x, y, eps, p, mode)


def host_weight_gradients(fwd, bwd, x, y, p: AVMEParams, mode) -> dict[str, Tensor]:
    """The weight-gradient products of csrc/avme_ops.cpp (avme_backward), in Python."""
    K, B, D = bwd["d_canvas"].shape
    Z, He, Hd, C = fwd["z"].shape[2], p.enc_hidden, p.dec_hidden, p.num_classes
    M = K * B
    dS, dQ = bwd["d_canvas"].reshape(M, D), bwd["d_q"].reshape(M, 2 * Z)
    dGe, dGd = bwd["d_gates_enc"].reshape(M, 4 * He), bwd["d_gates_dec"].reshape(M, 4 * Hd)
    sum_ge, sum_gd = bwd["d_gates_enc"].sum(0), bwd["d_gates_dec"].sum(0)

    def tail(t):
        return t[1:].reshape((K - 1) * B, -1)

    def head(t):
        return t[:-1].reshape((K - 1) * B, -1)

    g = {name: torch.zeros_like(t) for name, t in zip(AVMEParams._fields, p, strict=True)}
    g["write_w"] = dS.t() @ fwd["h_dec"].reshape(M, Hd)
    g["write_b"] = dS.sum(0)
    g["q_w"] = dQ.t() @ fwd["h_enc"].reshape(M, He)
    g["q_b"] = dQ.sum(0)
    g["dec_w_ih"][:, :Z] = dGd.t() @ fwd["z"].reshape(M, Z)
    if C:
        g["dec_w_ih"][:, Z:] = sum_gd.t() @ y
    g["dec_b_ih"] = g["dec_b_hh"] = dGd.sum(0)
    g["enc_w_ih"][:, :D] = sum_ge.t() @ x
    if mode == "error":
        prev = torch.cat([torch.zeros_like(fwd["canvases"][:1]), fwd["canvases"][:-1]])
        r = x - torch.sigmoid(prev)
        g["enc_w_ih"][:, D : 2 * D] = dGe.t() @ r.reshape(M, D)
    elif K > 1:
        g["enc_w_ih"][:, D : 2 * D] = tail(bwd["d_gates_enc"]).t() @ head(fwd["canvases"])
    if K > 1:
        g["enc_w_ih"][:, 2 * D : 2 * D + Hd] = tail(bwd["d_gates_enc"]).t() @ head(fwd["h_dec"])
        g["enc_w_hh"] = tail(bwd["d_gates_enc"]).t() @ head(fwd["h_enc"])
        g["dec_w_hh"] = tail(bwd["d_gates_dec"]).t() @ head(fwd["h_dec"])
    if C:
        g["enc_w_ih"][:, 2 * D + Hd :] = sum_ge.t() @ y
    g["enc_b_ih"] = g["enc_b_hh"] = dGe.sum(0)
    g["x"] = sum_ge @ p.enc_w_ih[:, :D]
    if mode == "error":  # r_t = x - sigmoid(s_{t-1}): dL/dx += sum_t dL/dr_t = sum_ge W_r
        g["x"] = g["x"] + sum_ge @ p.enc_w_ih[:, D : 2 * D]
    return g
