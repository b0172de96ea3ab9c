"""The contract of the K-step loop: its weights, its outputs and its options.

The option tuples here (:data:`ENCODER_INPUTS`, :data:`IMPLS`, :data:`PRECISIONS`,
:data:`DESIGNS`) are those of :mod:`avme_ext.choices` (which needs no torch); this module needs
only torch, so the benchmarks can import them without the modules or the extension.

Every implementation (the reference in :mod:`avme_ext.reference`, the fused ops in
:mod:`avme_ext.ops`) takes :class:`AVMEParams` and returns :class:`ForwardOutput` /
:class:`SampleOutput`, so callers never depend on which one ran.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .choices import DESIGNS, ENCODER_INPUTS, IMPLS, PRECISIONS

__all__ = ["ENCODER_INPUTS", "IMPLS", "PRECISIONS", "DESIGNS", "AVMEParams", "ForwardOutput", "SampleOutput"]



class AVMEParams(NamedTuple):
    """The weights of the K-step loop, laid out as ``nn.LSTMCell``/``nn.Linear`` hold them.

    Attributes (shapes):
        enc_w_ih: (4*He, 2*D + Hd + C)  columns ordered [x, r, h_dec, y]
        enc_w_hh: (4*He, He)
        enc_b_ih, enc_b_hh: (4*He,)
        q_w: (2*Z, He)  rows [mu; logvar]
        q_b: (2*Z,)
        dec_w_ih: (4*Hd, Z + C)  columns ordered [z, y]
        dec_w_hh: (4*Hd, Hd)
        dec_b_ih, dec_b_hh: (4*Hd,)
        write_w: (D, Hd)
        write_b: (D,)
    """

    enc_w_ih: Tensor
    enc_w_hh: Tensor
    enc_b_ih: Tensor
    enc_b_hh: Tensor
    q_w: Tensor
    q_b: Tensor
    dec_w_ih: Tensor
    dec_w_hh: Tensor
    dec_b_ih: Tensor
    dec_b_hh: Tensor
    write_w: Tensor
    write_b: Tensor

    @property
    def data_dim(self) -> int:
        return self.write_w.shape[0]

    @property
    def enc_hidden(self) -> int:
        return self.enc_w_hh.shape[1]

    @property
    def dec_hidden(self) -> int:
        return self.dec_w_hh.shape[1]

    @property
    def latent_dim(self) -> int:
        return self.q_w.shape[0] // 2

    @property
    def num_classes(self) -> int:
        return self.dec_w_ih.shape[1] - self.latent_dim


class ForwardOutput(NamedTuple):
    """Result of the training forward.

    Attributes:
        canvas: (B, D) final canvas logits s_K.
        mu: (K, B, Z) posterior means.
        logvar: (K, B, Z) posterior log-variances.
        canvases: (K, B, D) canvas logits s_1..s_K, or None when not requested.
    """

    canvas: Tensor
    mu: Tensor
    logvar: Tensor
    canvases: Tensor | None


class SampleOutput(NamedTuple):
    """Result of the decoder-only sampler.

    Attributes:
        canvas: (B, D) final canvas logits s_K.
        canvases: (K, B, D) canvas logits s_1..s_K, or None when not requested.
    """

    canvas: Tensor
    canvases: Tensor | None
