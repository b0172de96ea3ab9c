"""Input validation shared by the reference, the fused ops and the modules.

Every check raises an error that names the argument and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._value_checks import check_choice, check_positive_int

__all__ = [
    "check_tensor",
    "check_loop_inputs",
    "check_choice",
    "check_positive_int",
    "check_values",
]


def check_tensor(
    name: str,
    value: object,
    shape: Sequence[int | None],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    floating: bool = True,
) -> Tensor:
    """Check that ``value`` is a tensor of the given shape (None matches any size).

    Raises:
        TypeError: not a tensor, or the wrong dtype.
        ValueError: the wrong shape, device, or non-finite when that matters.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the parameters' dtype), got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on device {device} (the parameters' device), got {value.device}")
    return value


def check_values(condition: Tensor, message: str, details: Callable[[], str] | None = None) -> None:
    """Check a data-dependent condition on tensor values: every element of ``condition`` is true.

    In eager mode this reads the result on the host and raises ``ValueError(message + details())``.
    While ``torch.compile`` traces, reading a value would break the graph, so the check becomes
    ``torch._assert_async``: it stays in the compiled graph and fails at run time with ``message``
    (a RuntimeError on the CPU, a device-side assert on a GPU).

    Args:
        condition: bool tensor of any shape.
        message: what was expected, naming the argument.
        details: in eager mode, describes the values found (appended to ``message``).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(condition.all(), message)
    elif not bool(condition.all()):
        raise ValueError(message + (details() if details is not None else ""))


def check_loop_inputs(
    x: Tensor | None,
    y: Tensor | None,
    noise: Tensor,
    *,
    data_dim: int,
    num_classes: int,
    latent_dim: int,
    steps: int,
    dtype: torch.dtype,
    device: torch.device,
    noise_name: str = "eps",
) -> int:
    """Validate the inputs of the K-step loop and return the batch size B.

    Args:
        x: (B, D) data, or None for the decoder-only sampler.
        y: (B, C) conditioning vector; must be None when ``num_classes == 0``.
        noise: (K, B, Z) eps (training) or z (sampling).
    """
    batch = None
    if x is not None:
        check_tensor("x", x, (None, data_dim), dtype=dtype, device=device)
        batch = x.shape[0]
    check_tensor(noise_name, noise, (steps, batch, latent_dim), dtype=dtype, device=device)
    batch = noise.shape[1]
    if num_classes == 0:
        if y is not None:
            raise ValueError("y must be None: this model is unconditional (num_classes=0)")
    else:
        if y is None:
            raise ValueError(f"y is required: this model is conditional (num_classes={num_classes})")
        check_tensor("y", y, (batch, num_classes), dtype=dtype, device=device)
    return batch
