"""CPU tests of the fused ops (no GPU needed).

Two parts:

1. The built extension (``avme_ext._C``): op registration, schemas, fake/meta kernels (forward,
   backward, sampler), tracing with fake tensors (make_fx, torch.compile(fullgraph=True) on
   meta tensors), and the clear error for CPU tensors. Skipped when the extension is not
   built, unless ``AVME_EXPECT_EXTENSION=1`` (then a missing extension FAILS).

2. The kernels' logic under the CPU emulator: csrc/avme_ops.cpp and csrc/avme_kernels.cu
   compiled as C++ (csrc/emulation/), each CUDA thread an OS thread, registered as
   ``torch.ops.avme_emu.*`` on CPU tensors. Its outputs and gradients are compared with the
   float64 reference, and opcheck / torch.compile run on it. This needs only a C++ compiler
   (about a minute to build); set ``AVME_EMULATION=0`` to skip it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from avme_ext import ops
from avme_ext.loop_types import AVMEParams
from avme_ext.reference import avme_forward_reference, avme_sample_reference

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
EXPECT_EXTENSION = os.environ.get("AVME_EXPECT_EXTENSION", "") == "1"

FORWARD_SCHEMA = (
    "avme::forward(Tensor x, Tensor? y, Tensor eps, Tensor enc_w_ih, Tensor enc_w_hh, "
    "Tensor enc_b, Tensor q_w, Tensor q_b, Tensor dec_w_ih, Tensor dec_w_hh, Tensor dec_b, "
    "Tensor write_w, Tensor write_b, str encoder_input, bool return_canvases, "
    "bool save_for_backward, str precision) -> (Tensor canvas, Tensor mu, Tensor logvar, "
    "Tensor canvases, Tensor h_enc, Tensor c_enc, Tensor gates_enc, Tensor z, Tensor h_dec, "
    "Tensor c_dec, Tensor gates_dec)"
)
BACKWARD_SCHEMA = (
    "avme::backward(Tensor? grad_canvas, Tensor? grad_mu, Tensor? grad_logvar, "
    "Tensor? grad_canvases, Tensor x, Tensor? y, Tensor eps, Tensor logvar, Tensor canvases, "
    "Tensor h_enc, Tensor c_enc, Tensor gates_enc, Tensor z, Tensor h_dec, Tensor c_dec, "
    "Tensor gates_dec, Tensor enc_w_ih, Tensor enc_w_hh, Tensor q_w, Tensor dec_w_ih, "
    "Tensor dec_w_hh, Tensor write_w, str encoder_input, bool need_grad_x, str precision) -> "
    "(Tensor grad_x, Tensor grad_enc_w_ih, Tensor grad_enc_w_hh, Tensor grad_enc_b, "
    "Tensor grad_q_w, Tensor grad_q_b, Tensor grad_dec_w_ih, Tensor grad_dec_w_hh, "
    "Tensor grad_dec_b, Tensor grad_write_w, Tensor grad_write_b)"
)
SAMPLE_SCHEMA = (
    "avme::sample(Tensor z, Tensor? y, Tensor dec_w_ih, Tensor dec_w_hh, Tensor dec_b, "
    "Tensor write_w, Tensor write_b, bool return_canvases, str precision) -> "
    "(Tensor canvas, Tensor canvases)"
)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def make_params(D, C, He, Hd, Z, *, dtype=torch.float32, device="cpu", seed=0, grad=True, scale=None):
    """Random AVMEParams: normal with std ``scale`` (default: 0.3 for small layers, about
    nn.LSTMCell's init scale 1/sqrt(H) for large ones)."""
    gen = torch.Generator().manual_seed(seed)
    if scale is None:
        scale = min(0.3, 1.0 / max(He, Hd) ** 0.5)

    def rnd(*shape):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype)
        return t.to(device).requires_grad_(grad)

    return AVMEParams(
        rnd(4 * He, 2 * D + Hd + C), rnd(4 * He, He), rnd(4 * He), rnd(4 * He),
        rnd(2 * Z, He), rnd(2 * Z),
        rnd(4 * Hd, Z + C), rnd(4 * Hd, Hd), rnd(4 * Hd), rnd(4 * Hd),
        rnd(D, Hd), rnd(D),
    )  # fmt: skip


def make_inputs(B, K, D, C, Z, *, dtype=torch.float32, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, D, generator=gen, dtype=torch.float64).round().to(dtype).to(device)
    y = None
    if C:
        labels = torch.randint(0, C, (B,), generator=gen)
        y = torch.nn.functional.one_hot(labels, C).to(dtype).to(device)
    eps = torch.randn(K, B, Z, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return x, y, eps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0.0:
        return num
    return num / den


def convert(tensors, mode):
    """Real CPU tensors -> fake tensors of FakeTensorMode ``mode``, or meta tensors (mode=None)."""

    def one(t):
        if t is None:
            return None
        if mode is None:
            return t.detach().to("meta").requires_grad_(t.requires_grad)
        return mode.from_tensor(t)

    if isinstance(tensors, AVMEParams):
        return AVMEParams(*[one(t) for t in tensors])
    return tuple(one(t) for t in tensors)


def _require_extension() -> None:
    if ops.extension_loaded():
        return
    if EXPECT_EXTENSION:
        pytest.fail(
            "AVME_EXPECT_EXTENSION=1 but the avme extension is not loaded: "
            f"{ops.extension_error() or 'ops not registered'}"
        )
    pytest.skip("the avme CUDA extension (avme_ext._C) is not built")


@pytest.fixture
def ext():
    _require_extension()


def _op_args(x, y, eps, p):
    return (
        x, y, eps, p.enc_w_ih, p.enc_w_hh, p.enc_b_ih + p.enc_b_hh, p.q_w, p.q_b,
        p.dec_w_ih, p.dec_w_hh, p.dec_b_ih + p.dec_b_hh, p.write_w, p.write_b,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# 1. The built extension
# ---------------------------------------------------------------------------------------
def test_extension_loaded_when_expected():
    if EXPECT_EXTENSION:
        assert ops.extension_loaded(), f"avme_ext._C not loaded: {ops.extension_error()}"
    elif not ops.extension_loaded():
        pytest.skip("the avme CUDA extension is not built")


def test_schemas(ext):
    assert str(torch.ops.avme.forward.default._schema) == FORWARD_SCHEMA
    assert str(torch.ops.avme.backward.default._schema) == BACKWARD_SCHEMA
    assert str(torch.ops.avme.sample.default._schema) == SAMPLE_SCHEMA


def test_is_available_matches_cuda(ext):
    assert ops.is_available() == torch.cuda.is_available()


SIZES = dict(D=12, He=9, Hd=7, Z=3)


def _expected_forward_shapes(B, K, C, return_canvases, save):
    D, He, Hd, Z = SIZES["D"], SIZES["He"], SIZES["Hd"], SIZES["Z"]
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
    p = make_params(**SIZES, C=C, dtype=dtype, grad=False)
    x, y, eps = make_inputs(B, K, SIZES["D"], C, SIZES["Z"], dtype=dtype)
    fake = FakeTensorMode() if mode == "fake" else None
    p, (x, y, eps) = convert(p, fake), convert((x, y, eps), fake)
    with fake if fake is not None else torch.device("meta"):
        out = torch.ops.avme.forward(*_op_args(x, y, eps, p), "error", return_canvases, save, "fp32")
        assert [tuple(t.shape) for t in out] == _expected_forward_shapes(B, K, C, return_canvases, save)
        assert all(t.dtype == dtype for t in out)
        if mode == "meta":
            assert all(t.device.type == "meta" for t in out)


@pytest.mark.parametrize("C", [0, 3])
@pytest.mark.parametrize("return_canvases", [False, True])
@pytest.mark.parametrize("B", [0, 6])
def test_fused_forward_and_sample_fake(ext, C, return_canvases, B):
    K, D, Z = 5, SIZES["D"], SIZES["Z"]
    fake = FakeTensorMode()
    p = convert(make_params(**SIZES, C=C, grad=False), fake)
    x, y, eps = convert(make_inputs(B, K, D, C, Z), fake)
    with fake:
        out = ops.fused_forward(x, y, eps, p, "canvas", return_canvases, "tf32")
        assert tuple(out.canvas.shape) == (B, D)
        assert tuple(out.mu.shape) == tuple(out.logvar.shape) == (K, B, Z)
        if return_canvases:
            assert tuple(out.canvases.shape) == (K, B, D)
        else:
            assert out.canvases is None
        s = ops.fused_sample(eps, y, p, return_canvases, "bf16")
        assert tuple(s.canvas.shape) == (B, D)
        assert (s.canvases is None) != return_canvases
        if return_canvases:
            assert tuple(s.canvases.shape) == (K, B, D)


@pytest.mark.parametrize("C", [0, 2])
@pytest.mark.parametrize("need_x", [False, True])
@pytest.mark.parametrize("B", [0, 4])
def test_backward_fake_shapes(ext, C, need_x, B):
    K, D, He, Hd, Z = 3, SIZES["D"], SIZES["He"], SIZES["Hd"], SIZES["Z"]
    fake = FakeTensorMode()
    p = convert(make_params(**SIZES, C=C, grad=False), fake)
    x, y, eps = convert(make_inputs(B, K, D, C, Z), fake)
    with fake:
        fwd = torch.ops.avme.forward(*_op_args(x, y, eps, p), "canvas", False, True, "fp32")
        canvas, mu, logvar, canvases, *state = fwd
        grads = torch.ops.avme.backward(
            torch.empty_like(canvas), None, torch.empty_like(logvar), None,
            x, y, eps, logvar, canvases, *state,
            p.enc_w_ih, p.enc_w_hh, p.q_w, p.dec_w_ih, p.dec_w_hh, p.write_w,
            "canvas", need_x, "fp32",
        )  # fmt: skip
        expected = [
            (B if need_x else 0, D), (4 * He, 2 * D + Hd + C), (4 * He, He), (4 * He,),
            (2 * Z, He), (2 * Z,), (4 * Hd, Z + C), (4 * Hd, Hd), (4 * Hd,), (D, Hd), (D,),
        ]  # fmt: skip
        assert [tuple(g.shape) for g in grads] == expected


@pytest.mark.parametrize("C", [0, 3])
def test_autograd_under_fake_mode(ext, C):
    """loss.backward() through the op with fake tensors: the fake backward gives every grad."""
    B, K = 4, 3
    fake = FakeTensorMode()
    p = convert(make_params(**SIZES, C=C), fake)
    x, y, eps = make_inputs(B, K, SIZES["D"], C, SIZES["Z"])
    x, y, eps = convert((x.requires_grad_(True), y, eps), fake)
    with fake:
        out = ops.fused_forward(x, y, eps, p, "error", True, "fp32")
        loss = out.canvas.sum() + out.mu.square().sum() + out.canvases.mean()
        loss.backward()
        for t in (x, *p):
            assert t.grad is not None and t.grad.shape == t.shape


def _loss_fn(x, y, eps, *weights):
    p = AVMEParams(*weights)
    out = ops.fused_forward(x, y, eps, p, "error", True, "fp32")
    return out.canvas.sum() + (out.mu * out.logvar).sum() + out.canvases.square().mean()


def test_make_fx_fake_traces_forward_and_backward(ext):
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, y, eps, *weights):
        loss = _loss_fn(x, y, eps, *weights)
        return (loss, *torch.autograd.grad(loss, [x, *weights]))

    p = make_params(**SIZES, C=2)
    x, y, eps = make_inputs(3, 4, SIZES["D"], 2, SIZES["Z"])
    x.requires_grad_(True)
    gm = make_fx(step, tracing_mode="fake")(x, y, eps, *p)
    code = gm.code
    assert "avme.forward" in code and "avme.backward" in code


@pytest.mark.parametrize("C", [0, 2])
def test_torch_compile_fullgraph_on_meta(ext, C):
    """torch.compile(fullgraph=True) traces forward + backward without graph breaks."""
    torch._dynamo.reset()
    compiled = torch.compile(_loss_fn, fullgraph=True, backend="aot_eager")
    p = convert(make_params(**SIZES, C=C), None)
    x, y, eps = make_inputs(3, 4, SIZES["D"], C, SIZES["Z"])
    x, y, eps = convert((x.requires_grad_(True), y, eps), None)
    loss = compiled(x, y, eps, *p)
    loss.backward()
    assert loss.device.type == "meta"
    for t in (x, *p):
        assert t.grad is not None and t.grad.shape == t.shape


def test_cpu_tensors_give_clear_error(ext):
    p = make_params(**SIZES, C=0, grad=False)
    x, y, eps = make_inputs(2, 2, SIZES["D"], 0, SIZES["Z"])
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.fused_forward(x, y, eps, p)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.fused_sample(eps, y, p)


def test_bad_options(ext):
    p = make_params(**SIZES, C=0, grad=False)
    x, y, eps = make_inputs(2, 2, SIZES["D"], 0, SIZES["Z"])
    with pytest.raises(ValueError, match="encoder_input"):
        ops.fused_forward(x, y, eps, p, encoder_input="nope")
    with pytest.raises(ValueError, match="precision"):
        ops.fused_forward(x, y, eps, p, precision="fp16")


# ---------------------------------------------------------------------------------------
# 2. The kernels under the CPU emulator (torch.ops.avme_emu)
# ---------------------------------------------------------------------------------------
_EMU_STATE: dict = {}


def _emulator():
    if "ns" in _EMU_STATE:
        return _EMU_STATE["ns"]
    if "error" in _EMU_STATE:
        pytest.skip(_EMU_STATE["error"])
    if os.environ.get("AVME_EMULATION", "1") == "0":
        _EMU_STATE["error"] = "AVME_EMULATION=0"
        pytest.skip(_EMU_STATE["error"])
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        _EMU_STATE["error"] = "the CPU emulator needs a C++ compiler and ninja"
        pytest.skip(_EMU_STATE["error"])
    from torch.utils import cpp_extension

    # The JIT cache keys on the listed source and the flags: hash the included files into a
    # flag so that edits to csrc/ rebuild the emulator.
    digest = hashlib.sha1()
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in {".h", ".cuh", ".cu", ".cpp"}:
            digest.update(path.read_bytes())
    cpp_extension.load(
        name="avme_emulation",
        sources=[str(CSRC / "emulation" / "avme_emulation.cpp")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O2", "-pthread", f"-DAVME_EMU_SOURCES_{digest.hexdigest()[:16]}"],
        extra_ldflags=["-pthread"],
        is_python_module=False,
        verbose=False,
    )
    ops._register("avme_emu")
    _EMU_STATE["ns"] = torch.ops.avme_emu
    return _EMU_STATE["ns"]


@pytest.fixture
def emu():
    return _emulator()


@pytest.fixture
def emu_sms(monkeypatch):
    """Set the emulated SM count (steers rows per block: B / SMs rounded up to 1, 2, 4, 8)."""

    def set_sms(n: int) -> None:
        monkeypatch.setenv("AVME_EMU_SMS", str(n))

    return set_sms


def _run_both(ns, B, K, D, C, He, Hd, Z, encoder_input, dtype, need_x=True, seed=0):
    """Outputs, loss and gradients of the emulated op and the float64 reference."""
    p_emu = make_params(D, C, He, Hd, Z, dtype=dtype, seed=seed)
    p_ref = AVMEParams(*[t.detach().double().requires_grad_() for t in p_emu])
    x, y, eps = make_inputs(B, K, D, C, Z, dtype=dtype, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    weights = [
        torch.randn(B, D, generator=gen, dtype=torch.float64),
        torch.randn(K, B, Z, generator=gen, dtype=torch.float64),
        torch.randn(K, B, Z, generator=gen, dtype=torch.float64),
        torch.randn(K, B, D, generator=gen, dtype=torch.float64),
    ]
    results = []
    for impl, params, cast in (("emu", p_emu, dtype), ("ref", p_ref, torch.float64)):
        xi = x.to(cast).requires_grad_(need_x)
        yi = None if y is None else y.to(cast)
        ei = eps.to(cast)
        if impl == "emu":
            out = ops._forward_with(ns, xi, yi, ei, params, encoder_input, True, "fp32")
        else:
            out = avme_forward_reference(xi, yi, ei, params, encoder_input, True)
        # the loss in float64 on both sides: only the op's own rounding is compared
        w = weights
        loss = (
            (out.canvas.double() * w[0]).sum() + (out.mu.double() * w[1]).sum()
            + (out.logvar.double() * w[2]).sum() + (out.canvases.double() * w[3]).sum()
        )  # fmt: skip
        inputs = ([xi] if need_x else []) + list(params)
        grads = torch.autograd.grad(loss, inputs)
        results.append([out.canvas, out.mu, out.logvar, out.canvases, loss.detach(), *grads])
    return results


EMU_CASES = [
    # B, K, D, C, He, Hd, Z, encoder_input, SMs
    (1, 1, 10, 0, 6, 5, 2, "canvas", 4),
    (3, 4, 10, 3, 6, 5, 2, "error", 4),
    (7, 3, 9, 0, 7, 4, 3, "error", 1),      # 8 rows per block, one partial block
    (11, 2, 9, 2, 7, 4, 3, "canvas", 2),    # 8 rows per block: a full and a partial block
    (5, 2, 13, 2, 6, 9, 4, "canvas", 3),    # 2 rows per block, partial last block
    (6, 2, 300, 2, 270, 260, 3, "error", 2),  # every dimension > 256 threads (strided loops)
]


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: "B{}-K{}-D{}-C{}-He{}-Hd{}-Z{}-{}-sm{}".format(*c))
def test_emulated_forward_backward_fp64(emu, emu_sms, case):
    B, K, D, C, He, Hd, Z, encoder_input, sms = case
    emu_sms(sms)
    got, ref = _run_both(emu, B, K, D, C, He, Hd, Z, encoder_input, torch.float64)
    errors = [rel_err(a, b) for a, b in zip(got, ref)]
    assert max(errors) < 1e-10, errors


@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
def test_emulated_fp32_paper_sizes(emu, emu_sms, encoder_input):
    emu_sms(2)
    got, ref = _run_both(emu, 3, 2, 784, 10, 400, 400, 100, encoder_input, torch.float32)
    errors = [rel_err(a, b) for a, b in zip(got, ref)]
    assert max(errors) < 1e-4, errors


def test_emulated_without_x_grad_and_partial_loss(emu):
    B, K, D, C, He, Hd, Z = 4, 3, 8, 0, 5, 6, 2
    p = make_params(D, C, He, Hd, Z, dtype=torch.float64)
    x, y, eps = make_inputs(B, K, D, C, Z, dtype=torch.float64)
    # only mu is used: canvas, logvar and canvases get no gradient (None in the backward)
    out = ops._forward_with(emu, x, y, eps, p, "error", False, "fp32")
    grads = torch.autograd.grad(out.mu.sum(), list(p))
    ref = avme_forward_reference(x, y, eps, p, "error", False)
    ref_grads = torch.autograd.grad(ref.mu.sum(), list(p))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-10
    # the canvas only
    out = ops._forward_with(emu, x, y, eps, p, "canvas", False, "fp32")
    grads = torch.autograd.grad(out.canvas.sum(), list(p))
    ref = avme_forward_reference(x, y, eps, p, "canvas", False)
    ref_grads = torch.autograd.grad(ref.canvas.sum(), list(p))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-10


@pytest.mark.parametrize("precision, tol", [("tf32", 5e-3), ("bf16", 3e-2)])
def test_emulated_precision_options(emu, precision, tol):
    """The tensor-core options' code paths (on the CPU: bf16 rounding of the cuBLAS operands)."""
    B, K, D, C, He, Hd, Z = 5, 4, 40, 3, 24, 20, 4
    p = make_params(D, C, He, Hd, Z)
    pd = AVMEParams(*[t.detach().double().requires_grad_() for t in p])
    x, y, eps = make_inputs(B, K, D, C, Z)
    out = ops._forward_with(emu, x, y, eps, p, "error", True, precision)
    ref = avme_forward_reference(x.double(), y.double(), eps.double(), pd, "error", True)
    grads = torch.autograd.grad(out.canvas.sum() + out.mu.sum() + out.canvases.mean(), list(p))
    ref_grads = torch.autograd.grad(ref.canvas.sum() + ref.mu.sum() + ref.canvases.mean(), list(pd))
    for a, b in [(out.canvas, ref.canvas), (out.mu, ref.mu), *zip(grads, ref_grads)]:
        assert rel_err(a, b) <= tol


def test_emulated_no_grad_saves_nothing(emu):
    B, K, D, C, He, Hd, Z = 3, 2, 8, 2, 5, 6, 2
    p = make_params(D, C, He, Hd, Z, dtype=torch.float64)
    x, y, eps = make_inputs(B, K, D, C, Z, dtype=torch.float64)
    with torch.no_grad():
        out = emu.forward(*_op_args(x, y, eps, p), "canvas", False, False, "fp32")
        ref = avme_forward_reference(x, y, eps, p, "canvas", False)
    assert all(t.shape[0] == 0 for t in out[3:])
    assert rel_err(out[0], ref.canvas) < 1e-12
    assert rel_err(out[1], ref.mu) < 1e-12
    assert rel_err(out[2], ref.logvar) < 1e-12


@pytest.mark.parametrize("C", [0, 3])
@pytest.mark.parametrize("return_canvases", [False, True])
def test_emulated_sample(emu, emu_sms, C, return_canvases):
    emu_sms(1)
    B, K, D, He, Hd, Z = 9, 3, 11, 4, 6, 3
    p = make_params(D, C, He, Hd, Z, dtype=torch.float64, grad=False)
    _, y, z = make_inputs(B, K, D, C, Z, dtype=torch.float64)
    got = ops._sample_with(emu, z, y, p, return_canvases, "fp32")
    ref = avme_sample_reference(z, y, p, return_canvases)
    assert rel_err(got.canvas, ref.canvas) < 1e-12
    if return_canvases:
        assert rel_err(got.canvases, ref.canvases) < 1e-12
    else:
        assert got.canvases is None


def test_emulated_batch_zero(emu):
    D, C, He, Hd, Z, K = 8, 2, 5, 6, 2, 3
    p = make_params(D, C, He, Hd, Z, dtype=torch.float64)
    x, y, eps = make_inputs(0, K, D, C, Z, dtype=torch.float64)
    x.requires_grad_(True)
    out = ops._forward_with(emu, x, y, eps, p, "error", True, "fp32")
    assert out.canvas.shape == (0, D) and out.mu.shape == (K, 0, Z) and out.canvases.shape == (K, 0, D)
    (out.canvas.sum() + out.mu.sum()).backward()
    assert x.grad.shape == (0, D)
    for t in p:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()
    s = ops._sample_with(emu, eps, y, p, True, "fp32")
    assert s.canvas.shape == (0, D) and s.canvases.shape == (K, 0, D)


def test_emulated_tf32_option_restores_global_state(emu):
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    B, K, D, C, He, Hd, Z = 2, 2, 6, 0, 4, 3, 2
    p = make_params(D, C, He, Hd, Z)
    x, y, eps = make_inputs(B, K, D, C, Z)
    out = ops._forward_with(emu, x, y, eps, p, "canvas", False, "tf32")
    out.canvas.sum().backward()
    after = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    assert before == after


def test_emulated_opcheck(emu):
    B, K, D, C, He, Hd, Z = 3, 2, 6, 2, 4, 3, 2
    p = make_params(D, C, He, Hd, Z, dtype=torch.float64)
    x, y, eps = make_inputs(B, K, D, C, Z, dtype=torch.float64)
    x.requires_grad_(True)
    # save_for_backward=True is what fused_forward passes when anything requires grad ...
    torch.library.opcheck(emu.forward.default, (*_op_args(x, y, eps, p), "error", True, True, "fp32"))
    # ... and False otherwise (then the op is not differentiable: nothing was saved)
    pd = AVMEParams(*[t.detach() for t in p])
    torch.library.opcheck(
        emu.forward.default, (*_op_args(x.detach(), y, eps, pd), "canvas", False, False, "fp32")
    )
    torch.library.opcheck(
        emu.sample.default,
        (eps, y, pd.dec_w_ih, pd.dec_w_hh, pd.dec_b_ih + pd.dec_b_hh, pd.write_w, pd.write_b, True, "fp32"),
    )


def test_emulated_gradcheck(emu):
    B, K, D, C, He, Hd, Z = 2, 3, 3, 1, 2, 2, 1
    p = make_params(D, C, He, Hd, Z, dtype=torch.float64)
    x, y, eps = make_inputs(B, K, D, C, Z, dtype=torch.float64)
    x = torch.rand(B, D, dtype=torch.float64, requires_grad=True)

    def fn(x, *weights):
        out = ops._forward_with(emu, x, y, eps, AVMEParams(*weights), "error", True, "fp32")
        return out.canvas, out.mu, out.logvar, out.canvases

    assert torch.autograd.gradcheck(fn, (x, *p), fast_mode=True)


def test_emulated_torch_compile_fullgraph(emu):
    torch._dynamo.reset()
    B, K, D, C, He, Hd, Z = 3, 3, 8, 2, 5, 4, 2
    p = make_params(D, C, He, Hd, Z, dtype=torch.float64)
    x, y, eps = make_inputs(B, K, D, C, Z, dtype=torch.float64)

    def loss_fn(x, y, eps, *weights):
        out = ops._forward_with(emu, x, y, eps, AVMEParams(*weights), "canvas", True, "fp32")
        return out.canvas.sum() + (out.mu * out.logvar).sum() + out.canvases.square().mean()

    eager = loss_fn(x, y, eps, *p)
    eager_grads = torch.autograd.grad(eager, list(p))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(x, y, eps, *p)
    got_grads = torch.autograd.grad(got, list(p))
    assert rel_err(got, eager) < 1e-12
    for g, e in zip(got_grads, eager_grads):
        assert rel_err(g, e) < 1e-12


def test_emulated_bad_inputs(emu):
    B, K, D, C, He, Hd, Z = 2, 2, 6, 2, 4, 3, 2
    p = make_params(D, C, He, Hd, Z, grad=False)
    x, y, eps = make_inputs(B, K, D, C, Z)
    args = list(_op_args(x, y, eps, p))
    tail = ("canvas", False, False, "fp32")
    with pytest.raises(RuntimeError, match="eps has dtype"):
        emu.forward(*args[:2], eps.double(), *args[3:], *tail)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        emu.forward(x.half(), *args[1:], *tail)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        emu.forward(torch.rand(D, B).t(), *args[1:], *tail)
    with pytest.raises(RuntimeError, match=r"enc_w_hh must have shape"):
        emu.forward(*args[:4], torch.zeros(4 * He + 1, He), *args[5:], *tail)
    with pytest.raises(RuntimeError, match="y .* is required"):
        emu.forward(x, None, *args[2:], *tail)
    with pytest.raises(RuntimeError, match="encoder_input"):
        emu.forward(*args, "nope", False, False, "fp32")
    with pytest.raises(RuntimeError, match="precision"):
        emu.forward(*args, "canvas", False, False, "fp16")


def test_emulated_shared_memory_limit_error(emu, monkeypatch):
    monkeypatch.setenv("AVME_EMU_SMEM", "1024")
    p = make_params(64, 0, 32, 32, 8, grad=False)
    x, y, eps = make_inputs(2, 2, 64, 0, 8)
    with pytest.raises(RuntimeError, match="bytes of shared memory"):
        ops._forward_with(emu, x, y, eps, p, "canvas", False, "fp32")
