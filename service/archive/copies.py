"""The copies of an archived report kept beside it: `<report_id>+<digest>.json` (its FHIR bundle's:
`<report_id>+<digest>.fhir.json`), which service.archive.store writes when the report comes again with
other content or while the first file cannot be read.

They are not rows of the index (which names the file received first): they are found by listing the
first file's folder (one station's month) and keeping the names of exactly that pattern, 16 hex
digits of the content's SHA-256, for that report id (`+` is in no report id: no other report's name
matches). Numbered from 1 in the order they were written (the file's modification time, then its name),
so a copy written later never renumbers the ones before it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

#: A copy's file name: the report id, `+`, 16 hex digits, `.json` (a report) or `.fhir.json` (a bundle).
COPY_NAME = re.compile(r"(?P<report_id>[A-Za-z0-9][A-Za-z0-9_.:-]{0,127})\+(?P<digest>[0-9a-f]{16})"
                       r"(?P<suffix>\.fhir\.json|\.json)")


@dataclass(frozen=True)
class ArchivedCopy:
    """One copy beside an archived report: its number (1: the first written), file, the digest its
    name carries (the first 16 hex digits of its SHA-256), size and when it was written."""

    number: int
    path: Path
    digest: str
    size: int
    written_at: float

    def as_json(self) -> dict[str, object]:
        return {"copy": self.number, "path": str(self.path), "digest": self.digest, "bytes": self.size,
                "written_at": datetime.fromtimestamp(self.written_at, timezone.utc).isoformat()}


#: One folder's copies by report id, in the order they were written: (written_at, name, path, digest, size).
Listing = dict[str, list[tuple[float, str, Path, str, int]]]


def list_folder(folder: Path, bundles: bool = False) -> Listing:
    """Every report's copies in `folder` (one listing of it), by report id; bundles' copies with
    `bundles`. OSError when the folder cannot be listed (never taken as none)."""
    suffix = ".fhir.json" if bundles else ".json"
    found: Listing = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            m = COPY_NAME.fullmatch(entry.name)
            if m is None or m["suffix"] != suffix:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed since it was listed
                continue
            found.setdefault(m["report_id"], []).append(
                (st.st_mtime, entry.name, folder / entry.name, m["digest"], st.st_size))
    for files in found.values():
        files.sort()
    return found


def copies_of(first: Path, report_id: str, bundles: bool = False,
              listing: Listing | None = None) -> tuple[ArchivedCopy, ...]:
    """The copies beside `first`, the file the index names for `report_id` (itself left out: a
    report whose first file had to be written under a copy's name), numbered from 1. `listing`: its
    folder's, when listed already (`archive find` lists each folder once); OSError as list_folder."""
    if listing is None:
        listing = list_folder(first.parent, bundles)
    files = [f for f in listing.get(report_id, ()) if f[2] != first]
    return tuple(ArchivedCopy(n, path, digest, size, mtime)
                 for n, (mtime, _, path, digest, size) in enumerate(files, start=1))
