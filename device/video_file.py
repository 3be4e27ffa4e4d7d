"""A replayed video file: which files are opened, and how far FFmpeg's frames are trusted.

Video frames are decoded by FFmpeg through OpenCV, not by the hardened image decoder, so the replay
source holds them to the same limits another way: only the containers a microscope camera records
(AVI, MP4/MOV, Matroska/WebM, told by their first bytes; never a playlist or script FFmpeg would
follow to other files or URLs) are opened, with the FFmpeg backend only (never OpenCV's image-
sequence reader, which would read images past the hardened decoder); the frame size the opened
stream reports is judged before any frame is read, as an image header is (too_large_pixels,
absurd_aspect, too_small), and so is every frame read. Frames are read one at a time: a recording
of any length holds one frame in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from smearscope.device.ingest import IngestError, IngestLimits, RejectReason, shown
from smearscope.device.ingest.decode import check_geometry

logger = logging.getLogger(__name__)

#: What the replay source names the containers it opens, in its refusal.
CONTAINERS = "AVI, MP4/MOV or Matroska/WebM"


def _container(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    return None


def open_video(path: Path, limits: IngestLimits) -> Any:
    """An opened cv2.VideoCapture of a video file whose frame size is within `limits`; an
    `IngestError` otherwise: unsupported_format (not one of the containers), corrupt (FFmpeg cannot
    open it: damaged, or cut short like an MP4 without its index), or the frame size's code."""
    name = shown(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError as exc:
        raise IngestError(RejectReason.UNREADABLE, f"{name}: {exc.strerror or exc}") from exc
    if _container(head) is None:
        raise IngestError(RejectReason.UNSUPPORTED_FORMAT, f"{name}: not an {CONTAINERS} video file")
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise IngestError(RejectReason.CORRUPT, f"{name}: FFmpeg cannot open it (damaged, or cut short: "
                          "an MP4 whose index is missing)")
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    try:
        check_geometry(width, height, name, limits, said="its frames are")
    except IngestError:
        capture.release()
        raise
    return capture


def checked_frame(image: np.ndarray, name: str, limits: IngestLimits) -> np.ndarray:
    """A frame FFmpeg decoded, if its size is one a file could have (`IngestError` otherwise)."""
    check_geometry(int(image.shape[1]), int(image.shape[0]), name, limits, said="a frame is")
    return image


def declared_frames(capture: Any) -> int:
    """The frame count the container declares (0 when it declares none)."""
    return max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
