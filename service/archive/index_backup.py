"""The archive index kept as it was before an upgrade (`index.sqlite.v3-backup`): the smearscope that
made the index refuses the upgraded one and reads this copy (docs/ARCHIVE.md, going back)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from smearscope.files import fsync_dir

logger = logging.getLogger(__name__)

#: Room left on the disk beside the copy for the upgrade itself (its WAL): a copy that would fill the
#: disk is not begun.
UPGRADE_HEADROOM = 1 << 20


class BackupError(OSError):
    """The copy before an upgrade cannot be made: the index is left as it is, not upgraded."""


def backup_path(path: Path, version: int) -> Path:
    """Where the upgrade of index `path` from `version` keeps the index as it was (`index.sqlite.v3-backup`)."""
    return path.with_name(f"{path.name}.v{version}-backup")


@contextlib.contextmanager
def upgrade_lock(path: Path) -> Iterator[None]:
    """Held while this process opens index `path` to write it, making or upgrading it where it must (an advisory
    lock on a file beside it, `.index.sqlite.upgrade-lock`, kept there): a second process opening the same index
    meanwhile (the archive restarted by an update while `send-hl7` runs) waits, then finds it upgraded. Without it
    both copied the index to the same file at once and both stopped, the index not upgraded. Where the index's file
    system refuses the lock (not contention: NFS without its lock service), the open goes on without it, said once
    at WARNING, rather than the archive not starting there at all."""
    fd = _open_lock_file(path)
    try:
        index = os.stat(path)  # the index's owner and mode, as its copy has them: the archive's user can open the
        with contextlib.suppress(OSError):  # lock after root's send-hl7 made it, and no other user can read it
            os.fchown(fd, index.st_uid, index.st_gid)
        with contextlib.suppress(OSError):
            os.fchmod(fd, index.st_mode & 0o660)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("another process is making or upgrading the archive index %s: waiting for it", path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            logger.warning("the archive index %s is opened without its upgrade lock: its file system (%s) refused "
                           "the lock on %s (%s). Two processes making or upgrading the index at once (the archive "
                           "restarted while smearscope archive send-hl7 starts) may then stop; on NFS, run its lock "
                           "service (NFSv3: rpc.statd) or keep the archive on a local disk",
                           path, _file_system(path), path.with_name(f".{path.name}.upgrade-lock").name, exc)
        yield
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    """The lock file, open for writing where this user may write it: on NFS Linux takes flock as a POSIX lock,
    whose exclusive kind needs a file open for writing (EBADF on one open for reading). Read-only where the user may
    only read it (a member of the index's group, the index 0640), where a local file system locks it alike."""
    lock = path.with_name(f".{path.name}.upgrade-lock")
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return os.open(lock, os.O_RDONLY | os.O_CLOEXEC)


def _file_system(path: Path) -> str:
    """The type of the file system holding `path` (its mount's in /proc/self/mounts: "nfs4"), or "type unknown"."""
    target, found, kind = os.path.realpath(path), "", "type unknown"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            _, point, fs_type, *_ = line.split(" ")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), point)  # a space there is \040
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(found):
                found, kind = point, fs_type
    return kind


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def keep_before_upgrade(db: sqlite3.Connection, path: Path, version: int, new_version: int) -> None:
    """A copy of the index as it is (SQLite's backup: its WAL included), synced, in the index's mode and owner, before
    it is upgraded to `new_version`. It replaces the copy an earlier upgrade from the same version left. BackupError, the index left as it is and no partial copy left, where the disk has no
    room for it (checked before writing) or it cannot be written."""
    backup = backup_path(path, version)
    tmp = backup.with_name(f".{backup.name}.tmp")
    tmp.unlink(missing_ok=True)
    page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
    size = page_size * int(db.execute("PRAGMA page_count").fetchone()[0])
    disk = os.statvfs(path.parent)
    free = disk.f_bavail * disk.f_frsize
    refused = (f"the archive index {path} (version {version}) is not upgraded to version {new_version}, "
               f"nothing in it changed")
    if size + UPGRADE_HEADROOM > free:
        raise BackupError(f"{refused}: its copy as it is, {backup.name}, needs {_megabytes(size)} and the "
                          f"disk holds {_megabytes(free)} free: make room there and start it again "
                          "(docs/ARCHIVE.md, going back)")
    try:
        copy = sqlite3.connect(tmp)
        try:
            db.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # one file, nothing beside it to lose in a move
        finally:
            copy.close()
        index = os.stat(path)
        with contextlib.suppress(PermissionError):  # another owner can be given by root alone
            os.chown(tmp, index.st_uid, index.st_gid)  # the archive's user, whom `cp -p` gives back
        os.chmod(tmp, index.st_mode & 0o777)  # the index's own mode: it names specimens
        with tmp.open("rb") as synced:
            os.fsync(synced.fileno())
        os.replace(tmp, backup)
        fsync_dir(path.parent)
    except (OSError, sqlite3.Error) as exc:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + "-journal").unlink(missing_ok=True)
        raise BackupError(f"{refused}: its copy as it is, {backup.name}, could not be written ({exc})") from exc
    reports = int(db.execute("SELECT count(*) FROM reports").fetchone()[0])
    logger.info("the archive index %s (version %d, %d reports) copied to %s before its upgrade to version %d: "
                "the smearscope before it refuses the upgraded index and reads this copy (docs/ARCHIVE.md, "
                "going back)", path, version, reports, backup, new_version)
