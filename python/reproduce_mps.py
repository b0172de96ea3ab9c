"""A private NVIDIA MPS daemon for the training processes of the reproduction.

Several ``avme train`` processes on one GPU share it by time slicing: the kernels of one process
never run beside those of another, so four runs that each leave the GPU mostly idle (small
batches, CUDA-graph steps of small kernels) take about four times as long as one. Under the
Multi-Process Service (MPS) their kernels run side by side. :func:`mps_daemon` starts a control
daemon of its own for the duration of the training stage (its pipe and log folders in a fresh
temporary folder, so it touches no system-wide MPS), checks with a one-kernel probe process that
a client can use the GPU through it, and quits it at the end. The training processes find it
through the two environment variables of :attr:`MpsSession.env`.

Modes (``reproduce_paper.py --mps``): ``auto`` uses MPS when ``nvidia-cuda-mps-control`` is
installed and the probe passes, and otherwise trains without it (saying why); ``on`` fails
instead; ``off`` never starts it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

MPS_MODES = ("auto", "on", "off")
MPS_CONTROL = "nvidia-cuda-mps-control"
#: A client of the daemon: one kernel and a synchronisation on the default CUDA device.
PROBE = (sys.executable, "-c", "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()")


class MpsError(RuntimeError):
    """``--mps on`` and the daemon cannot be used."""


@dataclass(frozen=True)
class MpsSession:
    """What the training processes need to know about MPS.

    Attributes:
        env: environment variables for the clients (empty when MPS is not in use).
        reason: one line saying whether MPS is in use, and why not.
    """

    env: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    @property
    def active(self) -> bool:
        return bool(self.env)


def _run(command: list[str], env: dict[str, str], timeout: float, stdin: bytes | None = None) -> tuple[int, str]:
    try:
        done = subprocess.run(command, env=env, input=stdin, capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as error:
        return -1, str(error)
    text = (done.stdout + done.stderr).decode(errors="replace").strip()
    return done.returncode, text.splitlines()[-1] if text else ""


@contextmanager
def mps_daemon(mode: str, device: str, log: Callable[[str], None], *, control: str = MPS_CONTROL,
               probe: tuple[str, ...] = PROBE, timeout: float = 60.0) -> Iterator[MpsSession]:
    """A private MPS control daemon while the ``with`` block runs (see the module docstring).

    Args:
        mode: ``auto``, ``on`` or ``off``.
        device: the training device (MPS only for ``cuda``).
        log: prints one line.
        control: the control program (a path or a name on ``PATH``).
        probe: the command of the probe client.
        timeout: seconds allowed to each of start, probe and quit.

    Raises:
        ValueError: an unknown mode.
        MpsError: ``mode="on"`` and the daemon cannot be started or used.
    """
    if mode not in MPS_MODES:
        raise ValueError(f"mps mode must be one of {MPS_MODES}, got {mode!r}")
    if mode == "off" or not device.startswith("cuda"):
        yield MpsSession(reason="MPS off" if mode == "off" else f"MPS not used on {device}")
        return
    executable = shutil.which(control)
    folder = tempfile.mkdtemp(prefix="avme-mps-") if executable else None
    env = {} if folder is None else {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(folder, "pipe"),
                                     "CUDA_MPS_LOG_DIRECTORY": os.path.join(folder, "log")}
    for path in env.values():
        os.makedirs(path)
    full_env = {**os.environ, **env}
    failure = f"{control} not found" if executable is None else None
    started = False
    if failure is None:
        code, text = _run([executable, "-d"], full_env, timeout)
        started = code == 0
        failure = None if started else f"{control} -d exited with {code}: {text}"
    if failure is None:
        code, text = _run(list(probe), full_env, timeout)
        failure = None if code == 0 else f"a probe client failed through the daemon (exit {code}: {text})"
    try:
        if failure is not None:
            if mode == "on":
                raise MpsError(f"--mps on: {failure}")
            log(f"training without MPS (runs side by side share the GPU by time slicing): {failure}")
            yield MpsSession(reason=f"MPS not used: {failure}")
        else:
            log(f"MPS daemon started (pipe {env['CUDA_MPS_PIPE_DIRECTORY']}): runs side by side "
                "execute their kernels concurrently")
            yield MpsSession(env=env, reason="MPS daemon of this run")
    finally:
        if started:
            code, text = _run([executable], full_env, timeout, stdin=b"quit\n")
            if code != 0:
                log(f"warning: stopping the MPS daemon: {control} exited with {code}: {text}")
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
