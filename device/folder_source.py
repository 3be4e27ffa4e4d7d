"""The watched-folder source: images dropped into a directory, each analysed at least once.

A file is handed out only when it has settled (same size and mtime for `settle_s`) and the one
decoder (`device.ingest`) accepts it. It stays where it is until the station says its result is
stored (`done()`): only then is it recorded in an append-only log (which survives restarts) and
moved to `done/`. A crash before that leaves the file in the folder, so the next start analyses it
again; the station recognises a file whose report it already stored by the frame's `input_key`
(the content's hash) and does not count it twice.

A file that can never be an image goes to `rejected/` with a `.reason.txt` beside it (its reason
code first), and so does one the station refused (`done(frame, refused)`). One that may still be
being written (`MAYBE_INCOMPLETE`: empty, truncated, corrupt the way a half-written file is, not
readable yet; or decoded with a black last row, the zeros of a file its writer sized first) is
waited for `decode_grace_s` from its last change, decoded once per version (size and mtime: the
same bytes give the same refusal); and if it changes after it was rejected (its
writer was only slow), it is moved back and tried again, as one that changed after it was read
stays for its new version. Files under a writer's temporary name are left alone; file names need
not be UTF-8. Registered as the "folder" kind in `device.sources`.

A file the process does not survive (killed for memory, a native crash in the decoder, an
analysis the watchdog ends) must not stop the station for good: an attempt is logged before a
version is decoded (released when it is not handed out), and one still unfinished at the next start puts it on probation, where it
is read and analysed alone (nothing else handed out meanwhile), so a second death is its own. A
version interrupted `max_attempts` times goes to `rejected/` as `analysis_interrupted`. An
attempt left by an earlier boot of the machine (a power cut) is not counted as such, but its file
is analysed alone too, and one alone in hand at `max_reboot_attempts` restarts of the machine (a
file that resets the board) is set aside the same way (`ProcessedLog`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from smearscope.device.folder_checks import STATE_NAME, folder_problem, same_dir
from smearscope.device.frame import Frame
from smearscope.device.ingest import IngestError, IngestLimits, RejectReason, load_image, shown
from smearscope.device.ingest.files import read_regular
from smearscope.device.own_files import place, unique_target, write_own_text
from smearscope.device.processed_log import ProcessedLog, file_key
from smearscope.device.source_config import FolderSourceConfig
from smearscope.device.sources import FrameSource, SourceConfigurationError

logger = logging.getLogger(__name__)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float
    undecodable_since: float | None = None
    read_error: str | None = None  # the last one said in the log
    #: What decoding this version gave while it was waited for (a refusal, or "dark" for a black
    #: last row): the same bytes decode the same way, so it is not decoded again for it.
    verdict: IngestError | str | None = None


@dataclass
class _Rejected:
    """A file rejected as possibly incomplete, watched in `rejected/` for a late change."""

    name: str
    path: Path
    size: int
    mtime_ns: int
    rejected_at: float
    retries: int


#: Refusals a file still being written can get (also one whose writer set its full size first and
#: fills it in: zeros where the rest will be), or a file not readable yet; retried within the
#: grace, re-checked after. The others (too large, too small, a strip, a z-stack) are definitive.
MAYBE_INCOMPLETE = frozenset({RejectReason.EMPTY_FILE, RejectReason.TRUNCATED, RejectReason.CORRUPT,
                              RejectReason.NOT_AN_IMAGE, RejectReason.UNSUPPORTED_FORMAT,
                              RejectReason.BAD_DTYPE, RejectReason.BAD_CHANNELS,
                              RejectReason.BLANK_IMAGE, RejectReason.UNREADABLE})
#: How long a file rejected as possibly incomplete is watched for a change, and how often a file
#: may come back from `rejected/`.
RECHECK_S = 600.0
MAX_RECHECKS = 3


#: Names writers use while a file is incomplete; such files are left alone, not rejected.
TEMP_SUFFIXES: tuple[str, ...] = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".filepart",
                                  ".download", ".inprogress", ".writing", "~")


_NOWHERE = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG})


def _kind(entry: os.DirEntry[str]) -> str:
    """"file" (or a symlink to one), "dir" (or a symlink to one) or "other" (a FIFO, a device, a
    socket, a symlink to nothing, a loop, through a file); an OSError when the entry vanished."""
    try:
        return "file" if entry.is_file() else "dir" if entry.is_dir() else "other"
    except OSError as exc:  # a link that leads nowhere (a loop, through a file, a folder shut to this user), for good;
        if exc.errno in _NOWHERE and entry.is_symlink():  # anything else (a share's passing EIO) is tried again
            return "other"
        raise


#: Open folder sources: at a clean exit each releases the attempts it leaves unfinished.
_LIVE: weakref.WeakSet[FolderSource] = weakref.WeakSet()


@atexit.register
def _release_all_at_exit() -> None:
    for source in list(_LIVE):
        source._release_at_exit()


class FolderSource(FrameSource):
    """Polls a directory; each settled image is handed out, and moved to `done/` by `done()`.

    Delivery is at-least-once: a file leaves the folder only after the station has stored its
    result, so a crash never loses one; the station dedupes by `Frame.input_key`.
    """

    def __init__(self, config: FolderSourceConfig) -> None:
        super().__init__(config.name)
        problem = folder_problem(config)
        if problem is not None:
            raise SourceConfigurationError(problem)
        self._config = config
        self._root = config.path
        self._done = self._root / config.done_dir
        self._rejected = self._root / config.rejected_dir
        self._done.mkdir(exist_ok=True)
        self._rejected.mkdir(exist_ok=True)
        self._places = {d: os.path.realpath(d) for d in (self._done, self._rejected)}  # where moves go
        state = config.state_file or self._root / STATE_NAME
        self._log = ProcessedLog(state, config.state_max_entries)
        #: The state file's name when it lies in the watched folder itself: the station's own, no input.
        self._own = state.name if same_dir(state.parent, self._root) else None
        self._pending: dict[str, _Candidate] = {}
        self._stuck: set[str] = set()  # keys we could not move away; not retried every poll
        self._again: set[str] = set()  # keys rejected before, back in the folder: said once
        #: frame_id -> (file name, key, size, mtime_ns) of frames handed out and not yet done().
        self._handed: dict[str, tuple[str, str, int, int]] = {}
        self._handed_names: set[str] = set()
        self._watch: dict[str, _Rejected] = {}  # rejected/ path -> a maybe-incomplete file
        self._recheck_counts: dict[str, int] = {}
        #: The capture thread scans; the station's writer thread calls done(): moves and the log.
        self._lock = threading.Lock()
        self.rejected_count = 0
        #: The files it rejected itself, per reason code (the decoder's, not_an_image, file_too_large).
        self.rejected_reasons: Counter[str] = Counter()
        self._list_error: str | None = None  # said once until the folder can be listed again
        self._subfolders_said: set[str] = set()
        #: Versions the last process was reading or analysing when it died: each handed out alone.
        self._probation = set(self._log.unfinished())
        self._alone: str | None = None  # the frame id of the one on probation that is out
        _LIVE.add(self)

    def _next_frame(self) -> Frame | None:
        while not self._stop.is_set():
            frame = self.scan_once()
            if frame is not None:
                return frame
            self._stop.wait(self._config.poll_interval_s)
        return None

    def done(self, frame: Frame, refused: str | None = None) -> None:
        """The station stored this frame's result (or will never analyse it): record the file
        as processed and move it to `done/`; one the station `refused` (quality gate, decoder,
        analysis: the reason code) goes to `rejected/` with its reason. A file that changed since
        it was read (a writer that set its size first and was still filling it in) stays either
        way: its new version is analysed too. Never raises (any thread calls it): a folder or
        state file that cannot be written leaves the file where it is, said in the log."""
        with self._lock:
            handed = self._handed.pop(frame.frame_id, None)
            if handed is None:
                return
            fname, key, size, mtime_ns = handed
            self._handed_names.discard(fname)
            if self._alone == frame.frame_id:
                self._alone = None
            self._again.discard(key)
            try:
                self._let_go(fname, key, size, mtime_ns, refused)
            except OSError as exc:
                logger.error("%s: %s: cannot record or move it (%s); left where it is", self.name, shown(fname), exc)
                self._stuck.add(key)

    def _let_go(self, fname: str, key: str, size: int, mtime_ns: int, refused: str | None) -> None:
        try:
            st = os.stat(self._root / fname)
        except FileNotFoundError:
            st = None  # gone already: recorded, nothing to move
        if st is not None and (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            self._log.record(key, "done", fname)  # this version is handled; the file is not
            logger.warning("%s: %s changed after it was read (its writer was not done): its new "
                           "version is analysed too", self.name, shown(fname))
            return
        if refused is not None:
            # a bare code (the quality gate's, analysis_error) is said whose it is; a reason that
            # explains itself (duplicate_content: the same image as ...) is not given a wrong one
            whose = "" if ":" in refused else " (quality gate or analysis)"
            self._reject(fname, key, f"{refused}: refused by the station{whose}",
                         counted=False)  # the station counts its own refusals
            return
        self._log.record(key, "done", fname)
        if st is not None:
            self._move(fname, self._done, key)

    def scan_once(self, now: float | None = None) -> Frame | None:
        """One pass over the directory: the first settled, decodable new image, if any."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._recheck_rejected(now)
            return self._scan(now)

    def _scan(self, now: float) -> Frame | None:
        if self._alone is not None:  # a file on probation is out: nothing else is read meanwhile
            return None
        try:
            entries = [e for e in os.scandir(self._root) if not e.name.startswith(".") and e.name != self._own]
        except OSError as exc:
            if str(exc) != self._list_error:  # once, not every poll, until it lists again
                logger.error("%s: cannot list %s: %s", self.name, self._root, exc)
            self._list_error = str(exc)
            return None
        if self._list_error is not None:
            logger.warning("%s: %s can be listed again", self.name, self._root)
            self._list_error = None
        seen: set[str] = set()
        files = []
        skip = {self._done.name, self._rejected.name}
        for entry in entries:
            try:
                kind = _kind(entry)
                if kind == "file":
                    files.append((entry.stat(), entry.name))
                elif kind == "dir":
                    if entry.name not in skip and entry.name not in self._subfolders_said:
                        self._subfolders_said.add(entry.name)
                        logger.warning("%s: %s is a folder: only files directly in %s are analysed",
                                       self.name, shown(entry.name), self._root)
                else:  # a FIFO, a device, a socket, a dangling symlink or a loop: never an image
                    st = entry.stat(follow_symlinks=False)
                    key = file_key(entry.name, st.st_size, st.st_mtime_ns)
                    if key not in self._stuck and key not in self._log:  # once: it may not be movable
                        what = "not a regular file" if not entry.is_symlink() else "a symbolic link to " + (
                            "a FIFO, device or socket" if os.path.exists(entry.path) else "nothing readable")
                        self._reject(entry.name, key, f"not_a_file: {what}")
            except OSError:
                continue  # vanished between listing and stat
        for st, fname in sorted(files, key=lambda f: (f[0].st_mtime_ns, f[1])):
            seen.add(fname)
            if self._probation and self._handed and (key := file_key(fname, st.st_size, st.st_mtime_ns)) in \
                    self._probation and key not in self._stuck:
                return None  # it is read alone: what is out is done first
            try:
                frame = self._consider(fname, st, now)
            except Exception:  # one file must never stop the station: left alone, said once
                logger.exception("%s: %s could not be handled; left where it is", self.name, shown(fname))
                self._stuck.add(file_key(fname, st.st_size, st.st_mtime_ns))
                continue
            if frame is not None:
                return frame
        for gone in set(self._pending) - seen:
            del self._pending[gone]
        return None

    def _consider(self, fname: str, st: os.stat_result, now: float) -> Frame | None:
        if fname.endswith(TEMP_SUFFIXES) or fname in self._handed_names:
            return None  # still being written under a temporary name, or being analysed
        key = file_key(fname, st.st_size, st.st_mtime_ns)
        if key in self._stuck:
            return None
        if self._log.status(key) == "done":  # its report stored before a crash, never moved: the move only
            logger.info("%s: %s already processed; moving it to %s", self.name, shown(fname), self._done)
            self._move(fname, self._done, key)
            return None
        tries, reboots = self._log.attempts(key), self._log.reboots(key)
        crashed = tries >= self._config.max_attempts
        if (crashed or reboots >= self._config.max_reboot_attempts) and not self._log.attempted(key):
            why = (f"the station's process ended {tries} times while reading or analysing this file, the last time "
                   "with nothing else in hand (killed for memory, a crash in a decoder, or an analysis the watchdog "
                   "stopped)" if crashed else f"the machine restarted {reboots} times while this file was being "
                   "analysed alone, nothing else in hand (a reset of the board, a kernel panic, a driver hang ended "
                   "by the hardware watchdog; or as many power cuts)")
            self._reject(fname, key, f"analysis_interrupted: {why}; set aside (moved back into the folder, it is "
                         "tried again)", level=logging.ERROR)
            return None
        if key in self._log and key not in self._again:  # put back from rejected/ (or a stop before the move)
            self._again.add(key)
            logger.warning("%s: %s was rejected before and is in the folder again: judged again", self.name,
                           shown(fname))
        cand = self._pending.get(fname)
        if cand is None or (cand.size, cand.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._pending[fname] = cand = _Candidate(st.st_size, st.st_mtime_ns, now)
        if now - cand.stable_since < self._config.settle_s:
            return None
        ext = os.path.splitext(fname)[1].lower()
        problem = None
        if ext not in self._config.extensions:
            problem = f"{RejectReason.NOT_AN_IMAGE.value}: extension {ext or 'none'!r} is not one of {self._config.extensions}"
        elif st.st_size > self._config.max_file_mb * 1e6:
            problem = f"{RejectReason.FILE_TOO_LARGE.value}: {st.st_size} bytes, above max_file_mb"
        if problem is not None:
            self._reject(fname, key, problem)
            return None
        frame = self._read_new(fname, key, st, cand, now, tries)
        if frame is None and self._log.attempted(key):  # decoded, not in hand: a crash is not its doing
            try:
                self._log.release(key)
            except OSError:
                pass  # as if killed: at most it is analysed alone
        return frame

    def _read_new(self, fname: str, key: str, st: os.stat_result, cand: _Candidate, now: float,
                  tries: int) -> Frame | None:
        if cand.verdict is not None:  # decoded already, unchanged since: waited for, not decoded again
            if now - (cand.undecodable_since or now) < self._config.decode_grace_s:
                return None
            if isinstance(cand.verdict, IngestError):
                self._reject(fname, key, f"{cand.verdict.code.value}: {cand.verdict.message}", watch=True)
                return None
        try:
            try:
                # its size and a byte at most, from a regular file only: one swapped since it was listed for a
                # FIFO would block the scan, for a link to /dev/zero fill the memory
                data = read_regular(self._root / fname, st.st_size + 1) if st.st_size else b""
                after = os.stat(self._root / fname)
            except PermissionError as exc:  # not readable (yet): the grace, then rejected/ (said once)
                raise IngestError(RejectReason.UNREADABLE, f"{shown(fname)}: {exc.strerror or exc}") from exc
            except OSError as exc:  # a share's passing I/O error: tried again next scan, said once
                if cand.read_error != str(exc):
                    logger.warning("%s: cannot read %s: %s (trying again)", self.name, shown(fname), exc)
                cand.read_error = str(exc)
                return None
            changed = (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns)
            if data is None or len(data) != st.st_size or changed:
                return None  # changed while read (or no longer a file): the next scan sees it settle again
            if not self._log.attempted(key):  # before it is decoded: a crash from here on is counted
                try:
                    self._log.record(key, "attempt", fname, alone=key in self._probation)
                except OSError as exc:  # handed out unguarded; its done() says the disk's problem again
                    logger.error("%s: %s: cannot record the attempt: %s", self.name, shown(fname), exc)
            image = load_image(data, limits=self._limits(), source_name=shown(fname))
        except IngestError as exc:
            if exc.code in MAYBE_INCOMPLETE:  # its writer may not be done: wait, then reject
                cand.undecodable_since = cand.undecodable_since or now
                if now - cand.undecodable_since < self._config.decode_grace_s:
                    # a decoder's refusal stands until the file changes; unreadable is tried again
                    cand.verdict = exc if exc.code != RejectReason.UNREADABLE else None
                    return None
            self._reject(fname, key, f"{exc.code.value}: {exc.message}", watch=exc.code in MAYBE_INCOMPLETE)
            return None
        if not image.pixels[-1].any() and cand.verdict is None:  # a black last row: in brightfield, the
            cand.undecodable_since = cand.undecodable_since or now  # zeros of a file its writer sized first
            if now - cand.undecodable_since < self._config.decode_grace_s:
                cand.verdict = "dark"  # waited for; after the grace decoded again and analysed as it is
                return None
        frame = Frame(
            pixels=image.pixels,
            frame_id=f"{self.name}:{shown(fname)}@{key[:12]}",
            source=self.name,
            microns_per_pixel=self._config.microns_per_pixel,
            input_key=f"{self.name}:sha256:{hashlib.sha256(data).hexdigest()}",
        )
        del self._pending[fname]
        self._handed[frame.frame_id] = (fname, key, st.st_size, st.st_mtime_ns)
        self._handed_names.add(fname)
        if key in self._probation:
            self._alone = frame.frame_id
            logger.warning("%s: %s was being read or analysed when the station's process ended (%d time(s), rejected "
                           "at %d; alone at %d restart(s) of the machine, rejected at %d): analysed alone", self.name,
                           shown(fname), tries, self._config.max_attempts, self._log.reboots(key),
                           self._config.max_reboot_attempts)
        return frame

    def _release_at_exit(self) -> None:
        """A clean end of the process: what this source had in hand is not held against the files."""
        if self._lock.acquire(timeout=1.0):  # not while a scan hangs on a share: then counted
            try:
                self._log.release_open()
            except OSError:
                pass  # as if killed: at most a file analysed alone
            finally:
                self._lock.release()

    def _limits(self) -> IngestLimits:
        return IngestLimits(max_file_bytes=int(self._config.max_file_mb * 1e6))

    def _recheck_rejected(self, now: float) -> None:
        """A file rejected as possibly incomplete that changed since (a slow writer finished it
        through its open handle) goes back to the folder for another try."""
        for path_text, r in list(self._watch.items()):
            try:
                st = os.stat(r.path)
            except OSError:
                del self._watch[path_text]
                continue
            if (st.st_size, st.st_mtime_ns) == (r.size, r.mtime_ns):
                if time.monotonic() - r.rejected_at > RECHECK_S:
                    del self._watch[path_text]
                continue
            del self._watch[path_text]
            back = self._root / r.name
            if back.exists():
                continue
            try:
                with place(self._rejected, self._places[self._rejected]) as there:  # never out of a link's folder
                    os.replace(r.path.name, back, src_dir_fd=there)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(r.path.name + ".reason.txt", dir_fd=there)
            except OSError as exc:
                logger.error("%s: cannot move %s back for another try: %s", self.name, shown(str(r.path)), exc)
                continue
            self._recheck_counts[r.name] = r.retries
            logger.warning("%s: %s changed after it was rejected (its writer was slow): trying it "
                           "again", self.name, shown(r.name))

    def _reject(self, fname: str, key: str, reason: str, watch: bool = False, counted: bool = True,
                level: int = logging.WARNING) -> None:
        self._again.discard(key)
        cand = self._pending.get(fname)
        self._pending.pop(fname, None)
        self.rejected_count += counted
        if counted:
            self.rejected_reasons[reason.split(":", 1)[0].strip()] += 1
        logger.log(level, "%s: rejected %s: %s", self.name, shown(fname), reason)
        # Moved first, then recorded: a version recorded as rejected that is in the folder was put
        # back (by an operator, to try it again), never left there by a stop between the two.
        target = self._move(fname, self._rejected, key, note=reason)
        try:
            self._log.record(key, "rejected", fname)
        except OSError as exc:  # only a record: the file is no longer in the folder
            logger.error("%s: %s: cannot record its rejection: %s", self.name, shown(fname), exc)
        retries = self._recheck_counts.pop(fname, 0)
        if target is not None and watch and cand is not None and retries < MAX_RECHECKS:
            self._watch[str(target)] = _Rejected(fname, target, cand.size, cand.mtime_ns,
                                                 time.monotonic(), retries + 1)

    def _move(self, fname: str, directory: Path, key: str, note: str | None = None) -> Path | None:
        """Move the file into `directory` (with its `note` beside it as .reason.txt): the path it got."""
        try:
            directory.mkdir(exist_ok=True)  # the folder may have gone and come back without it
        except OSError:
            pass  # the move below says why
        target = unique_target(directory, fname, key)
        try:  # into the folder there at start, even if a link is put in its place meanwhile
            with place(directory, self._places[directory]) as there:
                os.replace(self._root / fname, target.name, dst_dir_fd=there)
                try:  # beside it, never through a link planted there
                    if note is not None:
                        write_own_text(target.name + ".reason.txt", f"{note}\n", dir_fd=there)
                except OSError as exc:
                    logger.error("%s: cannot write %s.reason.txt: %s", self.name, shown(str(target)), exc)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.error("%s: cannot move %s to %s: %s", self.name, shown(fname), directory, exc)
            self._stuck.add(key)
            return None
        return target
