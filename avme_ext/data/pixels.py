"""Pixel transforms on uint8 images: channels (grey/RGB), size, and binarization for the Bernoulli likelihood."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .catalog import BINARIZE_MODES
from .errors import check_name

__all__ = ["binarize_levels", "resize", "to_channels"]

#: ITU-R 601-2 luma weights in 16-bit fixed point, as PIL's ``convert("L")`` (so a colour data set made
#: grey here equals the same images made grey by PIL).
_LUMA = (19595, 38470, 7471)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 images with ``channels`` channels (1 or 3).

    RGB to grey is PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 32768) >> 16``;
    grey to RGB repeats the channel.
    """
    have = images.shape[1]
    if have == channels:
        return images
    if (have, channels) == (1, 3):
        return images.expand(-1, 3, -1, -1).contiguous()
    if (have, channels) == (3, 1):
        weights = torch.tensor(_LUMA, dtype=torch.int32).view(1, 3, 1, 1)
        grey = ((images.to(torch.int32) * weights).sum(dim=1, keepdim=True) + 32768) >> 16
        return grey.to(torch.uint8)
    raise ValueError(f"channels must be 1 or 3, got {channels} (images have {have})")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 images resized to ``size x size``: bilinear with antialiasing (area-like
    when shrinking), rounded back to 8 bits. Images already that size are returned as they are."""
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def binarize_levels(levels: torch.Tensor, mode: str, seed: int = 0) -> tuple[torch.Tensor, bool]:
    """Binarize ``(N, D)`` uint8 grey levels (gray level ``g = k / 255``) for the Bernoulli likelihood.

    Args:
        levels: ``(N, D)`` uint8.
        mode: ``"static"``: one Bernoulli(g) draw from a ``torch.Generator`` seeded with ``seed``;
            ``"dynamic"``: keep float32 g, drawn afresh at every batch (see :meth:`ImageSplit.batch`);
            ``"threshold"``: g > 0.5.
        seed: seed of the static draw (one draw over all ``N`` images).

    Returns:
        ``(images, binarized)``: uint8 0/1 images and True, or float32 gray levels and False (dynamic).
    """
    check_name("binarization", mode, BINARIZE_MODES)
    gray = levels.to(torch.float32) / 255
    if mode == "dynamic":
        return gray, False
    if mode == "static":
        return torch.bernoulli(gray, generator=torch.Generator().manual_seed(seed)).to(torch.uint8), True
    return (gray > 0.5).to(torch.uint8), True
