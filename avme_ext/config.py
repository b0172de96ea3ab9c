"""``AVMEConfig``: the sizes and options that define an AVME model, as plain JSON-able data (no torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ._value_checks import check_choice, check_positive_int
from .choices import ENCODER_INPUTS, LIKELIHOODS

__all__ = ["LIKELIHOODS", "LOOP_FIELDS", "AVMEConfig", "default_image_shape"]

#: The fields that define the K-step loop (:class:`~avme_ext.core.AVMECore`); the others say how the
#: model reads its canvas as pixels.
LOOP_FIELDS = ("data_dim", "num_classes", "enc_hidden", "dec_hidden", "latent_dim", "steps", "encoder_input")

_MNIST_SHAPE = (1, 28, 28)


def default_image_shape(data_dim: int) -> tuple[int, int, int]:
    """The (channels, height, width) of ``data_dim`` pixels when none is given: MNIST's (1, 28, 28)
    for 784, else one grey row (1, 1, data_dim)."""
    return _MNIST_SHAPE if data_dim == 784 else (1, 1, data_dim)


def _image_shape_tuple(value: Any) -> tuple[int, int, int]:
    """``value`` as a (C, H, W) tuple of positive ints (a JSON list is accepted), or a clear error."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise ValueError(f"image_shape must be (channels, height, width), got {value!r}")
    channels, height, width = (check_positive_int(f"image_shape's {name}", size)
                               for name, size in zip(("channels", "height", "width"), value))
    return channels, height, width


@dataclass(frozen=True)
class AVMEConfig:
    """Architecture of an AVME model. Defaults are the paper's sizes for MNIST.

    Attributes:
        data_dim: D, pixels per image.
        num_classes: C, number of classes for a conditional model (0: unconditional).
        enc_hidden: He, encoder LSTM units.
        dec_hidden: Hd, decoder LSTM units.
        latent_dim: Z, latent size per step.
        steps: K, number of drawing steps.
        encoder_input: ``"canvas"`` (the paper's) or ``"error"`` (DRAW's error image).
        likelihood: p(x | z): ``"bernoulli"`` (binary pixels, the paper's) or ``"logistic"`` (a
            discretized logistic for 8-bit grey or colour pixels), both with mean sigmoid(s_K).
        image_shape: (channels, height, width) of the flattened images, channels first, with
            ``data_dim == channels * height * width``; None means :func:`default_image_shape`
            ((1, 28, 28) for 784 pixels). A shape equal to that default is stored as None, so a
            config means one thing however it was written (and configs saved before this field
            existed compare equal to new ones). :attr:`resolved_image_shape` is always the tuple.

    Configs are plain data: :meth:`to_dict` / :meth:`from_dict` round-trip through JSON (a list
    ``image_shape`` comes back as a tuple); keys missing from an older file take the defaults.
    """

    data_dim: int = 784
    num_classes: int = 0
    enc_hidden: int = 400
    dec_hidden: int = 400
    latent_dim: int = 100
    steps: int = 12
    encoder_input: str = "canvas"
    likelihood: str = "bernoulli"
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        for field in ("data_dim", "enc_hidden", "dec_hidden", "latent_dim", "steps"):
            check_positive_int(field, getattr(self, field))
        check_positive_int("num_classes", self.num_classes, minimum=0)
        check_choice("encoder_input", self.encoder_input, ENCODER_INPUTS)
        check_choice("likelihood", self.likelihood, LIKELIHOODS)
        if self.image_shape is not None:
            shape = _image_shape_tuple(self.image_shape)
            channels, height, width = shape
            if channels * height * width != self.data_dim:
                raise ValueError(
                    f"image_shape {shape} holds {channels * height * width} pixels but data_dim is "
                    f"{self.data_dim}; data_dim must be channels * height * width"
                )
            object.__setattr__(self, "image_shape", None if shape == default_image_shape(self.data_dim) else shape)

    @property
    def resolved_image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images: ``image_shape``, or the default for ``data_dim``."""
        return self.image_shape if self.image_shape is not None else default_image_shape(self.data_dim)

    @property
    def channels(self) -> int:
        """Colour channels of the images (1: grey, 3: RGB)."""
        return self.resolved_image_shape[0]

    def loop_options(self) -> dict[str, Any]:
        """The fields of the K-step loop (:data:`LOOP_FIELDS`), the arguments of :class:`~avme_ext.core.AVMECore`."""
        return {name: getattr(self, name) for name in LOOP_FIELDS}

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AVMEConfig:
        """Build a config from a dict, refusing unknown keys (a config from another program)."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)  # a JSON list image_shape becomes a tuple in __post_init__
