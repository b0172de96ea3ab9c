"""Pure-PyTorch reference of the AVME K-step loop: the specification in code.

Every fused kernel is tested against these functions, and they are the fallback
on CPU (and on CUDA when the extension is not built).

Notation (shapes):
    B  batch size            D  pixels (784 for MNIST)
    C  condition size        (0 for an unconditional model)
    He encoder LSTM units    Hd decoder LSTM units
    Z  latent size           K  steps

For t = 1..K, with all state starting at zero:

    r_t            = s_{t-1}                   (encoder_input="canvas")
                   = x - sigmoid(s_{t-1})      (encoder_input="error")
    h_enc, c_enc   = LSTMCell_enc([x, r_t, h_dec, y], (h_enc, c_enc))
    mu_t, logvar_t = split(Linear_q(h_enc), Z)
    z_t            = mu_t + exp(logvar_t / 2) * eps_t
    h_dec, c_dec   = LSTMCell_dec([z_t, y], (h_dec, c_dec))
    s_t            = s_{t-1} + Linear_write(h_dec)

``LSTMCell`` is exactly :class:`torch.nn.LSTMCell` (gates i, f, g, o).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .loop_types import ENCODER_INPUTS, AVMEParams, ForwardOutput, SampleOutput

__all__ = [
    "lstm_cell",
    "avme_forward_reference",
    "avme_sample_reference",
]


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Finish an ``nn.LSTMCell`` step from its pre-activations.

    Args:
        gates: (B, 4H) pre-activations, gate order i, f, g, o.
        c: (B, H) previous cell state.

    Returns:
        (h, c): the new hidden and cell states, each (B, H).
    """
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def _split_columns(weight: Tensor, sizes: list[int]) -> list[Tensor]:
    """Split a (rows, sum(sizes)) weight into column blocks."""
    return list(weight.split(sizes, dim=1))


def avme_forward_reference(
    x: Tensor,
    y: Tensor | None,
    eps: Tensor,
    params: AVMEParams,
    encoder_input: str = "canvas",
    return_canvases: bool = False,
) -> ForwardOutput:
    """Run the K-step encoder/decoder loop (the training forward).

    Args:
        x: (B, D) data (0/1 pixels for the Bernoulli likelihood; any float works here).
        y: (B, C) conditioning vector (one-hot labels), or None when C == 0.
        eps: (K, B, Z) standard normal noise of the reparameterisation.
        params: the weights, see :class:`AVMEParams`.
        encoder_input: ``"canvas"`` (r_t = s_{t-1}) or ``"error"`` (r_t = x - sigmoid(s_{t-1})).
        return_canvases: also return every step's canvas logits.

    Returns:
        :class:`ForwardOutput` with canvas (B, D), mu and logvar (K, B, Z), canvases (K, B, D) or None.

    The encoder's input product is computed by column blocks,
    ``[x, r, h, y] W^T = x W_x^T + r W_r^T + h W_h^T + y W_y^T``, so the parts that do not
    change across steps (x and y) are computed once; this is the same function as
    ``nn.LSTMCell`` on the concatenation.
    """
    if encoder_input not in ENCODER_INPUTS:
        raise ValueError(f"encoder_input must be one of {ENCODER_INPUTS}, got {encoder_input!r}")
    steps, batch, latent = eps.shape
    data_dim, enc_hidden, dec_hidden = params.data_dim, params.enc_hidden, params.dec_hidden
    num_classes = params.num_classes

    w_x, w_r, w_h, w_y = _split_columns(params.enc_w_ih, [data_dim, data_dim, dec_hidden, num_classes])
    w_z, w_dy = _split_columns(params.dec_w_ih, [latent, num_classes])

    # Step-invariant parts of the two LSTMs' input products (with both biases).
    enc_static = F.linear(x, w_x, params.enc_b_ih + params.enc_b_hh)
    dec_static = params.dec_b_ih + params.dec_b_hh
    if num_classes > 0:
        assert y is not None
        enc_static = enc_static + F.linear(y, w_y)
        dec_static = dec_static + F.linear(y, w_dy)

    zeros = x.new_zeros
    h_enc, c_enc = zeros(batch, enc_hidden), zeros(batch, enc_hidden)
    h_dec, c_dec = zeros(batch, dec_hidden), zeros(batch, dec_hidden)
    canvas = zeros(batch, data_dim)

    mus, logvars, canvases = [], [], []
    for t in range(steps):
        r = canvas if encoder_input == "canvas" else x - torch.sigmoid(canvas)
        enc_gates = enc_static + F.linear(r, w_r) + F.linear(h_dec, w_h) + F.linear(h_enc, params.enc_w_hh)
        h_enc, c_enc = lstm_cell(enc_gates, c_enc)
        mu, logvar = F.linear(h_enc, params.q_w, params.q_b).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * eps[t]
        dec_gates = dec_static + F.linear(z, w_z) + F.linear(h_dec, params.dec_w_hh)
        h_dec, c_dec = lstm_cell(dec_gates, c_dec)
        canvas = canvas + F.linear(h_dec, params.write_w, params.write_b)
        mus.append(mu)
        logvars.append(logvar)
        if return_canvases:
            canvases.append(canvas)

    return ForwardOutput(
        canvas=canvas,
        mu=torch.stack(mus),
        logvar=torch.stack(logvars),
        canvases=torch.stack(canvases) if return_canvases else None,
    )


def avme_sample_reference(
    z: Tensor,
    y: Tensor | None,
    params: AVMEParams,
    return_canvases: bool = False,
) -> SampleOutput:
    """Run the decoder and write loop only (generation).

    Args:
        z: (K, B, Z) latents, N(0, I) draws for sampling from the prior.
        y: (B, C) conditioning vector, or None when C == 0.
        params: the weights (only the decoder and write parts are read).
        return_canvases: also return every step's canvas logits (the unrolled strip).

    Returns:
        :class:`SampleOutput` with canvas (B, D) and canvases (K, B, D) or None.
    """
    steps, batch, latent = z.shape
    w_z, w_dy = _split_columns(params.dec_w_ih, [latent, params.num_classes])
    dec_static = params.dec_b_ih + params.dec_b_hh
    if params.num_classes > 0:
        assert y is not None
        dec_static = dec_static + F.linear(y, w_dy)

    h_dec = z.new_zeros(batch, params.dec_hidden)
    c_dec = z.new_zeros(batch, params.dec_hidden)
    canvas = z.new_zeros(batch, params.data_dim)
    canvases = []
    for t in range(steps):
        dec_gates = dec_static + F.linear(z[t], w_z) + F.linear(h_dec, params.dec_w_hh)
        h_dec, c_dec = lstm_cell(dec_gates, c_dec)
        canvas = canvas + F.linear(h_dec, params.write_w, params.write_b)
        if return_canvases:
            canvases.append(canvas)
    return SampleOutput(canvas=canvas, canvases=torch.stack(canvases) if return_canvases else None)
