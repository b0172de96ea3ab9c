"""One run per directory: a launch of ``avme train`` holds a lock on its run directory.

Two processes writing one run directory would interleave their checkpoints and metrics. While
a launch runs, rank 0 holds an exclusive ``fcntl.flock`` on ``DIR/.avme-train.lock`` (taken
before the directory is read, released when the launch ends); a second launch on the same
directory is refused with a message that names the holder: its pid, host, start time and
command line, which the holder writes into the file. The operating system releases a flock
when its process ends in any way, SIGKILL included, so a lock left by a killed run never blocks
the next one: the file it leaves behind is only text. A torchrun job holds the lock once, on
rank 0. A file system without locks (some network file systems) runs without one, with a note.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import RunDirError

__all__ = ["LOCK_NAME", "RunLock"]

#: The lock file in a run directory.
LOCK_NAME = ".avme-train.lock"


class RunLock:
    """The lock of one run directory (see the module docstring); a context manager.

    Args:
        directory: the run directory (created by :meth:`acquire` when missing, and removed again by
            :meth:`release` if the launch left it empty).
        say: where a note goes when the file system has no locks.
    """

    def __init__(self, directory: str | os.PathLike, say: Callable[[str], None] | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunDirError` naming the process that holds it."""
        self._created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read(fd)
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirError(
                        f"--out {self.directory}: another avme train is using this run directory ({holder}); "
                        "one run per directory: wait for it to end or stop it, or choose another --out"
                    ) from None
                self.say(f"note: {self.directory} is on a file system without file locks ({error.strerror}); "
                         "nothing stops a second avme train from writing it at the same time")
                return self
            if self._is_current(fd):
                break
            os.close(fd)  # its holder released and removed it between our open and our lock: again
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_this_process()) + "\n").encode(), 0)
        return self

    def _is_current(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at :attr:`path` (a holder removes it when it releases)."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file and release the lock; remove the directory if acquiring created it and
        the launch wrote nothing there."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see _is_current
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created:
            try:
                self.directory.rmdir()
            except OSError:  # not empty: the run's files stay
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _this_process() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([_program(), *sys.argv[1:]]),
    }


def _program() -> str:
    """How this process was started: ``avme``, ``python -m avme_ext``, or the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.endswith(".__main__"):
        return f"python -m {spec.name.rpartition('.')[0]}"
    return Path(sys.argv[0]).name or "python"


def _read(fd: int) -> str:
    """The holder written in the lock file, in words."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode())
        where = "" if holder["host"] == socket.gethostname() else f" on {holder['host']}"
        return f"pid {holder['pid']}{where}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is still starting"
