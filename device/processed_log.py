"""The watched folder's processed-files log: what became of each file version, across restarts.

One line per event, appended and fsynced: `key<TAB>status<TAB>name` (a line break or tab in a
name written as \\xNN); a regular file, never read or written through a symbolic link
(device.own_files). A version's last `done` or `rejected` is its status. The other lines
(`attempt`, `released`) carry the key behind a `~` (`~key<TAB>attempt@...<TAB>name`): versions of
the station before attempts were logged read every line as a file processed, and would move a
file in hand at a crash or a stop to `done/` unanalysed; with the `~` they see no key of theirs.
A log whose attempts were written with the bare key (by the release that began logging them) is
read as well and rewritten at open. An `attempt` is written before the station decodes a version
(a `released` follows when it is not handed out), and finished by its `done` or `rejected`; one
still unfinished at the next start means the process ended while that file was being decoded or
analysed (killed: out of memory, a native crash in a decoder, the watchdog). A clean end of the
process (`release_at_exit`) writes
`released` for the attempts it leaves, so a stop, even one that leaves files unanalysed, is
never held against a file. An attempt carries the kernel's boot id (`attempt@<boot id>`): one
left unfinished under an earlier boot ended with the machine (a power cut, a kernel panic, a
reset of the board), which is no evidence against the file, so it is not counted as a crash; an
attempt without one (written where the kernel gives none, or by an earlier version) is. A board
that resets on a file would still retry it after every reboot for ever, so an attempt made with
the file alone in hand (on probation) is marked (`attempt@<boot id>@alone`), and the earlier boots
that ended with the file so in hand are counted apart (`reboots`). The log is
compacted to its last `max_entries` lines (at open, and whenever it reaches twice as many),
each version's finished attempts dropped first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from smearscope.device.ingest.errors import escaped_char
from smearscope.device.own_files import open_own, sync_folder

logger = logging.getLogger(__name__)

TERMINAL = ("done", "rejected")
#: Before the key of a line that is no `done` or `rejected`: a key no earlier reader matches.
EVENT_MARK = "~"

#: Where Linux gives the id of the running boot (a new random UUID at every boot); a module
#: attribute so tests can point it at a file of their own.
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def read_boot_id() -> str | None:
    """The running boot's id, None where the kernel gives none (not Linux, /proc not mounted)."""
    try:
        text = BOOT_ID_FILE.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and not any(c.isspace() or c == "@" for c in text) else None


def file_key(name: str, size: int, mtime_ns: int) -> str:
    """Stable identity of one version of one file (its name as the file system's bytes: a name
    that is not UTF-8, as an SMB share can give, has one too)."""
    return hashlib.sha1(os.fsencode(name) + f"|{size}|{mtime_ns}".encode()).hexdigest()[:16]


#: The longest line a version can make: the `~` mark of an attempt, a key, the longest status
#: (`attempt@<boot id>@alone`, a boot id being a 36-character UUID) and a name of 255 bytes, each
#: written as \\xNN.
LINE_BYTES = len(EVENT_MARK) + 16 + 1 + len("attempt@") + 36 + len("@alone") + 1 + 4 * 255 + 1

#: What would end a line of the log, or a field of one: a tab and every separator of str.splitlines.
_BREAKS = re.compile(r"[\t\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _one_line(name: str) -> str:
    """The name as the log writes it: a line break or tab in it as \\xNN (or \\uNNNN), so that no
    name can add a line (a forged `done` for another file's version) or shift a field."""
    return _BREAKS.sub(escaped_char, name)


def _marked(key: str, status: str) -> str:
    """The key as its line writes it: behind the `~` unless the line is a `done` or `rejected`."""
    return key if status in TERMINAL else EVENT_MARK + key


@dataclass
class _Version:
    name: str
    status: str | None = None  # its last "done" or "rejected"
    #: Unfinished attempts since then: each one's boot id, and whether the file was alone in hand.
    attempts: list[tuple[str | None, bool]] = field(default_factory=list)


class ProcessedLog:
    """Append-only record of file versions done, rejected or being attempted; survives restarts."""

    def __init__(self, path: Path, max_entries: int) -> None:
        self.path = path
        self.max_entries = max_entries
        #: Read once: the boot this process runs in; attempts of other boots are not counted.
        self.boot_id = read_boot_id()
        self._versions: dict[str, _Version] = {}
        self._keys: dict[str, str] = {}  # key -> its last status ("done" or "rejected")
        self._lines = 0  # lines in the file
        self._open: dict[str, str] = {}  # key -> name: attempted by this process, not finished
        self._compact()
        earlier = sum(len(v.attempts) - self._counted(v) for v in self._versions.values())
        if earlier:
            logger.info("%s: %d unfinished attempt(s) from an earlier boot of the machine (a power cut, a reboot): "
                        "not counted as crashes; their files are analysed alone", self.path, earlier)

    def _compact(self) -> None:
        """Keep the file's last `max_entries` lines (at open, and while it runs: a station up for
        months must not hold every file it ever saw); attempts a later line finished go first."""
        lines: list[str] = []
        try:
            with open(open_own(self.path, os.O_RDONLY), "rb") as fh:
                lines = [ln for ln in self._tail(fh).decode("utf-8", "surrogateescape").splitlines() if ln.strip()]
        except FileNotFoundError:
            pass  # made by the first record
        self._versions = {}
        bare = False  # an event line without its mark: rewritten, so that no earlier version misreads it
        for ln in lines:
            parts = ln.split("\t", 2)
            key, status = parts[0], parts[1] if len(parts) > 1 else "done"
            bare = bare or (status not in TERMINAL and not key.startswith(EVENT_MARK))
            self._apply(key.removeprefix(EVENT_MARK), status, parts[2] if len(parts) > 2 else "")
        if len(lines) > self.max_entries or bare:
            kept: list[str] = []
            for key, v in self._versions.items():  # in the order of each version's last line
                if v.status is not None:
                    kept.append(f"{key}\t{v.status}\t{v.name}")
                kept += [f"{_marked(key, 'attempt')}\t{_attempt(boot, alone)}\t{v.name}"
                         for boot, alone in v.attempts]
            try:
                self._rewrite(kept[-self.max_entries:])
            except OSError as exc:  # a full disk, a folder put in the way: used as read, tried again later
                logger.warning("cannot %s the processed-files log %s: %s%s",
                               "compact" if len(lines) > self.max_entries else "rewrite", self.path, exc,
                               "; its attempts stay without their mark: an earlier version put back now would "
                               "take the files in hand for processed" if bare else "")
            else:
                lines = kept[-self.max_entries:]
                self._versions = {}
                for ln in lines:
                    key, status, name = ln.split("\t", 2)
                    self._apply(key.removeprefix(EVENT_MARK), status, name)
        self._keys = {k: v.status for k, v in self._versions.items() if v.status is not None}
        self._lines = len(lines)

    def _rewrite(self, lines: list[str]) -> None:
        """The log made of `lines`, through a file beside it renamed over it."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)  # a link left there is removed, never written through
        with open(open_own(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w", encoding="utf-8",
                  errors="surrogateescape") as fh:
            fh.write("".join(ln + "\n" for ln in lines))
            fh.flush()
            os.fsync(fh.fileno())  # a power cut after the rename finds the whole log, not an empty one
        os.replace(tmp, self.path)
        sync_folder(self.path.parent)  # the rename too: else a power cut may bring back the old log, less the lines since

    def _tail(self, fh: BinaryIO) -> bytes:
        """The file's bytes, or only its last lines when it is larger than its entries can make (not
        the station's: put there by whoever may write the watched folder; read whole, a file of
        gigabytes took the memory at every start)."""
        most = 3 * self.max_entries * LINE_BYTES  # it is compacted at 2 x max_entries lines
        size = os.fstat(fh.fileno()).st_size
        if size <= most:
            return fh.read()
        logger.warning("the processed-files log %s is %d bytes, more than %d entries make: only its last %d "
                       "bytes are read", self.path, size, self.max_entries, most)
        fh.seek(size - most)
        fh.readline()  # the rest of a line cut by the seek
        return fh.read(most)

    def _apply(self, key: str, status: str, name: str) -> None:
        v = self._versions.pop(key, None) or _Version(name)  # re-inserted: ordered by last line
        self._versions[key] = v
        v.name = name or v.name
        what, _, rest = status.partition("@")
        boot, _, mark = rest.partition("@")
        if status in TERMINAL:
            v.status, v.attempts = status, []
        elif what == "attempt":
            v.attempts.append((boot or None, mark == "alone"))
        elif status == "released" and v.attempts:  # this process's own: the version's last attempt
            v.attempts.pop()

    def _counted(self, v: _Version) -> int:
        """Its unfinished attempts that count: this boot's, and those whose boot is not known."""
        return sum(1 for boot, _ in v.attempts if not self._earlier(boot))

    def _earlier(self, boot: str | None) -> bool:
        """Whether an attempt's boot is known to be an earlier one than this process's."""
        return boot is not None and self.boot_id is not None and boot != self.boot_id

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def status(self, key: str) -> str | None:
        return self._keys.get(key)

    def attempts(self, key: str) -> int:
        """Attempts at this version not finished by a `done` or `rejected` (this process's too),
        those of an earlier boot left out."""
        v = self._versions.get(key)
        return self._counted(v) if v is not None else 0

    def reboots(self, key: str) -> int:
        """Earlier boots of the machine that ended while this version was alone in hand (analysed
        on probation) and unfinished: a file that resets the board, or as many power cuts."""
        v = self._versions.get(key)
        return len({boot for boot, alone in v.attempts if alone and self._earlier(boot)}) if v is not None else 0

    def unfinished(self) -> dict[str, int]:
        """Versions with unfinished attempts, an earlier boot's too (each is analysed alone, so a
        file that resets the board is the one in hand at the next reset) -> how many count."""
        return {k: self._counted(v) for k, v in self._versions.items() if v.attempts}

    def attempted(self, key: str) -> bool:
        """This process recorded an attempt at this version that is not finished yet."""
        return key in self._open

    def record(self, key: str, status: str, name: str, alone: bool = False) -> None:
        """Append one line, fsynced: "done" or "rejected" (which finish the version's attempts),
        "attempt" (before this process decodes the version; written with the boot's id, marked
        when it is `alone` in hand: nothing else handed out until it is finished)."""
        self._append([(key, _attempt(self.boot_id, alone) if status == "attempt" else status, name)])
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
        with open(open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8",
                  errors="surrogateescape") as fh:  # any file name; never through a link
            fh.write("".join(f"{_marked(key, status)}\t{status}\t{_one_line(name)}\n"
                             for key, status, name in entries))
            fh.flush()
            os.fsync(fh.fileno())
        for key, status, name in entries:
            self._apply(key, status, _one_line(name))
            if status in TERMINAL:
                self._keys[key] = status
        self._lines += len(entries)
        if self._lines >= 2 * self.max_entries:
            try:
                self._compact()  # one that cannot be written is said there, tried again at the next record
            except OSError as exc:  # the log cannot be read back
                logger.warning("cannot compact the processed-files log %s: %s", self.path, exc)


def _attempt(boot: str | None, alone: bool) -> str:
    """Without a boot id every unfinished attempt counts as a crash: aloneness needs no mark."""
    return "attempt" if boot is None else f"attempt@{boot}@alone" if alone else f"attempt@{boot}"
