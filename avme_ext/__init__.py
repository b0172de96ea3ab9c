"""avme: the Adaptive Variational Memory Encoding model, a recurrent VAE that draws over K steps.

Public API:
    AVMECore   the K-step loop as a drop-in ``nn.Module`` (fused CUDA ops or the reference)
    AVME       the model: ELBO, importance-weighted bound, sampling, reconstruction
    AVMEConfig its sizes and options
    reference  the pure-PyTorch specification of the loop
    loop_types the loop's contract types and option choices (IMPLS, PRECISIONS, ENCODER_INPUTS)
    ops        the fused CUDA ops (``torch.ops.avme``) when built
"""

from . import loop_types, ops, reference
from .config import AVMEConfig
from .core import AVMECore
from .model import AVME, ELBOTerms

__all__ = ["AVME", "AVMEConfig", "AVMECore", "ELBOTerms", "loop_types", "ops", "reference"]
__version__ = "0.1.0"
