"""Checkpoints: one safetensors file each, written atomically, loaded without pickle.

A checkpoint ``<stem>.safetensors`` holds every tensor (model parameters, optimizer state,
random generator states) and, in its header metadata, a JSON document with the model
config, the optimizer's hyper-parameters and the trainer's counters. One file means one
atomic ``os.replace``: a run killed at any moment leaves either the old checkpoint or the
new one, never a torn pair. A readable copy of the JSON is written beside it as
``<stem>.json`` for people; the loader never reads it (pass the ``.safetensors`` file or
the run directory).

:func:`export_weights` writes a *weights file*: the model's weights only (cast to float16 by
default), with the model config and the provenance in the header; no optimizer or generator
state, so it is small enough to ship (about 10 MB at the paper's sizes).
:func:`load_model` reads both kinds.

Nothing here calls ``pickle`` or ``torch.load``: a file that is not a valid safetensors
checkpoint of this format is refused with an error naming it.

:func:`atomic_write_bytes` is the package's one way to write a file: a temporary file in the
same directory, fsync, ``os.replace``, with the permissions a normally created file gets
under the user's umask.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .choices import EXPORT_DTYPE_NAMES
from .config import AVMEConfig
from .model import AVME

__all__ = [
    "EXPORT_DTYPES",
    "FORMAT",
    "WEIGHTS_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "default_file_mode",
    "export_weights",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "read_training_options",
    "resolve_checkpoint",
    "sha256_of",
]

FORMAT = "avme-checkpoint"
WEIGHTS_FORMAT = "avme-weights"
VERSION = 1
CHECKPOINT_SUFFIX = ".safetensors"
RUN_CHECKPOINTS = ("best.safetensors", "last.safetensors")
#: dtypes :func:`export_weights` writes, by name.
EXPORT_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in EXPORT_DTYPE_NAMES}
_MODEL, _OPTIM, _RNG = "model.", "optimizer.", "rng."


class CheckpointError(ValueError):
    """A file is not a usable avme checkpoint (corrupt, truncated, foreign, or another config).

    Attributes:
        path: the file (or the path given) the error is about, when known.
        reason: the message without the suggestion below.
        alternative: an intact checkpoint of the same run to use instead (e.g. ``last.safetensors``
            when ``best.safetensors`` is corrupt), or None.
    """

    def __init__(self, reason: str, *, path: Path | None = None, alternative: Path | None = None) -> None:
        self.reason = reason
        self.path = path
        self.alternative = alternative
        message = reason
        if alternative is not None:
            message += f"; the run's {alternative.name} is intact: load_model({str(alternative)!r})"
        super().__init__(message)


@dataclass
class Checkpoint:
    """The contents of a checkpoint.

    Attributes:
        config: the model's architecture.
        model_state: the model's ``state_dict``.
        optimizer_state: an optimizer ``state_dict`` (or None).
        rng_states: named ``torch.Generator`` states (uint8 tensors).
        trainer_state: JSON-able counters and options of the trainer.
        provenance: where a weights file came from (empty for a training checkpoint).
        weights_only: True for a file written by :func:`export_weights`.
    """

    config: AVMEConfig
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None = None
    rng_states: dict[str, Tensor] = field(default_factory=dict)
    trainer_state: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    weights_only: bool = False


# --------------------------------------------------------------------------- writing files
_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The permission bits of a file created now with ``open(path, "w")``: ``0o666 & ~umask``."""
    return 0o666 & ~_current_umask()


def atomic_write_bytes(path: str | os.PathLike[str], write: bytes | Callable[[str], Any]) -> Path:
    """Write a file atomically and return its path.

    ``write`` is the content (bytes) or a function that writes the file whose name it is given
    (e.g. ``lambda tmp: save_file(tensors, tmp)``). The content goes to a temporary file in the
    same directory, which is fsynced, given the mode a normally created file would get
    (:func:`default_file_mode`; ``mkstemp`` alone would leave it 0600) and renamed onto
    ``path`` with ``os.replace``: readers see the old file or the new one, never a torn one.
    The parent directory is created. On any error (including KeyboardInterrupt) the temporary
    file is removed and ``path`` is left as it was; an OSError about the temporary file is
    raised about ``path`` (same errno), the file the caller knows.
    """
    path = Path(path)
    prefix = f".{path.name}."
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        if isinstance(write, (bytes, bytearray, memoryview)):
            Path(tmp).write_bytes(write)
        else:
            write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno is not None and _about_temporary(error, path.parent / prefix):
            raise OSError(error.errno, error.strerror, str(path)) from None  # the file the caller asked for
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_json(path: str | os.PathLike[str], document: Any) -> Path:
    """Write ``document`` as indented JSON, with a final newline, to ``path`` atomically
    (:func:`atomic_write_bytes`) and return its path."""
    return atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))


def _about_temporary(error: OSError, prefix: Path) -> bool:
    """Whether ``error`` is about one of our temporary files (or no file): those named ``prefix*``."""
    return error.filename is None or str(error.filename).startswith(str(prefix))


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Separate an optimizer ``state_dict`` into tensors and a JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{_OPTIM}{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name[len(_OPTIM) :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": dict(sorted(state.items())), "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike[str],
    model: AVME,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    rng_states: dict[str, Tensor] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and optionally optimizer, generators, trainer counters) to ``path``.

    Args:
        path: the ``.safetensors`` file to write (its parent is created); a ``.json`` copy of
            the metadata is written beside it.

    Returns:
        the checkpoint's path.
    """
    path = Path(path).with_suffix(".safetensors")
    tensors = {_MODEL + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "trainer": trainer_state or {},
        "optimizer": None,
    }
    if optimizer is not None:
        optim_tensors, meta["optimizer"] = _split_optimizer_state(optimizer.state_dict())
        tensors.update(optim_tensors)
    for name, state in (rng_states or {}).items():
        tensors[_RNG + name] = state.detach().cpu().contiguous()
    document = json.dumps(meta)
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata={"avme": document}))
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return path


# --------------------------------------------------------------------------- reading
def _read_metadata(path: Path) -> dict[str, Any]:
    """Read and parse the JSON document in a safetensors header without loading tensors."""
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) != 8:
                raise CheckpointError(f"{path}: file is truncated (no safetensors header)", path=path)
            size = int.from_bytes(size_bytes, "little")
            if size <= 0 or size > 100_000_000 or size + 8 > path.stat().st_size:
                raise CheckpointError(f"{path}: not a safetensors file (bad header size {size})", path=path)
            header = json.loads(handle.read(size))
        document = json.loads(header.get("__metadata__", {}).get("avme", "null"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise CheckpointError(f"{path}: not a safetensors file with an avme header ({error})", path=path) from None
    if not isinstance(document, dict) or document.get("format") not in (FORMAT, WEIGHTS_FORMAT):
        raise CheckpointError(f"{path}: not an avme checkpoint (no '{FORMAT}' metadata)", path=path)
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {document.get('version')} is not supported (expected {VERSION})", path=path
        )
    return document


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Find the checkpoint file for ``path``: a ``.safetensors`` file, or a run directory (its
    ``best.safetensors``, else ``last.safetensors``).

    Raises:
        FileNotFoundError: nothing at ``path``, or a run directory without checkpoints.
        CheckpointError: ``path`` is a file that is not a ``.safetensors`` file (for instance the
            readable ``.json`` twin of a checkpoint, or a run's ``config.json``).
    """
    path = Path(path)
    if path.is_dir():
        for name in RUN_CHECKPOINTS:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no best.safetensors or last.safetensors in this run directory")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix != CHECKPOINT_SUFFIX:
        twin = path.with_suffix(CHECKPOINT_SUFFIX)
        instead = (
            f"{twin} (this file's checkpoint)"
            if twin.is_file()
            else (
                f"the run directory {path.parent}"
                if any((path.parent / n).is_file() for n in RUN_CHECKPOINTS)
                else "a run directory or a .safetensors checkpoint file"
            )
        )
        raise CheckpointError(
            f"{path}: not a checkpoint (a checkpoint is a {CHECKPOINT_SUFFIX} file or a run directory); pass {instead}",
            path=path,
        )
    return path


def _intact_last(path: Path) -> Path | None:
    """For a run's ``best.safetensors``: the run's ``last.safetensors`` if it exists and loads, else None."""
    last = path.with_name("last.safetensors")
    if path.name != "best.safetensors" or not last.is_file():
        return None
    try:
        _read_checkpoint_file(last)
    except (CheckpointError, OSError):
        return None
    return last


def _read_checkpoint_file(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    meta = _read_metadata(path)
    try:
        tensors = load_file(path, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: cannot read tensors ({error}); the file is corrupt or truncated", path=path
        ) from None
    try:
        config = AVMEConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: bad model config ({error})", path=path) from None
    model_state = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    optim_tensors = {k: v for k, v in tensors.items() if k.startswith(_OPTIM)}
    rng_states = {k[len(_RNG) :]: v for k, v in tensors.items() if k.startswith(_RNG)}
    optimizer_state = None
    if meta.get("optimizer") is not None:
        optimizer_state = _join_optimizer_state(optim_tensors, meta["optimizer"])
    return Checkpoint(
        config,
        model_state,
        optimizer_state,
        rng_states,
        meta.get("trainer", {}),
        meta.get("provenance", {}),
        meta["format"] == WEIGHTS_FORMAT,
    )


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` or :func:`export_weights` (safetensors only,
    never pickle); ``path`` is the file or a run directory (see :func:`resolve_checkpoint`).

    Raises:
        CheckpointError: the file is corrupt, truncated, foreign, or inconsistent. When it is a run's
            ``best.safetensors`` and the run's ``last.safetensors`` loads, ``error.alternative`` names it.
        FileNotFoundError: no checkpoint at ``path``.
    """
    path = resolve_checkpoint(path)
    try:
        return _read_checkpoint_file(path, map_location)
    except CheckpointError as error:
        alternative = _intact_last(path)
        if alternative is None:
            raise
        raise CheckpointError(error.reason, path=path, alternative=alternative) from None


def read_training_options(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The training options and the data record a checkpoint carries, read from its header (no tensors).

    A training checkpoint holds them in its trainer state (``"train"``, ``"data"``), a weights file in
    its provenance (``"training"``, ``"data"``); either is None when absent (an older file has no data
    record; a weights file written without a source run has neither).

    Raises:
        FileNotFoundError, CheckpointError: as :func:`load_checkpoint`.
    """
    meta = _read_metadata(resolve_checkpoint(path))
    trainer, provenance = meta.get("trainer") or {}, meta.get("provenance") or {}
    train = trainer.get("train") or provenance.get("training")
    data = trainer.get("data") or provenance.get("data")
    return (dict(train) if isinstance(train, dict) else None), (dict(data) if isinstance(data, dict) else None)


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    impl: str = "auto",
    precision: str = "fp32",
    expected_config: AVMEConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> AVME:
    """Build an :class:`AVME` from a checkpoint or weights file (or a run directory), in eval mode.

    Args:
        expected_config: when given, refuse a checkpoint of another architecture.
        dtype: the parameters' dtype (a float16 weights file is loaded back to float32 by default).
    """
    checkpoint = load_checkpoint(path)
    resolved = resolve_checkpoint(path)
    if expected_config is not None and checkpoint.config != expected_config:
        raise CheckpointError(
            f"{resolved}: checkpoint is for {checkpoint.config}, expected {expected_config}", path=resolved
        )
    model = AVME.from_config(checkpoint.config, impl=impl, precision=precision)
    try:
        model.load_state_dict(checkpoint.model_state)
    except RuntimeError as error:
        raise CheckpointError(f"{resolved}: weights do not match the config ({error})", path=resolved) from None
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------- shipping weights
def _export_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in EXPORT_DTYPES:
        return EXPORT_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in EXPORT_DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")


def export_weights(
    source: str | os.PathLike[str], destination: str | os.PathLike[str], *, dtype: torch.dtype | str = torch.float16
) -> Path:
    """Write a weights-only file of a run's model, small enough to ship, and return its path.

    Args:
        source: a run directory (its best checkpoint, else its last) or a checkpoint file.
        destination: the ``.safetensors`` file to write (atomically; its parent is created).
        dtype: the weights' dtype in the file: float16 (default; about 10 MB at the paper's
            sizes), bfloat16 or float32.

    The file holds the model's floating-point ``state_dict`` cast to ``dtype`` and, in its header,
    the model config and the provenance (source file and its SHA-256, the training options and
    counters of the source, versions, time); no optimizer or generator state. :func:`load_model`
    reads it back (to float32 unless asked otherwise).

    Raises:
        FileNotFoundError, CheckpointError: ``source`` is not a readable checkpoint.
        ValueError: ``destination`` is not a ``.safetensors`` file, or an unsupported ``dtype``.
    """
    target = _export_dtype(dtype)
    destination = Path(destination)
    if destination.suffix != CHECKPOINT_SUFFIX:
        raise ValueError(f"destination {destination}: weights files end in {CHECKPOINT_SUFFIX}")
    resolved = resolve_checkpoint(source)
    checkpoint = load_checkpoint(resolved)
    if destination.exists() and destination.resolve() == resolved.resolve():
        raise ValueError(f"destination {destination} is the source checkpoint; write the weights to another file")
    tensors = {
        _MODEL + k: (v.to(target) if v.is_floating_point() else v).contiguous()
        for k, v in checkpoint.model_state.items()
    }
    from . import __version__

    state = checkpoint.trainer_state.get("state", {})
    provenance = checkpoint.provenance or {
        "source": str(resolved),
        "source_sha256": sha256_of(resolved),
        "training": checkpoint.trainer_state.get("train", {}),
        "data": checkpoint.trainer_state.get("data", {}),
        "progress": {k: state[k] for k in ("step", "epoch", "best_nelbo") if k in state},
    }
    provenance = {
        **provenance,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "avme_version": __version__,
        "torch_version": torch.__version__,
    }
    meta = {
        "format": WEIGHTS_FORMAT,
        "version": VERSION,
        "config": checkpoint.config.to_dict(),
        "dtype": str(target).removeprefix("torch."),
        "provenance": provenance,
    }
    return atomic_write_bytes(destination, lambda tmp: save_file(tensors, tmp, metadata={"avme": json.dumps(meta)}))
