"""Pixel likelihoods p(x | z) read from the final canvas s_K: Bernoulli and discretized logistic.

Both have mean ``sigmoid(s_K)``, so the loop (the canvas, the fused kernels, DRAW's error input
``x - sigmoid(s)``) is the same whichever is chosen; only the reconstruction term
-log p(x | z) of the ELBO and of the importance weights changes.

``"bernoulli"`` (:class:`BernoulliLikelihood`, the paper's)
    x is binary (0/1 pixels); -log p(x | z) is BCE-with-logits of s_K summed over pixels. No
    parameters.

``"logistic"`` (:class:`DiscretizedLogistic`)
    x holds 8-bit intensities scaled to [0, 1] (values k/255, grey or colour), and each pixel is
    a logistic of mean ``sigmoid(s_K)`` and scale ``exp(log_scale)`` integrated over its bin of
    width 1/255, the two edge bins reaching to -inf and +inf (PixelCNN++, Salimans et al. 2017;
    IAF, Kingma et al. 2016, on [0, 1] instead of [-1, 1]); see
    :func:`discretized_logistic_log_prob`. The probabilities of the 256 values of a pixel sum
    to 1, so the bound is on a discrete likelihood, comparable in bits per dimension with
    other 8-bit models.

    The learned log-scale is **per channel**: the parameter ``log_scale`` (shape ``(C,)``,
    ``likelihood.log_scale`` in the model's ``state_dict``) is shared by the pixels of a colour
    channel. Why not per pixel: the scale does not depend on z (an image-dependent scale would
    need a second output canvas, and the loop must stay as it is), so it can only describe noise
    that every image shares. Per channel that is each channel's noise level; per pixel it would
    be a fixed map that learns where the training images are constant (MNIST's empty border)
    rather than anything about an image, with D parameters tied to one resolution. The
    per-pixel scale shape (D,) is built from it by :meth:`DiscretizedLogistic.pixel_log_scale`.

Every likelihood is an ``nn.Module`` with the same methods: :meth:`PixelLikelihood.nll` (the
reconstruction term, (B,)), :meth:`PixelLikelihood.log_prob` (per pixel), the data checks, and
:meth:`PixelLikelihood.sample` (a draw of the pixels given their mean).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_values
from .config import LIKELIHOODS

__all__ = [
    "BINS",
    "INIT_LOG_SCALE",
    "LOG_SCALE_MAX",
    "LOG_SCALE_MIN",
    "BernoulliLikelihood",
    "DiscretizedLogistic",
    "PixelLikelihood",
    "bernoulli_nll",
    "discretized_logistic_log_prob",
    "make_likelihood",
]

#: Values of an 8-bit pixel: x = k / (BINS - 1), k = 0..255.
BINS = 256
#: Initial log-scale of the logistic on [0, 1]: scale 0.135, a standard deviation of
#: 0.135 * pi / sqrt(3) = 0.25, about that of the intensities of natural images.
INIT_LOG_SCALE = -2.0
#: The log-scale used is clamped to [LOG_SCALE_MIN, LOG_SCALE_MAX]. The minimum is PixelCNN++'s
#: -7 on [-1, 1] carried to [0, 1] (-7 - ln 2): a scale of about 1/4.4 of a bin's half-width,
#: below which a bin's probability is 0 or 1 to float precision. Above the maximum (scale 1,
#: the whole range) the distribution is flat over [0, 1] anyway.
LOG_SCALE_MIN = -7.0 - math.log(2.0)
LOG_SCALE_MAX = 0.0
#: How far from a bin centre (in bins) a value k/255 may be and still count as that bin: float16
#: data holds k/255 within 1/8 of a bin; continuous data falls outside for most pixels.
_BIN_TOLERANCE = 0.25


def bernoulli_nll(canvas: Tensor, x: Tensor) -> Tensor:
    """-log Bernoulli(x; sigmoid(canvas)) summed over pixels: (B, D), (B, D) -> (B,)."""
    return F.binary_cross_entropy_with_logits(canvas, x, reduction="none").sum(dim=1)


def discretized_logistic_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor, *, bins: int = BINS) -> Tensor:
    """log P(x) per pixel under a logistic of ``mean`` and ``exp(log_scale)`` discretized to ``bins`` values.

    Pixel values are x = k / (bins - 1), k = 0..bins-1, on [0, 1]. Value k has the logistic's
    mass on [x - h, x + h] with h = 1 / (2 (bins - 1)); the first bin extends to -inf and the
    last to +inf, so the ``bins`` probabilities sum to 1. With a = (x + h - mean) / scale and
    b = (x - h - mean) / scale:

    * k = 0: log sigmoid(a);
    * k = bins - 1: log(1 - sigmoid(b)) = log sigmoid(-b);
    * else log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log sigmoid(-b) + log(1 - exp(b - a)),
      an exact identity with no difference of nearly equal numbers: accurate in the far tails,
      where PixelCNN++'s ``cdf_plus - cdf_min`` underflows and needs its mid-bin density
      fallback (not needed here). a - b = 2h / scale depends on the scale only.

    Every branch is finite for a finite log-scale, so gradients are finite at the edge bins too.
    The value's bin is k = round(x * (bins - 1)): x need only be near k / (bins - 1).

    Args:
        x: (..., D) values k / (bins - 1).
        mean: (..., D) the logistic's location (``sigmoid(s_K)``), same shape as ``x``.
        log_scale: log of the scale, broadcastable to ``x`` (e.g. (D,)).
        bins: number of values of a pixel (256 for 8 bits).

    Returns:
        (..., D) log-probabilities, in the promoted dtype of the inputs and at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(mean.dtype, log_scale.dtype), torch.float32)
    levels = bins - 1
    k = torch.round(x.to(dtype) * levels)
    half = 0.5 / levels
    inv_scale = torch.exp(-log_scale.to(dtype))
    centered = k / levels - mean.to(dtype)
    upper = (centered + half) * inv_scale
    lower = (centered - half) * inv_scale
    log_below_upper = F.logsigmoid(upper)  # log P(X <= x + h)
    log_above_lower = F.logsigmoid(-lower)  # log P(X > x - h)
    log_width = torch.log(-torch.expm1(-2.0 * half * inv_scale))  # log(1 - exp(b - a))
    inner = log_below_upper + log_above_lower + log_width
    return torch.where(k <= 0, log_below_upper, torch.where(k >= levels, log_above_lower, inner))


class PixelLikelihood(nn.Module):
    """p(x | z) of the pixels given the final canvas s_K, with mean ``sigmoid(s_K)``.

    Subclasses define :attr:`name`, :meth:`log_prob`, :meth:`check_dtype`, :meth:`check_values`
    and :meth:`sample`.
    """

    name: str = ""

    def reset_parameters(self) -> None:
        """Re-initialise the likelihood's parameters (none by default)."""

    def log_prob(self, canvas: Tensor, x: Tensor) -> Tensor:
        """log p(x_d | s_K) of every pixel: (B, D) canvas logits, (B, D) data -> (B, D)."""
        raise NotImplementedError

    def nll(self, canvas: Tensor, x: Tensor) -> Tensor:
        """-log p(x | z): the reconstruction term, summed over pixels, in nats: (B, D), (B, D) -> (B,)."""
        return -self.log_prob(canvas, x).sum(dim=1)

    def check_dtype(self, x: Tensor) -> None:
        """Refuse a data tensor of a dtype this likelihood cannot read (TypeError naming ``x``)."""
        raise NotImplementedError

    def check_values(self, x: Tensor) -> None:
        """Refuse data values outside this likelihood's support (ValueError naming ``x``)."""
        raise NotImplementedError

    def sample(self, mean: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw pixels from p(x | z) given its mean ``sigmoid(s_K)`` (B, D): (B, D) values of the data's kind."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class BernoulliLikelihood(PixelLikelihood):
    """Binary pixels, x_d ~ Bernoulli(sigmoid(s_K)_d): the paper's likelihood. No parameters."""

    name = "bernoulli"

    def log_prob(self, canvas: Tensor, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(canvas, x, reduction="none")

    def nll(self, canvas: Tensor, x: Tensor) -> Tensor:
        return bernoulli_nll(canvas, x)

    def check_dtype(self, x: Tensor) -> None:
        if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.bool)):
            raise TypeError(f"x must be a float, uint8 or bool tensor of 0/1 pixels, got dtype {x.dtype}")

    def check_values(self, x: Tensor) -> None:
        check_values(
            (x == 0) | (x == 1),
            "x must be binary (every pixel 0 or 1) for the Bernoulli likelihood; "
            "binarize gray levels first (see avme_ext.data), and check for NaN",
        )

    def sample(self, mean: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(mean, generator=generator)


class DiscretizedLogistic(PixelLikelihood):
    """8-bit pixels x = k/255 (grey or colour), a logistic of mean ``sigmoid(s_K)`` per bin of width 1/255.

    Args:
        image_shape: (C, H, W) of the flattened images (channels first, ``D = C * H * W``).
        device, dtype: of the parameter.

    Attributes:
        log_scale: (C,) ``nn.Parameter``, the log of the logistic's scale on [0, 1] for each
            channel (initialised to :data:`INIT_LOG_SCALE`, clamped to
            [:data:`LOG_SCALE_MIN`, :data:`LOG_SCALE_MAX`] where it is used).
    """

    name = "logistic"

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.image_shape = (channels, height, width)
        self.log_scale = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every channel's log-scale to :data:`INIT_LOG_SCALE`."""
        with torch.no_grad():
            self.log_scale.fill_(INIT_LOG_SCALE)

    def pixel_log_scale(self) -> Tensor:
        """(D,) the clamped log-scale of every pixel (channel c's for its H * W pixels)."""
        _, height, width = self.image_shape
        clamped = self.log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        return clamped.repeat_interleave(height * width)

    def log_prob(self, canvas: Tensor, x: Tensor) -> Tensor:
        return discretized_logistic_log_prob(x, torch.sigmoid(canvas), self.pixel_log_scale())

    def check_dtype(self, x: Tensor) -> None:
        if not x.is_floating_point():
            hint = "; divide 8-bit pixels by 255" if x.dtype == torch.uint8 else ""
            raise TypeError(
                f"x must be a float tensor of 8-bit intensities k/255 for the logistic likelihood, "
                f"got dtype {x.dtype}{hint}"
            )

    def check_values(self, x: Tensor) -> None:
        levels = x * (BINS - 1)
        check_values(
            (x >= 0) & (x <= 1) & ((levels - levels.round()).abs() <= _BIN_TOLERANCE),
            "x must hold 8-bit intensities k/255 in [0, 1] for the logistic likelihood "
            "(scale 8-bit pixels by 1/255; not dequantized or continuous values), and no NaN",
        )

    def sample(self, mean: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """A draw of every pixel: mean + scale * logit(u), u ~ U(0, 1), rounded to its bin k/255 in [0, 1]."""
        u = torch.rand(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        tiny = torch.finfo(mean.dtype).tiny
        noise = torch.log(u.clamp_min(tiny)) - torch.log1p(-u)  # logit(u); u < 1 always
        value = mean + self.pixel_log_scale().to(mean.dtype).exp() * noise
        levels = BINS - 1
        return (value * levels).round().clamp(0, levels) / levels

    def extra_repr(self) -> str:
        return f"name={self.name!r}, image_shape={self.image_shape}"


def make_likelihood(
    name: str,
    image_shape: tuple[int, int, int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PixelLikelihood:
    """The likelihood called ``name`` (one of :data:`~avme_ext.config.LIKELIHOODS`) for images of ``image_shape``."""
    check_choice("likelihood", name, LIKELIHOODS)
    if name == "bernoulli":
        return BernoulliLikelihood()
    return DiscretizedLogistic(image_shape, device=device, dtype=dtype)
