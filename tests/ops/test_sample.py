"""avme::sample (the decoder-only sampler) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from avme_ext.loop_types import AVMEParams
from avme_ext.reference import avme_sample_reference

from .helpers import (
    ODD,
    PAPER,
    Sizes,
    assert_within,
    design_may_not_fit,
    fp32_bounds,
    fp64_bound,
    make_inputs,
    make_params,
)

EMULATOR = [(9, 3, Sizes(11, 4, 6, 3), 1), (5, 2, Sizes(13, 4, 9, 4), 3), (1, 1, Sizes(7, 4, 5, 2), 4)]
CUDA = [(B, K, sizes, 4) for sizes in (ODD, PAPER) for B, K in ((1, 1), (7, 12), (4097, 12), (33, 64))]


def _params():
    return [
        *[pytest.param("emulator", *c, id=f"emulator-B{c[0]}-K{c[1]}-D{c[2].D}-sm{c[3]}") for c in EMULATOR],
        *[pytest.param("cuda", *c, id=f"cuda-B{c[0]}-K{c[1]}-D{c[2].D}") for c in CUDA],
    ]


def _sample_run(sample, z, y, params, dtype):
    """Both outputs of the sampler (canvases returned), with z, y, params in ``dtype``."""
    y = None if y is None else y.to(dtype)
    out = sample(z.to(dtype), y, AVMEParams(*[t.detach().to(dtype) for t in params]), True)
    return {"canvas": out.canvas, "canvases": out.canvases}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [0, 10])
@pytest.mark.parametrize(("backend", "B", "K", "sizes", "sms"), _params(), indirect=["backend"])
def test_sample_matches_reference(backend, B, K, sizes, sms, C, dtype, emu_sms, each_design):
    emu_sms(sms)
    params = make_params(sizes, C, dtype=dtype, device=backend.device, grad=False)
    _, y, z = make_inputs(B, K, sizes, C, dtype=dtype, device=backend.device)
    backend.poison()
    with torch.no_grad(), design_may_not_fit():
        got = _sample_run(backend.sample, z, y, params, dtype)
        last = backend.sample(z, y, params, return_canvases=False)
        ref = _sample_run(avme_sample_reference, z, y, params, torch.float64)
        if dtype == torch.float64:
            bounds: float | dict[str, float] = fp64_bound(K, sizes, C)
        else:
            bounds = fp32_bounds(_sample_run(avme_sample_reference, z, y, params, torch.float32), ref)
    assert_within(got, ref, bounds)
    assert last.canvases is None
    assert torch.equal(last.canvas, got["canvas"])


def test_batch_zero(backend):
    K, C = 3, 2
    sizes = Sizes(6, 4, 3, 2)
    p = make_params(sizes, C, device=backend.device, grad=False)
    _, y, z = make_inputs(0, K, sizes, C, device=backend.device)
    s = backend.sample(z, y, p, return_canvases=True)
    assert s.canvas.shape == (0, sizes.D)
    assert s.canvases.shape == (K, 0, sizes.D)


def test_backward_through_the_sampler_raises(backend):
    sizes = Sizes(6, 4, 3, 2)
    p = make_params(sizes, 0, device=backend.device)
    _, _, z = make_inputs(3, 2, sizes, 0, device=backend.device)
    s = backend.sample(z, None, p)
    with pytest.raises(RuntimeError, match="backward through the fused sampler"):
        s.canvas.sum().backward()
