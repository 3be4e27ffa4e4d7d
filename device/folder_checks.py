"""Whether the station can work a watched folder at all: said at start (exit 78, `smearscope
doctor`, validate-config), not as a crash loop at the first file."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from smearscope.device.source_config import FolderSourceConfig

logger = logging.getLogger(__name__)

#: The log of processed files in the watched folder, unless `state_file` names another.
STATE_NAME = ".smearscope-processed"


def same_dir(a: Path, b: Path) -> bool:
    """Whether two paths are one folder (False where either cannot be looked at)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def folder_problem(config: FolderSourceConfig) -> str | None:
    """Why the station could not work the watched folder (None: it can): it must be a directory
    the station's user can list and write, for it moves each file into `done/` or `rejected/`
    (created there) and keeps its log of processed files beside them. Said at start (exit 78,
    `smearscope doctor`), not as a crash loop at the first file."""
    root = config.path
    if not root.is_dir():
        return f"watched folder {root} is not a directory"
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        return (f"watched folder {root} is not writable by this user (read-only, or another owner): the station "
                f"moves each file to {config.done_dir}/ or {config.rejected_dir}/ in it (under systemd: "
                "ReadWritePaths=, and a group shared with the camera software)")
    for sub in (config.done_dir, config.rejected_dir):
        d = root / sub
        if d.exists() and not (d.is_dir() and os.access(d, os.W_OK | os.X_OK)):
            return f"{d} is not a folder this user can write"
        if d.exists() and os.stat(d).st_dev != os.stat(root).st_dev:  # a link to another disk
            return (f"{d} is on another file system than the watched folder: files are moved there by rename, "
                    "which cannot cross disks (make it a folder on the same disk, not a link to another)")
    state = config.state_file or root / STATE_NAME  # rewritten through a file beside it when compacted: its folder too
    try:
        kind = os.lstat(state).st_mode
    except FileNotFoundError:
        kind = None  # made at start
    except OSError as exc:  # a folder on its path this user may not enter
        return f"state_file {state} cannot be looked at by this user: {exc.strerror or exc}"
    if kind is not None and not stat.S_ISREG(kind):  # a FIFO would hang the start, a link be written through
        return (f"state_file {state} is not a regular file (a directory, FIFO, device or symbolic link): "
                + ("name a file, or leave it out" if config.state_file else "remove it (it is made again)"))
    if not (os.access(state.parent, os.W_OK | os.X_OK) and (kind is None or os.access(state, os.W_OK))):
        return f"state_file {state} (or its folder) is not writable by this user"
    return None
