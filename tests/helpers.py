"""Helpers shared by the tests: subprocesses (``python -m avme_ext``, torchrun), the scripts, model sizes."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TypedDict

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


def run_in_repo(
    command: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` from the checkout's root and wait (at most ``timeout`` seconds), its stdout and
    stderr captured as text; a non-zero exit status is returned, not raised. ``env``: the child's whole
    environment (None: this process's; :func:`subprocess_env` for the usual one)."""
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=timeout)


def free_port() -> int:
    """A free TCP port on the loopback interface, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def load_script(name: str) -> ModuleType:
    """The script ``python/<name>.py`` of this checkout, imported as a module named ``name``."""
    return load_module(name, REPO / "python" / f"{name}.py")


def load_module(name: str, path: Path) -> ModuleType:
    """The Python file ``path`` imported as a module named ``name`` (not added to sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None, path
    assert spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Keyword arguments of the model classes, so that a test's size dictionary (``AVME(**SIZES)``) is
# checked against the signatures like the keywords themselves.
class SizeArgs(TypedDict, total=False):
    """The sizes of the networks and the number of steps (the pixels and classes come with the data)."""

    enc_hidden: int
    dec_hidden: int
    latent_dim: int
    steps: int


class DataSizeArgs(SizeArgs, total=False):
    """:class:`SizeArgs` and the pixels per image."""

    data_dim: int


class LoopArgs(DataSizeArgs, total=False):
    """Every argument of :class:`avme_ext.AVMECore` that defines the loop (:data:`avme_ext.config.LOOP_FIELDS`)."""

    num_classes: int
    encoder_input: str


class ModelArgs(SizeArgs, total=False):
    """:class:`SizeArgs` and the implementation options of :class:`avme_ext.AVME` and AVMECore."""

    impl: str
    precision: str


def model_args(hidden: int, latent: int, steps: int) -> list[str]:
    """``avme train`` options of a small model: both LSTMs of ``hidden`` units, Z = ``latent``, K = ``steps``."""
    return [
        "--enc-hidden",
        str(hidden),
        "--dec-hidden",
        str(hidden),
        "--latent-dim",
        str(latent),
        "--steps",
        str(steps),
    ]


def subset_args(train: int, valid: int) -> list[str]:
    """``avme train`` options that train on ``train`` images and validate on ``valid`` (0: no validation)."""
    return ["--train-subset", str(train), "--valid-subset", str(valid)]
