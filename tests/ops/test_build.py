"""The ops' registrations: schemas, fake (meta) kernels, tracing, opcheck, torch.compile.

The tests on the built extension (``avme_ext._C``) need no GPU: they use fake and meta
tensors. They skip when the extension is not built, unless ``AVME_EXPECT_EXTENSION=1`` (then
a missing extension FAILS). The opcheck / compile tests run on every backend.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from avme_ext import ops
from avme_ext.loop_types import AVMEParams

from . import backends
from .helpers import (
    ODD,
    TINY,
    Sizes,
    assert_within,
    forward_args,
    make_inputs,
    make_params,
    sample_args,
)

FORWARD_SCHEMA = (
    "avme::forward(Tensor x, Tensor? y, Tensor eps, Tensor enc_w_ih, Tensor enc_w_hh, "
    "Tensor enc_b, Tensor q_w, Tensor q_b, Tensor dec_w_ih, Tensor dec_w_hh, Tensor dec_b, "
    "Tensor write_w, Tensor write_b, str encoder_input, bool return_canvases, "
    "bool save_for_backward, str precision, str design) -> (Tensor canvas, Tensor mu, Tensor logvar, "
    "Tensor canvases, Tensor h_enc, Tensor c_enc, Tensor gates_enc, Tensor z, Tensor h_dec, "
    "Tensor c_dec, Tensor gates_dec)"
)
BACKWARD_SCHEMA = (
    "avme::backward(Tensor? grad_canvas, Tensor? grad_mu, Tensor? grad_logvar, "
    "Tensor? grad_canvases, Tensor x, Tensor? y, Tensor eps, Tensor logvar, Tensor canvases, "
    "Tensor h_enc, Tensor c_enc, Tensor gates_enc, Tensor z, Tensor h_dec, Tensor c_dec, "
    "Tensor gates_dec, Tensor enc_w_ih, Tensor enc_w_hh, Tensor q_w, Tensor dec_w_ih, "
    "Tensor dec_w_hh, Tensor write_w, str encoder_input, bool need_grad_x, bool need_grad_y, "
    "bool need_grad_eps, str precision, str design) -> (Tensor grad_x, Tensor grad_y, Tensor grad_eps, "
    "Tensor grad_enc_w_ih, Tensor grad_enc_w_hh, Tensor grad_enc_b, Tensor grad_q_w, "
    "Tensor grad_q_b, Tensor grad_dec_w_ih, Tensor grad_dec_w_hh, Tensor grad_dec_b, "
    "Tensor grad_write_w, Tensor grad_write_b)"
)
SAMPLE_SCHEMA = (
    "avme::sample(Tensor z, Tensor? y, Tensor dec_w_ih, Tensor dec_w_hh, Tensor dec_b, "
    "Tensor write_w, Tensor write_b, bool return_canvases, str precision, str design) -> "
    "(Tensor canvas, Tensor canvases)"
)
SIZES = Sizes(D=12, He=9, Hd=7, Z=3)


@pytest.fixture
def ext():
    try:
        backends.require_extension()
    except backends.MissingExtensionError as exc:
        pytest.fail(str(exc))
    except backends.UnavailableError as exc:
        pytest.skip(str(exc))


def convert(tensors, mode: FakeTensorMode | None):
    """Real CPU tensors -> fake tensors of ``mode``, or meta tensors (mode=None)."""

    def one(t):
        if t is None:
            return None
        if mode is None:
            return t.detach().to("meta").requires_grad_(t.requires_grad)
        return mode.from_tensor(t)

    if isinstance(tensors, AVMEParams):
        return AVMEParams(*[one(t) for t in tensors])
    return tuple(one(t) for t in tensors)


# ---------------------------------------------------------------------------------------
# The built extension
# ---------------------------------------------------------------------------------------
def test_extension_loaded_when_expected():
    if backends.EXPECT_EXTENSION:
        assert ops.extension_loaded(), f"avme_ext._C not loaded: {ops.extension_error()}"
    elif not ops.extension_loaded():
        pytest.skip("the avme CUDA extension is not built")


def test_schemas(ext):
    assert str(torch.ops.avme.forward.default._schema) == FORWARD_SCHEMA
    assert str(torch.ops.avme.backward.default._schema) == BACKWARD_SCHEMA
    assert str(torch.ops.avme.sample.default._schema) == SAMPLE_SCHEMA


def test_is_available_matches_cuda(ext):
    assert ops.is_available() == torch.cuda.is_available()


def _expected_forward_shapes(B, K, return_canvases, save):
    D, He, Hd, Z = SIZES.D, SIZES.He, SIZES.Hd, SIZES.Z
    S = K if save else 0
    KC = K if (return_canvases or save) else 0
    return [
        (B, D), (K, B, Z), (K, B, Z), (KC, B, D),
        (S, B, He), (S, B, He), (S, B, 4 * He), (S, B, Z), (S, B, Hd), (S, B, Hd), (S, B, 4 * Hd),
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["fake", "meta"])
@pytest.mark.parametrize("C", [0, 3])
@pytest.mark.parametrize("return_canvases", [False, True])
@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("B", [0, 5])
def test_forward_fake_shapes(ext, mode, C, return_canvases, save, B):
    K = 4
    dtype = torch.float64 if C else torch.float32
    p = make_params(SIZES, C, dtype=dtype, grad=False)
    x, y, eps = make_inputs(B, K, SIZES, C, dtype=dtype)
    fake = FakeTensorMode() if mode == "fake" else None
    p, (x, y, eps) = convert(p, fake), convert((x, y, eps), fake)
    with fake if fake is not None else torch.device("meta"):
        out = torch.ops.avme.forward(*forward_args(x, y, eps, p), "error", return_canvases, save, "fp32", "auto")
        assert [tuple(t.shape) for t in out] == _expected_forward_shapes(B, K, return_canvases, save)
        assert all(t.dtype == dtype for t in out)
        if mode == "meta":
            assert all(t.device.type == "meta" for t in out)


@pytest.mark.parametrize("C", [0, 3])
@pytest.mark.parametrize("return_canvases", [False, True])
@pytest.mark.parametrize("B", [0, 6])
def test_fused_forward_and_sample_fake(ext, C, return_canvases, B):
    K, D, Z = 5, SIZES.D, SIZES.Z
    fake = FakeTensorMode()
    p = convert(make_params(SIZES, C, grad=False), fake)
    x, y, eps = convert(make_inputs(B, K, SIZES, C), fake)
    with fake:
        out = ops.fused_forward(x, y, eps, p, "canvas", return_canvases, "tf32")
        assert tuple(out.canvas.shape) == (B, D)
        assert tuple(out.mu.shape) == tuple(out.logvar.shape) == (K, B, Z)
        assert (out.canvases is not None) == return_canvases
        if out.canvases is not None:
            assert tuple(out.canvases.shape) == (K, B, D)
        s = ops.fused_sample(eps, y, p, return_canvases, "bf16")
        assert tuple(s.canvas.shape) == (B, D)
        assert (s.canvases is not None) == return_canvases
        if s.canvases is not None:
            assert tuple(s.canvases.shape) == (K, B, D)


@pytest.mark.parametrize("C", [0, 2])
@pytest.mark.parametrize("need", [(False, False, False), (True, True, True), (False, True, False)])
@pytest.mark.parametrize("B", [0, 4])
def test_backward_fake_shapes(ext, C, need, B):
    K, D, He, Hd, Z = 3, SIZES.D, SIZES.He, SIZES.Hd, SIZES.Z
    need_x, need_y, need_eps = need[0], need[1] and C > 0, need[2]
    fake = FakeTensorMode()
    p = convert(make_params(SIZES, C, grad=False), fake)
    x, y, eps = convert(make_inputs(B, K, SIZES, C), fake)
    with fake:
        fwd = torch.ops.avme.forward(*forward_args(x, y, eps, p), "canvas", False, True, "fp32", "auto")
        canvas, _mu, logvar, canvases, *state = fwd
        grads = torch.ops.avme.backward(
            torch.empty_like(canvas), None, torch.empty_like(logvar), None,
            x, y, eps, logvar, canvases, *state,
            p.enc_w_ih, p.enc_w_hh, p.q_w, p.dec_w_ih, p.dec_w_hh, p.write_w,
            "canvas", need_x, need_y, need_eps, "fp32", "auto",
        )  # fmt: skip
    expected = [
        (B if need_x else 0, D), (B if need_y else 0, C), (K if need_eps else 0, B, Z),
        (4 * He, 2 * D + Hd + C), (4 * He, He), (4 * He,),
        (2 * Z, He), (2 * Z,), (4 * Hd, Z + C), (4 * Hd, Hd), (4 * Hd,), (D, Hd), (D,),
    ]  # fmt: skip
    assert [tuple(g.shape) for g in grads] == expected


@pytest.mark.parametrize("C", [0, 3])
def test_autograd_under_fake_mode(ext, C):
    """loss.backward() through the op with fake tensors: the fake backward gives every grad."""
    B, K = 4, 3
    fake = FakeTensorMode()
    p = convert(make_params(SIZES, C), fake)
    x, y, eps = make_inputs(B, K, SIZES, C)
    x.requires_grad_(True)
    eps.requires_grad_(True)
    if y is not None:
        y.requires_grad_(True)
    x, y, eps = convert((x, y, eps), fake)
    with fake:
        out = ops.fused_forward(x, y, eps, p, "error", True, "fp32")
        assert out.canvases is not None
        loss = out.canvas.sum() + out.mu.square().sum() + out.canvases.mean()
        loss.backward()
        for t in (x, eps, *p, *([] if y is None else [y])):
            assert t.grad is not None
            assert t.grad.shape == t.shape


def _loss_fn(x, y, eps, *weights):
    p = AVMEParams(*weights)
    out = ops.fused_forward(x, y, eps, p, "error", True, "fp32")
    assert out.canvases is not None
    return out.canvas.sum() + (out.mu * out.logvar).sum() + out.canvases.square().mean()


def test_make_fx_fake_traces_forward_and_backward(ext):
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, y, eps, *weights):
        loss = _loss_fn(x, y, eps, *weights)
        return (loss, *torch.autograd.grad(loss, [x, y, eps, *weights]))

    p = make_params(SIZES, 2)
    x, y, eps = make_inputs(3, 4, SIZES, 2)
    assert y is not None
    for t in (x, y, eps):
        t.requires_grad_(True)
    gm = make_fx(step, tracing_mode="fake")(x, y, eps, *p)
    assert "avme.forward" in gm.code
    assert "avme.backward" in gm.code


@pytest.mark.parametrize("C", [0, 2])
def test_torch_compile_fullgraph_on_meta(ext, C):
    """torch.compile(fullgraph=True) traces forward + backward without graph breaks."""
    torch._dynamo.reset()
    compiled = torch.compile(_loss_fn, fullgraph=True, backend="aot_eager")
    p = convert(make_params(SIZES, C), None)
    x, y, eps = make_inputs(3, 4, SIZES, C)
    x, y, eps = convert((x.requires_grad_(True), y, eps.requires_grad_(True)), None)
    loss = compiled(x, y, eps, *p)
    loss.backward()
    assert loss.device.type == "meta"
    for t in (x, eps, *p):
        assert t.grad is not None
        assert t.grad.shape == t.shape


def test_cpu_tensors_give_clear_error(ext):
    """The real ops on CPU tensors: a clear error instead of the dispatcher's generic one."""
    p = make_params(SIZES, 0, grad=False)
    x, y, eps = make_inputs(2, 2, SIZES, 0)
    with pytest.raises(RuntimeError, match="avme::forward: x must be a CUDA tensor"):
        ops.fused_forward(x, y, eps, p)
    with pytest.raises(RuntimeError, match="avme::sample: z must be a CUDA tensor"):
        ops.fused_sample(eps, y, p)


def test_bad_options_in_python(ext):
    p = make_params(SIZES, 0, grad=False)
    x, y, eps = make_inputs(2, 2, SIZES, 0)
    with pytest.raises(ValueError, match="encoder_input"):
        ops.fused_forward(x, y, eps, p, encoder_input="nope")
    with pytest.raises(ValueError, match="precision"):
        ops.fused_forward(x, y, eps, p, precision="fp16")


# ---------------------------------------------------------------------------------------
# Every backend
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_opcheck(backend, C):
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    sizes = TINY if not backend.is_cuda else ODD
    p = make_params(sizes, C, dtype=torch.float64, device=backend.device)
    x, y, eps = make_inputs(3, 2, sizes, C, dtype=torch.float64, device=backend.device)
    x.requires_grad_(True)
    eps.requires_grad_(True)
    # save_for_backward=True is what fused_forward passes when anything requires grad ...
    torch.library.opcheck(
        backend.ns.forward.default, (*forward_args(x, y, eps, p), "error", True, True, "fp32", "auto")
    )
    # ... and False otherwise (then the op is not differentiable: nothing was saved)
    pd = AVMEParams(*[t.detach() for t in p])
    xd, ed = x.detach(), eps.detach()
    torch.library.opcheck(
        backend.ns.forward.default, (*forward_args(xd, y, ed, pd), "canvas", False, False, "fp32", "auto")
    )
    torch.library.opcheck(backend.ns.sample.default, (*sample_args(ed, y, pd), True, "fp32", "auto"))
    # the backward, on the state a saving forward returned (not differentiable itself)
    canvas, mu, logvar, canvases, *state = backend.ns.forward(
        *forward_args(xd, y, ed, pd), "error", False, True, "fp32", "auto"
    )
    torch.library.opcheck(
        backend.ns.backward.default,
        (
            torch.ones_like(canvas), torch.ones_like(mu), None, None, xd, y, ed, logvar, canvases, *state,
            pd.enc_w_ih, pd.enc_w_hh, pd.q_w, pd.dec_w_ih, pd.dec_w_hh, pd.write_w,
            "error", True, C > 0, True, "fp32", "auto",
        ),
    )  # fmt: skip


def test_torch_compile_fullgraph_matches_eager(backend):
    """torch.compile(fullgraph=True, backend="aot_eager") on real tensors of the backend."""
    torch._dynamo.reset()
    B, K, C = 3, 3, 2
    sizes = Sizes(8, 5, 4, 2)
    p = make_params(sizes, C, dtype=torch.float64, device=backend.device)
    x, y, eps = make_inputs(B, K, sizes, C, dtype=torch.float64, device=backend.device)
    eps.requires_grad_(True)

    def loss_fn(x, y, eps, *weights):
        out = backend.forward(x, y, eps, AVMEParams(*weights), "canvas", True)
        return out.canvas.sum() + (out.mu * out.logvar).sum() + out.canvases.square().mean()

    inputs = [eps, *p]
    eager = loss_fn(x, y, eps, *p)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(x, y, eps, *p)
    got_grads = torch.autograd.grad(got, inputs)
    names = ["loss", "grad_eps", *AVMEParams._fields]
    # The same kernels run on both sides; only the float64 loss arithmetic around them may be
    # reordered by the compiled graph: a few float64 ulps.
    assert_within(
        dict(zip(names, [got, *got_grads], strict=True)), dict(zip(names, [eager, *eager_grads], strict=True)), 1e-12
    )
