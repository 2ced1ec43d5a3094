"""One export at a time per output folder: an exclusive ``flock`` on ``.<name>.lock`` next to the folder.

Two ``deltadit export`` runs on one ``--out`` would otherwise both build, both say success, and one would
silently win. With the lock the second waits (saying so, with the holder's pid) until the first is done,
then finds its export: identical options reuse it, other options are refused without ``--force``.

The kernel releases an ``flock`` when its holder exits in any way, SIGKILL included, so a lock file left by a
killed export is harmless: the next export takes it at once. The holder removes the file when it is done,
while still holding the lock; a waiter that then gets the lock on the removed file notices (the path no
longer names the inode it locked) and locks the path afresh, so two holders can never coexist.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def acquire(out: Path, on_wait: Callable[[str], None] | None = None) -> int:
    """Block until this process holds the lock of ``out``; returns the lock's file descriptor. Raises OSError
    when the lock file cannot be made (the caller reports it like any write failure)."""
    path = lock_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not told:
                    pid = _holder(fd)
                    on_wait(f"another deltadit export is writing {out}{f' (pid {pid})' if pid else ''}: waiting "
                            f"for it to finish (lock {path})")
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(path, fd):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the previous holder removed the file we locked: lock the path again
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(out: Path, fd: int) -> None:
    try:
        if _same_file(lock_path(out), fd):
            os.unlink(lock_path(out))  # while still holding it (see the module's docstring)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def folder_lock(out: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of the export folder ``out`` for the block."""
    fd = acquire(out, on_wait)
    try:
        yield
    finally:
        release(out, fd)
