""":class:`RawPart`: one official part of a data set (a file, a folder) as stored: uint8 images and labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RawPart"]


@dataclass(frozen=True, eq=False)
class RawPart:
    """One part of a data set as read from its files, before splits, resizing and binarization.

    Attributes:
        images: ``(N, C, H, W)`` uint8: 8-bit intensities, or 0/1 when ``binary``.
        labels: ``(N,)`` int64 class labels, or all ``-1`` (no labels).
        num_classes: classes of the data set (0: no labels).
        binary: whether the images are 0/1 (already binarized, no grey levels).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    binary: bool = False

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8 or self.images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W) uint8, got {tuple(self.images.shape)} "
                             f"{self.images.dtype}")
        if self.labels.shape != self.images.shape[:1] or self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be ({self.images.shape[0]},) int64, got {tuple(self.labels.shape)} "
                             f"{self.labels.dtype}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def unlabelled(cls, images: torch.Tensor, binary: bool = False) -> RawPart:
        """A part without labels (every label ``-1``, no classes)."""
        return cls(images, torch.full((images.shape[0],), -1, dtype=torch.int64), 0, binary)
