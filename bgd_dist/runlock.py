"""An exclusive lock on a run directory: one run writes into ``--out`` at a time."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class RunDirectoryLocked(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """``fcntl.flock`` on ``<out>/.lock``, held from :meth:`acquire` to :meth:`release` (or the
    process's end: the kernel drops the lock of a killed process). The file holds the PID of
    the process holding it, for the message the next run gets."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryLocked(f"{self.path.parent} is in use by another run (PID {holder}); wait for it "
                                     f"to finish or choose another --out directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(out_dir: str | Path) -> str | None:
    """The PID (as written in ``.lock``) of the process that holds the run directory now, or None
    when no process does (finished, killed or never started: the kernel drops a dead
    process's lock). Takes no lock itself."""
    path = Path(out_dir) / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
