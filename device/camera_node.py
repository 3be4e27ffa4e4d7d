"""Why a V4L2 camera's device node will not open, in words a technician can act on.

Shared by the camera source (its "did not open" log line) and `smearscope doctor`'s camera check,
so the journal of a station whose camera is unplugged says what doctor says. A GStreamer pipeline
or a URL has no node: nothing to say here (OpenCV's own reasons go to its log). Doctor also asks
the open node for its capabilities (VIDIOC_QUERYCAP, never a frame, so it runs beside a station
that holds the camera): a node of another driver, or a camera's metadata node, is no camera.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from pathlib import Path

logger = logging.getLogger(__name__)

#: What to do about a path that is there but no camera.
LIST_CAMERAS = "set [source] device to a camera's capture node: v4l2-ctl --list-devices lists each camera's nodes"

#: linux/videodev2.h: VIDIOC_QUERYCAP = _IOR('V', 0, struct v4l2_capability), a struct of 104 bytes
#: (driver[16], card[32], bus_info[32], then version, capabilities, device_caps, reserved[3]).
VIDIOC_QUERYCAP = 0x80685600
CAPABILITY_BYTES = 104
_CAP_VIDEO_CAPTURE = 0x00000001
_CAP_VIDEO_CAPTURE_MPLANE = 0x00001000
_CAP_DEVICE_CAPS = 0x80000000


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


def capture_problem(capability: bytes) -> str | None:
    """None when a struct v4l2_capability is a video capture node's, else what the node is."""
    card = capability[16:48].split(b"\0", 1)[0].decode("utf-8", "replace") or "a device"
    capabilities, device_caps = struct.unpack_from("=II", capability, 84)
    node_caps = device_caps if capabilities & _CAP_DEVICE_CAPS else capabilities
    if node_caps & (_CAP_VIDEO_CAPTURE | _CAP_VIDEO_CAPTURE_MPLANE):
        return None
    return f"a V4L2 node of {card} without video capture (its metadata node?)"


def _capability_problem(node: Path, fd: int) -> tuple[str, str] | None:
    """node_problem's words for an open node that is no V4L2 video capture node or does not answer."""
    try:
        capability = fcntl.ioctl(fd, VIDIOC_QUERYCAP, bytes(CAPABILITY_BYTES))
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):  # another driver's device: no V4L2 ioctls
            return "camera node", f"{node} is not a V4L2 device ({exc.strerror}): {LIST_CAMERAS}"
        return "camera", f"{node} does not answer ({exc.strerror})"
    problem = capture_problem(capability)
    return None if problem is None else ("camera node", f"{node} is {problem}: {LIST_CAMERAS}")


def node_problem(device: int | str, *, query_capabilities: bool = False) -> tuple[str, str] | None:
    """Why the camera's node cannot be opened for reading by this process, as (what, words); None
    when it can (no frame is read: a running station may hold the camera) or when it has no node.
    With query_capabilities, an open node must also answer VIDIOC_QUERYCAP as a capture node.

    `what` says who can mend it: "camera" a node not there or not answering (the camera coming
    back does), "camera access" one this user may not open, "camera node" a path that is there
    but no camera (a socket, a file, a folder, another driver's device), which no waiting mends."""
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
    try:
        return _capability_problem(node, fd) if query_capabilities else None
    finally:
        os.close(fd)
