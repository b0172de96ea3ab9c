"""The choices of avme's options, importable without torch.

One tuple per option, the single source of its choices: the modules that implement an option
(:mod:`avme_ext.loop_types`, :mod:`avme_ext.data`, :mod:`avme_ext.checkpoint`,
:mod:`avme_ext.training.config`) re-export these objects, and the ``avme`` command builds its
parsers from them without importing torch (``avme --help`` answers at once).
"""

from __future__ import annotations

__all__ = ["ENCODER_INPUTS", "IMPLS", "PRECISIONS", "DESIGNS", "DATASETS", "SPLITS", "EXPORT_DTYPE_NAMES"]

#: What the encoder reads besides x: the canvas s_{t-1} (the paper's) or DRAW's error image.
ENCODER_INPUTS = ("canvas", "error")
#: Implementations of the loop: chosen per call ("auto"), the fused CUDA ops, or the reference.
IMPLS = ("auto", "cuda", "ref")
#: Matrix-product precisions of the fused ops.
PRECISIONS = ("fp32", "tf32", "bf16")
#: Kernel designs of the fused ops: chosen by the host ("auto"), or one forced by name:
#: "rowtile" (a block per tile of batch rows), "persistent" (weight-stationary persistent
#: kernels, small batches), "stagewise" (a GEMM per stage with fused pointwise kernels).
DESIGNS = ("auto", "rowtile", "persistent", "stagewise")
#: Data sets of :func:`avme_ext.data.load_split`; the first is vendored with the package.
DATASETS: tuple[str, ...] = (
    "binarized_mnist", "binarized_mnist_amat", "mnist_static", "mnist_dynamic", "mnist_threshold",
)
#: Splits of every data set.
SPLITS: tuple[str, ...] = ("train", "valid", "test")
#: dtypes of an exported weights file (:func:`avme_ext.checkpoint.export_weights`), by torch name.
EXPORT_DTYPE_NAMES = ("float16", "bfloat16", "float32")
