"""``AVMECore``: the K-step recurrent VAE loop as a drop-in ``nn.Module``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import dispatch, ops
from ._checks import check_choice, check_loop_inputs, check_positive_int
from .config import AVMEConfig
from .loop_types import IMPLS, PRECISIONS, AVMEParams, ForwardOutput, SampleOutput
from .reference import avme_forward_reference, avme_sample_reference

__all__ = ["AVMECore", "IMPLS"]

_DEFAULTS = AVMEConfig()

#: The submodules whose weights the loop reads, in the order they are created and initialised,
#: with the exact class each must be.
_LOOP_MODULES: dict[str, type[nn.Module]] = {
    "encoder": nn.LSTMCell,
    "posterior": nn.Linear,
    "decoder": nn.LSTMCell,
    "write": nn.Linear,
}


def _check_loop_module(name: str, module: nn.Module, expected: type[nn.Module]) -> None:
    """Refuse a submodule whose forward or hooks the fused loop would silently skip."""
    found = type(module)
    # A torch.nn.utils.parametrize'd module is a generated subclass whose weights are computed
    # when read, which is all the loop does: it behaves as the plain class.
    if found is not expected and not (found.__bases__ == (expected,) and parametrize.is_parametrized(module)):
        raise TypeError(
            f"AVMECore.{name} must be exactly torch.nn.{expected.__name__}, got "
            f"{found.__module__}.{found.__qualname__}: the loop reads its weights and never calls its "
            f"forward, so a subclass's own forward (an adapter, say) would be silently skipped"
        )
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        raise RuntimeError(
            f"AVMECore.{name} has hooks registered; hooks on the submodules cannot run because the loop "
            f"is fused (it reads their weights and never calls them): register them on the AVMECore instead"
        )


class AVMECore(nn.Module):
    """The AVME encoder/decoder loop over K steps, usable inside any torch model like ``nn.LSTM``.

    Parameters are two :class:`torch.nn.LSTMCell` and two :class:`torch.nn.Linear`, so the
    ``state_dict`` is plain PyTorch and identical whichever implementation runs:

    - ``encoder``: ``LSTMCell(2*D + Hd + C, He)`` on ``[x, r_t, h_dec, y]``
    - ``posterior``: ``Linear(He, 2*Z)`` giving ``[mu_t, logvar_t]``
    - ``decoder``: ``LSTMCell(Z + C, Hd)`` on ``[z_t, y]``
    - ``write``: ``Linear(Hd, D)`` added to the canvas

    The loop is fused: it reads these submodules' weights and never calls them. So each must
    stay exactly ``nn.LSTMCell`` / ``nn.Linear`` (a subclass with its own forward, such as an
    adapter, is refused with a TypeError; ``torch.nn.utils.parametrize`` works, since it only
    changes the weights), and hooks registered on them cannot run (refused with a RuntimeError;
    hooks on the ``AVMECore`` itself run as usual).

    Args:
        data_dim: D, pixels per image.
        num_classes: C, size of the conditioning vector y (0: unconditional, no y).
        enc_hidden: He, encoder LSTM units.
        dec_hidden: Hd, decoder LSTM units.
        latent_dim: Z, latent size per step.
        steps: K, number of steps.
        encoder_input: ``"canvas"`` (r_t = s_{t-1}, the default) or ``"error"``
            (r_t = x - sigmoid(s_{t-1}), DRAW's).
        impl: ``"auto"`` (per call, :func:`avme_ext.dispatch.auto_impl` chooses from the device,
            dtype, precision, batch size and the model's sizes, the fused ops only where a committed
            benchmark measured them faster), ``"cuda"`` (fused ops, error if unavailable) or
            ``"ref"`` (pure PyTorch).
        precision: matrix-product precision of the fused ops: ``"fp32"`` (default),
            ``"tf32"`` or ``"bf16"`` (tensor cores, fp32 accumulation). The reference
            always computes in the input dtype.
        device, dtype: of the parameters, as for any ``torch.nn`` module.

    The size defaults and their validation are those of :class:`AVMEConfig` (``config``
    holds them); ``impl``, ``precision``, ``device`` and ``dtype`` are keyword-only.

    Shapes:
        forward: x (B, D), y (B, C) or None, eps (K, B, Z) -> :class:`ForwardOutput`
        sample: z (K, B, Z), y (B, C) or None -> :class:`SampleOutput`
    """

    def __init__(
        self,
        data_dim: int = _DEFAULTS.data_dim,
        num_classes: int = _DEFAULTS.num_classes,
        enc_hidden: int = _DEFAULTS.enc_hidden,
        dec_hidden: int = _DEFAULTS.dec_hidden,
        latent_dim: int = _DEFAULTS.latent_dim,
        steps: int = _DEFAULTS.steps,
        encoder_input: str = _DEFAULTS.encoder_input,
        *,
        impl: str = "auto",
        precision: str = "fp32",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = AVMEConfig(data_dim, num_classes, enc_hidden, dec_hidden, latent_dim, steps, encoder_input)
        check_choice("impl", impl, IMPLS)
        check_choice("precision", precision, PRECISIONS)
        self.config = config
        self.impl = impl
        self.precision = precision
        self.encoder = nn.LSTMCell(2 * data_dim + dec_hidden + num_classes, enc_hidden, device=device, dtype=dtype)
        self.posterior = nn.Linear(enc_hidden, 2 * latent_dim, device=device, dtype=dtype)
        self.decoder = nn.LSTMCell(latent_dim + num_classes, dec_hidden, device=device, dtype=dtype)
        self.write = nn.Linear(dec_hidden, data_dim, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, config: AVMEConfig, **kwargs: Any) -> AVMECore:
        """Build a core from an :class:`AVMEConfig` (``kwargs``: impl, precision, device, dtype).

        Only the loop's fields are read (:meth:`AVMEConfig.loop_options`): the likelihood and the
        image shape belong to the model around the loop (:class:`~avme_ext.model.AVME`).
        """
        return cls(**config.loop_options(), **kwargs)

    @property
    def data_dim(self) -> int:
        return self.config.data_dim

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def enc_hidden(self) -> int:
        return self.config.enc_hidden

    @property
    def dec_hidden(self) -> int:
        return self.config.dec_hidden

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def encoder_input(self) -> str:
        return self.config.encoder_input

    def extra_repr(self) -> str:
        options = {**self.config.loop_options(), "impl": self.impl, "precision": self.precision}
        return ", ".join(f"{name}={value!r}" for name, value in options.items())

    def reset_parameters(self) -> None:
        """Re-initialise every weight as ``nn.LSTMCell`` / ``nn.Linear`` do at construction.

        With the global seed set as before construction this reproduces the construction's
        weights, so ``AVMECore(..., device="meta").to_empty(device=d)`` followed by
        ``reset_parameters()`` gives the module that ``AVMECore(..., device=d)`` would.
        """
        for name in _LOOP_MODULES:
            getattr(self, name).reset_parameters()

    def loop_params(self) -> AVMEParams:
        """The module's parameters in the layout the loop functions take.

        Raises:
            TypeError: a submodule is not exactly ``nn.LSTMCell`` / ``nn.Linear``.
            RuntimeError: hooks are registered on a submodule (they could not run).
        """
        for name, expected in _LOOP_MODULES.items():
            _check_loop_module(name, getattr(self, name), expected)
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

    def fused_design(self, device: torch.device | str, batch_size: int) -> str:
        """The kernel design a fused call on ``device`` with ``batch_size`` rows asks for.

        The one forced by an :func:`avme_ext.ops.design` block; else the design the measured
        crossover table names for this device, dtype, precision and batch size
        (:func:`avme_ext.dispatch.auto_design`; only for a model of the sizes it was measured
        at), as a preference (``"auto:<design>"``, :func:`avme_ext.ops.preferring`): should that
        design not fit the call on this device, the host's own choice runs instead of an error;
        else ``"auto"`` (the host's choice by what fits).
        """
        forced = ops.requested_design()
        if forced != "auto":
            return forced
        measured = dispatch.auto_design(
            torch.device(device), self.write.weight.dtype, self.precision, batch_size, self.config
        )
        return "auto" if measured == "ref" else ops.preferring(measured)

    def resolved_impl(self, device: torch.device | str, batch_size: int | torch.SymInt | None = None) -> str:
        """The implementation that runs for inputs on ``device`` with ``batch_size`` rows.

        Args:
            device: where the inputs live (the parameters' device).
            batch_size: B of the call; ``impl="auto"`` chooses by it (see
                :func:`avme_ext.dispatch.auto_impl`).

        Returns:
            ``"cuda"`` (the fused ops) or ``"ref"`` (the reference); ``"auto"`` when
            ``impl="auto"`` and ``batch_size`` is None, since the choice is made per call.

        Raises:
            RuntimeError: ``impl="cuda"`` and the fused ops cannot run on ``device``.
        """
        device = torch.device(device)
        if self.impl == "ref":
            return "ref"
        if self.impl == "cuda":
            if device.type != "cuda":
                raise RuntimeError("AVMECore(impl='cuda') cannot run: the tensors are not on a CUDA device")
            if not ops.is_available():
                raise RuntimeError(
                    "AVMECore(impl='cuda') cannot run: the avme CUDA extension is not built "
                    "(see the README's build section)"
                )
            return "cuda"
        if batch_size is None:
            return "auto"
        if not isinstance(batch_size, torch.SymInt):  # symbolic while torch.compile traces
            check_positive_int("batch_size", batch_size, minimum=0)
        choice = dispatch.auto_impl(device, self.write.weight.dtype, self.precision, batch_size, self.config)
        if choice not in ("cuda", "ref"):
            raise RuntimeError(f"avme_ext.dispatch.auto_impl returned {choice!r}; expected 'cuda' or 'ref'")
        return choice

    def draw_noise(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw standard normal noise (K, B, Z) on the parameters' device and dtype."""
        weight = self.write.weight
        size = (self.steps, batch_size, self.latent_dim)
        if generator is None:  # only this overload takes a symbolic batch size (torch.compile, dynamic shapes)
            return torch.randn(size, device=weight.device, dtype=weight.dtype)
        return torch.randn(size, generator=generator, device=weight.device, dtype=weight.dtype)

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
            generator: random source for ``eps`` when it is not given (giving both is an error).
            return_canvases: also return every step's canvas logits (K, B, D).

        Returns:
            :class:`ForwardOutput`: canvas (B, D) logits of the final canvas s_K,
            mu and logvar (K, B, Z), canvases (K, B, D) or None.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if eps is None:
            eps = self.draw_noise(x.shape[0] if x.dim() == 2 else 0, generator)
        elif generator is not None:
            raise ValueError("pass eps or generator, not both: the generator only draws eps when eps is None")
        self._check(x, y, eps, "eps")
        params = self.loop_params()
        if self.resolved_impl(x.device, x.shape[0]) == "cuda":
            return ops.fused_forward(
                x, y, eps, params, self.encoder_input, return_canvases, self.precision,
                design=self.fused_design(x.device, x.shape[0]),
            )  # fmt: skip
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
            generator: random source for ``z`` when it is not given (giving both is an error).
            return_canvases: also return every step's canvas logits (K, B, D).

        Returns:
            :class:`SampleOutput`: canvas (B, D) logits and canvases (K, B, D) or None.
        """
        if z is None:
            if batch_size is not None:
                check_positive_int("batch_size", batch_size, minimum=0)
            elif y is not None:
                batch_size = y.shape[0]
            else:
                raise ValueError("sample() needs z, batch_size, or y to know the batch size")
            z = self.draw_noise(batch_size, generator)
        elif generator is not None:
            raise ValueError("pass z or generator, not both: the generator only draws z when z is None")
        self._check(None, y, z, "z")
        params = self.loop_params()
        if self.resolved_impl(z.device, z.shape[1]) == "cuda":
            return ops.fused_sample(
                z, y, params, return_canvases, self.precision, design=self.fused_design(z.device, z.shape[1])
            )
        return avme_sample_reference(z, y, params, return_canvases)
