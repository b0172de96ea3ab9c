"""Moving the reproduction state between this machine and a GPU machine that returns few, small files.

The GPU machine returns at most 8 files of at most 16 MiB each and 64 MiB in all, from no deeper
than two folders. :func:`pack` therefore writes what an invocation changed as one index
``repro-pack.json`` and a byte stream cut into parts ``repro-pack.000``, ``repro-pack.001``, ...
of at most ``part_bytes`` each. Every file is compressed with zlib; safetensors files first have
their tensor bytes regrouped by byte position (byte ``k`` of every element together), which makes
float32 and float16 weights compress (about 14% smaller at zlib level 1; plain zlib gains a few percent).
:func:`unpack` checks every part's and every file's SHA-256 and writes the files atomically.

An invocation that should travel back starts with :func:`snapshot` and ends with
:func:`changes` (files written or replaced since, and files removed) and :func:`pack`.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avme_ext.checkpoint import atomic_write_bytes
from reproduce_state import atomic_write_text

INDEX_NAME = "repro-pack.json"
PART_PATTERN = "repro-pack.{:03d}"
PACK_FORMAT = "avme-reproduction-pack"
PACK_VERSION = 1
MiB = 1 << 20
#: Limits of what comes back from the GPU machine, with a margin: each part under 16 MiB, the
#: index and the parts at most 7 files (the 8th is the call's log), 60 MiB in all (under 64 MiB).
PART_BYTES = 15 * MiB
MAX_FILES = 7
MAX_BYTES = 60 * MiB
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
#: Never packed: files a later invocation does not need (the trainer's best checkpoint with its
#: optimizer state: its weights travel as float16), temporary files, TensorBoard events.
EXCLUDED_NAMES = {"best.safetensors", "best.json"}
EXCLUDED_PARTS = {"tensorboard"}


class PackTooLarge(RuntimeError):
    """The files to pack do not fit the limits; ``sizes`` maps each file to its packed size."""

    def __init__(self, message: str, sizes: dict[str, int]) -> None:
        super().__init__(message)
        self.sizes = sizes


# --------------------------------------------------------------------------- what changed
Snapshot = dict[str, tuple[int, int]]


def _travels(rel: str) -> bool:
    parts = rel.split("/")
    return not (parts[-1] in EXCLUDED_NAMES or parts[-1].endswith(".tmp") or parts[-1].startswith(".")
                or EXCLUDED_PARTS & set(parts))


def snapshot(root: Path) -> Snapshot:
    """(size, mtime_ns) of every file under ``root`` that can travel, by relative path."""
    root = Path(root)
    found: Snapshot = {}
    if not root.is_dir():
        return found
    for path in root.rglob("*"):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            if _travels(rel):
                stat = path.stat()
                found[rel] = (stat.st_size, stat.st_mtime_ns)
    return found


def changes(root: Path, before: Snapshot) -> tuple[list[str], list[str]]:
    """(files new or changed since ``before``, files removed since), relative to ``root``, sorted."""
    after = snapshot(root)
    changed = sorted(rel for rel, stat in after.items() if before.get(rel) != stat)
    removed = sorted(rel for rel in before if rel not in after)
    return changed, removed


# --------------------------------------------------------------------------- codec
def _shuffle_stride(rel: str) -> int:
    if not rel.endswith(".safetensors"):
        return 1
    return 2 if ".fp16." in rel else 4


def _safetensors_data_offset(data: bytes) -> int:
    if len(data) < 8:
        return len(data)
    return min(len(data), 8 + int.from_bytes(data[:8], "little"))


def encode(rel: str, data: bytes) -> tuple[bytes, int]:
    """(zlib stream, stride): tensor bytes of a safetensors file regrouped by byte position first."""
    stride = _shuffle_stride(rel)
    if stride > 1:
        start = _safetensors_data_offset(data)
        body = data[start:]
        usable = len(body) - len(body) % stride
        planes = b"".join(body[k:usable:stride] for k in range(stride))
        data = data[:start] + planes + body[usable:]
    return zlib.compress(data, 1), stride


def decode(blob: bytes, stride: int) -> bytes:
    data = zlib.decompress(blob)
    if stride > 1:
        start = _safetensors_data_offset(data)
        body = data[start:]
        usable = len(body) - len(body) % stride
        count = usable // stride
        out = bytearray(usable)
        for k in range(stride):
            out[k::stride] = body[k * count : (k + 1) * count]
        data = data[:start] + bytes(out) + body[usable:]
    return data


# --------------------------------------------------------------------------- pack / unpack
@dataclass(frozen=True)
class PackReport:
    files: list[str]
    removed: list[str]
    parts: list[Path]
    packed_bytes: int
    raw_bytes: int


def pack(
    root: Path,
    files: list[str],
    removed: list[str],
    destination: Path,
    *,
    base: dict[str, Any],
    part_bytes: int | None = None,
    max_files: int | None = None,
    max_bytes: int | None = None,
) -> PackReport:
    """Write ``files`` (relative to ``root``) and the list ``removed`` as an index and parts in ``destination``.

    Args:
        base: recorded in the index; :func:`unpack` checks it against the state it updates
            (e.g. the number of calls the manifest held when the invocation started).
        part_bytes, max_files, max_bytes: the limits (default :data:`PART_BYTES`, :data:`MAX_FILES`
            counting the index, :data:`MAX_BYTES`).

    Raises:
        PackTooLarge: more than ``max_bytes`` in all or more than ``max_files`` files; nothing is written.
    """
    part_bytes = PART_BYTES if part_bytes is None else part_bytes
    max_files = MAX_FILES if max_files is None else max_files
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    root, destination = Path(root), Path(destination)
    entries, blobs, offset, raw = [], [], 0, 0
    for rel in files:
        data = (root / rel).read_bytes()
        blob, stride = encode(rel, data)
        entries.append({"path": rel, "offset": offset, "length": len(blob), "bytes": len(data), "stride": stride,
                        "sha256": hashlib.sha256(data).hexdigest()})
        blobs.append(blob)
        offset += len(blob)
        raw += len(data)
    total = offset
    num_parts = max(1, -(-total // part_bytes))
    sizes = {entry["path"]: entry["length"] for entry in entries}
    if total > max_bytes or num_parts + 1 > max_files:
        largest = ", ".join(f"{rel} {size / MiB:.1f} MiB" for rel, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:4])
        raise PackTooLarge(f"the state to send back is {total / MiB:.1f} MiB packed in {num_parts} parts; the limit is "
                           f"{max_bytes / MiB:.0f} MiB and {max_files - 1} parts (largest: {largest})", sizes)
    destination.mkdir(parents=True, exist_ok=True)
    stream = b"".join(blobs)
    parts, part_entries = [], []
    for index in range(num_parts):
        chunk = stream[index * part_bytes : (index + 1) * part_bytes]
        path = destination / PART_PATTERN.format(index)
        path.write_bytes(chunk)
        parts.append(path)
        part_entries.append({"file": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    index_document = {"format": PACK_FORMAT, "version": PACK_VERSION, "base": base, "files": entries,
                      "removed": list(removed), "parts": part_entries, "packed_bytes": total, "raw_bytes": raw}
    atomic_write_text(destination / INDEX_NAME, json.dumps(index_document, indent=1) + "\n")
    return PackReport(list(files), list(removed), parts, total, raw)


def read_index(source: Path) -> dict[str, Any]:
    path = Path(source) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not the files returned by a reproduction call")
    document = json.loads(path.read_text(encoding="utf-8"))
    if document.get("format") != PACK_FORMAT or document.get("version") != PACK_VERSION:
        raise ValueError(f"{path}: not a version {PACK_VERSION} {PACK_FORMAT}")
    return document


def _safe_relative(rel: str) -> str:
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts or not all(_SAFE_NAME.fullmatch(p) for p in path.parts):
        raise ValueError(f"refusing the packed path {rel!r}")
    return path.as_posix()


def unpack(source: Path, root: Path) -> dict[str, Any]:
    """Apply the pack in ``source`` to ``root``: check every part and file, write files atomically, remove
    the removed ones. Returns the index."""
    source, root = Path(source), Path(root)
    document = read_index(source)
    stream = bytearray()
    for part in document["parts"]:
        data = (source / part["file"]).read_bytes()
        if len(data) != part["bytes"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise ValueError(f"{source / part['file']}: damaged part (size or SHA-256 differs from the index)")
        stream += data
    decoded = []
    for entry in document["files"]:
        rel = _safe_relative(entry["path"])
        data = decode(bytes(stream[entry["offset"] : entry["offset"] + entry["length"]]), entry["stride"])
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{rel}: damaged in the pack (SHA-256 differs)")
        decoded.append((rel, data))
    for rel, data in decoded:
        atomic_write_bytes(root / rel, data)
    for rel in document["removed"]:
        (root / _safe_relative(rel)).unlink(missing_ok=True)
    _remove_empty_dirs(root)
    return document


def _remove_empty_dirs(root: Path) -> None:
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()
