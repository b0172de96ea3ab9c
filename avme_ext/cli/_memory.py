"""Requests that cannot fit in memory, reported as one line instead of an allocator's traceback.

* :func:`check_fits` refuses, before any work, a request whose sure allocations (a lower bound,
  computed by the command from its sizes) exceed the memory available to this process: free
  RAM, a cgroup memory limit or an address-space limit (``ulimit -v``) on the CPU; free GPU
  memory on CUDA. A request known to be too large is a bad argument (exit status 2).
* :func:`out_of_memory_message` recognises an allocation that failed while working (a CUDA
  ``torch.OutOfMemoryError``, a CPU allocator's ``RuntimeError``, a ``MemoryError``) and words it
  as one line; :func:`avme_ext.cli._common.run_subcommand` reports it with exit status 1.
"""

from __future__ import annotations

import os
import re
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["FLOAT_BYTES", "available_memory", "check_fits", "format_bytes", "out_of_memory_message"]

#: Bytes of one float32 value, the unit of every estimate here.
FLOAT_BYTES = 4


def format_bytes(count: float) -> str:
    """``"812 MB"``, ``"4.8 TB"`` (decimal units)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} bytes"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What this process's memory cgroup still allows (v2, then v1), or None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                                      "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v1 writes a huge number for "no limit"
            return max(int(limit) - usage, 0)
    return None


def _address_space_available() -> int | None:
    """What ``ulimit -v`` (RLIMIT_AS) still allows this process to map, or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(soft - int(line.split()[1]) * 1024, 0)
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on ``device`` (None when unknown)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    known = [value for value in (_meminfo_available(), _cgroup_available(), _address_space_available())
             if value is not None]
    return min(known) if known else None


def check_fits(needed: int, device: torch.device, what: str, advice: str) -> None:
    """Refuse a request whose sure allocations (``needed`` bytes, a lower bound) exceed what is available.

    Args:
        needed: bytes the request allocates at once at the least.
        device: where it allocates them.
        what: the request in the user's terms, e.g. ``"--num 1000000000"``.
        advice: what to do instead, e.g. ``"ask for fewer images"``.

    Raises:
        CLIError: (exit status 2) ``"<what>: needs at least 4.8 TB of memory, 21 GB are available
            on cpu; <advice>"``.
    """
    from ._common import CLIError

    available = available_memory(device)
    if available is not None and needed > available:
        raise CLIError(f"{what}: needs at least {format_bytes(needed)} of memory, {format_bytes(available)} "
                       f"{'is' if available < 2 else 'are'} available on {device}; {advice}")


_CPU_ALLOCATION = re.compile(r"(DefaultCPUAllocator|alloc_cpu|can't allocate memory|not enough memory)")
_REQUESTED_BYTES = re.compile(r"allocate (\d+) bytes")


def out_of_memory_message(error: BaseException) -> str | None:
    """One line for an allocation that failed (``"out of memory: tried to allocate 4.8 TB"``), or None
    when ``error`` is not an allocation failure."""
    torch = sys.modules.get("torch")
    cuda_oom = torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ()))
    if cuda_oom:
        first = str(error).split(". ")[:2]  # "CUDA out of memory. Tried to allocate 2.00 GiB"
        return "out of memory: " + ". ".join(first).strip()
    if isinstance(error, MemoryError):
        return "out of memory"
    if isinstance(error, RuntimeError) and _CPU_ALLOCATION.search(str(error)):
        requested = _REQUESTED_BYTES.search(str(error))
        return "out of memory" + (f": tried to allocate {format_bytes(int(requested.group(1)))}" if requested else "")
    return None
