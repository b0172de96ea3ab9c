"""The reference loop against a literal nn.LSTMCell implementation, gradcheck, edge sizes, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avme_ext import AVMECore
from avme_ext.reference import avme_forward_reference, avme_sample_reference
from helpers import DataSizeArgs

SMALL: DataSizeArgs = {"data_dim": 6, "enc_hidden": 5, "dec_hidden": 4, "latent_dim": 3, "steps": 3}


def make_core(num_classes: int = 0, encoder_input: str = "canvas", dtype=torch.float64, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    kwargs = {**SMALL, **sizes}
    return AVMECore(num_classes=num_classes, encoder_input=encoder_input, impl="ref", dtype=dtype, **kwargs)


def make_inputs(core: AVMECore, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    dtype = core.write.weight.dtype
    x = torch.randint(0, 2, (batch, core.data_dim), generator=g).to(dtype)
    y = None
    if core.num_classes:
        y = nn.functional.one_hot(torch.randint(0, core.num_classes, (batch,), generator=g), core.num_classes).to(dtype)
    eps = torch.randn(core.steps, batch, core.latent_dim, generator=g, dtype=dtype)
    return x, y, eps


def literal_forward(core: AVMECore, x, y, eps):
    """DEVELOPERS.md's loop written with the module's own nn.LSTMCell/nn.Linear on concatenations."""
    batch = x.shape[0]
    h_enc = x.new_zeros(batch, core.enc_hidden)
    c_enc = torch.zeros_like(h_enc)
    h_dec = x.new_zeros(batch, core.dec_hidden)
    c_dec = torch.zeros_like(h_dec)
    s = torch.zeros_like(x)
    extra = [y] if y is not None else []
    mus, logvars, canvases = [], [], []
    for t in range(core.steps):
        r = s if core.encoder_input == "canvas" else x - torch.sigmoid(s)
        h_enc, c_enc = core.encoder(torch.cat([x, r, h_dec, *extra], 1), (h_enc, c_enc))
        mu, logvar = core.posterior(h_enc).chunk(2, 1)
        z = mu + torch.exp(logvar / 2) * eps[t]
        h_dec, c_dec = core.decoder(torch.cat([z, *extra], 1), (h_dec, c_dec))
        s = s + core.write(h_dec)
        mus.append(mu)
        logvars.append(logvar)
        canvases.append(s)
    return s, torch.stack(mus), torch.stack(logvars), torch.stack(canvases)


CASES = [(c, e) for c in (0, 4) for e in ("canvas", "error")]


@pytest.mark.parametrize(("num_classes", "encoder_input"), CASES)
def test_reference_equals_literal_lstmcell_loop(num_classes, encoder_input):
    core = make_core(num_classes, encoder_input, data_dim=11, enc_hidden=9, dec_hidden=7, latent_dim=5, steps=4)
    x, y, eps = make_inputs(core, batch=6)
    out = core(x, y, eps, return_canvases=True)
    expected = literal_forward(core, x, y, eps)
    for got, want in zip((out.canvas, out.mu, out.logvar, out.canvases), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_classes", [0, 4])
def test_sampler_equals_literal_decoder_loop(num_classes):
    core = make_core(num_classes)
    _, y, z = make_inputs(core, batch=5)
    out = core.sample(z, y, return_canvases=True)
    s = z.new_zeros(5, core.data_dim)
    h = z.new_zeros(5, core.dec_hidden)
    c = torch.zeros_like(h)
    extra = [y] if y is not None else []
    for t in range(core.steps):
        h, c = core.decoder(torch.cat([z[t], *extra], 1), (h, c))
        s = s + core.write(h)
        torch.testing.assert_close(out.canvases[t], s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.canvas, s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("num_classes", "encoder_input"), CASES)
def test_gradcheck_forward(num_classes, encoder_input):
    core = make_core(num_classes, encoder_input)
    x, y, eps = make_inputs(core, batch=3)
    x = x.clone().requires_grad_(True)
    params = core.loop_params()
    names = params._fields

    def fn(x, eps, *flat):
        p = type(params)(**dict(zip(names, flat, strict=True)))
        out = avme_forward_reference(x, y, eps, p, encoder_input, return_canvases=True)
        return out.canvas, out.mu, out.logvar, out.canvases

    flat = [t.detach().clone().requires_grad_(True) for t in params]
    eps = eps.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, eps, *flat), eps=1e-6, atol=1e-6)


def test_gradcheck_sampler():
    core = make_core(4)
    _, y, z = make_inputs(core, batch=3)
    params = core.loop_params()
    flat = [t.detach().clone().requires_grad_(True) for t in params]

    def fn(z, *flat):
        return avme_sample_reference(z, y, type(params)(*flat), return_canvases=True).canvases

    assert torch.autograd.gradcheck(fn, (z.clone().requires_grad_(True), *flat), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("batch", "steps"), [(0, 3), (1, 1), (2, 1), (7, 5)])
def test_edge_sizes(batch, steps):
    core = make_core(0, steps=steps)
    x, y, eps = make_inputs(core, batch)
    out = core(x, y, eps, return_canvases=True)
    assert out.canvas.shape == (batch, core.data_dim)
    assert out.mu.shape == out.logvar.shape == (steps, batch, core.latent_dim)
    assert out.canvases.shape == (steps, batch, core.data_dim)
    if batch:
        torch.testing.assert_close(out.canvases[-1], out.canvas)
    assert core(x, eps=eps).canvases is None


def test_noise_from_generator_is_reproducible():
    core = make_core(0)
    x, _, _ = make_inputs(core, 4)
    a = core(x, generator=torch.Generator().manual_seed(3)).canvas
    b = core(x, generator=torch.Generator().manual_seed(3)).canvas
    c = core(x, generator=torch.Generator().manual_seed(4)).canvas
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_state_dict_is_plain_pytorch_and_round_trips():
    core = make_core(4, "error")
    expected_keys = {
        f"{m}.{p}"
        for m, ps in {
            "encoder": ("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
            "decoder": ("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
            "posterior": ("weight", "bias"),
            "write": ("weight", "bias"),
        }.items()
        for p in ps
    }
    assert set(core.state_dict()) == expected_keys
    other = make_core(4, "error", seed=99)
    x, y, eps = make_inputs(core, 3)
    assert not torch.allclose(other(x, y, eps).canvas, core(x, y, eps).canvas)
    other.load_state_dict(core.state_dict())
    torch.testing.assert_close(other(x, y, eps).canvas, core(x, y, eps).canvas, rtol=0, atol=0)
    assert isinstance(core.encoder, nn.LSTMCell)
    assert isinstance(core.decoder, nn.LSTMCell)


def test_bad_inputs_name_the_argument():
    core = make_core(4)
    x, y, eps = make_inputs(core, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 6\)"):
        core(x[:, :5], y, eps)
    with pytest.raises(TypeError, match=r"x must have dtype torch\.float64"):
        core(x.float(), y, eps)
    with pytest.raises(ValueError, match=r"eps must have shape \(3, 3, 3\)"):
        core(x, y, eps[:2])
    with pytest.raises(ValueError, match="y is required"):
        core(x, None, eps)
    with pytest.raises(ValueError, match=r"y must have shape \(3, 4\)"):
        core(x, y[:, :2], eps)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        core([[0.0] * 6], y, eps)
    unconditional = make_core(0)
    with pytest.raises(ValueError, match="y must be None"):
        unconditional(x, y, eps)
    with pytest.raises(ValueError, match="z must have shape"):
        unconditional.sample(torch.zeros(2, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoder_input": "diff"}, "encoder_input must be one of"),
        ({"impl": "triton"}, "impl must be one of"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"latent_dim": 2.5}, "latent_dim must be an integer"),
        ({"num_classes": -1}, "num_classes must be an integer >= 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AVMECore(**{**SMALL, **kwargs})


def test_impl_cuda_without_cuda_tensors_is_an_error():
    core = AVMECore(**SMALL, impl="cuda")
    x = torch.zeros(2, SMALL["data_dim"])
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        core(x)


def test_tensors_on_another_device_are_refused():
    core = make_core(4)
    x, y, eps = make_inputs(core, 3)
    with pytest.raises(ValueError, match=r"x must be on device cpu \(the parameters' device\), got meta"):
        core(x.to("meta"), y, eps)
    with pytest.raises(ValueError, match="eps must be on device cpu"):
        core(x, y, eps.to("meta"))
    with pytest.raises(ValueError, match="y must be on device cpu"):
        core(x, y.to("meta"), eps)
