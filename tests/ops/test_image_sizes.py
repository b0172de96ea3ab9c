"""Data sizes beyond MNIST's 784 pixels: D = channels x height x width, e.g. 3 x 32 x 32 = 3072.

Each design either runs a size or refuses it with its reason, and ``"auto"`` (also when it
prefers a design that refuses: ``"auto:<design>"``, what ``AVMECore(impl="auto")`` passes for a
measured design) then runs another design, never an error, never a wrong result:

- at small hidden sizes every design runs D = 3072 and matches the float64 reference (outputs
  and every gradient);
- at the paper's hidden sizes (H = 400, Z = 100) on an H100-like device (132 SMs, 227 KiB of
  shared memory per block), the persistent design's weight slices do not fit: it refuses with
  the bytes it would need, and ``"auto"`` / ``"auto:persistent"`` run the stagewise design;
- the rowtile design refuses a row whose state does not fit in shared memory.
"""

from __future__ import annotations

import pytest
import torch

from avme_ext import dispatch, ops
from avme_ext.core import AVMECore

from . import backends
from .conftest import NAMED_DESIGNS
from .helpers import (
    Case,
    Sizes,
    assert_within,
    compare_with_reference,
    forward_args,
    fp32_bounds,
    make_inputs,
    make_params,
    reference_forward,
    run_and_grad,
    to_reference,
)

COLOUR = 3 * 32 * 32  # CIFAR-10 / SVHN
SMALL_HIDDEN = Sizes(D=COLOUR, He=8, Hd=8, Z=4)
PAPER_HIDDEN = Sizes(D=COLOUR, He=400, Hd=400, Z=100)
H100_SMS, H100_SMEM = "132", "232448"


@pytest.fixture
def emulator():
    try:
        return backends.emulator()
    except backends.UnavailableError as exc:
        pytest.skip(f"emulator backend: {exc}")


@pytest.fixture
def h100_like(monkeypatch):
    """The emulated device gets an H100's SM count and shared memory per block."""
    monkeypatch.setenv("AVME_EMU_SMS", H100_SMS)
    monkeypatch.setenv("AVME_EMU_SMEM", H100_SMEM)


def _forward_args(backend, case: Case, design: str) -> tuple[object, ...]:
    params = make_params(case.sizes, case.C, device=backend.device, grad=False)
    x, y, eps = make_inputs(case.B, case.K, case.sizes, case.C, device=backend.device)
    return (*forward_args(x, y, eps, params), case.encoder_input, False, True, "fp32", design)


# The persistent design's emulation (all blocks' threads at once) takes over 10 s here.
DESIGN_PARAMS = [pytest.param(d, marks=[pytest.mark.slow] if d == "persistent" else []) for d in NAMED_DESIGNS]


@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
@pytest.mark.parametrize("design", DESIGN_PARAMS)
def test_every_design_runs_colour_images_at_small_hidden_sizes(emulator, emu_sms, design, encoder_input):
    """Forward and every gradient at D = 3072 against float64, each design forced by name (a
    refusal here fails the test: at these hidden sizes every design fits)."""
    emu_sms(4)
    case = Case(2, 2, SMALL_HIDDEN, 2, encoder_input)
    with ops.design(design):
        compare_with_reference(emulator, case, scale=COLOUR**-0.5, refusal_skips=False)


def test_persistent_refuses_paper_hidden_sizes_with_its_reason(emulator, h100_like):
    """Its weight slices at D = 3072, H = 400 need more shared memory than an H100 block has:
    the forced design raises before any work, naming the sizes and the bytes."""
    case = Case(2, 2, PAPER_HIDDEN, 0, "canvas")
    with pytest.raises(RuntimeError, match=(
        r"avme::forward: the persistent design cannot run these sizes on this device "
        r"\(D=3072, He=400, Hd=400, Z=100, C=0, dtype size 4\): each of its \d+ blocks would "
        r"need \d+ bytes of shared memory .* at most 232448 per block"
    )):  # fmt: skip
        emulator.ns.forward(*_forward_args(emulator, case, "persistent"))


@pytest.mark.parametrize("design", ["auto", "auto:persistent"])
def test_auto_runs_another_design_where_persistent_refuses(emulator, h100_like, design):
    """ "auto" (B <= 256 would take the persistent design where it fits) and "auto:persistent"
    run the stagewise design at D = 3072, H = 400 and match the float64 reference."""
    compare_with_reference(emulator, Case(2, 2, PAPER_HIDDEN, 0, "error"), design=design, scale=COLOUR**-0.5)


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_rowtile_refuses_a_row_that_does_not_fit_and_auto_falls_back(emulator, monkeypatch, op):
    """One row's state at D = 3072 is 6196 floats forward (error mode), 3176 backward: on a
    device with 12 KiB per block the rowtile design refuses it by name; "auto:rowtile" runs."""
    monkeypatch.setenv("AVME_EMU_SMEM", str(12 * 1024))
    case = Case(2, 2, SMALL_HIDDEN, 0, "error")
    args = list(_forward_args(emulator, case, "rowtile"))
    if op == "forward":
        with pytest.raises(RuntimeError, match=r"avme::forward: the rowtile design needs \d+ bytes .*D=3072"):
            emulator.ns.forward(*args)
    args[-1] = "auto:rowtile"
    out = emulator.ns.forward(*args)
    assert torch.isfinite(out[0]).all()
    if op == "backward":
        x, y, eps, w_ih, w_hh, _, q_w, _, d_ih, d_hh, _, write_w, _ = args[:13]
        canvas, _mu, logvar, canvases, *state = out
        bwd = [torch.ones_like(canvas), None, None, None, x, y, eps, logvar, canvases, *state,
               w_ih, w_hh, q_w, d_ih, d_hh, write_w, "error", True, False, True, "fp32", "rowtile"]  # fmt: skip
        with pytest.raises(RuntimeError, match=r"avme::backward: the rowtile design needs \d+ bytes"):
            emulator.ns.backward(*bwd)
        bwd[-1] = "auto:rowtile"
        assert all(torch.isfinite(g).all() for g in emulator.ns.backward(*bwd))


def test_module_auto_with_a_measured_persistent_design_trains_colour_images(emulator, h100_like, monkeypatch):
    """AVMECore(impl="auto") where the crossover table names the persistent design (a table measured
    at these sizes on a GPU with more shared memory than this one, which matches its name pattern):
    at D = 3072 and H = 400 that design refuses, so the preference it passes runs the stagewise
    design; the loss and every gradient match the float64 reference."""
    core = AVMECore(COLOUR, 0, 400, 400, 100, 2, "error", impl="auto")
    asked = []
    monkeypatch.setattr(dispatch, "auto_impl", lambda device, dtype, precision, batch_size, model: "cuda")
    monkeypatch.setattr(dispatch, "auto_design", lambda device, dtype, precision, batch_size, model: "persistent")

    def on_emulator(x, y, eps, params, encoder_input, return_canvases, precision, *, design):
        asked.append(design)
        return ops._forward_with(emulator.ns, x, y, eps, params, encoder_input, return_canvases, precision, design)

    monkeypatch.setattr(ops, "fused_forward", on_emulator)
    x, _, eps = make_inputs(2, 2, PAPER_HIDDEN, 0)
    weights = [torch.randn(s, dtype=torch.float64) for s in ((2, COLOUR), (2, 2, 100), (2, 2, 100), (2, 2, COLOUR))]
    got = run_and_grad(
        lambda x, y, eps, p: core(x, y, eps, return_canvases=True), core.loop_params(), x, None, eps, weights
    )
    assert asked == ["auto:persistent"]
    params = core.loop_params()
    reference = {
        dtype: run_and_grad(reference_forward("error"), to_reference(params, dtype), x, None, eps, weights, dtype=dtype)
        for dtype in (torch.float64, torch.float32)
    }
    assert_within(got, reference[torch.float64], fp32_bounds(reference[torch.float32], reference[torch.float64]))
