"""Files written whole or not at all, on disk before the call returns.

Shared by the TensorRT engine builder (`smearscope.export`) and the report archive
(`smearscope.service.archive`), which may not import each other: the top-level package is the
place both may import (tests/test_layers.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


#: What flock raises on a file system that has none; a write there goes on unlocked (said once per folder),
#: so only a cleanup running at that moment could remove its temporary file (the write then fails, said).
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})
_SAID_NO_FLOCK: set[Path] = set()


def _said_no_flock(folder: Path, exc: OSError) -> None:
    if folder not in _SAID_NO_FLOCK:
        _SAID_NO_FLOCK.add(folder)
        logger.warning("%s: the file system refuses file locks (%s): files are written there without locking their "
                       "temporary file", folder, exc.strerror or exc)


def fsync_dir(path: Path) -> None:
    """A folder's entries (a rename, a new file) on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """`data` at `path`, whole or not at all, on disk before this returns (`mode`: its permissions;
    else 0600, mkstemp's). A write cut short (disk full, power lost) leaves the former file, or
    none, under `path`; its temporary file `.<name>.<8 random characters>.tmp` is removed. The
    temporary file is locked (flock) until it is renamed: a cleanup of the temporary files killed
    writes left (`remove_unless_written`) leaves it."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without flock (NFS without its lock service): written unlocked
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                os.unlink(tmp)
                raise
            _said_no_flock(path.parent, exc)
        if not os.fstat(fd).st_nlink:
            os.close(fd)  # a cleanup removed it between its making and the lock: another
            continue
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
                try:
                    os.replace(tmp, path)  # the lock held until then (it goes with the file's closing)
                    break
                except FileNotFoundError:
                    if os.fstat(fh.fileno()).st_nlink:
                        raise
                    # removed by a cleanup that could not open it to see the lock (another user's): another
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    fsync_dir(path.parent)


def remove_unless_written(tmp: Path) -> bool:
    """Remove `tmp`, a temporary file of write_atomically's, unless its write is under way (another
    process beside this one writing it: False, kept). One this process cannot open (another user's, the
    write of `sudo smearscope ...`) is told by the kernel's list of locks; OSError where that cannot be read."""
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except PermissionError:
        if _flocked(os.lstat(tmp)):
            return False
        tmp.unlink()  # a write that locks it meanwhile finds it gone at its rename and makes another
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        tmp.unlink()  # under the lock: a write that made it meanwhile waits, finds it gone and makes another
        return True
    finally:
        os.close(fd)


def _flocked(st: os.stat_result) -> bool:
    """Whether some process holds a flock on the file of `st`, by /proc/locks (its device as major:minor in
    hex, then the inode); OSError where the list cannot be read."""
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}".encode()
    with open("/proc/locks", "rb") as locks:  # bytes: no codec to import (a process of another user may not read them)
        return any(len(f := line.split()) > 5 and f[1] == b"FLOCK" and device in f[4:6] for line in locks)
