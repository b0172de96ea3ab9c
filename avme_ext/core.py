"""``AVMECore``: the K-step recurrent VAE loop as a drop-in ``nn.Module``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from ._checks import check_choice, check_loop_inputs, check_positive_int
from .loop_types import ENCODER_INPUTS, AVMEParams, ForwardOutput, SampleOutput
from .reference import avme_forward_reference, avme_sample_reference

__all__ = ["AVMECore", "IMPLS"]

IMPLS = ("auto", "cuda", "ref")


class AVMECore(nn.Module):
    """The AVME encoder/decoder loop over K steps, usable inside any torch model like ``nn.LSTM``.

    Parameters are two :class:`torch.nn.LSTMCell` and two :class:`torch.nn.Linear`, so the
    ``state_dict`` is plain PyTorch and identical whichever implementation runs:

    - ``encoder``: ``LSTMCell(2*D + Hd + C, He)`` on ``[x, r_t, h_dec, y]``
    - ``posterior``: ``Linear(He, 2*Z)`` giving ``[mu_t, logvar_t]``
    - ``decoder``: ``LSTMCell(Z + C, Hd)`` on ``[z_t, y]``
    - ``write``: ``Linear(Hd, D)`` added to the canvas

    Args:
        data_dim: D, pixels per image.
        num_classes: C, size of the conditioning vector y (0: unconditional, no y).
        enc_hidden: He, encoder LSTM units.
        dec_hidden: Hd, decoder LSTM units.
        latent_dim: Z, latent size per step.
        steps: K, number of steps.
        encoder_input: ``"canvas"`` (r_t = s_{t-1}, the default) or ``"error"``
            (r_t = x - sigmoid(s_{t-1}), DRAW's).
        impl: ``"auto"`` (fused CUDA ops for CUDA tensors when built, reference otherwise),
            ``"cuda"`` (fused ops, error if unavailable) or ``"ref"`` (pure PyTorch).
        precision: matrix-product precision of the fused ops: ``"fp32"`` (default),
            ``"tf32"`` or ``"bf16"`` (tensor cores, fp32 accumulation). The reference
            always computes in the input dtype.

    Shapes:
        forward: x (B, D), y (B, C) or None, eps (K, B, Z) -> :class:`ForwardOutput`
        sample: z (K, B, Z), y (B, C) or None -> :class:`SampleOutput`
    """

    def __init__(
        self,
        data_dim: int = 784,
        num_classes: int = 0,
        enc_hidden: int = 400,
        dec_hidden: int = 400,
        latent_dim: int = 100,
        steps: int = 12,
        encoder_input: str = "canvas",
        impl: str = "auto",
        precision: str = "fp32",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("data_dim", data_dim)
        check_positive_int("num_classes", num_classes, minimum=0)
        check_positive_int("enc_hidden", enc_hidden)
        check_positive_int("dec_hidden", dec_hidden)
        check_positive_int("latent_dim", latent_dim)
        check_positive_int("steps", steps)
        check_choice("encoder_input", encoder_input, ENCODER_INPUTS)
        check_choice("impl", impl, IMPLS)
        check_choice("precision", precision, ops.PRECISIONS)
        self.data_dim = data_dim
        self.num_classes = num_classes
        self.enc_hidden = enc_hidden
        self.dec_hidden = dec_hidden
        self.latent_dim = latent_dim
        self.steps = steps
        self.encoder_input = encoder_input
        self.impl = impl
        self.precision = precision
        factory = {"device": device, "dtype": dtype}
        self.encoder = nn.LSTMCell(2 * data_dim + dec_hidden + num_classes, enc_hidden, **factory)
        self.posterior = nn.Linear(enc_hidden, 2 * latent_dim, **factory)
        self.decoder = nn.LSTMCell(latent_dim + num_classes, dec_hidden, **factory)
        self.write = nn.Linear(dec_hidden, data_dim, **factory)

    def extra_repr(self) -> str:
        return (
            f"data_dim={self.data_dim}, num_classes={self.num_classes}, enc_hidden={self.enc_hidden}, "
            f"dec_hidden={self.dec_hidden}, latent_dim={self.latent_dim}, steps={self.steps}, "
            f"encoder_input={self.encoder_input!r}, impl={self.impl!r}, precision={self.precision!r}"
        )

    def loop_params(self) -> AVMEParams:
        """The module's parameters in the layout the loop functions take."""
        return AVMEParams(
            enc_w_ih=self.encoder.weight_ih,
            enc_w_hh=self.encoder.weight_hh,
            enc_b_ih=self.encoder.bias_ih,
            enc_b_hh=self.encoder.bias_hh,
            q_w=self.posterior.weight,
            q_b=self.posterior.bias,
            dec_w_ih=self.decoder.weight_ih,
            dec_w_hh=self.decoder.weight_hh,
            dec_b_ih=self.decoder.bias_ih,
            dec_b_hh=self.decoder.bias_hh,
            write_w=self.write.weight,
            write_b=self.write.bias,
        )

    def resolved_impl(self, device: torch.device) -> str:
        """The implementation that runs for tensors on ``device``: ``"cuda"`` or ``"ref"``."""
        if self.impl == "ref":
            return "ref"
        fused = device.type == "cuda" and ops.is_available()
        if self.impl == "cuda" and not fused:
            reason = "the tensors are not on a CUDA device" if device.type != "cuda" else (
                "the avme CUDA extension is not built (see the README's build section)"
            )
            raise RuntimeError(f"AVMECore(impl='cuda') cannot run: {reason}")
        return "cuda" if fused else "ref"

    def draw_noise(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw standard normal noise (K, B, Z) on the parameters' device and dtype."""
        weight = self.write.weight
        return torch.randn(
            (self.steps, batch_size, self.latent_dim),
            generator=generator,
            device=weight.device,
            dtype=weight.dtype,
        )

    def _check(self, x: Tensor | None, y: Tensor | None, noise: Tensor, noise_name: str) -> None:
        weight = self.write.weight
        check_loop_inputs(
            x,
            y,
            noise,
            data_dim=self.data_dim,
            num_classes=self.num_classes,
            latent_dim=self.latent_dim,
            steps=self.steps,
            dtype=weight.dtype,
            device=weight.device,
            noise_name=noise_name,
        )

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        eps: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        return_canvases: bool = False,
    ) -> ForwardOutput:
        """Run the encoder/decoder loop.

        Args:
            x: (B, D) data, on the parameters' device and dtype.
            y: (B, C) conditioning vector (e.g. one-hot labels); None when C == 0.
            eps: (K, B, Z) reparameterisation noise; drawn from ``generator`` when None.
            generator: random source for ``eps`` when it is not given.
            return_canvases: also return every step's canvas logits (K, B, D).

        Returns:
            :class:`ForwardOutput`: canvas (B, D) logits of the final canvas s_K,
            mu and logvar (K, B, Z), canvases (K, B, D) or None.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if eps is None:
            eps = self.draw_noise(x.shape[0] if x.dim() == 2 else 0, generator)
        self._check(x, y, eps, "eps")
        params = self.loop_params()
        if self.resolved_impl(x.device) == "cuda":
            return ops.fused_forward(x, y, eps, params, self.encoder_input, return_canvases, self.precision)
        return avme_forward_reference(x, y, eps, params, self.encoder_input, return_canvases)

    def sample(
        self,
        z: Tensor | None = None,
        y: Tensor | None = None,
        *,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        return_canvases: bool = False,
    ) -> SampleOutput:
        """Run the decoder and write loop only, from prior draws.

        Args:
            z: (K, B, Z) latents; drawn from N(0, I) with ``generator`` when None.
            y: (B, C) conditioning vector; None when C == 0.
            batch_size: B when ``z`` is None (defaults to ``y``'s batch size).
            generator: random source for ``z``.
            return_canvases: also return every step's canvas logits (K, B, D).

        Returns:
            :class:`SampleOutput`: canvas (B, D) logits and canvases (K, B, D) or None.
        """
        if z is None:
            if batch_size is None:
                if y is None:
                    raise ValueError("sample() needs z, batch_size, or y to know the batch size")
                batch_size = y.shape[0]
            check_positive_int("batch_size", batch_size, minimum=0)
            z = self.draw_noise(batch_size, generator)
        self._check(None, y, z, "z")
        params = self.loop_params()
        if self.resolved_impl(z.device) == "cuda":
            return ops.fused_sample(z, y, params, return_canvases, self.precision)
        return avme_sample_reference(z, y, params, return_canvases)
