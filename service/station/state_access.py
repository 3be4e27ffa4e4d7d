"""The station's own files on disk, checked for this user's access before it starts.

A state directory copied back from a backup as root (`sudo cp -a`, `tar x` as root) holds files
the station's user may read but not write, or not even open; systemd's `StateDirectory=` fixes the
owner only when the directory itself has the wrong one, not files under a directory that has the
right one. Without this check such a start fails deep in SQLite or the review gallery (a Python
traceback, again every `RestartSec`); with it the start, `validate-config` and `doctor` name the
files, their owner and mode, and the `chown` that fixes them.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from smearscope.device.folder_checks import STATE_NAME
from smearscope.service.config import StationConfig
from smearscope.service.station.typed_cells import review_directory, typed_cells_path

logger = logging.getLogger(__name__)

#: The stores without which the station cannot work: it refuses to start (exit 78). Without the
#: others (review gallery, typed cells) it runs on and loses what it would keep there, said at ERROR.
BLOCKING = frozenset({"mqtt.outbox.path", "source.path"})

#: How many of the files found are named in the message (the count says the rest).
NAMED = 3

_SQLITE_SIDECARS = ("", "-wal", "-shm", "-journal")


def _sqlite_files(path: Path) -> list[Path]:
    return [Path(f"{path}{suffix}") for suffix in _SQLITE_SIDECARS]


def _walk(root: Path) -> Iterator[Path]:
    """`root` and everything under it, without following links (a walk that cannot enter a folder
    yields the folder, which the access test then names)."""
    yield root
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            yield Path(folder) / name


def _blocked(path: Path) -> Path | None:
    """What keeps this user from reading and writing `path` (a folder: also entering it): the path
    itself, or the folder above it this user cannot enter; None when nothing does (or it is absent)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError:  # a folder on its path this user may not enter: that folder is what to fix
        return next((p for p in reversed(path.parents) if not os.access(p, os.X_OK)), path)
    if stat.S_ISLNK(mode):
        return None  # the station writes no links; what one points to is not its state
    wanted = os.R_OK | os.W_OK | (os.X_OK if stat.S_ISDIR(mode) else 0)
    return None if os.access(path, wanted) else path


def _owned(path: Path) -> str:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return f"owner {user_name(st.st_uid)}:{_group(st.st_gid)}, mode {stat.S_IMODE(st.st_mode):04o}"


def user_name(uid: int) -> str:
    """The user `uid` names (the number itself where the system names none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _stores(config: StationConfig) -> list[tuple[str, Path | None, list[Path]]]:
    """(config field, the folder a recursive chown may start at or None, the paths the station
    writes there). The outbox's and typed cells' folders may hold other files: only the station's
    files in them (and the outbox's folder itself, where its WAL is made) are named."""
    outbox = Path(config.mqtt.outbox.path)
    typed = typed_cells_path(config)
    stores: list[tuple[str, Path | None, list[Path]]] = [
        ("mqtt.outbox.path", None, [outbox.parent, *_sqlite_files(outbox), Path(f"{outbox}.reserve")])]
    if config.review.enabled and config.review.typing:  # else the station leaves that file alone
        stores.append(("review.typed_cells_path", None, _sqlite_files(typed)))
    if config.review.enabled:  # the review folder is the station's alone
        review = review_directory(config)
        stores.append(("review.directory", review, list(_walk(review)) if os.path.isdir(review) else [review]))
    source = config.source
    if getattr(source, "kind", None) == "folder":
        root = source.path  # the lab's files in it keep their owner: only what the station writes
        stores.append(("source.path", None, [root, root / source.done_dir, root / source.rejected_dir,
                                             source.state_file or root / STATE_NAME]))
    return stores


def state_access_problems(config: StationConfig) -> list[tuple[str, str]]:
    """(config field, reason) for each store of the station's state holding files this user
    cannot read and write: empty when every file the station keeps is its own to change."""
    if os.geteuid() == 0:
        return []  # root writes anything (and a station should not run as root anyway)
    user, group = user_name(os.geteuid()), _group(os.getegid())
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for field, top, paths in _stores(config):
        bad = [p for p in dict.fromkeys(b for b in map(_blocked, paths) if b is not None) if p not in seen]
        seen.update(bad)
        if not bad:
            continue
        named = ", ".join(f"{p} ({_owned(p)})" for p in bad[:NAMED])
        more = f" and {len(bad) - NAMED} more" if len(bad) > NAMED else ""
        fix = (f"chown -R {user}:{group} {top}" if top is not None
               else f"chown {user}:{group} " + " ".join(str(p) for p in bad))
        problems.append((field, (
            f"{len(bad)} of the station's files and folders cannot be read and written by user {user} (uid {os.geteuid()}): "
            f"{named}{more}; copied or restored as another user? Give them back to it: sudo {fix}")))
    return problems


def refused_for_access(config: StationConfig) -> bool:
    """At a start: True (each problem printed, for one chown to fix all) when the outbox or the
    watched folder holds files this user cannot write; the review gallery's and typed cells' are
    said at ERROR and the station runs without them."""
    problems = state_access_problems(config)
    if any(field in BLOCKING for field, _ in problems):
        print("\n".join(f"{field}: {reason}" for field, reason in problems), file=sys.stderr)
        return True
    for field, reason in problems:
        logger.error("%s: %s (the station runs without them)", field, reason)
    return False
