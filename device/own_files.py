"""The station's own files in a folder others write (the watched folder): opened without following
a symbolic link and without blocking, and only when they are regular files.

Whoever may write the watched folder (the camera software's user) can put a link or a FIFO where
the station keeps its log of processed files, or in a `rejected/` folder it made itself: written
through a link, the station would overwrite whatever file the link names that its user may write
(the outbox); read from a FIFO, its start would wait for ever. Likewise `done/` and `rejected/`,
where files are moved: one replaced by a link to another folder would have the station put files
of any name beside its own (an outbox's -wal file).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

_FLAGS = os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


def open_own(path: str | os.PathLike[str], flags: int, mode: int = 0o666, dir_fd: int | None = None) -> int:
    """A file descriptor of the regular file at `path` (os.open `flags`, e.g. O_WRONLY | O_APPEND |
    O_CREAT; relative to the folder `dir_fd` if given); OSError when it is a symbolic link, a FIFO, a
    device or a directory, or cannot be opened."""
    try:
        fd = os.open(path, flags | _FLAGS, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise OSError(errno.ELOOP, "a symbolic link, not followed", os.fspath(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    return fd


def write_own_text(path: str | os.PathLike[str], text: str, dir_fd: int | None = None) -> None:
    """Write `text` (UTF-8, names' odd bytes as \\xNN) to the regular file at `path` (in the folder
    `dir_fd` if given), made or replaced."""
    fd = open_own(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, dir_fd=dir_fd)
    with open(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(text)


#: Longest name a file keeps in done/ or rejected/: its `.reason.txt` beside it must fit the file
#: system's 255 bytes.
MAX_NAME_BYTES = 255 - len(".reason.txt")


def unique_target(directory: Path, name: str, key: str) -> Path:
    """`directory/name`, or with the version's key in it when that is taken or too long (then the
    name is cut to fit, the key keeping it apart)."""
    target = directory / name
    if target.exists() or len(os.fsencode(name)) > MAX_NAME_BYTES:
        stem, suffix = (os.fsencode(part) for part in os.path.splitext(name))
        suffix = suffix[:16]
        stem = stem[:MAX_NAME_BYTES - 9 - len(suffix)]
        target = directory / os.fsdecode(stem + b"-" + key[:8].encode() + suffix)
    return target


def still_at(directory: Path, real: str) -> None:
    """OSError unless `directory` leads where it led at start (`real`, its resolved path)."""
    now = os.path.realpath(directory)
    if now != real:
        raise OSError(errno.EXDEV, f"it leads to {now} now, not to {real} as at start (replaced by a link?)",
                      os.fspath(directory))


@contextmanager
def place(directory: Path, real: str) -> Iterator[int]:
    """A descriptor of `directory`, which must lead where it led at start (`real`, its resolved
    path; OSError otherwise). Moves and writes made relative to it land in that folder even if a
    link is put in its place after the check (a check, then a rename by path, could be raced)."""
    still_at(directory, real)  # then opened not through a link: one put there after the check is refused
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        yield fd
    finally:
        os.close(fd)


def sync_folder(directory: str | os.PathLike[str]) -> None:
    """fsync `directory` itself, so that a rename or a new name in it survives a power cut (the
    file's own fsync keeps its bytes, not the entry that names it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
