"""`smearscope doctor`'s camera check: a V4L2 index or /dev path is a video capture node this user
can open, asked for its capabilities (VIDIOC_QUERYCAP) and never for a frame, so it runs beside a
running station that holds the camera. A GStreamer pipeline or a URL is not checked. The node is
looked at by smearscope.device.camera_node, whose words the camera source logs too.

What `what` a FAIL carries tells the installer whether the running station gets past it
(smearscope.cli.doctor.RECOVERED_BY_THE_STATION): `camera` for a node not there, or there and not
answering (the station waits for the camera with backoff); `camera access` for one this user may
not open; `camera node` for a path that is there but no camera (a socket, a file, another driver's
device, a camera's metadata node), which the station would wait on for ever.
"""

from __future__ import annotations

from smearscope.device.camera_node import device_node, node_problem

#: smearscope.cli.doctor's (status, what, detail); not imported from it, which imports this module.
Check = tuple[str, str, str]

_WAITS = "; the station waits for it and opens it when it comes"


def camera_checks(source) -> list[Check]:
    """The camera line of a V4L2 camera source; none for another source kind."""
    if source.kind != "camera":
        return []
    node = device_node(source.device)
    if node is None:
        what = "URL" if "://" in source.device else "GStreamer pipeline"
        return [("INFO", "camera", (f"a {what}: not checked here (no frame is captured); "
                 "the station's log says whether it opens"))]
    problem = node_problem(source.device, query_capabilities=True)
    if problem is not None:
        what, words = problem
        return [("FAIL", what, words + (_WAITS if what == "camera" else ""))]
    return [("OK", "camera", f"{node} is a video capture node and opens for reading (no frame captured)")]
