"""avme::forward against the float64 reference: outputs of the inference path (nothing saved).

The gradients (and the forward that saves its state for them) are in test_backward.py.
"""

from __future__ import annotations

import pytest
import torch

from avme_ext.reference import avme_forward_reference

from .helpers import (
    CASES,
    FP64_CASES,
    PRECISION_CASES,
    TINY,
    Case,
    assert_finite,
    assert_within,
    backend_params,
    compare_with_reference,
    forward_args,
    fp64_bound,
    make_inputs,
    make_params,
)


@pytest.mark.parametrize(("backend", "case"), backend_params(CASES), indirect=["backend"])
def test_outputs_match_reference_fp32(backend, case: Case, emu_sms, each_design):
    emu_sms(case.sms)
    compare_with_reference(backend, case, grads=False)


@pytest.mark.parametrize(("backend", "case"), backend_params(FP64_CASES), indirect=["backend"])
def test_outputs_match_reference_fp64(backend, case: Case, emu_sms, each_design):
    emu_sms(case.sms)
    compare_with_reference(backend, case, dtype=torch.float64, grads=False)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize(("backend", "case"), backend_params(PRECISION_CASES), indirect=["backend"])
def test_tensor_core_precisions(backend, case: Case, precision, emu_sms, each_design):
    """The tf32/bf16 options' code paths (on the CPU: the bf16 rounding of the products)."""
    emu_sms(case.sms)
    compare_with_reference(backend, case, precision=precision, grads=False)


@pytest.mark.parametrize("save", [False, True])
def test_saved_state_only_when_asked(backend, save):
    """save_for_backward=False (inference, e.g. huge IWAE batches) returns empty state; the
    outputs do not depend on it."""
    B, K, C = 5, 3, 2
    p = make_params(TINY, C, dtype=torch.float64, device=backend.device, grad=False)
    x, y, eps = make_inputs(B, K, TINY, C, dtype=torch.float64, device=backend.device)
    out = backend.ns.forward(*forward_args(x, y, eps, p), "error", False, save, "fp32", "auto")
    steps = K if save else 0
    assert [t.shape[0] for t in out[4:]] == [steps] * 7
    assert out[3].shape[0] == steps  # canvases are kept for the backward only
    if save:
        assert_finite({f"state{i}": t for i, t in enumerate(out[3:])})
    ref = avme_forward_reference(x, y, eps, p, "error", False)
    other = backend.ns.forward(*forward_args(x, y, eps, p), "error", False, not save, "fp32", "auto")
    names = ("canvas", "mu", "logvar")
    assert_within(
        dict(zip(names, out[:3], strict=True)), dict(zip(names, ref[:3], strict=True)), fp64_bound(K, TINY, C)
    )
    for got, again in zip(out[:3], other[:3], strict=True):
        assert torch.equal(got, again)  # saving the state does not change the arithmetic


def test_fused_forward_saves_state_only_under_grad(backend):
    """fused_forward asks the op to save its state only when autograd will need it."""
    p = make_params(TINY, 0, device=backend.device)
    x, _, eps = make_inputs(4, 2, TINY, 0, device=backend.device)
    with torch.no_grad():
        out = backend.forward(x, None, eps, p)
    assert out.canvas.grad_fn is None
    out = backend.forward(x, None, eps, p)
    assert out.canvas.grad_fn is not None


@pytest.mark.parametrize("return_canvases", [False, True])
def test_batch_zero(backend, return_canvases):
    K, C = 3, 2
    p = make_params(TINY, C, device=backend.device, grad=False)
    x, y, eps = make_inputs(0, K, TINY, C, device=backend.device)
    out = backend.forward(x, y, eps, p, "error", return_canvases)
    assert out.canvas.shape == (0, TINY.D)
    assert out.mu.shape == out.logvar.shape == (K, 0, TINY.Z)
    assert (out.canvases is not None) == return_canvases
    if return_canvases:
        assert out.canvases.shape == (K, 0, TINY.D)


def test_noncontiguous_inputs_are_accepted_by_fused_forward(backend):
    """The Python wrapper makes its inputs contiguous (the raw op refuses them)."""
    p = make_params(TINY, 0, device=backend.device, grad=False)
    x, _, eps = make_inputs(6, 3, TINY, 0, device=backend.device)
    x_nc = x.t().contiguous().t()
    eps_nc = eps.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_nc.is_contiguous()
    assert not eps_nc.is_contiguous()
    a = backend.forward(x_nc, None, eps_nc, p)
    b = backend.forward(x, None, eps, p)
    assert_finite({"canvas": a.canvas, "mu": a.mu})
    assert torch.equal(a.canvas, b.canvas)
    assert torch.equal(a.mu, b.mu)


def test_tf32_option_restores_global_state(backend):
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    p = make_params(TINY, 0, device=backend.device)
    x, _, eps = make_inputs(2, 2, TINY, 0, device=backend.device)
    out = backend.forward(x, None, eps, p, "canvas", False, "tf32")
    out.canvas.sum().backward()
    after = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    assert before == after


@pytest.mark.parametrize(("B", "expected"), [(3, "persistent"), (257, "stagewise")])
def test_auto_design_follows_the_batch_size(backend, B, expected):
    """design="auto" runs the persistent kernels up to 256 rows (where they fit) and the stagewise
    design above: its outputs are bit-identical to the design forced by name, not to the other."""
    p = make_params(TINY, 2, dtype=torch.float32, device=backend.device, grad=False)
    x, y, eps = make_inputs(B, 2, TINY, 2, dtype=torch.float32, device=backend.device)
    runs = {
        name: backend.ns.forward(*forward_args(x, y, eps, p), "error", True, False, "fp32", name)
        for name in ("auto", "persistent", "stagewise")
    }
    backend.synchronize()
    other = "stagewise" if expected == "persistent" else "persistent"
    for got, want in zip(runs["auto"][:4], runs[expected][:4], strict=True):
        assert_finite({"out": got})
        assert torch.equal(got, want)
    assert not all(torch.equal(a, b) for a, b in zip(runs["auto"][:4], runs[other][:4], strict=True))
