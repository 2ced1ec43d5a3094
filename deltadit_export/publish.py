"""Write an export folder so that an interrupted export never leaves a half folder that looks complete.

Everything is built in a hidden sibling ``.<name>.tmp-<pid>`` and only then swapped into place.
The swap uses ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it (one atomic step); else two
renames, with the previous folder parked as ``.<name>.old-<pid>`` in between. :func:`recover`
runs before every export: it restores a parked folder whose swap was cut short and deletes stale
temporaries, so a rerun after SIGKILL or a full disk starts clean.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path

RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where renameat2 is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(out: Path) -> Path:
    """A fresh hidden temporary folder next to ``out`` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes it 0700; the published folder must be readable like any folder the user makes
    # (a service often runs the engines as another user).
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def recover(out: Path) -> list[str]:
    """Undo what an interrupted export left next to ``out``. Returns what was done, for the log."""
    done: list[str] = []
    if not out.parent.is_dir():
        return done
    for p in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            p.rename(out)
            done.append(f"restored {out} from an interrupted swap")
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        if _owner_alive(p):
            continue
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed stale temporary {p.name}")
    return done


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) from /proc, to tell a reused pid apart; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(tmp: Path) -> bool:
    """A temporary folder of a live export (another process) must not be deleted under it."""
    pid_file = tmp / ".pid"
    try:
        fields = pid_file.read_text().split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if len(fields) > 1 and _start_time(pid) not in (None, fields[1]):
        return False  # the pid was reused by another process: the export that owned this folder is gone
    try:  # a killed export that nobody has reaped yet is a zombie: not alive
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return True


def mark_owner(tmp: Path) -> None:
    pid = os.getpid()
    (tmp / ".pid").write_text(f"{pid} {_start_time(pid) or ''}".strip())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing what was there, never leaving neither."""
    (tmp / ".pid").unlink(missing_ok=True)
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(tmp)
    if not out.exists():
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        return
    if _exchange(tmp, out):
        _fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous export
        return
    parked = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, parked)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(parked, out)  # put the previous export back before reporting the failure
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(parked, ignore_errors=True)


def write_file(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file (a report, a PNG) through a temporary sibling renamed into place: a reader never sees a
    half-written file, and an interrupted write leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
