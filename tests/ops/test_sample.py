"""avme::sample (the decoder-only sampler) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from .helpers import ODD, PAPER, Sizes, compare_sample_with_reference, make_inputs, make_params

EMULATOR = [(9, 3, Sizes(11, 4, 6, 3), 1), (5, 2, Sizes(13, 4, 9, 4), 3), (1, 1, Sizes(7, 4, 5, 2), 4)]
CUDA = [(B, K, sizes, 4) for sizes in (ODD, PAPER) for B, K in ((1, 1), (7, 12), (4097, 12), (33, 64))]


def _params():
    return [
        *[pytest.param("emulator", *c, id=f"emulator-B{c[0]}-K{c[1]}-D{c[2].D}-sm{c[3]}") for c in EMULATOR],
        *[pytest.param("cuda", *c, id=f"cuda-B{c[0]}-K{c[1]}-D{c[2].D}") for c in CUDA],
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [0, 10])
@pytest.mark.parametrize(("backend", "B", "K", "sizes", "sms"), _params(), indirect=["backend"])
def test_sample_matches_reference(backend, B, K, sizes, sms, C, dtype, emu_sms, each_design):
    emu_sms(sms)
    compare_sample_with_reference(backend, B, K, sizes, C, dtype)


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
