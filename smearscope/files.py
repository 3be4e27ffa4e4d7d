"""Files written whole or not at all, on disk before the call returns.

Shared by the TensorRT engine builder (`smearscope.export`) and the report archive
(`smearscope.service.archive`), which may not import each other: the top-level package is the
place both may import (tests/test_layers.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


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
    none, under `path`; its temporary file `.<name>.<8 random characters>.tmp` is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
