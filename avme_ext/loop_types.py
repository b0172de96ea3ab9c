"""The contract of the K-step loop: its weights, its outputs and its options.

The option tuples here (:data:`ENCODER_INPUTS`, :data:`IMPLS`, :data:`PRECISIONS`,
:data:`DESIGNS`) are the single
source of the choices; this module needs only torch, so the CLI and the benchmarks can import
them without the modules or the extension.

Every implementation (the reference in :mod:`avme_ext.reference`, the fused ops in
:mod:`avme_ext.ops`) takes :class:`AVMEParams` and returns :class:`ForwardOutput` /
:class:`SampleOutput`, so callers never depend on which one ran.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["ENCODER_INPUTS", "IMPLS", "PRECISIONS", "DESIGNS", "AVMEParams", "ForwardOutput", "SampleOutput"]

#: What the encoder reads besides x: the canvas s_{t-1} (the paper's) or DRAW's error image.
ENCODER_INPUTS = ("canvas", "error")
#: Implementations of the loop: chosen per call ("auto"), the fused CUDA ops, or the reference.
IMPLS = ("auto", "cuda", "ref")
#: Matrix-product precisions of the fused ops.
PRECISIONS = ("fp32", "tf32", "bf16")
#: Kernel designs of the fused ops: chosen by the host ("auto"), or one forced by name:
#: "rowtile" (a block per tile of batch rows), "persistent" (weight-stationary persistent
#: kernels, small batches), "stagewise" (a GEMM per stage with fused pointwise kernels).
DESIGNS = ("auto", "rowtile", "persistent", "stagewise")


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
