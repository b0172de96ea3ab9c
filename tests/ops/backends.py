"""Where the fused ops run in the tests: the CPU emulator or a CUDA device.

- ``emulator``: csrc/avme_ops.cpp and the kernels compiled as C++ (csrc/emulation/), each CUDA
  thread an OS thread, registered as ``torch.ops.avme_emu.*`` on CPU tensors. Built on first
  use with ``torch.utils.cpp_extension.load`` (about a minute; cached across runs); needs a
  C++ compiler and ninja. ``AVME_EMULATION=0`` skips it.
- ``cuda``: the built extension ``torch.ops.avme.*`` on the current CUDA device.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avme_ext import ops
from avme_ext.loop_types import AVMEParams, ForwardOutput, SampleOutput

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
EXPECT_EXTENSION = os.environ.get("AVME_EXPECT_EXTENSION", "") == "1"
BACKENDS = ("emulator", "cuda")


@dataclass(frozen=True)
class Backend:
    """One place the ops run: its op namespace and the device of its tensors."""

    name: str
    ns: Any  # torch.ops.avme_emu or torch.ops.avme
    device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        eps: torch.Tensor,
        params: AVMEParams,
        encoder_input: str = "canvas",
        return_canvases: bool = False,
        precision: str = "fp32",
        design: str | None = None,
    ) -> ForwardOutput:
        """ops.fused_forward on this backend's ops (differentiable)."""
        return ops._forward_with(self.ns, x, y, eps, params, encoder_input, return_canvases, precision, design)

    def sample(
        self,
        z: torch.Tensor,
        y: torch.Tensor | None,
        params: AVMEParams,
        return_canvases: bool = False,
        precision: str = "fp32",
    ) -> SampleOutput:
        """ops.fused_sample on this backend's ops."""
        return ops._sample_with(self.ns, z, y, params, return_canvases, precision)

    def poison(self) -> None:
        """Make unwritten output elements show up as NaN. The emulator's outputs start as NaN
        already (csrc/avme_ops.cpp: uninit); on CUDA the caching allocator's free memory is
        filled with NaN."""
        if self.is_cuda:
            poison_cuda_memory()

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()


def poison_cuda_memory(num_bytes: int = 1 << 28) -> None:
    """Fill (up to) num_bytes of the CUDA caching allocator's free memory with NaN and free it."""
    free = torch.cuda.mem_get_info()[0]
    num_bytes = max(1 << 20, min(num_bytes, free // 2))
    blocks = []
    for size in (num_bytes // 2, num_bytes // 4, num_bytes // 8, 1 << 20, 1 << 16):
        block = torch.empty(size // 4, dtype=torch.float32, device="cuda")
        block.fill_(float("nan"))
        blocks.append(block)
    del blocks


class UnavailableError(Exception):
    """A backend cannot run here; the message says why (the tests skip with it)."""


class MissingExtensionError(Exception):
    """AVME_EXPECT_EXTENSION=1 but the built ops are missing (the tests fail with it)."""


_BUILDS: dict[str, Any] = {}  # emulation source -> its op namespace, or the UnavailableError it raised


def load_emulation(source: str, namespace: str) -> Any:
    """Build the test-only emulation translation unit ``csrc/emulation/<source>`` (once per
    process; cached across runs by torch's JIT) and return ``torch.ops.<namespace>``.

    Raises UnavailableError with the reason when it cannot be built here (``AVME_EMULATION=0``, or no
    C++ compiler or ninja).
    """
    if source in _BUILDS:
        if isinstance(_BUILDS[source], UnavailableError):
            raise _BUILDS[source]
        return _BUILDS[source]
    reason = None
    if os.environ.get("AVME_EMULATION", "1") == "0":
        reason = "AVME_EMULATION=0"
    elif shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        reason = "the CPU emulator needs a C++ compiler and ninja"
    if reason is not None:
        _BUILDS[source] = UnavailableError(reason)
        raise _BUILDS[source]
    from torch.utils import cpp_extension

    # The JIT cache keys on the listed source and the flags: hash every included file into a
    # flag so that edits to csrc/ rebuild the emulator.
    digest = hashlib.sha1()
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in {".h", ".cuh", ".cu", ".cpp"}:
            digest.update(path.read_bytes())
    cpp_extension.load(
        name=Path(source).stem,
        sources=[str(CSRC / "emulation" / source)],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O2", "-pthread", f"-DAVME_EMU_SOURCES_{digest.hexdigest()[:16]}"],
        extra_ldflags=["-pthread"],
        is_python_module=False,
        verbose=False,
    )
    _BUILDS[source] = getattr(torch.ops, namespace)
    return _BUILDS[source]


_EMULATOR: dict[str, Backend] = {}


def emulator() -> Backend:
    """The emulator backend, built on first use (raises UnavailableError when it cannot be)."""
    if "backend" not in _EMULATOR:
        ns = load_emulation("avme_emulation.cpp", "avme_emu")
        ops._register("avme_emu")
        _EMULATOR["backend"] = Backend("emulator", ns, torch.device("cpu"))
    return _EMULATOR["backend"]


def require_extension() -> None:
    """Raise MissingExtensionError (AVME_EXPECT_EXTENSION=1) or UnavailableError when the ops are not built."""
    if ops.extension_loaded():
        return
    reason = ops.extension_error() or "the ops are not registered"
    if EXPECT_EXTENSION:
        raise MissingExtensionError(f"AVME_EXPECT_EXTENSION=1 but the avme extension is not loaded: {reason}")
    raise UnavailableError(f"the avme CUDA extension (avme_ext._C) is not built: {reason}")


def cuda() -> Backend:
    """The CUDA backend (raises UnavailableError without a GPU, MissingExtensionError as above)."""
    if not torch.cuda.is_available():
        raise UnavailableError("needs a CUDA device")
    require_extension()
    return Backend("cuda", torch.ops.avme, torch.device("cuda", torch.cuda.current_device()))


def get(name: str) -> Backend:
    return {"emulator": emulator, "cuda": cuda}[name]()
