"""Seeds of named random streams: one derivation for training noise, shuffling and evaluation chunks."""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(namespace: str, seed: int, *tags: object) -> int:
    """A 63-bit seed for the stream named by ``tags`` under ``namespace``, stable across runs.

    ``derive_seed("avme-train", 0, "noise", 12)`` and ``derive_seed("avme-eval", 0, 3, "iwae")``
    hash ``"<namespace>:<seed>:<tag>:..."`` with BLAKE2b, so streams never collide across
    namespaces, steps or chunks, and the same names give the same numbers on every machine.
    """
    text = ":".join([namespace, str(int(seed)), *(str(t) for t in tags)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
