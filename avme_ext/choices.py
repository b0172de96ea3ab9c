"""The choices of avme's options, importable without torch.

One tuple per option, the single source of its choices: the modules that implement an option
(:mod:`avme_ext.loop_types`, :mod:`avme_ext.data`, :mod:`avme_ext.checkpoint`,
:mod:`avme_ext.training.config`) re-export these objects, and the ``avme`` command builds its
parsers from them without importing torch (``avme --help`` answers at once).
"""

from __future__ import annotations

__all__ = ["BINARIZE_MODES", "CHANNELS", "DATASETS", "DESIGNS", "EMNIST_SPLITS", "ENCODER_INPUTS", "EXPORT_DTYPE_NAMES",
           "IMPLS", "LIKELIHOODS", "PRECISIONS", "SPLITS"]

#: What the encoder reads besides x: the canvas s_{t-1} (the paper's) or DRAW's error image.
ENCODER_INPUTS = ("canvas", "error")
#: The pixel likelihoods p(x | z): Bernoulli for binary pixels, a discretized logistic for 8-bit grey
#: or colour ones (see :mod:`avme_ext.likelihoods`).
LIKELIHOODS = ("bernoulli", "logistic")
#: Implementations of the loop: chosen per call ("auto"), the fused CUDA ops, or the reference.
IMPLS = ("auto", "cuda", "ref")
#: Matrix-product precisions of the fused ops.
PRECISIONS = ("fp32", "tf32", "bf16")
#: Kernel designs of the fused ops: chosen by the host ("auto"), or one forced by name:
#: "rowtile" (a block per tile of batch rows), "persistent" (weight-stationary persistent
#: kernels, small batches), "stagewise" (a GEMM per stage with fused pointwise kernels).
DESIGNS = ("auto", "rowtile", "persistent", "stagewise")
#: Data sets of :func:`avme_ext.data.load_split` (described in :mod:`avme_ext.data.catalog`); the first is
#: vendored with the package.
DATASETS: tuple[str, ...] = (
    "binarized_mnist", "binarized_mnist_amat", "mnist_static", "mnist_dynamic", "mnist_threshold", "mnist",
    "fashion_mnist", "kmnist", "emnist", "omniglot", "cifar10", "svhn", "imagefolder", "npz",
)
#: Splits of every data set.
SPLITS: tuple[str, ...] = ("train", "valid", "test")
#: How grey levels become 0/1 pixels for the Bernoulli likelihood: one seeded draw (``static``), a fresh
#: draw for every batch (``dynamic``, the protocol of the IWAE paper), or gray level > 0.5 (``threshold``).
BINARIZE_MODES: tuple[str, ...] = ("static", "dynamic", "threshold")
#: The EMNIST splits of ``torchvision.datasets.EMNIST``.
EMNIST_SPLITS: tuple[str, ...] = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
#: ``--channels``: 1 (grey) or 3 (RGB).
CHANNELS: tuple[int, ...] = (1, 3)
#: dtypes of an exported weights file (:func:`avme_ext.checkpoint.export_weights`), by torch name.
EXPORT_DTYPE_NAMES = ("float16", "bfloat16", "float32")
