"""Why a V4L2 camera's device node will not open, in words a technician can act on.

Shared by the camera source (its "did not open" log line) and `smearscope doctor`'s camera check,
so the journal of a station whose camera is unplugged says what doctor says. A GStreamer pipeline
or a URL has no node: nothing to say here (OpenCV's own reasons go to its log).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

#: What to do about a path that is there but no camera.
LIST_CAMERAS = "set [source] device to a camera's capture node: v4l2-ctl --list-devices lists each camera's nodes"


def device_node(device: int | str) -> Path | None:
    """The /dev node a V4L2 index or path names; None for a GStreamer pipeline or a URL."""
    if isinstance(device, int) or device.strip().isdigit():
        return Path(f"/dev/video{int(device)}")
    return Path(device) if device.startswith("/") else None


def _not_a_device(mode: int) -> str | None:
    """What a path that is no character device is, in words; None for a character device."""
    if stat.S_ISCHR(mode):
        return None
    kinds = ((stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISBLK, "a block device"))
    return next((words for test, words in kinds if test(mode)), "not a device node")


def node_problem(device: int | str) -> tuple[str, str] | None:
    """Why the camera's node cannot be opened for reading by this process, as (what, words); None
    when it can (no frame is read: a running station may hold the camera) or when it has no node.

    `what` says who can mend it: "camera" a node not there or not answering (the camera coming
    back does), "camera access" one this user may not open, "camera node" a path that is there
    but no camera (a socket, a file, a folder), which no waiting mends."""
    node = device_node(device)
    if node is None:
        return None
    try:
        other = _not_a_device(node.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return "camera", f"{node} does not exist: camera unplugged, or another index (v4l2-ctl --list-devices)"
    except OSError as exc:
        return "camera access", f"{node} cannot be looked at by this user ({exc.strerror})"
    if other is not None:
        return "camera node", f"{node} is {other}, no camera: {LIST_CAMERAS}"
    try:
        fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError as exc:
        return "camera access", (f"{node} cannot be opened for reading by this user ({exc.strerror}): "
                                 "the station's user needs the video group")
    except OSError as exc:  # the node is there, its device does not answer (unplugged meanwhile, a driver)
        return "camera", f"{node} cannot be opened for reading ({exc.strerror})"
    os.close(fd)
    return None
