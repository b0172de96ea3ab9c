"""Multi-process helpers: torchrun detection, process groups, rank-0 helpers, sharding, gathers.

A run is *distributed* when it was started by ``torchrun`` (or ``python -m torch.distributed.run``),
which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every
process. :func:`setup` then joins the process group: NCCL with one GPU per process
(``cuda:LOCAL_RANK``) on CUDA devices, gloo on CPUs. Without those variables everything here
degrades to a single process (rank 0 of 1) and no process group is created, so the same code
runs under ``python -m avme_ext`` and under ``torchrun``.

Sharding follows ``torch.utils.data.DistributedSampler``, over tensors rather than a DataLoader:
one global permutation per epoch, the same on every rank, and rank ``r`` of ``W`` takes the
positions ``r, r + W, r + 2W, ...`` of every global batch (see :func:`local_rows`).

Gathering: :func:`all_gather_objects` gives every rank the objects of all ranks, in rank order;
e.g. sharded evaluation (``avme_ext.evaluation``) gathers its per-rank results with it. This
module knows nothing of what it gathers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "detect",
    "setup",
    "teardown",
    "resolve_device",
    "is_initialized",
    "barrier",
    "broadcast_object",
    "all_gather_objects",
    "all_reduce_sum",
    "any_true",
    "local_rows",
]

T = TypeVar("T")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    Attributes:
        rank: global rank in [0, world_size).
        world_size: number of processes (1 without torchrun).
        local_rank: rank on this node (selects the GPU ``cuda:local_rank``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files, metrics and progress bars."""
        return self.rank == 0


def _env_int(name: str, env: dict[str, str]) -> int:
    value = env.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def detect(env: dict[str, str] | None = None) -> DistInfo:
    """Read the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Returns rank 0 of 1 when the variables are absent (a plain ``python -m avme_ext`` run).

    Raises:
        RuntimeError: only some of the variables are set, or they are inconsistent.
    """
    env = dict(os.environ) if env is None else env
    present = [name for name in _TORCHRUN_VARS if name in env]
    if not present:
        return DistInfo()
    if len(present) != len(_TORCHRUN_VARS):
        missing = sorted(set(_TORCHRUN_VARS) - set(present))
        raise RuntimeError(
            f"incomplete torchrun environment: {', '.join(present)} set but {', '.join(missing)} missing; "
            "launch with 'torchrun --nproc_per_node=N -m avme_ext train ...' or unset them"
        )
    info = DistInfo(_env_int("RANK", env), _env_int("WORLD_SIZE", env), _env_int("LOCAL_RANK", env))
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise RuntimeError(
            f"inconsistent torchrun environment: RANK={info.rank} WORLD_SIZE={info.world_size} "
            f"LOCAL_RANK={info.local_rank}"
        )
    return info


def resolve_device(requested: str, info: DistInfo) -> torch.device:
    """The device of this process.

    Args:
        requested: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            Under torchrun a CUDA request always means ``cuda:LOCAL_RANK`` (one GPU per process).
        info: this process's place in the job.

    Raises:
        ValueError: an unknown device string, or CUDA asked for but not available.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"--device {requested!r} is not a device ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested!r}: CUDA is not available on this machine (use --device cpu)")
        index = info.local_rank if info.distributed else (device.index or 0)
        count = torch.cuda.device_count()
        if index >= count:
            what = (
                f"LOCAL_RANK={index} (use --nproc_per_node <= the number of GPUs)"
                if info.distributed
                else (f"--device {requested!r}")
            )
            raise ValueError(f"{what}: only {count} CUDA devices are visible")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {requested!r}: only cpu and cuda devices are supported")
    return device


def setup(info: DistInfo, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU); nothing for a single process."""
    if not info.distributed or dist.is_initialized():
        return
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    from torch.distributed.distributed_c10d import PrefixStore
    from torch.distributed.rendezvous import rendezvous

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # torchrun's elastic agent shares one TCP store across restart attempts, so a restarted
    # worker group would read the dead workers' addresses left by the previous attempt (gloo:
    # "connectFullMesh failed ... Connection refused"). Give every attempt its own key space.
    store, rank, world_size = next(rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = PrefixStore(f"avme/attempt-{attempt}", store)
    kwargs: dict[str, Any] = {
        "backend": backend,
        "timeout": timeout,
        "store": store,
        "rank": rank,
        "world_size": world_size,
    }
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


def teardown() -> None:
    """Leave the process group if one was joined (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """True when a process group is active."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if is_initialized():
        dist.barrier()


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank ``src``'s ``value`` on every rank (picklable objects; no-op for a single process)."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for a single process).

    ``obj`` must be picklable; tensors in it should be on the CPU (they are sent as pickles).
    """
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged for a single process)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a signal received by one)."""
    if not is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def local_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` examples that rank ``rank`` of ``world_size`` takes.

    Strided like ``DistributedSampler``: positions ``rank, rank + W, ...``. Apply the same slice to
    the batch's images, labels and to the rows of the global noise (K, B, Z) on dimension 1, so each
    example gets the same noise whatever the number of processes.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    return slice(rank, batch_size, world_size)
