"""Floating-point operation counts of the AVME workloads, derived from the model equations.

For t = 1..K (see ``avme_ext/reference.py``)::

    h_enc, c_enc   = LSTMCell_enc([x, r_t, h_dec, y], (h_enc, c_enc))   # 4He x (2D + Hd + C) and 4He x He
    mu_t, logvar_t = Linear_q(h_enc)                                      # 2Z x He
    z_t            = mu_t + exp(logvar_t / 2) * eps_t
    h_dec, c_dec   = LSTMCell_dec([z_t, y], (h_dec, c_dec))              # 4Hd x (Z + C) and 4Hd x Hd
    s_t            = s_{t-1} + Linear_write(h_dec)                        # D x Hd

A product of a (B, n) matrix by an (n, m) one counts 2*B*n*m FLOPs (a multiply and an add),
so one step of the forward costs, per the issue's formula::

    encoder gates   2*B*4He*(2D + Hd + C + He)
    posterior       2*B*2Z*He
    decoder gates   2*B*4Hd*(Z + C + Hd)
    write           2*B*D*Hd

Two conventions are reported:

``algorithmic`` (the default, the ``flops`` field of a record)
    The equations as written: the x (and y) columns of the encoder product are multiplied
    at every one of the K steps. This is the model's own cost, independent of how an
    implementation organises it, so rates of different implementations compare directly.
``executed``
    What both the reference and the fused kernel actually compute: the step-invariant x and
    y parts of both LSTMs' input products are computed once per sequence, not K times
    (``enc_static``/``dec_static`` in the reference and the kernels). This is the count that
    ``torch.utils.flop_counter`` measures on the reference (see tests/test_bench.py).

Elementwise work (bias and partial-product adds, LSTM nonlinearities, reparameterisation,
canvas update, losses) is a few tens of operations per hidden unit, latent and pixel per
step, about 30k per row against ~10M matmul FLOPs per row and step at the paper's sizes
(~0.3%): it is not counted.

A training step is counted as forward + backward with backward = 2 x forward (the gradient
with respect to the input and to the weight of every product each cost as much as the
product); the optimizer step (O(parameters)) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ModelSize",
    "PAPER_SIZE",
    "forward_step_flops",
    "forward_flops",
    "train_step_flops",
    "sample_flops",
    "iwae_flops",
    "matmul_flops",
    "BACKWARD_FACTOR",
]

#: backward cost relative to the forward.
BACKWARD_FACTOR = 2


@dataclass(frozen=True)
class ModelSize:
    """Sizes of the model: D pixels, He/Hd LSTM units, Z latent size, C condition size."""

    data_dim: int = 784
    enc_hidden: int = 400
    dec_hidden: int = 400
    latent_dim: int = 100
    num_classes: int = 0


#: The paper's sizes (MNIST, unconditional).
PAPER_SIZE = ModelSize()


def forward_step_flops(batch: int, size: ModelSize) -> int:
    """Algorithmic matmul FLOPs of one step of the encoder/decoder loop for ``batch`` rows."""
    b, d, he, hd, z, c = batch, size.data_dim, size.enc_hidden, size.dec_hidden, size.latent_dim, size.num_classes
    encoder = 2 * b * 4 * he * (2 * d + hd + c + he)
    posterior = 2 * b * 2 * z * he
    decoder = 2 * b * 4 * hd * (z + c + hd)
    write = 2 * b * d * hd
    return encoder + posterior + decoder + write


def _hoisted_savings(batch: int, steps: int, size: ModelSize) -> int:
    """FLOPs saved by computing the step-invariant x/y input products once instead of K times."""
    b, d, he, hd, c = batch, size.data_dim, size.enc_hidden, size.dec_hidden, size.num_classes
    per_sequence = 2 * b * 4 * he * (d + c) + 2 * b * 4 * hd * c
    return (steps - 1) * per_sequence


def forward_flops(batch: int, steps: int, size: ModelSize, *, executed: bool = False) -> int:
    """Matmul FLOPs of the K-step forward (training forward or one IWAE evaluation).

    Args:
        batch: B rows (trajectories).
        steps: K.
        size: the model sizes.
        executed: count the x/y input products once per sequence (what the implementations
            do) instead of once per step (the equations, the default).
    """
    total = steps * forward_step_flops(batch, size)
    if executed:
        total -= _hoisted_savings(batch, steps, size)
    return total


def train_step_flops(batch: int, steps: int, size: ModelSize, *, executed: bool = False) -> int:
    """FLOPs of one training step: forward + backward (= 2 x forward); the optimizer is not counted."""
    return (1 + BACKWARD_FACTOR) * forward_flops(batch, steps, size, executed=executed)


def sample_flops(batch: int, steps: int, size: ModelSize, *, executed: bool = False) -> int:
    """FLOPs of drawing ``batch`` images: decoder gates and write at every step (no encoder)."""
    b, d, hd, z, c = batch, size.data_dim, size.dec_hidden, size.latent_dim, size.num_classes
    per_step = 2 * b * 4 * hd * (z + c + hd) + 2 * b * d * hd
    total = steps * per_step
    if executed:
        total -= (steps - 1) * 2 * b * 4 * hd * c
    return total


def iwae_flops(images: int, samples: int, steps: int, size: ModelSize, *, executed: bool = False) -> int:
    """FLOPs of the IWAE bound: a forward over ``images * samples`` trajectories (no backward)."""
    return forward_flops(images * samples, steps, size, executed=executed)


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) x (k, n) matrix product."""
    return 2 * m * n * k
