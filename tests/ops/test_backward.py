"""avme::backward (through fused_forward's autograd) against the float64 reference.

Gradients w.r.t. every parameter and w.r.t. x, y and eps; only the requested ones are
computed; double backward is refused.
"""

from __future__ import annotations

import pytest
import torch

from avme_ext.loop_types import AVMEParams
from avme_ext.reference import avme_forward_reference

from . import backends
from .helpers import (
    CASES,
    FP64_CASES,
    PRECISION_CASES,
    TINY,
    Case,
    Sizes,
    assert_finite,
    assert_within,
    backend_params,
    compare_with_reference,
    forward_args,
    fp64_bound,
    make_inputs,
    make_params,
    to_reference,
)


@pytest.mark.parametrize(("backend", "case"), backend_params(CASES), indirect=["backend"])
def test_gradients_match_reference_fp32(backend, case: Case, emu_sms, each_design):
    emu_sms(case.sms)
    compare_with_reference(backend, case)


@pytest.mark.parametrize(("backend", "case"), backend_params(FP64_CASES), indirect=["backend"])
def test_gradients_match_reference_fp64(backend, case: Case, emu_sms, each_design):
    emu_sms(case.sms)
    compare_with_reference(backend, case, dtype=torch.float64)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize(("backend", "case"), backend_params(PRECISION_CASES), indirect=["backend"])
def test_gradients_tensor_core_precisions(backend, case: Case, precision, emu_sms, each_design):
    emu_sms(case.sms)
    compare_with_reference(backend, case, precision=precision)


def test_weight_gradients_without_input_gradients(backend):
    """x, y, eps not requiring grad: the op computes no input gradient, weights still right."""
    case = Case(5, 3, Sizes(11, 6, 5, 3), 2, "error")
    errors = compare_with_reference(backend, case, dtype=torch.float64, input_grads=False)
    assert not any(name in errors for name in ("grad_x", "grad_y", "grad_eps"))


# Which of x, y, eps require grad; each alone, since the op computes each only on request.
@pytest.mark.parametrize(
    "wanted",
    [
        pytest.param(("x",), marks=pytest.mark.slow),
        ("y",),
        pytest.param(("eps",), marks=pytest.mark.slow),
        ("x", "y", "eps"),
    ],
)
@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
@pytest.mark.usefixtures("one_emulated_sm")
def test_each_input_gradient_alone(backend, wanted, encoder_input, each_design):
    B, K, C = 4, 3, 3
    sizes = Sizes(9, 5, 4, 2)
    p = make_params(sizes, C, dtype=torch.float64, device=backend.device, grad=False)
    x, y, eps = make_inputs(B, K, sizes, C, dtype=torch.float64, device=backend.device)
    assert y is not None
    inputs = {"x": x, "y": y, "eps": eps}
    for name in wanted:
        inputs[name].requires_grad_(True)

    def loss(forward_out):
        assert forward_out.canvases is not None
        return (
            forward_out.canvas.square().sum() + forward_out.mu.sum()
            + (forward_out.logvar * forward_out.mu).sum() + forward_out.canvases.mean()
        )  # fmt: skip

    out = backend.forward(x, y, eps, p, encoder_input, True)
    got = dict(zip(wanted, torch.autograd.grad(loss(out), [inputs[n] for n in wanted]), strict=True))
    ref = avme_forward_reference(x, y, eps, p, encoder_input, True)
    want = dict(zip(wanted, torch.autograd.grad(loss(ref), [inputs[n] for n in wanted]), strict=True))
    assert_within(got, want, fp64_bound(K, sizes, C))
    for name in set(inputs) - set(wanted):
        assert inputs[name].grad is None


@pytest.mark.parametrize("pick", ["canvas", "mu", "logvar", "canvases"])
@pytest.mark.usefixtures("one_emulated_sm")
def test_loss_of_one_output(backend, pick):
    """The outputs the loss does not use get no gradient (None in the backward)."""
    B, K, C = 5, 3, 2
    p = make_params(TINY, C, dtype=torch.float64, device=backend.device)
    pd = to_reference(p)
    x, y, eps = make_inputs(B, K, TINY, C, dtype=torch.float64, device=backend.device)
    x.requires_grad_(True)
    out = backend.forward(x, y, eps, p, "error", True)
    got = dict(zip(["x", *AVMEParams._fields], torch.autograd.grad(getattr(out, pick).sum(), [x, *p]), strict=True))
    xr = x.detach().requires_grad_(True)
    ref = avme_forward_reference(xr, y, eps, pd, "error", True)
    want = dict(zip(["x", *AVMEParams._fields], torch.autograd.grad(getattr(ref, pick).sum(), [xr, *pd]), strict=True))
    assert_within(got, want, fp64_bound(K, TINY, C))


@pytest.mark.parametrize("C", [pytest.param(0, marks=pytest.mark.slow), 1])
@pytest.mark.parametrize("encoder_input", [pytest.param("canvas", marks=pytest.mark.slow), "error"])
@pytest.mark.usefixtures("one_emulated_sm")
def test_gradcheck(backend, C, encoder_input, each_design):
    """Finite differences of the fused op itself, w.r.t. x, y, eps and every weight (the fast
    suite checks the error mode with a class input; --runslow every combination)."""
    B, K = 2, 3
    sizes = Sizes(3, 2, 2, 1)
    p = make_params(sizes, C, dtype=torch.float64, device=backend.device)
    x, y, eps = make_inputs(B, K, sizes, C, dtype=torch.float64, device=backend.device)
    x = torch.rand(B, sizes.D, dtype=torch.float64, device=backend.device, requires_grad=True)
    eps.requires_grad_(True)
    inputs = [x, eps, *p] if y is None else [x, eps, y.requires_grad_(True), *p]

    def fn(x, eps, *rest):
        y_, weights = (None, rest) if C == 0 else (rest[0], rest[1:])
        out = backend.forward(x, y_, eps, AVMEParams(*weights), encoder_input, True)
        return out.canvas, out.mu, out.logvar, out.canvases

    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)


def test_double_backward_is_refused(backend):
    p = make_params(TINY, 2, dtype=torch.float64, device=backend.device)
    x, y, eps = make_inputs(3, 2, TINY, 2, dtype=torch.float64, device=backend.device)
    x.requires_grad_(True)
    out = backend.forward(x, y, eps, p, "canvas", True)
    grads = torch.autograd.grad(out.canvas.square().sum(), [x, *p], create_graph=True)
    assert_finite({"grad_x": grads[0]})
    with pytest.raises(RuntimeError, match="double backward through the fused AVME ops is not supported"):
        torch.autograd.grad(torch.stack([g.square().sum() for g in grads]).sum(), [x, *p])


def test_single_backward_after_create_graph_matches(backend):
    """create_graph=True alone is allowed (only differentiating its result is refused)."""
    p = make_params(TINY, 0, dtype=torch.float64, device=backend.device)
    x, _, eps = make_inputs(3, 2, TINY, 0, dtype=torch.float64, device=backend.device)
    out = backend.forward(x, None, eps, p)
    with_graph = torch.autograd.grad(out.canvas.sum(), list(p), create_graph=True)
    out = backend.forward(x, None, eps, p)
    plain = torch.autograd.grad(out.canvas.sum(), list(p))
    for a, b in zip(with_graph, plain, strict=True):
        assert torch.equal(a.detach(), b)


def test_batch_zero(backend):
    K, C = 3, 2
    p = make_params(TINY, C, device=backend.device)
    x, y, eps = make_inputs(0, K, TINY, C, device=backend.device)
    assert y is not None
    for t in (x, y, eps):
        t.requires_grad_(True)
    out = backend.forward(x, y, eps, p, "error", True)
    assert out.canvases is not None
    (out.canvas.sum() + out.mu.sum() + out.canvases.sum()).backward()
    for t in (x, y, eps):
        assert t.grad is not None
        assert t.grad.shape == t.shape
    for t in p:
        assert t.grad is not None
        assert t.grad.shape == t.shape
        assert not t.grad.any()


def test_backward_without_saved_state_is_a_clear_error(backend):
    """The raw backward on the outputs of a forward that saved nothing."""
    p = make_params(TINY, 0, device=backend.device, grad=False)
    x, _, eps = make_inputs(3, 2, TINY, 0, device=backend.device)
    args = (x, None, eps, p.enc_w_ih, p.enc_w_hh, p.enc_b_ih, p.q_w, p.q_b, p.dec_w_ih,
            p.dec_w_hh, p.dec_b_ih, p.write_w, p.write_b)  # fmt: skip
    canvas, _mu, logvar, canvases, *state = backend.ns.forward(*args, "canvas", False, False, "fp32", "auto")
    with pytest.raises(RuntimeError, match="did not save its state"):
        backend.ns.backward(
            torch.ones_like(canvas), None, None, None, x, None, eps, logvar, canvases, *state,
            p.enc_w_ih, p.enc_w_hh, p.q_w, p.dec_w_ih, p.dec_w_hh, p.write_w,
            "canvas", True, False, True, "fp32", "auto",
        )  # fmt: skip


def _rowtile_work(emu, K: int, encoder_input: str) -> tuple[int, int, int, int]:
    """(forward products, forward kernels, backward products, backward kernels) of one rowtile
    call pair (B = 3, TINY sizes, C = 2, every gradient asked for)."""
    from .work_counts import count_work

    p = make_params(TINY, 2, dtype=torch.float64, grad=False)
    x, y, eps = make_inputs(3, K, TINY, 2, dtype=torch.float64)
    args = forward_args(x, y, eps, p)

    def forward():
        return emu.ns.forward(*args, encoder_input, False, True, "fp32", "rowtile")

    fwd_work = count_work(forward, emu.ns.kernel_launches)
    canvas, _mu, logvar, canvases, *state = forward()

    def backward():
        return emu.ns.backward(
            torch.ones_like(canvas), None, logvar, None, x, y, eps, logvar, canvases, *state,
            p.enc_w_ih, p.enc_w_hh, p.q_w, p.dec_w_ih, p.dec_w_hh, p.write_w, encoder_input,
            True, True, True, "fp32", "rowtile",
        )  # fmt: skip

    bwd_work = count_work(backward, emu.ns.kernel_launches)
    return fwd_work["products"], fwd_work["kernels"], bwd_work["products"], bwd_work["kernels"]


@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
def test_host_products_are_one_per_gradient_block(emu_sms, encoder_input):
    """The host's products, whatever K: forward 3 (x and y into the encoder, y into the decoder,
    each bias the addend of its GEMM); backward one per gradient block, written in place: write,
    posterior, decoder [z | y | recurrent], encoder [x | y] and ONE for its [r | h_dec | recurrent]
    blocks, grad_x (twice in error mode: W_x and W_r), grad_y (encoder and decoder). The rowtile
    design writes dL/deps itself (no product for it) and runs one kernel each way."""
    try:
        emu = backends.emulator()
    except backends.UnavailableError as exc:
        pytest.skip(str(exc))
    emu_sms(4)
    counted = {K: _rowtile_work(emu, K, encoder_input) for K in (2, 4)}
    error = encoder_input == "error"
    assert counted == dict.fromkeys((2, 4), (3, 1, 11 + error, 1)), counted
