"""The watched folder's processed-files log: what became of each file version, across restarts.

One line per event, appended and fsynced: `key<TAB>status<TAB>name`. A version's last `done` or
`rejected` is its status. An `attempt` is written before the station decodes a version (a
`released` follows when it is not handed out), and finished by its `done` or `rejected`; one
still unfinished at the next start means the process ended while that file was being decoded
or analysed (killed: out of memory, a native
crash in a decoder, the watchdog). A clean end of the process (`release_at_exit`) writes
`released` for the attempts it leaves, so a stop, even one that leaves files unanalysed, is
never held against a file. The log is compacted to its last `max_entries` lines (at open, and
whenever it reaches twice as many), each version's finished attempts dropped first.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TERMINAL = ("done", "rejected")


def file_key(name: str, size: int, mtime_ns: int) -> str:
    """Stable identity of one version of one file (its name as the file system's bytes: a name
    that is not UTF-8, as an SMB share can give, has one too)."""
    return hashlib.sha1(os.fsencode(name) + f"|{size}|{mtime_ns}".encode()).hexdigest()[:16]


@dataclass
class _Version:
    name: str
    status: str | None = None  # its last "done" or "rejected"
    attempts: int = 0  # unfinished attempts since then


class ProcessedLog:
    """Append-only record of file versions done, rejected or being attempted; survives restarts."""

    def __init__(self, path: Path, max_entries: int) -> None:
        self.path = path
        self.max_entries = max_entries
        self._versions: dict[str, _Version] = {}
        self._keys: dict[str, str] = {}  # key -> its last status ("done" or "rejected")
        self._lines = 0  # lines in the file
        self._open: dict[str, str] = {}  # key -> name: attempted by this process, not finished
        self._compact()

    def _compact(self) -> None:
        """Keep the file's last `max_entries` lines (at open, and while it runs: a station up for
        months must not hold every file it ever saw); attempts a later line finished go first."""
        lines: list[str] = []
        if self.path.exists():
            lines = [ln for ln in self.path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
                     if ln.strip()]
        self._versions = {}
        for ln in lines:
            parts = ln.split("\t", 2)
            self._apply(parts[0], parts[1] if len(parts) > 1 else "done", parts[2] if len(parts) > 2 else "")
        if len(lines) > self.max_entries:
            kept: list[str] = []
            for key, v in self._versions.items():  # in the order of each version's last line
                if v.status is not None:
                    kept.append(f"{key}\t{v.status}\t{v.name}")
                kept += [f"{key}\tattempt\t{v.name}"] * v.attempts
            lines = kept[-self.max_entries:]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8", errors="surrogateescape")
            os.replace(tmp, self.path)
            self._versions = {}
            for ln in lines:
                key, status, name = ln.split("\t", 2)
                self._apply(key, status, name)
        self._keys = {k: v.status for k, v in self._versions.items() if v.status is not None}
        self._lines = len(lines)

    def _apply(self, key: str, status: str, name: str) -> None:
        v = self._versions.pop(key, None) or _Version(name)  # re-inserted: ordered by last line
        self._versions[key] = v
        v.name = name or v.name
        if status in TERMINAL:
            v.status, v.attempts = status, 0
        elif status == "attempt":
            v.attempts += 1
        elif status == "released":
            v.attempts = max(0, v.attempts - 1)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def status(self, key: str) -> str | None:
        return self._keys.get(key)

    def attempts(self, key: str) -> int:
        """Attempts at this version not finished by a `done` or `rejected` (this process's too)."""
        v = self._versions.get(key)
        return v.attempts if v is not None else 0

    def unfinished(self) -> dict[str, int]:
        """Versions with unfinished attempts -> how many."""
        return {k: v.attempts for k, v in self._versions.items() if v.attempts}

    def attempted(self, key: str) -> bool:
        """This process recorded an attempt at this version that is not finished yet."""
        return key in self._open

    def record(self, key: str, status: str, name: str) -> None:
        """Append one line, fsynced: "done" or "rejected" (which finish the version's attempts),
        "attempt" (before this process decodes the version)."""
        self._append([(key, status, name)])
        if status == "attempt":
            self._open[key] = name
        else:
            self._open.pop(key, None)

    def release(self, key: str) -> None:
        """This process's attempt at the version ended without it in hand (waited for, read again
        later): a crash from now on is not its doing."""
        if key in self._open:
            self._append([(key, "released", self._open[key])])
            del self._open[key]

    def release_open(self) -> None:
        """The process ends cleanly: its unfinished attempts were not the file's doing."""
        if self._open:
            self._append([(key, "released", name) for key, name in self._open.items()])
            self._open.clear()

    def _append(self, entries: list[tuple[str, str, str]]) -> None:
        with open(self.path, "a", encoding="utf-8", errors="surrogateescape") as fh:  # any file name
            fh.write("".join(f"{key}\t{status}\t{name}\n" for key, status, name in entries))
            fh.flush()
            os.fsync(fh.fileno())
        for key, status, name in entries:
            self._apply(key, status, name)
            if status in TERMINAL:
                self._keys[key] = status
        self._lines += len(entries)
        if self._lines >= 2 * self.max_entries:
            try:
                self._compact()
            except OSError as exc:  # a full disk: tried again at the next record
                logger.warning("cannot compact the processed-files log %s: %s", self.path, exc)
