"""Stage 1, step 1: a frame's bytes from a path, read only from a regular file and never past a bound.

A path is judged twice: by `os.stat` before it is opened (a FIFO, a device or a directory is
never opened: opening some devices does something), and by the opened file's own `fstat`, so a
file swapped for a FIFO or a link to a device between the two (by whoever writes the folder) is
not read either: a FIFO would block the reader for ever, `/dev/zero` would never end. It is opened
without blocking and read to at most a given number of bytes.

`read_image_file_within` reads a file only if it lies in given folders, judged on the file that was
opened (Linux: the descriptor's /proc/self/fd link), so a path component swapped for a symbolic
link between a caller's check and the read cannot lead the read out of them.
"""

from __future__ import annotations

import logging
import os
import stat

from smearscope.device.ingest.errors import IngestError, RejectReason

logger = logging.getLogger(__name__)


class OutsideFolders(Exception):
    """The file opened lies outside the folders it had to be in."""


def within(real: str, folders: tuple[str, ...]) -> bool:
    """Whether the resolved path `real` lies in (or below) one of the resolved `folders`."""
    return any(os.path.commonpath((real, folder)) == folder != real for folder in folders)


_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


def read_regular(path: str | os.PathLike[str], most: int, same_as: os.stat_result | None = None) -> bytes | None:
    """At most `most` bytes of the regular file at `path`; None when what opened is not a regular
    file (any more), or not the file `same_as` describes. OSError from the open or the read is the
    caller's."""
    fd = os.open(path, _FLAGS)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (
                same_as is not None and (opened.st_dev, opened.st_ino) != (same_as.st_dev, same_as.st_ino)):
            return None
        with open(fd, "rb", closefd=False) as fh:
            return fh.read(most)
    finally:
        os.close(fd)


def read_image_file_within(path: str, folders: tuple[str, ...], max_bytes: int, name: str) -> bytes:
    """As `read_image_file`, the file opened once: it is located from its descriptor and, outside
    `folders` (resolved paths), refused `OutsideFolders` before a byte is read; what is read is that
    same file. The first open is an O_PATH one: it reads nothing, never blocks on a FIFO and runs no
    device's open; the read reopens it through /proc/self/fd."""
    try:
        located = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise IngestError(RejectReason.NOT_FOUND, f"{name}: no such file") from None
    except OSError as exc:
        raise IngestError(RejectReason.UNREADABLE, f"{name}: {exc.strerror or exc}") from exc
    try:
        try:
            where = os.readlink(f"/proc/self/fd/{located}")
        except OSError as exc:  # no /proc: where the file lies is unknown, so it is not read
            raise IngestError(RejectReason.UNREADABLE, f"{name}: where the opened file lies is unknown "
                              f"(/proc/self/fd: {exc.strerror or exc})") from exc
        if not where.startswith("/") or not within(where.removesuffix(" (deleted)"), folders):
            raise OutsideFolders(where)
        return read_image_file(f"/proc/self/fd/{located}", max_bytes, name, same_as=os.fstat(located))
    finally:
        os.close(located)


def read_image_file(path: str, max_bytes: int, name: str, same_as: os.stat_result | None = None) -> bytes:
    """The bytes of the file at `path`, or the `IngestError` of step 1 (not_found, not_a_file,
    unreadable, empty_file, file_too_large); with `same_as`, only from the file it describes."""
    try:
        st = os.stat(path) if same_as is None else same_as
    except (FileNotFoundError, NotADirectoryError):
        raise IngestError(RejectReason.NOT_FOUND, f"{name}: no such file") from None
    except OSError as exc:
        raise IngestError(RejectReason.UNREADABLE, f"{name}: {exc.strerror or exc}") from exc
    except ValueError:  # a NUL character, or a lone surrogate no file name's byte gives: names no file
        raise IngestError(RejectReason.NOT_FOUND, f"{name}: no file has such a name (a NUL character or a "
                          "lone surrogate in it)") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise IngestError(RejectReason.NOT_A_FILE, f"{name}: {kind}")
    if st.st_size == 0:
        raise IngestError(RejectReason.EMPTY_FILE, f"{name}: 0 bytes")
    if st.st_size > max_bytes:
        raise IngestError(RejectReason.FILE_TOO_LARGE, f"{name}: {st.st_size} bytes > limit {max_bytes}")
    try:
        # +1 so a file that grew after stat() is still caught by the size limit.
        data = read_regular(path, max_bytes + 1, same_as)
    except FileNotFoundError:
        raise IngestError(RejectReason.NOT_FOUND, f"{name}: no such file") from None
    except OSError as exc:
        raise IngestError(RejectReason.UNREADABLE, f"{name}: {exc.strerror or exc}") from exc
    if data is None:
        raise IngestError(RejectReason.NOT_A_FILE, f"{name}: not a regular file (any more: replaced while "
                          "it was opened)")
    if not data:
        raise IngestError(RejectReason.EMPTY_FILE, f"{name}: 0 bytes")
    if len(data) > max_bytes:
        raise IngestError(RejectReason.FILE_TOO_LARGE, f"{name}: grew past the size limit")
    return data
