"""Every argument of every op is checked before any data is touched, with a clear error.

One table of bad inputs, run on the emulator and on CUDA, each case twice: with no tensor
requiring grad (the op's own kernel) and with the weights and x requiring grad (through the
Python autograd kernel that ``torch.library.register_autograd`` installs). Each must raise a
RuntimeError naming the op, the argument and what was expected, and never crash the process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from .helpers import TINY, Sizes

B, K = 4, 3

FORWARD_TENSORS = (
    "x", "y", "eps", "enc_w_ih", "enc_w_hh", "enc_b", "q_w", "q_b",
    "dec_w_ih", "dec_w_hh", "dec_b", "write_w", "write_b",
)  # fmt: skip
BACKWARD_TENSORS = (
    "grad_canvas", "grad_mu", "grad_logvar", "grad_canvases", "x", "y", "eps", "logvar",
    "canvases", "h_enc", "c_enc", "gates_enc", "z", "h_dec", "c_dec", "gates_dec",
    "enc_w_ih", "enc_w_hh", "q_w", "dec_w_ih", "dec_w_hh", "write_w",
)  # fmt: skip
SAMPLE_TENSORS = ("z", "y", "dec_w_ih", "dec_w_hh", "dec_b", "write_w", "write_b")
WEIGHTS = {"enc_w_ih", "enc_w_hh", "enc_b", "q_w", "q_b", "dec_w_ih", "dec_w_hh", "dec_b", "write_w", "write_b"}


def shapes(sizes: Sizes, C: int, B: int = B, K: int = K) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor argument of the three ops, by name."""
    D, He, Hd, Z = sizes.D, sizes.He, sizes.Hd, sizes.Z
    return {
        "x": (B, D), "y": (B, C), "eps": (K, B, Z), "z": (K, B, Z),
        "enc_w_ih": (4 * He, 2 * D + Hd + C), "enc_w_hh": (4 * He, He), "enc_b": (4 * He,),
        "q_w": (2 * Z, He), "q_b": (2 * Z,),
        "dec_w_ih": (4 * Hd, Z + C), "dec_w_hh": (4 * Hd, Hd), "dec_b": (4 * Hd,),
        "write_w": (D, Hd), "write_b": (D,),
        "grad_canvas": (B, D), "grad_mu": (K, B, Z), "grad_logvar": (K, B, Z), "grad_canvases": (K, B, D),
        "logvar": (K, B, Z), "canvases": (K, B, D), "h_enc": (K, B, He), "c_enc": (K, B, He),
        "gates_enc": (K, B, 4 * He), "h_dec": (K, B, Hd), "c_dec": (K, B, Hd), "gates_dec": (K, B, 4 * Hd),
    }  # fmt: skip


def arguments(op: str, device, *, sizes: Sizes = TINY, C: int = 2, grad: bool = False, **dims) -> dict[str, Any]:
    """Valid arguments of ``op`` in schema order (small random values; y None when C == 0).
    With ``grad`` the weights and x require grad."""
    names = {"forward": FORWARD_TENSORS, "backward": BACKWARD_TENSORS, "sample": SAMPLE_TENSORS}[op]
    gen = torch.Generator().manual_seed(0)
    all_shapes = shapes(sizes, C, **dims)
    args: dict[str, Any] = {}
    for name in names:
        if name == "y" and C == 0:
            args[name] = None
            continue
        t = (torch.randn(all_shapes[name], generator=gen) * 0.3).to(device)
        args[name] = t.requires_grad_(grad and (name in WEIGHTS or name == "x"))
    if op == "forward":
        args.update(
            encoder_input="canvas", return_canvases=False, save_for_backward=False, precision="fp32", design="auto"
        )
    elif op == "backward":
        args.update(
            encoder_input="canvas",
            need_grad_x=True,
            need_grad_y=C > 0,
            need_grad_eps=True,
            precision="fp32",
            design="auto",
        )
    else:
        args.update(return_canvases=True, precision="fp32", design="auto")
    return args


def call(backend, op: str, args: dict[str, Any]):
    return getattr(backend.ns, op)(*args.values())


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, last dimension strided by 2."""
    return torch.stack([t, t], dim=-1)[..., 0]


@dataclass(frozen=True)
class Bad:
    """One bad input: ``change`` edits valid arguments of ``op`` (model with C classes)."""

    op: str
    id: str
    change: Callable[[dict[str, Any]], None]
    match: str
    C: int = 2
    on: tuple[str, ...] = ("emulator", "cuda")


def _set(name: str, make: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    def change(args: dict[str, Any]) -> None:
        args[name] = make(args[name])

    return change


def _shape(name: str, *shape: int) -> Callable[[dict[str, Any]], None]:
    return _set(name, lambda t: torch.zeros(shape, dtype=t.dtype, device=t.device))


def _unconditional_y(ref: str) -> Callable[[dict[str, Any]], None]:
    """Pass a y (B, 1) on ``args[ref]``'s device to a model without classes."""

    def change(args: dict[str, Any]) -> None:
        args["y"] = torch.zeros(B, 1, device=args[ref].device)

    return change


FWD, BWD, SMP = "avme::forward: ", "avme::backward: ", "avme::sample: "
CUDA = ("cuda",)
D, He, Hd, Z, C2 = TINY.D, TINY.He, TINY.Hd, TINY.Z, 2

FORWARD = [
    # options
    Bad(
        "forward",
        "encoder_input",
        _set("encoder_input", lambda _: "nope"),
        FWD + "encoder_input must be 'canvas' or 'error', got 'nope'",
    ),
    Bad(
        "forward",
        "precision",
        _set("precision", lambda _: "fp16"),
        FWD + "precision must be one of 'fp32', 'tf32', 'bf16', got 'fp16'",
    ),
    Bad(
        "forward",
        "design",
        _set("design", lambda _: "fastest"),
        FWD
        + "design must be one of 'auto', 'rowtile', 'persistent', 'stagewise', or 'auto:' followed by one of the three named designs, got 'fastest'",
    ),
    Bad(
        "forward",
        "design-prefer",
        _set("design", lambda _: "auto:auto"),
        FWD + "design must be one of .* got 'auto:auto'",
    ),
    # defined
    Bad("forward", "x-none", _set("x", lambda _: None), FWD + "x is undefined"),
    Bad("forward", "eps-none", _set("eps", lambda _: None), FWD + "eps is undefined"),
    Bad("forward", "q_w-none", _set("q_w", lambda _: None), FWD + "q_w is undefined"),
    Bad("forward", "write_b-none", _set("write_b", lambda _: None), FWD + "write_b is undefined"),
    # device (CUDA: a CPU tensor among CUDA tensors)
    Bad(
        "forward", "x-cpu", _set("x", lambda t: t.cpu()), FWD + "x must be a CUDA tensor, got a tensor on cpu", on=CUDA
    ),
    Bad("forward", "y-cpu", _set("y", lambda t: t.cpu()), FWD + "y must be a CUDA tensor", on=CUDA),
    Bad("forward", "eps-cpu", _set("eps", lambda t: t.cpu()), FWD + "eps must be a CUDA tensor", on=CUDA),
    Bad("forward", "q_b-cpu", _set("q_b", lambda t: t.cpu()), FWD + "q_b must be a CUDA tensor", on=CUDA),
    # dtype
    Bad("forward", "x-half", _set("x", lambda t: t.half()), FWD + "x must be float32 or float64, got Half"),
    Bad("forward", "x-int", _set("x", lambda t: t.long()), FWD + "x must be float32 or float64, got Long"),
    Bad("forward", "eps-double", _set("eps", lambda t: t.double()), FWD + "eps has dtype Double but x has dtype Float"),
    Bad("forward", "y-double", _set("y", lambda t: t.double()), FWD + "y has dtype Double but x has dtype Float"),
    Bad("forward", "enc_w_ih-double", _set("enc_w_ih", lambda t: t.double()), FWD + "enc_w_ih has dtype Double"),
    Bad("forward", "write_b-half", _set("write_b", lambda t: t.half()), FWD + "write_b has dtype Half"),
    # rank
    Bad("forward", "x-1d", _set("x", lambda t: t[0]), FWD + r"x must be 2-D \(B, D\), got shape \[6\]"),
    Bad("forward", "x-3d", _set("x", lambda t: t[None]), FWD + r"x must be 2-D \(B, D\)"),
    Bad("forward", "eps-2d", _set("eps", lambda t: t[0]), FWD + r"eps must be 3-D \(K, B, Z\)"),
    Bad("forward", "y-1d", _set("y", lambda t: t[:, 0]), FWD + r"y must be 2-D \(B, C\)"),
    Bad("forward", "enc_w_ih-1d", _set("enc_w_ih", lambda t: t[0]), FWD + "enc_w_ih must be 2-D"),
    Bad("forward", "enc_w_hh-1d", _set("enc_w_hh", lambda t: t[0]), FWD + "enc_w_hh must be 2-D"),
    Bad("forward", "q_w-3d", _set("q_w", lambda t: t[None]), FWD + "q_w must be 2-D"),
    Bad("forward", "dec_w_ih-1d", _set("dec_w_ih", lambda t: t[0]), FWD + "dec_w_ih must be 2-D"),
    Bad("forward", "dec_w_hh-3d", _set("dec_w_hh", lambda t: t[None]), FWD + "dec_w_hh must be 2-D"),
    Bad("forward", "write_w-1d", _set("write_w", lambda t: t[0]), FWD + "write_w must be 2-D"),
    # sizes out of range
    Bad("forward", "K-0", _shape("eps", 0, B, Z), FWD + r"K = 0 \(eps.shape\[0\]\) must be in \[1, "),
    Bad("forward", "He-0", _shape("enc_w_hh", 0, 0), FWD + r"He = 0 \(enc_w_hh.shape\[1\]\) must be in \[1, "),
    Bad("forward", "Z-0", _shape("q_w", 0, He), FWD + r"Z = 0 \(q_w.shape\[0\]\) must be in \[1, "),
    Bad("forward", "D-0", _shape("write_w", 0, Hd), FWD + r"D = 0 \(write_w.shape\[0\]\) must be in \[1, "),
    Bad("forward", "Hd-0", _shape("dec_w_hh", 4 * Hd, 0), FWD + r"Hd = 0 \(dec_w_hh.shape\[1\]\) must be in \[1, "),
    # shapes that disagree
    Bad("forward", "x-D", _shape("x", B, D + 1), FWD + r"x must have shape \(B, D\) = \[4, 6\], got \[4, 7\]"),
    Bad(
        "forward",
        "eps-B",
        _shape("eps", K, B + 1, Z),
        FWD + r"eps must have shape \(K, B, Z\) = \[3, 4, 2\], got \[3, 5, 2\]",
    ),
    Bad("forward", "eps-Z", _shape("eps", K, B, Z + 1), FWD + r"eps must have shape \(K, B, Z\)"),
    Bad("forward", "y-B", _shape("y", B + 1, C2), FWD + r"y must have shape \(B, C\) = \[4, 2\], got \[5, 2\]"),
    Bad(
        "forward",
        "y-missing",
        _set("y", lambda _: None),
        FWD + r"y \(B, C\) = \[4, 2\] is required: the model is conditional",
    ),
    Bad("forward", "y-unconditional", _unconditional_y("x"), FWD + "y must be None for an unconditional model", C=0),
    Bad(
        "forward",
        "enc_w_ih-cols",
        _shape("enc_w_ih", 4 * He, 2 * D + Hd + C2 + 1),
        FWD + r"enc_w_ih must have shape \(4\*He, 2\*D \+ Hd \+ C\)",
    ),
    Bad(
        "forward", "enc_w_hh-rows", _shape("enc_w_hh", 4 * He + 1, He), FWD + r"enc_w_hh must have shape \(4\*He, He\)"
    ),
    Bad("forward", "enc_b", _shape("enc_b", 4 * He - 1), FWD + r"enc_b must have shape \(4\*He\)"),
    Bad("forward", "q_w-odd", _shape("q_w", 2 * Z + 1, He), FWD + r"q_w must have 2\*Z rows \(\[mu; logvar\]\)"),
    Bad("forward", "q_w-cols", _shape("q_w", 2 * Z, He + 1), FWD + r"q_w must have shape \(2\*Z, He\)"),
    Bad("forward", "q_b", _shape("q_b", 2 * Z + 2), FWD + r"q_b must have shape \(2\*Z\)"),
    Bad(
        "forward",
        "dec_w_ih-narrow",
        _shape("dec_w_ih", 4 * Hd, Z - 1),
        FWD + r"dec_w_ih must have Z \+ C >= Z = 2 columns",
    ),
    Bad(
        "forward", "dec_w_hh-rows", _shape("dec_w_hh", 4 * Hd + 4, Hd), FWD + r"dec_w_hh must have shape \(4\*Hd, Hd\)"
    ),
    Bad("forward", "dec_b", _shape("dec_b", 4 * Hd + 1), FWD + r"dec_b must have shape \(4\*Hd\)"),
    Bad("forward", "write_w-Hd", _shape("write_w", D, Hd + 1), FWD + r"write_w must have shape \(D, Hd\)"),
    Bad("forward", "write_b", _shape("write_b", D + 1), FWD + r"write_b must have shape \(D\)"),
    # contiguity
    Bad(
        "forward",
        "x-strided",
        _set("x", noncontiguous),
        FWD + r"x must be contiguous \(call .contiguous\(\) on it first\)",
    ),
    Bad("forward", "y-strided", _set("y", noncontiguous), FWD + "y must be contiguous"),
    Bad("forward", "eps-strided", _set("eps", noncontiguous), FWD + "eps must be contiguous"),
    Bad(
        "forward",
        "enc_w_ih-transposed",
        _set("enc_w_ih", lambda t: t.t().contiguous().t()),
        FWD + "enc_w_ih must be contiguous",
    ),
    Bad("forward", "dec_b-strided", _set("dec_b", noncontiguous), FWD + "dec_b must be contiguous"),
]

BACKWARD = [
    Bad(
        "backward",
        "encoder_input",
        _set("encoder_input", lambda _: "canvases"),
        BWD + "encoder_input must be 'canvas' or 'error'",
    ),
    Bad("backward", "precision", _set("precision", lambda _: "FP32"), BWD + "precision must be one of"),
    Bad("backward", "design", _set("design", lambda _: "Auto"), BWD + "design must be one of"),
    Bad(
        "backward",
        "need_grad_y-unconditional",
        _set("need_grad_y", lambda _: True),
        BWD + "need_grad_y is true but the model is unconditional",
        C=0,
    ),
    Bad("backward", "no-saved-state", _shape("h_enc", 0, B, He), BWD + "the forward did not save its state"),
    Bad("backward", "x-none", _set("x", lambda _: None), BWD + "x is undefined"),
    Bad("backward", "gates_dec-none", _set("gates_dec", lambda _: None), BWD + "gates_dec is undefined"),
    Bad(
        "backward",
        "grad_logvar-cpu",
        _set("grad_logvar", lambda t: t.cpu()),
        BWD + "grad_logvar must be a CUDA tensor",
        on=CUDA,
    ),
    Bad("backward", "h_dec-cpu", _set("h_dec", lambda t: t.cpu()), BWD + "h_dec must be a CUDA tensor", on=CUDA),
    Bad(
        "backward",
        "x-double",
        _set("x", lambda t: t.double()),
        BWD + "grad_canvas has dtype Float but x has dtype Double",
    ),
    Bad(
        "backward", "eps-double", _set("eps", lambda t: t.double()), BWD + "eps has dtype Double but x has dtype Float"
    ),
    Bad(
        "backward",
        "grad_canvas-double",
        _set("grad_canvas", lambda t: t.double()),
        BWD + "grad_canvas has dtype Double",
    ),
    Bad("backward", "x-1d", _set("x", lambda t: t[0]), BWD + r"x must be 2-D \(B, D\)"),
    Bad("backward", "h_enc-2d", _set("h_enc", lambda t: t[0]), BWD + r"h_enc must be 3-D \(K, B, He\)"),
    Bad("backward", "y-missing", _set("y", lambda _: None), BWD + r"y \(B, C\) = \[4, 2\] is required"),
    Bad("backward", "logvar", _shape("logvar", K, B, Z + 1), BWD + r"logvar must have shape \(K, B, Z\)"),
    Bad("backward", "canvases", _shape("canvases", K - 1, B, D), BWD + r"canvases must have shape \(K, B, D\)"),
    Bad("backward", "h_enc", _shape("h_enc", K, B, He + 1), BWD + r"h_enc must have shape \(K, B, He\)"),
    Bad("backward", "c_enc", _shape("c_enc", K, B, He + 1), BWD + r"c_enc must have shape \(K, B, He\)"),
    Bad("backward", "gates_enc", _shape("gates_enc", K, B, He), BWD + r"gates_enc must have shape \(K, B, 4\*He\)"),
    Bad("backward", "z", _shape("z", K, B + 1, Z), BWD + r"z must have shape \(K, B, Z\)"),
    Bad("backward", "gates_dec", _shape("gates_dec", K, B, Hd), BWD + r"gates_dec must have shape \(K, B, 4\*Hd\)"),
    Bad("backward", "grad_mu", _shape("grad_mu", K, B, Z + 1), BWD + r"grad_mu must have shape \(K, B, Z\)"),
    Bad(
        "backward", "grad_logvar", _shape("grad_logvar", K, B + 1, Z), BWD + r"grad_logvar must have shape \(K, B, Z\)"
    ),
    Bad("backward", "h_dec", _shape("h_dec", K, B, Hd + 1), BWD + r"h_dec must have shape \(K, B, Hd\)"),
    Bad("backward", "grad_canvas", _shape("grad_canvas", B, D - 1), BWD + r"grad_canvas must have shape \(B, D\)"),
    Bad(
        "backward",
        "enc_w_ih",
        _shape("enc_w_ih", 4 * He, 2 * D + Hd),
        BWD + r"enc_w_ih must have shape \(4\*He, 2\*D \+ Hd \+ C\)",
    ),
    Bad("backward", "enc_w_hh", _shape("enc_w_hh", 4 * He + 1, He), BWD + r"enc_w_hh must have shape \(4\*He, He\)"),
    Bad("backward", "q_w", _shape("q_w", 2 * Z, He + 1), BWD + r"q_w must have shape \(2\*Z, He\)"),
    Bad(
        "backward",
        "dec_w_ih",
        _shape("dec_w_ih", 4 * Hd + 1, Z + C2),
        BWD + r"dec_w_ih must have shape \(4\*Hd, Z \+ C\)",
    ),
    Bad("backward", "dec_w_hh", _shape("dec_w_hh", 4 * Hd + 1, Hd), BWD + r"dec_w_hh must have shape \(4\*Hd, Hd\)"),
    Bad("backward", "write_w", _shape("write_w", D, Hd + 1), BWD + r"write_w must have shape \(D, Hd\)"),
    Bad(
        "backward",
        "grad_canvases-strided",
        _set("grad_canvases", noncontiguous),
        BWD + "grad_canvases must be contiguous",
    ),
    Bad("backward", "c_dec-strided", _set("c_dec", noncontiguous), BWD + "c_dec must be contiguous"),
]

SAMPLE = [
    Bad("sample", "precision", _set("precision", lambda _: "fp64"), SMP + "precision must be one of"),
    Bad("sample", "design", _set("design", lambda _: ""), SMP + "design must be one of"),
    Bad("sample", "z-none", _set("z", lambda _: None), SMP + "z is undefined"),
    Bad("sample", "z-2d", _set("z", lambda t: t[0]), SMP + r"z must be 3-D \(K, B, Z\)"),
    Bad("sample", "K-0", _shape("z", 0, B, Z), SMP + r"K = 0 \(z.shape\[0\]\) must be in \[1, "),
    Bad("sample", "Z-0", _shape("z", K, B, 0), SMP + r"Z = 0 \(z.shape\[2\]\) must be in \[1, "),
    Bad("sample", "z-half", _set("z", lambda t: t.half()), SMP + "z must be float32 or float64"),
    Bad(
        "sample",
        "dec_w_ih-double",
        _set("dec_w_ih", lambda t: t.double()),
        SMP + "dec_w_ih has dtype Double but z has dtype Float",
    ),
    Bad("sample", "dec_w_hh-cpu", _set("dec_w_hh", lambda t: t.cpu()), SMP + "dec_w_hh must be a CUDA tensor", on=CUDA),
    Bad("sample", "y-missing", _set("y", lambda _: None), SMP + r"y \(B, C\) = \[4, 2\] is required"),
    Bad("sample", "y-unconditional", _unconditional_y("z"), SMP + "y must be None", C=0),
    Bad("sample", "dec_w_ih-narrow", _shape("dec_w_ih", 4 * Hd, Z - 1), SMP + r"dec_w_ih must have Z \+ C >= Z"),
    Bad("sample", "dec_w_hh", _shape("dec_w_hh", 4 * Hd + 1, Hd), SMP + r"dec_w_hh must have shape \(4\*Hd, Hd\)"),
    Bad("sample", "dec_b", _shape("dec_b", 4 * Hd - 4), SMP + r"dec_b must have shape \(4\*Hd\)"),
    Bad("sample", "write_w", _shape("write_w", D, Hd - 1), SMP + r"write_w must have shape \(D, Hd\)"),
    Bad("sample", "write_b", _shape("write_b", D - 1), SMP + r"write_b must have shape \(D\)"),
    Bad("sample", "z-strided", _set("z", noncontiguous), SMP + "z must be contiguous"),
]

TABLE = FORWARD + BACKWARD + SAMPLE


def _table_params():
    return [pytest.param(name, bad, id=f"{name}-{bad.op}-{bad.id}") for bad in TABLE for name in bad.on]


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "autograd"])
@pytest.mark.parametrize(("backend", "bad"), _table_params(), indirect=["backend"])
def test_bad_input_raises_clear_error(backend, bad: Bad, grad):
    args = arguments(bad.op, backend.device, C=bad.C, grad=grad)
    bad.change(args)
    with pytest.raises(RuntimeError, match=bad.match):
        call(backend, bad.op, args)


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "autograd"])
@pytest.mark.parametrize("C", [0, 2])
@pytest.mark.parametrize("op", ["forward", "backward", "sample"])
def test_valid_arguments_run(backend, op, C, grad):
    """The table's starting point is valid: each bad input is the only thing wrong."""
    outputs = call(backend, op, arguments(op, backend.device, C=C, grad=grad))
    assert all(torch.isfinite(t).all() for t in outputs)


def test_every_argument_has_a_case():
    """Each tensor argument of each op appears in at least one bad input."""
    for op, names in (("forward", FORWARD_TENSORS), ("backward", BACKWARD_TENSORS), ("sample", SAMPLE_TENSORS)):
        touched = set()
        for bad in TABLE:
            if bad.op != op:
                continue
            args = arguments(op, "cpu", C=bad.C)
            before = dict(args)
            bad.change(args)
            touched |= {n for n in args if args[n] is not before[n]}
        untested = set(names) - touched
        assert not untested, f"{op}: no bad input for {sorted(untested)}"


@pytest.mark.parametrize("op", ["forward", "backward", "sample"])
def test_shared_memory_limit_is_a_clear_error(backend, op, monkeypatch):
    """The rowtile design keeps one batch row's state in shared memory: asked for by name, a row
    that does not fit is a clear error, checked before any allocation, whatever the batch size.
    The designs that do not need it (stagewise, and "auto", which picks a design that fits,
    also when it prefers the rowtile design) run the same sizes."""
    if backend.is_cuda:
        sizes = Sizes(D=200_000, He=4, Hd=4, Z=2)  # the canvas alone exceeds any GPU's limit
    else:
        monkeypatch.setenv("AVME_EMU_SMEM", "256")
        sizes = Sizes(D=64, He=32, Hd=32, Z=8)  # over 600 bytes per row for every op
    for batch in (1, 0):
        args = arguments(op, backend.device, sizes=sizes, C=0, B=batch, K=1)
        args["design"] = "rowtile"
        with pytest.raises(RuntimeError, match=rf"avme::{op}: the rowtile design needs \d+ bytes of shared memory"):
            call(backend, op, args)
        for other in ("stagewise", "auto", "auto:rowtile"):
            args["design"] = other
            out = call(backend, op, args)
            backend.synchronize()
            assert all(bool(torch.isfinite(t).all()) for t in out if t.numel()), (op, other)


def test_tensors_on_two_gpus(cuda_backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    args = arguments("forward", "cuda:0")
    args["eps"] = args["eps"].to("cuda:1")
    with pytest.raises(RuntimeError, match="eps is on cuda:1 but x is on cuda:0"):
        call(cuda_backend, "forward", args)


@pytest.mark.parametrize("op", ["forward", "backward", "sample"])
def test_design_that_cannot_run_fails_before_any_work(backend, op, monkeypatch):
    """The persistent design asked for by name at sizes it cannot run is a clear error raised
    before any output is allocated or any product launched (the whole plan is made first)."""
    if backend.is_cuda:
        pytest.skip("steers the emulated device's shared memory (AVME_EMU_SMEM)")
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("AVME_EMU_SMEM", "256")  # no block's weight slice fits
    args = arguments(op, backend.device, sizes=Sizes(D=64, He=32, Hd=32, Z=8))
    args["design"] = "persistent"
    with (
        profile(activities=[ProfilerActivity.CPU]) as prof,
        pytest.raises(RuntimeError, match=rf"avme::{op}: the persistent design cannot run these sizes"),
    ):
        call(backend, op, args)
    work = sorted({e.name for e in prof.events() if e.name.startswith("aten::")})
    assert not work, f"{op} allocated or computed before rejecting the design: {work}"
    args["design"] = "auto:persistent"  # preferred, not forced: the host's choice runs instead
    assert all(bool(torch.isfinite(t).all()) for t in call(backend, op, args) if t.numel())


@pytest.mark.parametrize("design", ["rowtile", "persistent", "stagewise"])
def test_tensors_on_second_gpu_while_first_is_current(cuda_backend, design):
    """The ops run on their tensors' device whatever the current device is (device guard):
    every op on cuda:1 with cuda:0 current gives what it gives with cuda:1 current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    for op in ("forward", "backward", "sample"):
        args = arguments(op, "cuda:1")
        args["design"] = design
        with torch.cuda.device(1):
            expected = call(cuda_backend, op, args)
        with torch.cuda.device(0):
            got = call(cuda_backend, op, args)
        torch.cuda.synchronize(1)
        for g, e in zip(got, expected, strict=True):
            assert g.device == torch.device("cuda:1")
            assert torch.equal(g, e), (op, design)
