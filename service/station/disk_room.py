"""Room left on a disk: the review overlays and the typed-cells file give way to the outbox
while the disk has less than `[review] min_free_disk_mb` free."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def free_bytes(path: Path) -> float:
    """Free bytes on the disk that holds `path` (or its nearest existing parent); infinite when
    that cannot be read (a disk that cannot be measured refuses nothing)."""
    try:
        where = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
        return shutil.disk_usage(where).free
    except OSError:
        return float("inf")
