"""GPU tests of the fused ops against the float64 reference.

Every test skips (with the reason) unless ``avme_ext.ops.is_available()``: the extension is
built and a CUDA device is present.

Conventions: the fused op runs in float32 (or float64), the reference in float64 on the same
weights and the same eps; the comparison is the relative Frobenius error
||fused - ref|| / ||ref|| per tensor, for the outputs (canvas, mu, logvar, every step's
canvas), a loss that touches all of them with random weights, and every gradient. Before each
fused run the CUDA caching allocator is filled with NaN ("poisoned"), so an output element a
kernel fails to write shows up as NaN.

Set ``AVME_SLOW_TESTS=1`` for the large-batch (int64 indexing) test.
"""

from __future__ import annotations

import os

import pytest
import torch

from avme_ext import ops
from avme_ext.core import AVMECore
from avme_ext.loop_types import AVMEParams
from avme_ext.reference import avme_forward_reference, avme_sample_reference

pytestmark = pytest.mark.skipif(
    not ops.is_available(),
    reason=(
        "needs the avme CUDA extension and a CUDA device "
        f"(extension loaded: {ops.extension_loaded()}, CUDA available: {torch.cuda.is_available()})"
    ),
)

DEVICE = "cuda"
TOL = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2}
PAPER = dict(D=784, He=400, Hd=400, Z=100)
ODD = dict(D=100, He=48, Hd=40, Z=7)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def poison_cuda_memory(num_bytes: int = 1 << 28) -> None:
    """Fill (up to) num_bytes of the caching allocator's free memory with NaN and free it."""
    free = torch.cuda.mem_get_info()[0]
    num_bytes = max(1 << 20, min(num_bytes, free // 2))
    blocks = []
    for size in (num_bytes // 2, num_bytes // 4, num_bytes // 8, 1 << 20, 1 << 16):
        t = torch.empty(size // 4, dtype=torch.float32, device=DEVICE)
        t.fill_(float("nan"))
        blocks.append(t)
    del blocks


def make_module(D, He, Hd, Z, C, K, encoder_input, seed=0, dtype=torch.float32, impl="cuda"):
    torch.manual_seed(seed)
    return AVMECore(
        data_dim=D, num_classes=C, enc_hidden=He, dec_hidden=Hd, latent_dim=Z, steps=K,
        encoder_input=encoder_input, impl=impl, device=DEVICE, dtype=dtype,
    )  # fmt: skip


def make_inputs(B, K, D, C, Z, seed=1, dtype=torch.float32):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = (torch.rand(B, D, generator=gen, device=DEVICE) < 0.3).to(dtype)
    y = None
    if C:
        labels = torch.randint(0, C, (B,), generator=gen, device=DEVICE)
        y = torch.nn.functional.one_hot(labels, C).to(dtype)
    eps = torch.randn(K, B, Z, generator=gen, device=DEVICE, dtype=torch.float64).to(dtype)
    return x, y, eps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    if not torch.isfinite(a).all():
        return float("inf")
    return num if den == 0.0 else num / den


def double_params(p: AVMEParams) -> AVMEParams:
    return AVMEParams(*[t.detach().double().requires_grad_() for t in p])


def run_and_grad(forward, params, x, y, eps, loss_weights, x_grad=True):
    """Outputs, loss (float64) and gradients w.r.t. x (optional) and every parameter."""
    x = x.detach().requires_grad_(x_grad)
    out = forward(x, y, eps, params)
    w = loss_weights
    loss = (
        (out.canvas.double() * w[0]).sum() + (out.mu.double() * w[1]).sum()
        + (out.logvar.double() * w[2]).sum() + (out.canvases.double() * w[3]).sum()
    )  # fmt: skip
    inputs = ([x] if x_grad else []) + list(params)
    grads = torch.autograd.grad(loss, inputs)
    names = ["canvas", "mu", "logvar", "canvases", "loss"] + (["x"] if x_grad else []) + list(
        AVMEParams._fields
    )
    return dict(zip(names, [out.canvas, out.mu, out.logvar, out.canvases, loss.detach(), *grads]))


def compare_with_reference(B, K, sizes, C, encoder_input, precision="fp32", dtype=torch.float32, seed=0):
    D, He, Hd, Z = sizes["D"], sizes["He"], sizes["Hd"], sizes["Z"]
    core = make_module(D, He, Hd, Z, C, K, encoder_input, seed=seed, dtype=dtype)
    params = core.loop_params()
    x, y, eps = make_inputs(B, K, D, C, Z, seed=seed + 1, dtype=dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 2)
    weights = [
        torch.randn(B, D, generator=gen, device=DEVICE, dtype=torch.float64),
        torch.randn(K, B, Z, generator=gen, device=DEVICE, dtype=torch.float64),
        torch.randn(K, B, Z, generator=gen, device=DEVICE, dtype=torch.float64),
        torch.randn(K, B, D, generator=gen, device=DEVICE, dtype=torch.float64),
    ]

    def fused(x, y, eps, p):
        return ops.fused_forward(x, y, eps, p, encoder_input, True, precision)

    def reference(x, y, eps, p):
        return avme_forward_reference(x, y, eps, p, encoder_input, True)

    poison_cuda_memory()
    got = run_and_grad(fused, params, x, y, eps, weights)
    torch.cuda.synchronize()
    yd = None if y is None else y.double()
    ref = run_and_grad(reference, double_params(params), x.double(), yd, eps.double(), weights)
    errors = {name: rel_err(got[name], ref[name]) for name in ref}
    tol = 1e-10 if dtype == torch.float64 else TOL[precision]
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


# ---------------------------------------------------------------------------------------
# Forward and gradients vs the float64 reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
@pytest.mark.parametrize("C", [0, 10])
@pytest.mark.parametrize("K", [1, 2, 12])
@pytest.mark.parametrize("B", [1, 7, 100, 4097])
def test_odd_sizes(B, K, C, encoder_input):
    compare_with_reference(B, K, ODD, C, encoder_input)


@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
@pytest.mark.parametrize("C", [0, 10])
@pytest.mark.parametrize("B", [1, 100])
def test_paper_sizes(B, C, encoder_input):
    compare_with_reference(B, 12, PAPER, C, encoder_input)


@pytest.mark.parametrize(
    "B, K, sizes, C, encoder_input",
    [
        (7, 64, ODD, 10, "error"),
        (100, 64, ODD, 0, "canvas"),
        (7, 64, PAPER, 0, "canvas"),
        (4097, 12, PAPER, 10, "error"),
        (4097, 2, PAPER, 0, "canvas"),
    ],
    ids=["odd-K64-error", "odd-K64-canvas", "paper-K64", "paper-B4097-error", "paper-B4097-canvas"],
)
def test_long_and_large(B, K, sizes, C, encoder_input):
    compare_with_reference(B, K, sizes, C, encoder_input)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
def test_tensor_core_precisions(precision, encoder_input):
    compare_with_reference(100, 12, PAPER, 10, encoder_input, precision=precision)


@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
@pytest.mark.parametrize("B", [1, 7, 100])
def test_float64_op(B, encoder_input):
    compare_with_reference(B, 12, ODD, 10, encoder_input, dtype=torch.float64)


def test_float64_paper_sizes():
    compare_with_reference(9, 3, PAPER, 10, "error", dtype=torch.float64)


def test_gradient_wrt_x_only_when_needed():
    core = make_module(**ODD, C=0, K=3, encoder_input="error")
    x, _, eps = make_inputs(5, 3, ODD["D"], 0, ODD["Z"])
    out = core(x, eps=eps)
    out.canvas.sum().backward()
    assert x.grad is None
    assert all(p.grad is not None for p in core.parameters())


def test_partial_losses_match_reference():
    """Losses that use only some outputs (the others' gradients are None in the backward)."""
    core = make_module(**ODD, C=10, K=4, encoder_input="canvas")
    params = core.loop_params()
    pd = double_params(params)
    x, y, eps = make_inputs(9, 4, ODD["D"], 10, ODD["Z"])
    for pick in ("canvas", "mu", "logvar"):
        out = ops.fused_forward(x, y, eps, params, "canvas", False)
        grads = torch.autograd.grad(getattr(out, pick).sum(), list(params))
        ref = avme_forward_reference(x.double(), y.double(), eps.double(), pd, "canvas", False)
        ref_grads = torch.autograd.grad(getattr(ref, pick).sum(), list(pd))
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) <= 1e-4


def test_noncontiguous_inputs_are_accepted_by_fused_forward():
    core = make_module(**ODD, C=0, K=3, encoder_input="canvas")
    x, _, eps = make_inputs(6, 3, ODD["D"], 0, ODD["Z"])
    x_nc = x.t().contiguous().t()
    eps_nc = eps.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_nc.is_contiguous() and not eps_nc.is_contiguous()
    a = ops.fused_forward(x_nc, None, eps_nc, core.loop_params())
    b = ops.fused_forward(x, None, eps, core.loop_params())
    assert torch.equal(a.canvas, b.canvas) and torch.equal(a.mu, b.mu)


# ---------------------------------------------------------------------------------------
# Batch size 0, sampler
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [0, 10])
def test_batch_zero(C):
    core = make_module(**ODD, C=C, K=3, encoder_input="error")
    x, y, eps = make_inputs(0, 3, ODD["D"], C, ODD["Z"])
    x.requires_grad_(True)
    out = core(x, y, eps, return_canvases=True)
    assert out.canvas.shape == (0, ODD["D"]) and out.mu.shape == (3, 0, ODD["Z"])
    assert out.canvases.shape == (3, 0, ODD["D"])
    (out.canvas.sum() + out.mu.sum() + out.canvases.sum()).backward()
    assert x.grad.shape == (0, ODD["D"])
    for p in core.parameters():
        assert p.grad is not None and not p.grad.any()
    s = core.sample(eps, y, return_canvases=True)
    assert s.canvas.shape == (0, ODD["D"]) and s.canvases.shape == (3, 0, ODD["D"])


@pytest.mark.parametrize("sizes", [ODD, PAPER], ids=["odd", "paper"])
@pytest.mark.parametrize("C", [0, 10])
@pytest.mark.parametrize("B, K", [(1, 1), (7, 12), (4097, 12), (33, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampler(sizes, C, B, K, dtype):
    core = make_module(**sizes, C=C, K=K, encoder_input="canvas", dtype=dtype)
    params = core.loop_params()
    _, y, z = make_inputs(B, K, sizes["D"], C, sizes["Z"], dtype=dtype)
    poison_cuda_memory()
    with torch.no_grad():
        got = ops.fused_sample(z, y, params, return_canvases=True)
        got_last = ops.fused_sample(z, y, params, return_canvases=False)
        ref = avme_sample_reference(
            z.double(), None if y is None else y.double(), double_params(params), True
        )
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_err(got.canvas, ref.canvas) <= tol
    assert rel_err(got.canvases, ref.canvases) <= tol
    assert got_last.canvases is None and torch.equal(got_last.canvas, got.canvas)


def test_sampler_backward_raises():
    core = make_module(**ODD, C=0, K=2, encoder_input="canvas")
    s = core.sample(batch_size=3)
    with pytest.raises(RuntimeError, match="not implemented"):
        s.canvas.sum().backward()


def test_no_grad_forward_matches_and_saves_nothing():
    core = make_module(**ODD, C=10, K=5, encoder_input="error")
    x, y, eps = make_inputs(50, 5, ODD["D"], 10, ODD["Z"])
    with torch.no_grad():
        a = core(x, y, eps, return_canvases=True)
        raw = torch.ops.avme.forward(
            x, y, eps, *_weights(core.loop_params()), "error", False, False, "fp32"
        )
    b = core(x, y, eps, return_canvases=True)
    assert torch.equal(a.canvas, b.canvas) and torch.equal(a.canvases, b.canvases)
    assert all(t.shape[0] == 0 for t in raw[3:])


def _weights(p: AVMEParams):
    return (
        p.enc_w_ih, p.enc_w_hh, p.enc_b_ih + p.enc_b_hh, p.q_w, p.q_b,
        p.dec_w_ih, p.dec_w_hh, p.dec_b_ih + p.dec_b_hh, p.write_w, p.write_b,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# opcheck, torch.compile, CUDA graphs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [0, 3])
def test_opcheck(C):
    core = make_module(**ODD, C=C, K=3, encoder_input="error")
    p = core.loop_params()
    x, y, eps = make_inputs(5, 3, ODD["D"], C, ODD["Z"])
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.avme.forward.default, (x, y, eps, *_weights(p), "error", True, True, "fp32"))
    pd = AVMEParams(*[t.detach() for t in p])
    torch.library.opcheck(
        torch.ops.avme.forward.default, (x.detach(), y, eps, *_weights(pd), "canvas", False, False, "fp32")
    )
    torch.library.opcheck(
        torch.ops.avme.sample.default,
        (eps, y, pd.dec_w_ih, pd.dec_w_hh, pd.dec_b_ih + pd.dec_b_hh, pd.write_w, pd.write_b, True, "fp32"),
    )


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    core = make_module(**ODD, C=10, K=6, encoder_input="error")
    x, y, eps = make_inputs(33, 6, ODD["D"], 10, ODD["Z"])

    def loss_fn(x, y, eps):
        out = core(x, y, eps, return_canvases=True)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(out.canvas, x, reduction="sum")
        kl = 0.5 * (out.mu.square() + out.logvar.exp() - 1 - out.logvar).sum()
        return bce + kl + out.canvases.square().mean()

    eager = loss_fn(x, y, eps)
    eager_grads = torch.autograd.grad(eager, list(core.parameters()))
    compiled = torch.compile(loss_fn, fullgraph=True)
    got = compiled(x, y, eps)
    got_grads = torch.autograd.grad(got, list(core.parameters()))
    assert rel_err(got, eager) <= 1e-5
    for g, e in zip(got_grads, eager_grads):
        assert rel_err(g, e) <= 1e-5


def test_cuda_graph_capture_replay_equals_eager():
    core = make_module(**ODD, C=10, K=5, encoder_input="error")
    params = list(core.parameters())
    x, y, eps = make_inputs(17, 5, ODD["D"], 10, ODD["Z"])
    static_x, static_eps = x.clone(), eps.clone()

    def step():
        out = core(static_x, y, static_eps, return_canvases=True)
        loss = out.canvas.square().sum() + out.mu.sum() + out.logvar.square().sum() + out.canvases.sum()
        return (loss, out.canvas, *torch.autograd.grad(loss, params))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    x2, _, eps2 = make_inputs(17, 5, ODD["D"], 10, ODD["Z"], seed=7)
    static_x.copy_(x2)
    static_eps.copy_(eps2)
    graph.replay()
    torch.cuda.synchronize()
    static_x_copy, static_eps_copy = static_x.clone(), static_eps.clone()
    eager = step()
    assert torch.equal(static_x, static_x_copy) and torch.equal(static_eps, static_eps_copy)
    for g, e in zip(static_out, eager):
        assert torch.allclose(g, e, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Training: fused and reference from the same weights
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
def test_adam_training_matches_reference(encoder_input):
    K, C = 6, 10
    fused = make_module(**ODD, C=C, K=K, encoder_input=encoder_input, impl="cuda")
    ref = make_module(**ODD, C=C, K=K, encoder_input=encoder_input, impl="ref")
    ref.load_state_dict(fused.state_dict())
    opt_f = torch.optim.Adam(fused.parameters(), lr=1e-3)
    opt_r = torch.optim.Adam(ref.parameters(), lr=1e-3)
    losses_f, losses_r = [], []
    for step in range(10):
        x, y, eps = make_inputs(64, K, ODD["D"], C, ODD["Z"], seed=100 + step)
        for core, opt, losses in ((fused, opt_f, losses_f), (ref, opt_r, losses_r)):
            out = core(x, y, eps)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(out.canvas, x, reduction="sum")
            kl = 0.5 * (out.mu.square() + out.logvar.exp() - 1 - out.logvar).sum()
            loss = (bce + kl) / x.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    for a, b in zip(losses_f, losses_r):
        assert abs(a - b) <= 1e-4 * abs(b), (losses_f, losses_r)


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------
def _raw_args():
    core = make_module(**ODD, C=10, K=3, encoder_input="canvas")
    x, y, eps = make_inputs(4, 3, ODD["D"], 10, ODD["Z"])
    return [x, y, eps, *_weights(core.loop_params())]


TAIL = ("canvas", False, False, "fp32")


def test_cpu_tensor_to_cuda_op():
    args = _raw_args()
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        torch.ops.avme.forward(args[0].cpu(), *args[1:], *TAIL)
    with pytest.raises(RuntimeError, match="eps must be a CUDA tensor"):
        torch.ops.avme.forward(*args[:2], args[2].cpu(), *args[3:], *TAIL)
    cpu_params = AVMEParams(*[t.detach().cpu() for t in make_module(**ODD, C=10, K=3, encoder_input="canvas").loop_params()])
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.fused_forward(args[0].cpu(), args[1].cpu(), args[2].cpu(), cpu_params)


def test_wrong_dtype():
    args = _raw_args()
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.avme.forward(args[0].half(), *args[1:], *TAIL)
    with pytest.raises(RuntimeError, match="eps has dtype"):
        torch.ops.avme.forward(*args[:2], args[2].double(), *args[3:], *TAIL)


def test_noncontiguous_raw_op():
    args = _raw_args()
    x_nc = args[0].t().contiguous().t()
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.avme.forward(x_nc, *args[1:], *TAIL)


def test_wrong_shapes_and_options():
    args = _raw_args()
    with pytest.raises(RuntimeError, match="y .* is required"):
        torch.ops.avme.forward(args[0], None, *args[2:], *TAIL)
    with pytest.raises(RuntimeError, match="eps must have shape"):
        torch.ops.avme.forward(*args[:2], args[2][:, :2], *args[3:], *TAIL)
    with pytest.raises(RuntimeError, match="precision"):
        torch.ops.avme.forward(*args, "canvas", False, False, "fp16")


def test_shared_memory_limit_is_a_clear_error():
    D = 200_000  # one row's canvas alone exceeds any GPU's shared memory per block
    core = make_module(D=D, He=4, Hd=4, Z=2, C=0, K=1, encoder_input="canvas")
    x, _, eps = make_inputs(1, 1, D, 0, 2)
    with pytest.raises(RuntimeError, match="bytes of shared memory"):
        core(x, eps=eps)


# ---------------------------------------------------------------------------------------
# Large batch: offsets beyond 2^31 elements (opt-in: ~12 GB)
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("AVME_SLOW_TESTS", "") != "1", reason="set AVME_SLOW_TESTS=1")
def test_huge_batch_int64_offsets():
    K, B = 12, 230_000  # K*B*D = 2.16e9 > 2^31 elements in the canvases output
    core = make_module(**PAPER, C=0, K=K, encoder_input="error")
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.rand(B, PAPER["D"], generator=gen, device=DEVICE) < 0.3).float()
    eps = torch.randn(K, B, PAPER["Z"], generator=gen, device=DEVICE)
    with torch.no_grad():
        out = core(x, eps=eps, return_canvases=True)
        rows = torch.tensor([0, 1, B // 2, B - 2, B - 1], device=DEVICE)
        ref = avme_forward_reference(
            x[rows].double(), None, eps[:, rows].double(), double_params(core.loop_params()), "error", True
        )
    assert rel_err(out.canvas[rows], ref.canvas) <= 1e-4
    assert rel_err(out.canvases[:, rows], ref.canvases) <= 1e-4
    assert rel_err(out.mu[:, rows], ref.mu) <= 1e-4
