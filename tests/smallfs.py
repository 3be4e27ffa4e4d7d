"""A small real file system for disk-full tests: a tmpfs of a few hundred kilobytes mounted on
a test's directory (needs root, or the mount is refused and the test skips with the reason).

A tmpfs is a real file system: writes past its size fail with ENOSPC, which SQLite reports as
SQLITE_FULL, exactly as on a full SD card; nothing is simulated.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    """Mount a tmpfs of `size_kb` KiB on `path` (created) for the duration; skip if impossible."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs",
                           str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    "disk-full tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path, name: str = "filler", leave_bytes: int = 0) -> Path:
    """Write a file until the file system is full (less `leave_bytes`); returns its path."""
    target = directory / name
    stat = os.statvfs(directory)
    room = stat.f_bavail * stat.f_frsize - leave_bytes
    # Unbuffered: when another writer fills the disk first, the ENOSPC below ends the loop and no
    # buffered bytes are left for close() to fail on (it did, raising ENOSPC at the `with`).
    with open(target, "wb", buffering=0) as fh:
        chunk = b"\0" * 4096
        written = 0
        try:
            while written < room:
                fh.write(chunk)
                written += len(chunk)
            fh.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return target
