"""Fused CUDA ops of the K-step loop (``torch.ops.avme``), with autograd and fake kernels.

The compiled extension ``avme_ext._C`` (csrc/) registers three ops:

- ``avme::forward``: the training forward (all K steps in one kernel launch); returns the
  outputs and, when ``save_for_backward``, the per-step state the backward needs.
- ``avme::backward``: backward through time (one launch) plus the gradients of the weights
  and, on request (``need_grad_x``/``need_grad_y``/``need_grad_eps``), of ``x``, ``y`` and
  ``eps``, as large matmuls over all K*B rows.
- ``avme::sample``: the decoder-only sampler (one launch).

Each op checks every argument (device, dtype, shape, contiguity, options) before it touches
any data, and raises a RuntimeError naming the argument and what was expected.

This module registers their autograd formulas and their fake (meta) kernels, so the ops work
under ``torch.compile(fullgraph=True)``. Gradients flow to every parameter and to ``x``,
``y`` and ``eps``, as through the reference. Double backward (a second derivative through
``avme::backward``, e.g. ``create_graph=True`` then another ``grad``) raises a clear error,
as does backward through ``avme::sample``; use the reference for those.

Kernel designs (``design``, one of :data:`DESIGNS`; see csrc/README.md): ``"rowtile"`` (a
block per tile of batch rows, all K steps in one launch), ``"persistent"`` (weight-stationary
persistent kernels: each block keeps its slice of the weights on chip for all K steps, grid
barriers between stages; small batches), ``"stagewise"`` (one GEMM per stage with fused
pointwise kernels; large batches). ``"auto"`` lets the host choose: persistent when it fits
and B <= 256, stagewise otherwise. Every design computes the same function and is tested
against the reference; :func:`design` forces one. A forced design that cannot run a call's
sizes on its device (the persistent design where its weight slices do not fit in shared memory,
the rowtile design where one batch row's state does not) raises a RuntimeError saying why;
``"auto:<design>"`` (:func:`preferring`) asks for that design where it can run and for the
host's choice elsewhere. The stagewise design runs every size.

Precision policy (``precision``): ``"fp32"`` computes every product in fp32 (TF32 off, whatever
the global setting is); ``"tf32"`` runs the products on TF32 tensor cores and ``"bf16"`` on bf16
tensor cores (bf16 operands), both with fp32 accumulation, while the LSTM cell states, the
canvas and every pointwise operation stay in fp32. Which products that covers depends on the
design: the step-invariant input products and the weight-gradient matmuls always; the
per-step products in the stagewise design; the rowtile and persistent step kernels compute
in fp32 (or fp64). With float64 tensors the precision is ignored.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

import contextlib
from collections.abc import Iterator

from .loop_types import (
    DESIGNS,
    ENCODER_INPUTS,
    PRECISIONS,
    AVMEParams,
    ForwardOutput,
    SampleOutput,
)

__all__ = [
    "DESIGNS",
    "PRECISIONS",
    "design",
    "preferring",
    "requested_design",
    "is_available",
    "extension_loaded",
    "extension_error",
    "fused_forward",
    "fused_sample",
]

_IMPORT_ERROR: str | None = None
if importlib.util.find_spec(f"{__package__}._C") is None:  # a pure-Python install
    _C = None
    _IMPORT_ERROR = "avme_ext._C is not built (pure-Python install)"
else:
    try:  # importing the library runs its TORCH_LIBRARY registrations
        from . import _C  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as _exc:  # built, but not loadable (e.g. built against another torch)
        _C = None
        _IMPORT_ERROR = f"avme_ext._C failed to load: {type(_exc).__name__}: {_exc}"


def _ops_registered() -> bool:
    try:
        torch.ops.avme.forward  # noqa: B018
        torch.ops.avme.backward  # noqa: B018
        torch.ops.avme.sample  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


_LOADED = _C is not None and _ops_registered()


def extension_loaded() -> bool:
    """True when ``avme_ext._C`` is importable and the ``torch.ops.avme`` ops are registered.

    Needs no GPU: true on a CPU-only machine where the extension was built.
    """
    return _LOADED


def extension_error() -> str | None:
    """Why the extension could not be imported (None when it was)."""
    return _IMPORT_ERROR


def is_available() -> bool:
    """True when the compiled extension is loaded and a CUDA device is present."""
    return extension_loaded() and torch.cuda.is_available()


def _require_extension() -> None:
    if not extension_loaded():
        reason = f" ({_IMPORT_ERROR})" if _IMPORT_ERROR else ""
        raise RuntimeError(
            "the avme CUDA extension (avme_ext._C) is not built" + reason + "; install with "
            "`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .` or use the "
            "reference implementation (AVMECore(impl='ref'))"
        )


#: How the ``design`` argument of the ops asks for a design where it can run, else the host's
#: choice: this prefix and the design's name (see :func:`preferring`).
PREFER = "auto:"
_NAMED_DESIGNS = tuple(d for d in DESIGNS if d != "auto")


def preferring(name: str) -> str:
    """The ``design`` argument that runs design ``name`` where it can run the call's sizes on
    the call's device, and the host's automatic choice elsewhere (never an error for a size).

    ``"auto"`` stays ``"auto"``. This is how a design measured fastest at some sizes is asked
    for (:meth:`avme_ext.core.AVMECore.fused_design`): a data size, hidden size or device the
    measurement did not cover may not fit it.
    """
    if name == "auto":
        return name
    if name not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {name!r}")
    return PREFER + name


def _check_options(encoder_input: str, precision: str, design_name: str) -> None:
    if encoder_input not in ENCODER_INPUTS:
        raise ValueError(f"encoder_input must be one of {ENCODER_INPUTS}, got {encoder_input!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    preferred = design_name[len(PREFER) :] if str(design_name).startswith(PREFER) else None
    if design_name not in DESIGNS and preferred not in _NAMED_DESIGNS:
        raise ValueError(
            f"design must be one of {DESIGNS} or {PREFER!r} followed by one of {_NAMED_DESIGNS}, "
            f"got {design_name!r}"
        )


_FORCED_DESIGN: list[str] = []


@contextlib.contextmanager
def design(name: str) -> Iterator[None]:
    """Force the kernel design of every fused op call inside the ``with`` block.

    ``name`` is one of :data:`DESIGNS`; ``"auto"`` restores the automatic choice. Used by the
    benchmarks and tests to compare designs; a design that cannot run the sizes or the dtype
    of a call raises a RuntimeError saying why. Not thread-local: do not race it.
    """
    if name not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {name!r}")
    _FORCED_DESIGN.append(name)
    try:
        yield
    finally:
        _FORCED_DESIGN.pop()


def requested_design() -> str:
    """The design forced by the innermost :func:`design` block, or ``"auto"``."""
    return _FORCED_DESIGN[-1] if _FORCED_DESIGN else "auto"


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def fused_forward(
    x: Tensor,
    y: Tensor | None,
    eps: Tensor,
    params: AVMEParams,
    encoder_input: str = "canvas",
    return_canvases: bool = False,
    precision: str = "fp32",
    design: str | None = None,
) -> ForwardOutput:
    """Fused training forward; same contract as :func:`avme_ext.reference.avme_forward_reference`.

    ``design`` names the kernel design (one of :data:`DESIGNS`, or :func:`preferring` one);
    None takes the one forced by :func:`design` blocks, else ``"auto"`` (the host picks by batch
    size and what fits).

    Differentiable w.r.t. ``x``, ``y``, ``eps`` and every parameter (once: no double
    backward). The per-step state
    for the backward is kept only when grad mode is on and some input requires grad, so
    inference (``torch.no_grad()``, e.g. IWAE with a huge batch) stores no K-step state.
    """
    _require_extension()
    return _forward_with(
        torch.ops.avme, x, y, eps, params, encoder_input, return_canvases, precision, design
    )


def _forward_with(
    ns, x, y, eps, params, encoder_input, return_canvases, precision, design_name=None
) -> ForwardOutput:
    """fused_forward on the ops of namespace ``ns`` (torch.ops.avme, or the test emulator's)."""
    design_name = requested_design() if design_name is None else design_name
    _check_options(encoder_input, precision, design_name)
    enc_b = params.enc_b_ih + params.enc_b_hh
    dec_b = params.dec_b_ih + params.dec_b_hh
    tensors = (
        x, y, eps,
        params.enc_w_ih, params.enc_w_hh, enc_b,
        params.q_w, params.q_b,
        params.dec_w_ih, params.dec_w_hh, dec_b,
        params.write_w, params.write_b,
    )  # fmt: skip
    tensors = tuple(_contiguous(t) for t in tensors)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out = ns.forward(*tensors, encoder_input, bool(return_canvases), save, precision, design_name)
    return ForwardOutput(
        canvas=out[0], mu=out[1], logvar=out[2], canvases=out[3] if return_canvases else None
    )


def fused_sample(
    z: Tensor,
    y: Tensor | None,
    params: AVMEParams,
    return_canvases: bool = False,
    precision: str = "fp32",
    design: str | None = None,
) -> SampleOutput:
    """Fused decoder-only sampler; same contract as :func:`avme_ext.reference.avme_sample_reference`.

    Not differentiable (backward raises); use the reference to differentiate through sampling.
    ``design`` as for :func:`fused_forward`.
    """
    _require_extension()
    return _sample_with(torch.ops.avme, z, y, params, return_canvases, precision, design)


def _sample_with(ns, z, y, params, return_canvases, precision, design_name=None) -> SampleOutput:
    """fused_sample on the ops of namespace ``ns``."""
    design_name = requested_design() if design_name is None else design_name
    _check_options("canvas", precision, design_name)
    dec_b = params.dec_b_ih + params.dec_b_hh
    tensors = (z, y, params.dec_w_ih, params.dec_w_hh, dec_b, params.write_w, params.write_b)
    tensors = tuple(_contiguous(t) for t in tensors)
    canvas, canvases = ns.sample(*tensors, bool(return_canvases), precision, design_name)
    return SampleOutput(canvas=canvas, canvases=canvases if return_canvases else None)


# ---------------------------------------------------------------------------------------
# Fake kernels and autograd (registered only when the library is loaded).
# ---------------------------------------------------------------------------------------
def _forward_fake(
    x, y, eps, enc_w_ih, enc_w_hh, enc_b, q_w, q_b, dec_w_ih, dec_w_hh, dec_b, write_w, write_b,
    encoder_input, return_canvases, save_for_backward, precision, design,
):  # fmt: skip
    steps, batch, latent = eps.shape
    data_dim, enc_hidden, dec_hidden = write_w.shape[0], enc_w_hh.shape[1], dec_w_hh.shape[1]
    saved = steps if save_for_backward else 0
    kept = steps if (return_canvases or save_for_backward) else 0
    new = x.new_empty
    return (
        new((batch, data_dim)),
        new((steps, batch, latent)),
        new((steps, batch, latent)),
        new((kept, batch, data_dim)),
        new((saved, batch, enc_hidden)),
        new((saved, batch, enc_hidden)),
        new((saved, batch, 4 * enc_hidden)),
        new((saved, batch, latent)),
        new((saved, batch, dec_hidden)),
        new((saved, batch, dec_hidden)),
        new((saved, batch, 4 * dec_hidden)),
    )


def _backward_fake(
    grad_canvas, grad_mu, grad_logvar, grad_canvases, x, y, eps, logvar, canvases,
    h_enc, c_enc, gates_enc, z, h_dec, c_dec, gates_dec,
    enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w,
    encoder_input, need_grad_x, need_grad_y, need_grad_eps, precision, design,
):  # fmt: skip
    steps, batch, latent = eps.shape
    classes = dec_w_ih.shape[1] - latent
    return (
        x.new_empty((batch if need_grad_x else 0, x.shape[1])),
        x.new_empty((batch if need_grad_y else 0, classes)),
        x.new_empty((steps if need_grad_eps else 0, batch, latent)),
        enc_w_ih.new_empty(enc_w_ih.shape),
        enc_w_hh.new_empty(enc_w_hh.shape),
        enc_w_hh.new_empty((enc_w_hh.shape[0],)),
        q_w.new_empty(q_w.shape),
        q_w.new_empty((q_w.shape[0],)),
        dec_w_ih.new_empty(dec_w_ih.shape),
        dec_w_hh.new_empty(dec_w_hh.shape),
        dec_w_hh.new_empty((dec_w_hh.shape[0],)),
        write_w.new_empty(write_w.shape),
        write_w.new_empty((write_w.shape[0],)),
    )


def _sample_fake(z, y, dec_w_ih, dec_w_hh, dec_b, write_w, write_b, return_canvases, precision, design):
    steps, batch, _ = z.shape
    data_dim = write_w.shape[0]
    return (
        z.new_empty((batch, data_dim)),
        z.new_empty((steps if return_canvases else 0, batch, data_dim)),
    )


def _forward_setup_context(ctx, inputs, output):
    (
        x, y, eps, enc_w_ih, enc_w_hh, _enc_b, q_w, _q_b, dec_w_ih, dec_w_hh, _dec_b, write_w,
        _write_b, encoder_input, _return_canvases, _save, precision, design_name,
    ) = inputs  # fmt: skip
    _canvas, _mu, logvar, canvases, *state = output
    ctx.encoder_input = encoder_input
    ctx.precision = precision
    ctx.design = design_name
    ctx.mark_non_differentiable(*state)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(
        x, y, eps, logvar, canvases, *state, enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w
    )


def _grad(t: Tensor | None) -> Tensor | None:
    # Incoming gradients can be expanded/strided views (e.g. from .sum()); the op wants
    # contiguous tensors.
    return None if t is None else t.contiguous()


def _forward_backward(ns, ctx, grad_canvas, grad_mu, grad_logvar, grad_canvases):
    (
        x, y, eps, logvar, canvases, h_enc, c_enc, gates_enc, z, h_dec, c_dec, gates_dec,
        enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w,
    ) = ctx.saved_tensors  # fmt: skip
    need_x, need_y, need_eps = (bool(n) for n in ctx.needs_input_grad[:3])
    need_y = need_y and y is not None
    grads = ns.backward(
        _grad(grad_canvas), _grad(grad_mu), _grad(grad_logvar), _grad(grad_canvases),
        x, y, eps, logvar, canvases, h_enc, c_enc, gates_enc, z, h_dec, c_dec, gates_dec,
        enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w,
        ctx.encoder_input, need_x, need_y, need_eps, ctx.precision, ctx.design,
    )  # fmt: skip
    grad_x, grad_y, grad_eps, *grad_weights = grads
    # Inputs: x, y, eps, 10 weights/biases, encoder_input, return_canvases, save, precision,
    # design.
    return (
        grad_x if need_x else None,
        grad_y if need_y else None,
        grad_eps if need_eps else None,
        *grad_weights,
        None, None, None, None, None,
    )  # fmt: skip


DOUBLE_BACKWARD_ERROR = (
    "double backward through the fused AVME ops is not supported; use AVMECore(impl='ref') "
    "(the reference implementation) for higher-order gradients"
)


def _backward_backward(ctx, *grads):
    """Autograd formula of ``avme::backward``: refuse to differentiate it (double backward).

    Runs only when the gradients computed with ``create_graph=True`` are differentiated
    again; the first backward itself is unaffected.
    """
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _sample_setup_context(ctx, inputs, output):
    pass


def _sample_backward(ctx, grad_canvas, grad_canvases):
    raise RuntimeError(
        "backward through the fused sampler (avme::sample) is not implemented; "
        "run the sampler under torch.no_grad(), or use AVMECore(impl='ref') to differentiate it"
    )


def _register(namespace: str = "avme") -> None:
    """Register fake kernels and autograd for the ops of ``namespace``."""
    ns = getattr(torch.ops, namespace)

    def backward(ctx, grad_canvas, grad_mu, grad_logvar, grad_canvases, *_grad_state):
        return _forward_backward(ns, ctx, grad_canvas, grad_mu, grad_logvar, grad_canvases)

    torch.library.register_fake(f"{namespace}::forward", _forward_fake)
    torch.library.register_fake(f"{namespace}::backward", _backward_fake)
    torch.library.register_fake(f"{namespace}::sample", _sample_fake)
    torch.library.register_autograd(
        f"{namespace}::forward", backward, setup_context=_forward_setup_context
    )
    torch.library.register_autograd(f"{namespace}::backward", _backward_backward)
    torch.library.register_autograd(
        f"{namespace}::sample", _sample_backward, setup_context=_sample_setup_context
    )


if extension_loaded():
    _register()
