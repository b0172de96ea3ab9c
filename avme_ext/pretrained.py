"""Pretrained models shipped inside the package, addressed by name.

The registry is the directory :data:`ASSET_DIR` (``avme_ext/assets/pretrained/``): one weights
file per model, written by :func:`avme_ext.checkpoint.export_weights` (float16, config and
provenance in its header), and ``index.json``::

    {"format": "avme-pretrained-index", "version": 1,
     "models": [{"name": "...", "description": "...", "file": "<name>.safetensors",
                 "sha256": "<hex digest of the file>", "results": {<the evaluation that made it>}}]}

:func:`load_pretrained` checks the file's SHA-256 against the index before loading it, without
pickle. :func:`register_pretrained` adds a trained run to a registry (exports its weights and
rewrites the index atomically). The command line accepts a name wherever it accepts a run
directory (``avme sample NAME``, ``avme eval NAME``) and lists them with ``avme list-pretrained``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_json, export_weights, load_model, sha256_of
from .model import AVME

__all__ = [
    "ASSET_DIR",
    "PretrainedError",
    "PretrainedModel",
    "list_pretrained",
    "load_pretrained",
    "pretrained_info",
    "pretrained_path",
    "register_pretrained",
]

#: The registry shipped with the package (read at call time, so it can be pointed elsewhere).
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "pretrained"
INDEX_NAME = "index.json"
INDEX_FORMAT = "avme-pretrained-index"
INDEX_VERSION = 1
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


class PretrainedError(ValueError):
    """No pretrained model of that name, or its installed file or index fails its check."""


@dataclass(frozen=True)
class PretrainedModel:
    """One entry of the registry.

    Attributes:
        name: what users type (lowercase letters, digits, ``.``, ``_``, ``-``).
        description: one line: what the model is.
        file: the weights file, relative to the registry directory.
        sha256: hex SHA-256 of that file.
        results: the evaluation that made it (e.g. the summary and provenance of ``avme eval --json``).
    """

    name: str
    description: str
    file: str
    sha256: str
    results: dict[str, Any] = field(default_factory=dict)

    def path(self, directory: Path | None = None) -> Path:
        """The weights file in ``directory`` (default: :data:`ASSET_DIR`)."""
        return (ASSET_DIR if directory is None else Path(directory)) / self.file


def _index_path(directory: Path | None) -> Path:
    return (ASSET_DIR if directory is None else Path(directory)) / INDEX_NAME


def _read_index(directory: Path | None) -> list[PretrainedModel]:
    path = _index_path(directory)
    if not path.is_file():
        return []
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != INDEX_FORMAT or document.get("version") != INDEX_VERSION:
            raise ValueError(f"expected format {INDEX_FORMAT!r} version {INDEX_VERSION}")
        return [PretrainedModel(**entry) for entry in document["models"]]
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        AttributeError,
        KeyError,
        TypeError,
        ValueError,
    ) as error:
        raise PretrainedError(f"{path}: unreadable registry index ({error}); reinstall the package") from None


def list_pretrained(directory: str | os.PathLike[str] | None = None) -> list[PretrainedModel]:
    """The installed pretrained models, in index order (an empty list when none are installed)."""
    return _read_index(None if directory is None else Path(directory))


def pretrained_info(name: str, directory: str | os.PathLike[str] | None = None) -> PretrainedModel:
    """The registry entry of ``name``.

    Raises:
        PretrainedError: no model of that name (the message lists the installed ones).
    """
    models = list_pretrained(directory)
    for model in models:
        if model.name == name:
            return model
    if not models:
        raise PretrainedError(f"no pretrained model {name!r}: no pretrained models are installed in this version")
    names = ", ".join(m.name for m in models)
    raise PretrainedError(f"no pretrained model {name!r}; installed: {names}")


def pretrained_path(name: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """The verified weights file of ``name``.

    Raises:
        PretrainedError: unknown name, or the file is missing or its SHA-256 differs from the index.
    """
    entry = pretrained_info(name, directory)
    path = entry.path(None if directory is None else Path(directory))
    if not path.is_file():
        raise PretrainedError(f"pretrained model {name!r}: {path} is missing; reinstall the package")
    digest = sha256_of(path)
    if digest != entry.sha256:
        raise PretrainedError(
            f"pretrained model {name!r}: {path} has SHA-256 {digest}, the index says {entry.sha256}: the file is "
            "damaged or was replaced; reinstall the package"
        )
    return path


def load_pretrained(
    name: str,
    *,
    device: str | torch.device = "cpu",
    impl: str = "auto",
    precision: str = "fp32",
    dtype: torch.dtype = torch.float32,
    directory: str | os.PathLike[str] | None = None,
) -> AVME:
    """The pretrained model ``name`` in eval mode, its file checked against the index's SHA-256.

    Args:
        device, impl, precision, dtype: as for :func:`avme_ext.checkpoint.load_model`.
        directory: the registry (default: :data:`ASSET_DIR`, the one shipped with the package).

    Raises:
        PretrainedError: unknown name, or a missing or damaged file.
    """
    path = pretrained_path(name, directory)
    return load_model(path, device=device, impl=impl, precision=precision, dtype=dtype)


def register_pretrained(
    name: str,
    source: str | os.PathLike[str],
    *,
    description: str,
    results: dict[str, Any] | None = None,
    dtype: torch.dtype | str = torch.float16,
    directory: str | os.PathLike[str] | None = None,
) -> PretrainedModel:
    """Add (or replace) ``name`` in a registry: export ``source``'s weights there and rewrite the index.

    Args:
        name: lowercase letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit.
        source: a run directory (its best checkpoint) or a checkpoint file.
        description: one line for ``avme list-pretrained``.
        results: the evaluation that made the model (JSON-able).
        dtype: of the stored weights (see :func:`avme_ext.checkpoint.export_weights`).
        directory: the registry (default: :data:`ASSET_DIR`).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name must be lowercase letters, digits, '.', '_' or '-', got {name!r}")
    if not isinstance(description, str) or not description.strip():
        raise ValueError("description must be a non-empty string")
    root = ASSET_DIR if directory is None else Path(directory)
    weights = export_weights(source, root / f"{name}.safetensors", dtype=dtype)
    entry = PretrainedModel(name, description.strip(), weights.name, sha256_of(weights), dict(results or {}))
    models = [m for m in _read_index(root) if m.name != name] + [entry]
    document = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "models": [asdict(m) for m in models]}
    atomic_write_json(_index_path(root), document)
    return entry
