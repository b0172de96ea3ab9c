"""avme: the Adaptive Variational Memory Encoding model, a recurrent VAE that draws over K steps.

Public API:
    AVMECore   the K-step loop as a drop-in ``nn.Module`` (fused CUDA ops or the reference)
    AVME       the model: ELBO, importance-weighted bound, sampling, reconstruction
    AVMEConfig its sizes and options
    reference  the pure-PyTorch specification of the loop
    loop_types the loop's contract types and option choices (IMPLS, PRECISIONS, DESIGNS, ...)
    ops        the fused CUDA ops (``torch.ops.avme``) when built

The names are imported on first use (PEP 562), so ``import avme_ext`` itself does not import
torch: the ``avme`` command can then answer Ctrl-C during its start-up with one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["AVME", "AVMEConfig", "AVMECore", "ELBOTerms", "loop_types", "ops", "reference"]
__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_EXPORTS = {"AVME": "model", "ELBOTerms": "model", "AVMEConfig": "config", "AVMECore": "core"}
_SUBMODULES = ("loop_types", "ops", "reference")

if TYPE_CHECKING:
    from . import loop_types, ops, reference
    from .config import AVMEConfig
    from .core import AVMECore
    from .model import AVME, ELBOTerms


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
