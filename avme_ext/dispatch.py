"""What ``impl="auto"`` runs: the fused ops only where a committed benchmark measured them faster.

The choice comes from a crossover table produced by ``bench/run.py`` on a named GPU; a
configuration that no benchmark measured (another GPU, dtype or precision) runs the reference,
so ``"auto"`` never picks a path slower than the reference on the evidence we have.
"""

from __future__ import annotations

import torch

from . import ops

__all__ = ["auto_impl"]


def auto_impl(device: torch.device, dtype: torch.dtype, precision: str, batch_size: int) -> str:
    """The implementation ``AVMECore(impl="auto")`` runs for these inputs: ``"cuda"`` or ``"ref"``.

    Args:
        device: where the inputs live.
        dtype: the parameters' dtype.
        precision: the module's matrix-product precision (``"fp32"``, ``"tf32"``, ``"bf16"``).
        batch_size: B, the rows of the call.
    """
    if device.type != "cuda" or not ops.is_available():
        return "ref"
    return "ref"  # placeholder until the crossover table lands
