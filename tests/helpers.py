"""Helpers shared by the tests that start subprocesses (``python -m avme_ext``, torchrun)."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
#: The real data sets beside the checkout (``../shared/data``); ``AVME_SHARED_DATA`` points elsewhere
#: (e.g. from a git worktree, whose parent folder is not the checkout's).
SHARED_DATA = Path(os.environ.get("AVME_SHARED_DATA") or REPO.parent / "shared" / "data")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: this source tree on PYTHONPATH, one CPU thread (like torchrun),
    no GPU, and no torchrun variables inherited from the test runner."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def free_port() -> int:
    """A free TCP port on the loopback interface, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script(name: str) -> ModuleType:
    """The script ``python/<name>.py`` of this checkout, imported as a module named ``name``."""
    spec = importlib.util.spec_from_file_location(name, REPO / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
