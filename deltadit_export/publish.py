"""Write an export folder so that an interrupted export never leaves a half folder that looks complete, and
write every other output file (reports, PNGs, JSON) so that a reader never sees a half-written one.

Everything is built in a hidden sibling ``.<name>.tmp-<pid>`` and only then swapped into place.
The swap uses ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it (one atomic step); else two
renames, with the previous folder parked as ``.<name>.old-<pid>`` in between. :func:`recover`
runs before every export: it restores a parked folder whose swap was cut short and deletes stale
temporaries, so a rerun after SIGKILL or a full disk starts clean. Files in the previous folder that are
not part of its export (a user's notes, images an older ``deltadit generate`` wrote there) are linked into
the new folder before the swap (:func:`carry_user_files`), so a re-export never deletes them.

:func:`write_file` writes one file through a temporary sibling renamed into place; :func:`check_writable`
probes an output folder before minutes of work depend on it. Both report failures as :class:`OutputError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

RENAME_EXCHANGE = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# A probe of this size finds a full disk before the work starts (a grid PNG is ~10 KB, quality.json ~60 KB).
PROBE_BYTES = 256 * 1024


class OutputError(RuntimeError):
    """An output file or folder cannot be written; the message names it, the reason, and the fix."""


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


def why_not_writable(exc: OSError, what: str = "--out") -> str:
    """The fix for a failed write, by its cause (``what``: the option that chose the place)."""
    if exc.errno in DISK_FULL:
        return f"the disk is full: free space there, or pass {what} on another disk"
    if exc.errno == errno.EROFS:
        return f"the file system is read-only: pass {what} on a writable disk"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write there: pass {what} to a folder you can write"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"a file stands where a folder should be: pass {what} to a folder"
    return f"pass {what} to a folder on a local, writable disk"


def probe_space(folder: Path) -> None:
    """Write :data:`PROBE_BYTES` in ``folder``, flush them to disk and remove them; OSError when it cannot."""
    fd, probe = tempfile.mkstemp(prefix=".deltadit-write-probe-", dir=folder)
    try:
        left = memoryview(b"\0" * PROBE_BYTES)
        while left:  # a nearly full disk takes part of a write; the next part fails with ENOSPC
            left = left[os.write(fd, left):]
        os.fsync(fd)
    finally:
        os.close(fd)
        Path(probe).unlink(missing_ok=True)


def check_writable(folder: str | os.PathLike, what: str = "--out") -> Path:
    """Prove that ``folder`` (or, while it does not exist, its nearest existing parent, where it will be made)
    takes a file of :data:`PROBE_BYTES`, written, flushed to disk and removed: a read-only, foreign or full disk
    is refused at once, not after minutes of work. Nothing is left behind, so a run refused later for another
    reason has made no folder."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        probe_space(existing)
    except OSError as exc:
        raise OutputError(f"{what} {folder}: cannot write there ({exc.strerror or exc}); "
                          f"{why_not_writable(exc, what)}") from None
    return folder


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of earlier writes of ``path`` killed before their rename (their process is gone)."""
    prefix = _temporary_prefix(path)
    for p in path.parent.glob(f"{prefix}*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # a live writer (another process writing the same file): not ours to remove
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except OSError:
            continue


def write_file(path: str | os.PathLike, data: bytes | str, what: str = "--out") -> Path:
    """Write one file (a report, a PNG) through a temporary sibling renamed into place: a reader never sees a
    half-written file, and an interrupted write (SIGKILL, full disk) leaves the previous file as it was.
    Failures raise :class:`OutputError` naming the file and the fix."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{_temporary_prefix(path)}{os.getpid()}-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = f"the previous {path.name} is untouched" if path.exists() else f"no {path.name} was written"
            raise OutputError(f"cannot write {path} ({exc.strerror or exc}); {kept}: "
                              f"{why_not_writable(exc, what)}") from None
        raise
    return path


# ---------------------------------------------------------------- a user's files in an export folder


def user_files(out: Path, is_ours: Callable[[str], bool]) -> list[str]:
    """Paths (relative, POSIX) of the files and links under ``out`` that are not part of its export."""
    found = []
    for root, dirs, files in os.walk(out):
        rel_root = Path(root).relative_to(out)
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            rel = (rel_root / name).as_posix()
            if not is_ours(rel):
                found.append(rel)
    return sorted(found)


def carry_user_files(out: Path, tmp: Path, is_ours: Callable[[str], bool]) -> list[str]:
    """Link (or copy, where links fail) every user file of the previous export folder ``out`` into the new one
    ``tmp`` before the swap: the previous folder keeps them until the swap, the new one has them after it, so
    no moment of a SIGKILL loses them. Returns what was carried; refuses a name the new export also writes."""
    if not out.is_dir():
        return []
    carried = user_files(out, is_ours)
    for rel in carried:
        src, dst = out / rel, tmp / rel
        if os.path.lexists(dst):
            raise OutputError(f"{src} is not part of the export in {out}, but the new export writes a file of that "
                              "name; move it out of the folder (it is kept as it is) and rerun")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return carried
