"""Why a V4L2 camera's device node will not open, in words a technician can act on.

Shared by the camera source (its "did not open" log line) and `smearscope doctor`'s camera check,
so the journal of a station whose camera is unplugged says what doctor says. A GStreamer pipeline
or a URL has no node: nothing to say here (OpenCV's own reasons go to its log).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def device_node(device: int | str) -> Path | None:
    """The /dev node a V4L2 index or path names; None for a GStreamer pipeline or a URL."""
    if isinstance(device, int) or device.strip().isdigit():
        return Path(f"/dev/video{int(device)}")
    return Path(device) if device.startswith("/") else None


def node_problem(device: int | str) -> str | None:
    """Why the camera's node cannot be opened for reading by this process; None when it can (no
    frame is read: a running station may hold the camera) or when it has no node."""
    node = device_node(device)
    if node is None:
        return None
    if not node.exists():
        return f"{node} does not exist: camera unplugged, or another index (v4l2-ctl --list-devices)"
    try:
        fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return (f"{node} cannot be opened for reading by this user ({exc.strerror}): "
                "the station's user needs the video group")
    os.close(fd)
    return None
