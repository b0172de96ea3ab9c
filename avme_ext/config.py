"""``AVMEConfig``: the sizes and options that define an AVME model, as plain JSON-able data (no torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ._value_checks import check_choice, check_positive_int
from .choices import ENCODER_INPUTS

__all__ = ["AVMEConfig"]


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
    """

    data_dim: int = 784
    num_classes: int = 0
    enc_hidden: int = 400
    dec_hidden: int = 400
    latent_dim: int = 100
    steps: int = 12
    encoder_input: str = "canvas"

    def __post_init__(self) -> None:
        for field in ("data_dim", "enc_hidden", "dec_hidden", "latent_dim", "steps"):
            check_positive_int(field, getattr(self, field))
        check_positive_int("num_classes", self.num_classes, minimum=0)
        check_choice("encoder_input", self.encoder_input, ENCODER_INPUTS)

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
        return cls(**data)
