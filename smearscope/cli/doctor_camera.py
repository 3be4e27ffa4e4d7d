"""`smearscope doctor`'s camera check: a V4L2 index or /dev path is a video capture node this user
can open, asked for its capabilities (VIDIOC_QUERYCAP) and never for a frame, so it runs beside a
running station that holds the camera. A GStreamer pipeline or a URL is not checked.

What `what` a FAIL carries tells the installer whether the running station gets past it
(smearscope.cli.doctor.RECOVERED_BY_THE_STATION): `camera` for a node not there, or there and not
answering (the station waits for the camera with backoff); `camera access` for one this user may
not open; `camera node` for a path that is there but no camera (a socket, a file, another driver's
device, a camera's metadata node), which the station would wait on for ever.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from smearscope.device.camera_node import LIST_CAMERAS, device_node, node_problem

#: smearscope.cli.doctor's (status, what, detail); not imported from it, which imports this module.
Check = tuple[str, str, str]

#: linux/videodev2.h: VIDIOC_QUERYCAP = _IOR('V', 0, struct v4l2_capability), a struct of 104 bytes
#: (driver[16], card[32], bus_info[32], then version, capabilities, device_caps, reserved[3]).
VIDIOC_QUERYCAP = 0x80685600
CAPABILITY_BYTES = 104
_CAP_VIDEO_CAPTURE = 0x00000001
_CAP_VIDEO_CAPTURE_MPLANE = 0x00001000
_CAP_DEVICE_CAPS = 0x80000000
_WAITS = "; the station waits for it and opens it when it comes"


def capture_problem(capability: bytes) -> str | None:
    """None when a struct v4l2_capability is a video capture node's, else what the node is."""
    card = capability[16:48].split(b"\0", 1)[0].decode("utf-8", "replace") or "a device"
    capabilities, device_caps = struct.unpack_from("=II", capability, 84)
    node_caps = device_caps if capabilities & _CAP_DEVICE_CAPS else capabilities
    if node_caps & (_CAP_VIDEO_CAPTURE | _CAP_VIDEO_CAPTURE_MPLANE):
        return None
    return f"a V4L2 node of {card} without video capture (its metadata node?)"


def camera_checks(source) -> list[Check]:
    """The camera line of a V4L2 camera source; none for another source kind."""
    if source.kind != "camera":
        return []
    node = device_node(source.device)
    if node is None:
        what = "URL" if "://" in source.device else "GStreamer pipeline"
        return [("INFO", "camera", (f"a {what}: not checked here (no frame is captured); "
                 "the station's log says whether it opens"))]
    problem = node_problem(source.device)  # the camera source's words when it does not open
    if problem is not None:
        what, words = problem
        return [("FAIL", what, words + (_WAITS if what == "camera" else ""))]
    try:
        fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:  # gone since node_problem looked
        return [("FAIL", "camera", f"{node} cannot be opened for reading ({exc.strerror}){_WAITS}")]
    try:
        capability = fcntl.ioctl(fd, VIDIOC_QUERYCAP, bytes(CAPABILITY_BYTES))
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):  # another driver's device: no V4L2 ioctls
            return [("FAIL", "camera node", f"{node} is not a V4L2 device ({exc.strerror}): {LIST_CAMERAS}")]
        return [("FAIL", "camera", f"{node} does not answer ({exc.strerror}){_WAITS}")]
    finally:
        os.close(fd)
    problem = capture_problem(capability)
    if problem is not None:
        return [("FAIL", "camera node", f"{node} is {problem}: {LIST_CAMERAS}")]
    return [("OK", "camera", f"{node} is a video capture node and opens for reading (no frame captured)")]
