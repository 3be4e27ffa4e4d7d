"""The review's overlay files: one folder per run, each field's overlay numbered as written.

A file is `<n>+<field id>.jpg`, n counting up within its run ('+' is never in a name's field id
part), so the order a run's overlays were written in survives a restart and a wall clock set back
(file times do not: a board without a clock battery writes after a power cut with times older
than the run's earlier fields). The disk cap deletes the oldest by this order.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_.@-]+")
_NUMBERED = re.compile(r"^(\d+)\+")


def safe_name(text: str) -> str:
    """`text` as a file or folder name (a run id, a field id): other characters as '_'."""
    return _SAFE.sub("_", text)


def overlay_order(path: Path) -> tuple[int, float]:
    """Where an overlay stands in its run's order written: its number; a file without one (written
    before overlays were numbered, hence before every numbered one) by its modification time."""
    numbered = _NUMBERED.match(path.name)
    return (int(numbered.group(1)), 0.0) if numbered else (-1, path.stat().st_mtime)


def write_overlay_file(folder: Path, field_id: str, jpeg: bytes) -> tuple[Path, list[Path]]:
    """Write a field's overlay into its run's folder under the number after the folder's last (a
    restart goes on from its files); (the file, the field's earlier files removed: a field analysed
    again, after a crash before its report was stored, is the newest). Raises OSError."""
    name = f"{safe_name(field_id)[:120]}.jpg"
    folder.mkdir(parents=True, exist_ok=True)
    earlier = [p for p in folder.iterdir() if p.name.endswith(".jpg")]
    numbers = [int(m.group(1)) for p in earlier if (m := _NUMBERED.match(p.name))]
    path = folder / f"{max(numbers, default=0) + 1:06d}+{name}"
    path.write_bytes(jpeg)
    replaced = [p for p in earlier if p.name == name or (_NUMBERED.match(p.name) and p.name.split("+", 1)[1] == name)]
    for p in replaced:
        p.unlink(missing_ok=True)
    return path, replaced
