""":class:`ImageSplit`: one split of an image data set as flattened tensors, and how its pixels reach the model."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch.utils.data import TensorDataset

__all__ = ["IMAGE_SIZE", "MNIST_SHAPE", "NUM_CLASSES", "NUM_PIXELS", "PIXEL_KINDS", "ImageSplit"]

IMAGE_SIZE = 28
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE  # 784
NUM_CLASSES = 10
#: (channels, height, width) of MNIST, the default of :class:`ImageSplit`.
MNIST_SHAPE: tuple[int, int, int] = (1, IMAGE_SIZE, IMAGE_SIZE)
#: What the stored pixels are (see :attr:`ImageSplit.pixels`).
PIXEL_KINDS: tuple[str, ...] = ("binary", "dynamic", "levels")


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split of a flattened image data set.

    Attributes:
        images: ``(N, D)`` images, ``D = channels * height * width`` in (channel, row, column) order.
            Their kind (see :attr:`pixels`) is one of: uint8 0/1 (``binarized``); float32 grey levels in
            [0, 1], binarized afresh at every :meth:`batch` call (dynamic binarization); uint8 8-bit
            intensities 0..255 (``levels``), given to the model as ``k / 255``.
        labels: ``(N,)`` int64 class labels in [0, ``num_classes``), or all ``-1`` when the source has
            no labels (see :attr:`has_labels`).
        binarized: whether ``images`` already hold 0/1 values.
        name: human-readable origin, e.g. ``"binarized_mnist/train"``.
        image_shape: ``(channels, height, width)`` of one image (default MNIST's ``(1, 28, 28)``).
        levels: whether ``images`` are uint8 8-bit intensities (for the discretized logistic likelihood).
        num_classes: classes of the data set (0 when it has no labels).
    """

    images: torch.Tensor
    labels: torch.Tensor
    binarized: bool
    name: str
    image_shape: tuple[int, int, int] = MNIST_SHAPE
    levels: bool = False
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        dim = math.prod(self.image_shape)
        n = self.images.shape[0] if self.images.dim() == 2 else -1
        if len(self.image_shape) != 3 or self.images.dim() != 2 or self.images.shape[1] != dim:
            raise ValueError(
                f"{self.name}: images must be (N, {dim}) for image_shape {self.image_shape}, "
                f"got {tuple(self.images.shape)}"
            )
        if self.labels.shape != (n,) or self.labels.dtype != torch.int64:
            raise ValueError(
                f"{self.name}: labels must be ({n},) int64, got {tuple(self.labels.shape)} {self.labels.dtype}"
            )
        if self.binarized and self.levels:
            raise ValueError(f"{self.name}: images are either binarized (0/1) or 8-bit levels, not both")
        if (self.binarized or self.levels) and self.images.dtype != torch.uint8:
            kind = "binarized" if self.binarized else "8-bit level"
            raise ValueError(f"{self.name}: {kind} images must be uint8, got {self.images.dtype}")
        if self.dynamic and not self.images.is_floating_point():
            raise ValueError(f"{self.name}: gray-level images must be floating point, got {self.images.dtype}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def has_labels(self) -> bool:
        """False when labels are the ``-1`` placeholder (e.g. the label-less amat files)."""
        return len(self) == 0 or bool((self.labels >= 0).all())

    @property
    def dynamic(self) -> bool:
        """Whether :meth:`batch` draws the pixels (dynamic binarization; it then needs a generator)."""
        return not self.binarized and not self.levels

    @property
    def pixels(self) -> str:
        """``"binary"``, ``"dynamic"`` or ``"levels"``: what :meth:`batch` gives (see :data:`PIXEL_KINDS`)."""
        return "binary" if self.binarized else "levels" if self.levels else "dynamic"

    def batch(
        self,
        index: torch.Tensor,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather a batch of images as the model takes them.

        Args:
            index: ``(b,)`` integer (or boolean mask) index into the split.
            generator: required for gray-level splits (dynamic binarization): each pixel is
                drawn from Bernoulli(gray level) with it, so every call gives a fresh draw.
                Ignored by binarized and 8-bit level splits.
            device, dtype: of the returned images.

        Returns:
            ``x`` of shape ``(b, D)`` in ``dtype`` on ``device``: 0/1 values (binarized or dynamic
            splits) or ``k / 255`` (8-bit levels); ``y`` of shape ``(b,)`` int64 labels on ``device``.
        """
        index = torch.as_tensor(index, device=self.images.device)
        x = self.images[index]
        if self.dynamic:
            if generator is None:
                raise ValueError(
                    f"{self.name}: gray-level images are binarized per batch (dynamic "
                    "binarization); pass a torch.Generator as `generator`"
                )
            x = torch.bernoulli(x.to(generator.device, torch.float32), generator=generator)
        elif self.levels:
            return x.to(device=device, dtype=dtype) / 255, self.labels[index].to(device)
        return x.to(device=device, dtype=dtype), self.labels[index].to(device)

    def subset(self, n: int, generator: torch.Generator | None = None) -> ImageSplit:
        """A random subset of ``n`` distinct rows (never simply the first rows: the
        binarized MNIST test split is sorted by label)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"{self.name}: subset size must be in [0, {len(self)}], got {n}")
        index = torch.randperm(len(self), generator=generator)[:n].to(self.images.device)
        return self.take(index, f"{self.name}[subset {n}]")

    def as_dataset(self) -> TensorDataset:
        """A ``TensorDataset`` of (float32 ``(D,)`` image, int64 label) for a DataLoader.

        For a gray-level (dynamic) split the images are the gray levels: binarize each batch
        yourself, e.g. with ``torch.bernoulli``. 8-bit levels are given as ``k / 255``.
        """
        images = self.images.float() / 255 if self.levels else self.images.float()
        return TensorDataset(images, self.labels)

    def take(self, index: torch.Tensor | slice, name: str) -> ImageSplit:
        """The rows ``index`` of this split, named ``name``."""
        return replace(self, images=self.images[index], labels=self.labels[index], name=name)
