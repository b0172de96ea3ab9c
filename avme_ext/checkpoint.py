"""Checkpoints: one safetensors file each, written atomically, loaded without pickle.

A checkpoint ``<stem>.safetensors`` holds every tensor (model parameters, optimizer state,
random generator states) and, in its header metadata, a JSON document with the model
config, the optimizer's hyper-parameters and the trainer's counters. One file means one
atomic ``os.replace``: a run killed at any moment leaves either the old checkpoint or the
new one, never a torn pair. A readable copy of the JSON is written beside it as
``<stem>.json`` for people; the loader never needs it.

Nothing here calls ``pickle`` or ``torch.load``: a file that is not a valid safetensors
checkpoint of this format is refused with an error naming it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import AVMEConfig
from .model import AVME

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "resolve_checkpoint",
]

FORMAT = "avme-checkpoint"
VERSION = 1
_MODEL, _OPTIM, _RNG = "model.", "optimizer.", "rng."


class CheckpointError(ValueError):
    """A file is not a usable avme checkpoint (corrupt, truncated, foreign, or another config)."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint.

    Attributes:
        config: the model's architecture.
        model_state: the model's ``state_dict``.
        optimizer_state: an optimizer ``state_dict`` (or None).
        rng_states: named ``torch.Generator`` states (uint8 tensors).
        trainer_state: JSON-able counters and options of the trainer.
    """

    config: AVMEConfig
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None = None
    rng_states: dict[str, Tensor] = field(default_factory=dict)
    trainer_state: dict[str, Any] = field(default_factory=dict)


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write a file atomically: ``write(tmp_path)`` then fsync and ``os.replace`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    path: str | os.PathLike,
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
    readable = json.dumps(meta, indent=2).encode()
    atomic_write_bytes(path.with_suffix(".json"), lambda tmp: Path(tmp).write_bytes(readable))
    return path


def _read_metadata(path: Path) -> dict[str, Any]:
    """Read and parse the JSON document in a safetensors header without loading tensors."""
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) != 8:
                raise CheckpointError(f"{path}: file is truncated (no safetensors header)")
            size = int.from_bytes(size_bytes, "little")
            if size <= 0 or size > 100_000_000 or size + 8 > path.stat().st_size:
                raise CheckpointError(f"{path}: not a safetensors file (bad header size {size})")
            header = json.loads(handle.read(size))
        document = json.loads(header.get("__metadata__", {}).get("avme", "null"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise CheckpointError(f"{path}: not a safetensors file with an avme header ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an avme checkpoint (no '{FORMAT}' metadata)")
    if document.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {document.get('version')} is not supported (expected {VERSION})")
    return document


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Find the checkpoint file for ``path``: a ``.safetensors`` file, its ``.json`` twin, or a run
    directory (its ``best.safetensors``, else ``last.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no best.safetensors or last.safetensors in this run directory")
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors only, never pickle).

    Raises:
        CheckpointError: the file is corrupt, truncated, foreign, or inconsistent.
        FileNotFoundError: no checkpoint at ``path``.
    """
    path = resolve_checkpoint(path)
    meta = _read_metadata(path)
    try:
        tensors = load_file(path, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path}: cannot read tensors ({error}); the file is corrupt or truncated") from None
    try:
        config = AVMEConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: bad model config ({error})") from None
    model_state = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    optim_tensors = {k: v for k, v in tensors.items() if k.startswith(_OPTIM)}
    rng_states = {k[len(_RNG) :]: v for k, v in tensors.items() if k.startswith(_RNG)}
    optimizer_state = None
    if meta.get("optimizer") is not None:
        optimizer_state = _join_optimizer_state(optim_tensors, meta["optimizer"])
    return Checkpoint(config, model_state, optimizer_state, rng_states, meta.get("trainer", {}))


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    impl: str = "auto",
    precision: str = "fp32",
    expected_config: AVMEConfig | None = None,
) -> AVME:
    """Build an :class:`AVME` from a checkpoint (a file or a run directory), in eval mode.

    Args:
        expected_config: when given, refuse a checkpoint of another architecture.
    """
    checkpoint = load_checkpoint(path)
    if expected_config is not None and checkpoint.config != expected_config:
        raise CheckpointError(
            f"{resolve_checkpoint(path)}: checkpoint is for {checkpoint.config}, expected {expected_config}"
        )
    model = AVME.from_config(checkpoint.config, impl=impl, precision=precision)
    try:
        model.load_state_dict(checkpoint.model_state)
    except RuntimeError as error:
        raise CheckpointError(f"{resolve_checkpoint(path)}: weights do not match the config ({error})") from None
    return model.to(device).eval()
