"""Stage 1, step 1: a frame's bytes from a path, read only from a regular file and never past a bound.

A path is judged twice: by `os.stat` before it is opened (a FIFO, a device or a directory is
never opened: opening some devices does something), and by the opened file's own `fstat`, so a
file swapped for a FIFO or a link to a device between the two (by whoever writes the folder) is
not read either: a FIFO would block the reader for ever, `/dev/zero` would never end. It is opened
without blocking and read to at most a given number of bytes.
"""

from __future__ import annotations

import logging
import os
import stat

from smearscope.device.ingest.errors import IngestError, RejectReason

logger = logging.getLogger(__name__)

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


def read_regular(path: str | os.PathLike[str], most: int) -> bytes | None:
    """At most `most` bytes of the regular file at `path`; None when what opened is not a regular
    file (any more). OSError from the open or the read is the caller's."""
    fd = os.open(path, _FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as fh:
            return fh.read(most)
    finally:
        os.close(fd)


def read_image_file(path: str, max_bytes: int, name: str) -> bytes:
    """The bytes of the file at `path`, or the `IngestError` of step 1 (not_found, not_a_file,
    unreadable, empty_file, file_too_large)."""
    try:
        st = os.stat(path)
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
        data = read_regular(path, max_bytes + 1)
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
