"""``AVME``: the model of the paper on top of :class:`AVMECore`: ELBO, sampling, reconstruction.

The loop (:class:`AVMECore`) draws the canvas s_K; a pixel likelihood
(:mod:`avme_ext.likelihoods`: Bernoulli for binary pixels, a discretized logistic for 8-bit grey or
colour ones, both of mean sigmoid(s_K)) scores the data against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int, check_tensor, check_values
from .config import AVMEConfig
from .core import AVMECore
from .likelihoods import BernoulliLikelihood, PixelLikelihood, bernoulli_nll, make_likelihood

__all__ = ["AVME", "ELBOTerms", "elbo_terms", "gaussian_kl", "iwae_chunking", "log_weights"]

_DEFAULTS = AVMEConfig()
#: The paper's likelihood, used where none is given (it has no parameters, so one serves every model).
_BERNOULLI = BernoulliLikelihood()

#: -log Bernoulli(x; sigmoid(canvas)) summed over pixels: (B, D), (B, D) -> (B,) (the paper's
#: reconstruction term; see :func:`avme_ext.likelihoods.bernoulli_nll`).
reconstruction_nll = bernoulli_nll


class ELBOTerms(NamedTuple):
    """Per-image terms of the negative ELBO, in nats.

    Attributes:
        reconstruction: (B,) -log p(x | z, y) summed over pixels (for the Bernoulli likelihood,
            BCE-with-logits of s_K).
        kl: (B, K) KL(q(z_t | ...) || N(0, I)) of every step.
    """

    reconstruction: Tensor
    kl: Tensor

    @property
    def loss(self) -> Tensor:
        """(B,) negative ELBO: reconstruction + sum_t KL_t."""
        return self.reconstruction + self.kl.sum(dim=1)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last dimension.

    Args:
        mu, logvar: (..., Z).

    Returns:
        (...,) the KL in nats.
    """
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def elbo_terms(
    core: AVMECore,
    x: Tensor,
    y_vec: Tensor | None,
    eps: Tensor | None,
    *,
    generator: torch.Generator | None = None,
    likelihood: PixelLikelihood | None = None,
) -> ELBOTerms:
    """Per-image negative-ELBO terms of inputs already checked, with no host synchronisation.

    What :meth:`AVME.forward` computes after validating its inputs; capturable in a CUDA graph.

    Args:
        core: the model's loop.
        x: (B, D) images in the parameters' dtype and device, as ``likelihood`` reads them.
        y_vec: (B, C) one-hot labels, or None for an unconditional model.
        eps: (K, B, Z) noise, or None to draw it from ``generator``.
        likelihood: p(x | z) (the model's ``likelihood``); None: Bernoulli.

    Returns:
        :class:`ELBOTerms`: reconstruction (B,) and kl (B, K).
    """
    out = core(x, y_vec, eps, generator=generator)
    nll = (_BERNOULLI if likelihood is None else likelihood).nll(out.canvas, x)
    return ELBOTerms(nll, gaussian_kl(out.mu, out.logvar).transpose(0, 1))


def log_weights(
    canvas: Tensor,
    x: Tensor,
    eps: Tensor,
    mu: Tensor,
    logvar: Tensor,
    likelihood: PixelLikelihood | None = None,
) -> Tensor:
    """Log importance weights of whole trajectories: log p(x|z) + sum_t [log N(z_t; 0, I) - log q(z_t)].

    With z_t = mu_t + exp(logvar_t / 2) * eps_t the Gaussian normalisers cancel and
    log N(z_t; 0, I) - log q(z_t) = sum(-z_t^2 / 2 + eps_t^2 / 2 + logvar_t / 2).

    Args:
        canvas: (B, D) final canvas logits.
        x: (B, D) data, as ``likelihood`` reads them.
        eps, mu, logvar: (K, B, Z).
        likelihood: p(x | z); None: Bernoulli.

    Returns:
        (B,) log weights in nats.
    """
    z = mu + torch.exp(0.5 * logvar) * eps
    log_ratio = 0.5 * (eps.square() - z.square() + logvar).sum(dim=(0, 2))
    return log_ratio - (_BERNOULLI if likelihood is None else likelihood).nll(canvas, x)


def iwae_chunking(samples: int, max_rows: int) -> tuple[int, int]:
    """How :meth:`AVME.iwae_bound` splits its work into calls of at most ``max_rows`` trajectories:
    (images per group, samples per call); each group of images takes ``ceil(samples / samples
    per call)`` calls."""
    return max(1, max_rows // samples), min(samples, max_rows)


class AVME(nn.Module):
    """Adaptive Variational Memory Encoding model: the K-step loop and a pixel likelihood.

    Args:
        data_dim, num_classes, enc_hidden, dec_hidden, latent_dim, steps, encoder_input:
            see :class:`AVMEConfig` (defaults: the paper's MNIST sizes, unconditional).
        likelihood: ``"bernoulli"`` (the paper's, binary pixels) or ``"logistic"`` (a discretized
            logistic for 8-bit grey or colour pixels, with a learned log-scale per channel), see
            :mod:`avme_ext.likelihoods`.
        image_shape: (channels, height, width) of the flattened images, see :class:`AVMEConfig`.
        impl: ``"auto"``, ``"cuda"`` or ``"ref"``, see :class:`AVMECore`.
        precision: matrix-product precision of the fused ops, see :class:`AVMECore`.
        device, dtype: of the parameters, as for any ``torch.nn`` module.

    ``impl``, ``precision``, ``device`` and ``dtype`` are keyword-only. The weights are those of
    ``core`` (an :class:`AVMECore`, with its rules on submodules and hooks) and, for the logistic,
    ``likelihood.log_scale`` ((C,)); the Bernoulli likelihood has none, so its ``state_dict`` is
    the core's alone.

    Data conventions: ``x`` is (B, D) with the pixels of each image flattened channels first
    (``image.reshape(-1)`` of a (C, H, W) image). Bernoulli: float, uint8 or bool with values in
    {0, 1}. Logistic: float with values k/255, k = 0..255 (8-bit intensities scaled to [0, 1]).
    ``y`` is (B,) int64 class labels in [0, C) for a conditional model and must be None for an
    unconditional one. These value checks read the data on the host in eager mode; under
    ``torch.compile`` they run as asynchronous asserts so the graph does not break.
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
        likelihood: str = _DEFAULTS.likelihood,
        image_shape: tuple[int, int, int] | None = _DEFAULTS.image_shape,
        *,
        impl: str = "auto",
        precision: str = "fp32",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = AVMEConfig(
            data_dim, num_classes, enc_hidden, dec_hidden, latent_dim, steps, encoder_input, likelihood, image_shape
        )
        self.core = AVMECore.from_config(config, impl=impl, precision=precision, device=device, dtype=dtype)
        self.likelihood = make_likelihood(likelihood, config.resolved_image_shape, device=device, dtype=dtype)
        self._config = config

    @classmethod
    def from_config(cls, config: AVMEConfig, **kwargs: Any) -> AVME:
        """Build a model from an :class:`AVMEConfig` (``kwargs``: impl, precision, device, dtype)."""
        return cls(**config.to_dict(), **kwargs)

    @property
    def config(self) -> AVMEConfig:
        """The architecture: ``core``'s loop, the likelihood and the image shape."""
        return self._config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images (:attr:`AVMEConfig.resolved_image_shape`)."""
        return self._config.resolved_image_shape

    def reset_parameters(self) -> None:
        """Re-initialise every weight as at construction (see :meth:`AVMECore.reset_parameters`;
        the logistic's log-scale goes back to its constant initial value)."""
        self.core.reset_parameters()
        self.likelihood.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def steps(self) -> int:
        return self.config.steps

    def _param(self) -> Tensor:
        return self.core.write.weight

    # ----------------------------------------------------------------- inputs
    def check_images(self, x: Tensor) -> Tensor:
        """Validate images (B, D) for the likelihood (binary, or k/255) and return them in the
        parameters' dtype and device."""
        check_tensor("x", x, (None, self.config.data_dim), floating=False)
        self.likelihood.check_dtype(x)
        weight = self._param()
        x = x.to(device=weight.device, dtype=weight.dtype)
        self.likelihood.check_values(x)
        return x

    def encode_labels(self, y: Tensor | None, batch_size: int) -> Tensor | None:
        """Validate labels (B,) int64 and return them one-hot (B, C), or None for an unconditional model."""
        num_classes = self.config.num_classes
        if num_classes == 0:
            if y is not None:
                raise ValueError("y must be None: this model is unconditional (num_classes=0)")
            return None
        if y is None:
            raise ValueError(f"y is required: this model is conditional (num_classes={num_classes})")
        check_tensor("y", y, (batch_size,), floating=False)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")
        check_values(
            (y >= 0) & (y < num_classes),
            f"y must hold labels in [0, {num_classes})",
            lambda: f", got values in [{int(y.min())}, {int(y.max())}]",
        )
        weight = self._param()
        return F.one_hot(y.to(device=weight.device, dtype=torch.int64), num_classes).to(weight.dtype)

    # ----------------------------------------------------------------- ELBO
    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        eps: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ELBOTerms:
        """Per-image negative-ELBO terms for one draw of the noise.

        Args:
            x: (B, D) images (binary for the Bernoulli likelihood, k/255 for the logistic).
            y: (B,) labels for a conditional model, else None.
            eps: (K, B, Z) noise; drawn from ``generator`` when None (giving both is an error).

        Returns:
            :class:`ELBOTerms`: reconstruction (B,) and kl (B, K).
        """
        x = self.check_images(x)
        y_vec = self.encode_labels(y, x.shape[0])
        return elbo_terms(self.core, x, y_vec, eps, generator=generator, likelihood=self.likelihood)

    def loss(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        kl_weight: float = 1.0,
        eps: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, ELBOTerms]:
        """Training objective: batch mean of reconstruction + kl_weight * sum_t KL_t.

        ``x``, ``y``, ``eps`` and ``generator`` are as for :meth:`forward`.

        Returns:
            (scalar loss, the :class:`ELBOTerms` it was computed from).
        """
        terms = self(x, y, eps=eps, generator=generator)
        return (terms.reconstruction + kl_weight * terms.kl.sum(dim=1)).mean(), terms

    # ----------------------------------------------------------------- likelihood bounds
    def log_weights(self, x: Tensor, y_vec: Tensor | None, eps: Tensor) -> Tensor:
        """Log importance weights (B,) of trajectories with noise ``eps`` (K, B, Z).

        ``x`` must already be checked (see :meth:`check_images`) and ``y_vec`` one-hot.
        """
        out = self.core(x, y_vec, eps)
        return log_weights(out.canvas, x, eps, out.mu, out.logvar, self.likelihood)

    @torch.no_grad()
    def iwae_bound(
        self,
        x: Tensor,
        y: Tensor | None = None,
        samples: int = 5000,
        *,
        max_rows: int = 20000,
        generator: torch.Generator | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Importance-weighted lower bound on log p(x) (or log p(x | y)) per image, in nats.

        log p(x) >= logsumexp_s log w_s - log S over S whole trajectories, computed in chunks
        of at most ``max_rows`` trajectories so memory stays bounded for any S.

        Args:
            x: (B, D) images (binary for the Bernoulli likelihood, k/255 for the logistic).
            y: (B,) labels (conditional model: gives log p(x | y)), else None.
            samples: S, trajectories per image (S=1 is the ELBO of one draw).
            max_rows: trajectories evaluated at once.
            progress: called with the number of images after each group of images is done
                (groups of ``max(1, max_rows // samples)`` images), e.g. to move a progress bar.

        Returns:
            (B,) the bound.
        """
        check_positive_int("samples", samples)
        check_positive_int("max_rows", max_rows)
        x = self.check_images(x)
        y_vec = self.encode_labels(y, x.shape[0])
        bounds = []
        images_per_chunk, samples_per_chunk = iwae_chunking(samples, max_rows)
        for start in range(0, x.shape[0], images_per_chunk):
            xs = x[start : start + images_per_chunk]
            ys = None if y_vec is None else y_vec[start : start + images_per_chunk]
            n = xs.shape[0]
            chunks = []
            for s0 in range(0, samples, samples_per_chunk):
                s = min(samples_per_chunk, samples - s0)
                x_rep = xs.repeat_interleave(s, dim=0)
                y_rep = None if ys is None else ys.repeat_interleave(s, dim=0)
                eps = self.core.draw_noise(n * s, generator)
                chunks.append(self.log_weights(x_rep, y_rep, eps).view(n, s))
            bounds.append(torch.logsumexp(torch.cat(chunks, dim=1), dim=1) - math.log(samples))
            if progress is not None:
                progress(n)
        return torch.cat(bounds) if bounds else x.new_zeros(0)

    @torch.no_grad()
    def class_log_likelihoods(
        self,
        x: Tensor,
        samples: int = 5000,
        *,
        max_rows: int = 20000,
        generator: torch.Generator | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """IWAE bounds on log p(x | y=c) for every class c of a conditional model: (B, D) -> (B, C).

        ``progress`` as for :meth:`iwae_bound`, called for every group of images of every class.
        """
        if self.config.num_classes == 0:
            raise ValueError("class_log_likelihoods needs a conditional model (num_classes > 0)")
        columns = []
        for c in range(self.config.num_classes):
            labels = torch.full((x.shape[0],), c, dtype=torch.int64, device=x.device)
            columns.append(
                self.iwae_bound(x, labels, samples, max_rows=max_rows, generator=generator, progress=progress)
            )
        return torch.stack(columns, dim=1)

    @staticmethod
    def marginal_from_class_bounds(class_bounds: Tensor) -> Tensor:
        """log p(x) >= logsumexp_y log p(x | y) - log C under a uniform label prior: (B, C) -> (B,)."""
        return torch.logsumexp(class_bounds, dim=1) - math.log(class_bounds.shape[1])

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        y: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Draw images from the prior: z_t ~ N(0, I), decoder and write only.

        Args:
            num_samples: B (unconditional), or None to take it from ``y``.
            y: (B,) labels for a conditional model.
            return_steps: also return sigmoid(s_t) for every step (the unrolled strip).

        Returns:
            (means (B, D), steps (K, B, D) or None): the means sigmoid(s_K) of p(x | z) and the
            canvases sigmoid(s_t). For either likelihood the mean is the picture to show (a draw
            of the pixels themselves, ``self.likelihood.sample(means)``, adds independent pixel
            noise: salt and pepper for the Bernoulli, grain for the logistic).
        """
        if y is not None:
            if num_samples is not None and num_samples != y.shape[0]:
                raise ValueError(f"num_samples={num_samples} does not match y's batch size {y.shape[0]}")
            batch = y.shape[0]
        elif num_samples is None:
            raise ValueError("sample() needs num_samples (unconditional) or y (conditional)")
        else:
            batch = num_samples
        check_positive_int("num_samples", batch, minimum=0)
        y_vec = self.encode_labels(y, batch)
        out = self.core.sample(y=y_vec, batch_size=batch, generator=generator, return_canvases=return_steps)
        steps = torch.sigmoid(out.canvases) if out.canvases is not None else None
        return torch.sigmoid(out.canvas), steps

    @torch.no_grad()
    def reconstruct(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        return_steps: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Encode and redraw images: (B, D) -> (sigmoid(s_K) (B, D), sigmoid(s_t) (K, B, D) or None)."""
        x = self.check_images(x)
        y_vec = self.encode_labels(y, x.shape[0])
        out = self.core(x, y_vec, generator=generator, return_canvases=return_steps)
        steps = torch.sigmoid(out.canvases) if out.canvases is not None else None
        return torch.sigmoid(out.canvas), steps
