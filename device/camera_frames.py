"""What a camera's (or a replayed video's) frame must be before it becomes a `Frame`.

OpenCV hands over whatever the capture gives: 8-bit gray, BGR or BGRA (any strides) are used as
they are, 16-bit samples are scaled from their real depth (`SampleDepth`: machine-vision and USB
cameras put 10- or 12-bit samples in the low bits of 16-bit words, which their top byte would read
16 times too dark), and anything else (float, two-channel YUYV) is unusable, named in words for the
log. A frame over the pixel limit of a decoded file is dropped.
A live sensor's noise never repeats a frame bit for bit, so a run of identical frames is a frozen
stream (a stalled USB or capture-card driver), not a stage left still: `RepeatWatch` says it.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from smearscope.device.ingest import IngestLimits, sensor_depth, to_bgr8

logger = logging.getLogger(__name__)

#: A camera frame repeated bit for bit this many times in a row is a frozen stream: said once.
FROZEN_REPEATS = 20


#: Frames in a row whose samples must all be over the 'auto' depth before it grows: one corrupt
#: transfer (a USB frame of garbage above 4095 from a 12-bit camera) would otherwise lock a deeper
#: depth and read every later frame up to 16 times too dark until restart; a camera that really
#: gives deeper samples (a dark start, then bright fields) keeps giving them, and 3 frames is a
#: fraction of a second at any live frame rate.
DEPTH_CONFIRM_FRAMES = 3


class SampleDepth:
    """The bit depth a source's 16-bit samples are scaled from: the configured `sample_bits`, or in
    'auto' the files' rule (`device.ingest.sensor_depth`: the smallest usual sensor depth that
    holds the highest sample) taken from the first frame, growing only when DEPTH_CONFIRM_FRAMES
    frames in a row are over it (to the smallest depth that holds each of them): a frame is never
    brightened for being dark, a dark first frame does not clip the bright ones after it for long,
    and a single outlier frame (read clipped at the current depth) changes nothing. The depth
    chosen is said once, and again only if it grows; the first outlier is said once at INFO."""

    def __init__(self, name: str, sample_bits: int | str = "auto") -> None:
        self._name = name
        self._configured = sample_bits if isinstance(sample_bits, int) else None
        self.bits: int | None = self._configured
        self._said_over = False
        self._said_outlier = False
        self._over_run = 0  # frames in a row over `bits`
        self._over_depth = 16  # the smallest depth that holds each frame of that run

    def of(self, samples: np.ndarray) -> int:
        """The depth to scale these (colour, 16-bit) samples from."""
        top = int(samples.max())
        if self._configured is not None:
            if top >= 1 << self._configured and not self._said_over:
                self._said_over = True
                logger.warning("%s: a 16-bit sample of %d is over the %d-bit range of [source] sample_bits = %d: "
                               "such samples clip at white; check the camera's bit depth", self._name, top,
                               self._configured, self._configured)
            return self._configured
        depth = sensor_depth(top)
        if self.bits is None:
            self.bits = depth
            logger.info("%s: 16-bit samples read as %d-bit (highest sample %d in the first frame; [source] "
                        "sample_bits sets the depth)", self._name, depth, top)
        elif depth > self.bits:
            self._over_depth = min(self._over_depth, depth) if self._over_run else depth
            self._over_run += 1
            if self._over_run >= DEPTH_CONFIRM_FRAMES:
                logger.warning("%s: 16-bit samples over %d bits in %d frames in a row (highest %d): samples now "
                               "read as %d-bit ([source] sample_bits sets the depth)", self._name, self.bits,
                               self._over_run, top, self._over_depth)
                self.bits, self._over_run = self._over_depth, 0
            else:
                self._said_outlier = self._outlier(top)
        else:
            self._over_run = 0
        return self.bits

    def _outlier(self, top: int) -> bool:
        """Says a frame over the depth, not (yet) confirmed: at INFO the first time, DEBUG after."""
        level = logging.DEBUG if self._said_outlier else logging.INFO
        logger.log(level, "%s: a frame's 16-bit sample of %d is over %d bits; read clipped at %d-bit unless "
                   "%d frames in a row are over it (a corrupt transfer, or a camera giving deeper samples)",
                   self._name, top, self.bits, self.bits, DEPTH_CONFIRM_FRAMES)
        return True


#: V4L2's 16-bit grey, FOURCC 'Y16 ' (what many USB3 machine-vision cameras give): OpenCV converts it to
#: 8 bit from each word's top byte unless asked for the samples as they are, so 10- or 12-bit samples in
#: the low bits would read up to 16 times too dark before `SampleDepth` ever saw them.
V4L2_Y16 = cv2.VideoWriter_fourcc(*"Y16 ")


def keep_16bit_samples(capture, name: str) -> bool:
    """Ask an opened V4L2 capture that gives 16-bit grey for its samples as they are (OpenCV's
    CAP_PROP_CONVERT_RGB off: frames of 16-bit words, which `as_bgr8` scales from their real depth);
    True when it does. Every other format keeps OpenCV's conversion (Y10 and Y12 it scales right)."""
    if int(capture.get(cv2.CAP_PROP_FOURCC)) != V4L2_Y16:
        return False
    if not capture.set(cv2.CAP_PROP_CONVERT_RGB, 0):
        logger.warning("%s gives 16-bit grey (V4L2 Y16) but OpenCV would not hand its samples over as they are: "
                       "it reads each word's top byte, so a 10- or 12-bit camera reads up to 16 times too dark", name)
        return False
    logger.info("%s gives 16-bit grey (V4L2 Y16): its samples are read as they are and scaled from their depth "
                "([source] sample_bits)", name)
    return True


def as_bgr8(image: np.ndarray | None, depth: SampleDepth) -> np.ndarray | None:
    """Gray, BGRA or 16-bit images as HxWx3 uint8 BGR (16-bit samples scaled from `depth`); None
    for anything unusable."""
    if image is None or image.size == 0 or image.ndim not in (2, 3):
        return None
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 3, 4) or image.dtype not in (np.uint8, np.uint16):
        return None
    colour = image[:, :, :3] if channels == 4 else image  # a camera's alpha is no transparency
    if colour.dtype == np.uint16:
        return to_bgr8(colour, depth.of(colour))
    if channels == 1:
        return cv2.cvtColor(colour, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(colour)


def within_limits(image: np.ndarray | None, limits: IngestLimits | None = None) -> np.ndarray | None:
    """A camera or video frame, unless it has more pixels than a decoded file may have."""
    limits = limits or IngestLimits()
    if image is not None and image.shape[0] * image.shape[1] > limits.max_pixels:
        logger.warning("frame of %dx%d px is over the %d pixel limit; dropped", image.shape[1],
                       image.shape[0], limits.max_pixels)
        return None
    return image


def described(image: np.ndarray) -> str:
    """A frame's size and sample layout in words: '64x48, 2 channels of uint8'."""
    if image.ndim not in (2, 3):
        return f"an array of shape {tuple(image.shape)} of {image.dtype}"
    channels = 1 if image.ndim == 2 else image.shape[2]
    return f"{image.shape[1]}x{image.shape[0]}, {channels} channel{'s' if channels != 1 else ''} of {image.dtype}"


class RepeatWatch:
    """Counts a camera's frames equal bit for bit (every 8th row and column) to the one before;
    FROZEN_REPEATS in a row are said once as a frozen stream, and its moving again after."""

    def __init__(self, name: str, device: int | str) -> None:
        self._name, self._device = name, device
        self._sample: np.ndarray | None = None
        self.repeats = 0

    def note(self, pixels: np.ndarray) -> None:
        sample = pixels[::8, ::8].copy()
        same = self._sample is not None and np.array_equal(sample, self._sample)
        self._sample = sample
        if same:
            self.repeats += 1
            if self.repeats == FROZEN_REPEATS:
                logger.warning("%s: camera %r gave the same frame %d times in a row, bit for bit: its stream looks "
                               "frozen (a live sensor's noise never repeats), not a stage left still; the quality "
                               "gate refuses them as same_field; check the camera", self._name, self._device,
                               FROZEN_REPEATS)
        elif self.repeats:
            if self.repeats >= FROZEN_REPEATS:
                logger.info("%s: camera %r moves again after %d identical frames", self._name, self._device,
                            self.repeats + 1)
            self.repeats = 0
