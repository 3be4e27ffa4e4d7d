"""Frame sources: where fields of view come from (camera, watched folder, replay, synthetic).

The watched folder lives in `device.folder_source`; the other kinds are here.

Every source is an iterator of frozen `Frame`s with `close()` and context-manager support, chosen
by the config's `kind` through a lazy registry ("kind" -> "module:Class", imported only when
chosen). `close()` may be called from another thread: it ends iteration at the next frame
boundary. Frame ids are unique within a run and stable where the input is (file name + size +
mtime, recording pass + position, seed); live camera ids carry a per-open session token
(`<source>:<session>-<counter>`, the session the open's wall-clock milliseconds in hex, a dot and
8 random hex digits: a board without a clock battery boots on the same saved time again and again,
so the clock alone would give two starts the same ids).

Image files are decoded by the one hardened decoder (`device.ingest.load_image`: limits judged
from the header before any pixel is decoded, 12/16-bit samples scaled by their real depth, damaged
JPEG streams refused), as every other path into the pipeline is.
"""

from __future__ import annotations

import importlib
import logging
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np
from typing_extensions import Self  # typing.Self needs Python 3.11

from smearscope.device.camera_frames import (
    RepeatWatch,
    SampleDepth,
    as_bgr8,
    described,
    keep_16bit_samples,
    within_limits,
)
from smearscope.device.camera_node import node_problem
from smearscope.device.camera_reads import GuardedCapture
from smearscope.device.frame import Frame
from smearscope.device.ingest import IngestError, IngestLimits, load_image, shown
from smearscope.device.source_config import (
    IMAGE_EXTENSIONS,
    CameraSourceConfig,
    ReplaySourceConfig,
    SimulatedSourceConfig,
    SourceConfig,
)
from smearscope.device.video_file import checked_frame, declared_frames, open_video

logger = logging.getLogger(__name__)

#: kind -> "module:Class"; a class is imported only when its kind is chosen.
SOURCE_REGISTRY: Mapping[str, str] = {
    "camera": "smearscope.device.sources:CameraSource",
    "folder": "smearscope.device.folder_source:FolderSource",
    "replay": "smearscope.device.sources:ReplaySource",
    "simulated": "smearscope.device.sources:SimulatedSource",
}


class SourceConfigurationError(ValueError):
    """The configured source cannot exist: unknown kind, missing path, empty recording."""


def source_class(kind: str) -> type[FrameSource]:
    """The FrameSource class registered for `kind`, imported on first use."""
    try:
        target = SOURCE_REGISTRY[kind]
    except KeyError:
        known = ", ".join(sorted(SOURCE_REGISTRY))
        raise SourceConfigurationError(f"unknown source kind {kind!r} (known: {known})") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, FrameSource)):
        raise SourceConfigurationError(f"{target} is not a FrameSource")
    return cls


def open_source(config: SourceConfig) -> FrameSource:
    """Build the source that `config.kind` names."""
    return source_class(config.kind)(config)


class FrameSource(ABC):
    """An iterator of Frames that owns a capture resource; `close()` ends iteration."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stop = threading.Event()
        # Held while the iterating thread touches the resource, so close() never releases a
        # capture in the middle of a read.
        self._io_lock = threading.Lock()
        self._released = False

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        with self._io_lock:
            frame = None if self._stop.is_set() else self._next_frame()
            if frame is None:
                self._release_once()
                raise StopIteration
            return frame

    @abstractmethod
    def _next_frame(self) -> Frame | None:
        """The next frame, or None when the source is exhausted or closed."""

    def _release(self) -> None:
        """Free the capture resource (called once)."""

    def done(self, frame: Frame, refused: str | None = None) -> None:
        """The station has stored what `frame` produced, or will never analyse it (any thread;
        `refused`: the reason code, when the station refused it: the quality gate, the decoder
        or the analysis). A source that keeps its input until then (the watched folder) lets go
        of it now."""

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop iteration; release now unless a read is in progress (that thread releases)."""
        self._stop.set()
        if self._io_lock.acquire(timeout=timeout_s):
            try:
                self._release_once()
            finally:
                self._io_lock.release()
        else:
            logger.warning("%s: close() during a blocked read; released when it returns", self.name)

    def _release_once(self) -> None:
        if not self._released:
            self._released = True
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --- helpers ---------------------------------------------------------------------------------


def backoff_delay(failures: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: initial, 2x, 4x ... capped at max_s (failures counts from 1)."""
    return min(max_s, initial_s * 2.0 ** max(0, min(failures - 1, 30)))


class _Pacer:
    """Spaces frames 1/fps apart without bursting to catch up after a slow consumer."""

    def __init__(self, fps: float, stop: threading.Event) -> None:
        self._period = 1.0 / fps if fps > 0 else 0.0
        self._stop = stop
        self._due: float | None = None

    def wait(self) -> bool:
        """Sleep until the next frame is due; False when the source was closed meanwhile."""
        now = time.monotonic()
        if self._due is not None and self._due > now and self._stop.wait(self._due - now):
            return False
        self._due = max(now, self._due or now) + self._period
        return not self._stop.is_set()


# --- camera ----------------------------------------------------------------------------------

_CAPTURE_APIS = {"v4l2": cv2.CAP_V4L2, "gstreamer": cv2.CAP_GSTREAMER, "ffmpeg": cv2.CAP_FFMPEG}


def capture_target(config: CameraSourceConfig) -> tuple[int | str, int]:
    """(OpenCV device argument, API preference) for the configured camera."""
    device: int | str = config.device
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device.strip())
    api = config.api
    if api == "auto":
        if isinstance(device, int) or device.startswith("/dev/"):
            api = "v4l2"
        elif "!" in device:
            api = "gstreamer"
        elif "://" in device:
            api = "ffmpeg"
        else:
            return device, cv2.CAP_ANY  # e.g. a video file on a test bench
    return device, _CAPTURE_APIS[api]


def ffmpeg_timeout_ms(read_timeout_s: float) -> int:
    """FFmpeg's open and read timeouts for a network camera: four fifths of `read_timeout_s`."""
    return round(read_timeout_s * 800)


def _open_capture(config: CameraSourceConfig) -> Any:
    """An opened cv2.VideoCapture, or None when the camera is not there. OpenCV is not asked to open a
    V4L2 node the station knows will not open (missing, not this user's, no device): the source says
    why, where OpenCV's WARN lines said only that it could not, at every retry of a camera gone for days."""
    device, api = capture_target(config)
    if api == cv2.CAP_V4L2 and node_problem(device) is not None:
        return None
    params: list[int] = []
    if api == cv2.CAP_FFMPEG:
        # FFmpeg's own bound on network stalls, under read_timeout_s: a dead RTSP stream is FFmpeg's
        # clean error (a reconnect) first, and the hang guard (device.camera_reads) only the backstop.
        ms = ffmpeg_timeout_ms(config.read_timeout_s)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
    capture = cv2.VideoCapture(device, api, params) if params else cv2.VideoCapture(device, api)
    if not capture.isOpened():
        capture.release()
        return None
    if api == cv2.CAP_V4L2:
        if config.width:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
        if config.height:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
        keep_16bit_samples(capture, config.name)  # after the size: setting it may renegotiate the format
    return capture


#: Good frames in a row after which a reopened camera counts as back: said, its backoff from the first delay again.
STABLE_FRAMES = 25


class CameraSource(FrameSource):
    """A live camera via OpenCV; reconnects with exponential backoff when it vanishes, from the
    first delay again once it gave STABLE_FRAMES good frames in a row.

    The configured um/px holds for the frame size of the first frame this source read: a camera
    that later gives frames of another size (replugged into another mode, binning, a crop) makes
    frames without a scale (estimated from red-cell size), said once per change, until it gives
    the first size again. Binning would scale the um/px and a crop keep it: the station cannot tell.
    A live sensor's noise never repeats a frame bit for bit: FROZEN_REPEATS repeats in a row are
    said as a frozen stream (the quality gate refuses them as same_field), once, until it moves.
    An open or read longer than `read_timeout_s` is a hung camera: said, abandoned, opened again
    (device.camera_reads); `state` says what the camera is doing now, `camera.recovering` that a
    call hung and no frame came since. An RTSP/HTTP stream (FFmpeg) is opened with FFmpeg's own
    timeouts a fifth under `read_timeout_s`, so its clean error comes before the guard.
    """

    def __init__(
        self,
        config: CameraSourceConfig,
        capture_factory: Callable[[CameraSourceConfig], Any] = _open_capture,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config.name)
        self._config = config
        #: Each open()/read() on its own thread, bounded by read_timeout_s (device.camera_reads).
        self.camera = GuardedCapture(config.name, config.device, lambda: capture_factory(config),
                                     config.read_timeout_s, self._stop, clock)
        self._failures = 0
        self._streak = 0  # good frames in a row since the last failure or hung call
        # the random part keeps ids apart across starts on the same restored (fake-hwclock) time
        self._session = f"{time.time_ns() // 1_000_000:x}.{secrets.token_hex(4)}"
        self._counter = 0
        self._scale_size: tuple[int, int] | None = None  # (width, height) the scale holds for
        self._other_size: tuple[int, int] | None = None  # the other size last said
        self._repeats = RepeatWatch(config.name, config.device)
        self._depth = SampleDepth(config.name, config.sample_bits)  # kept across reopens: one camera

    @property
    def failures(self) -> int:
        """Failed opens/reads since the camera last gave STABLE_FRAMES good frames in a row (a
        camera that drops out after each frame keeps backing off, said at 1, 2, 4, 8 ... failures)."""
        return self._failures

    @property
    def state(self) -> str:
        """What the camera does now: 'opening', 'reading', 'reconnect_wait', 'idle' or 'closed', for
        the station's status and telemetry (a hang since the last frame: `camera.recovering`)."""
        return "closed" if self.closed else self.camera.activity.what

    def _next_frame(self) -> Frame | None:
        while not self._stop.is_set():
            hung_before = self.camera.hung_calls
            if self.camera.capture is None and not self.camera.open():
                if self.camera.hung_calls != hung_before:  # hung (said): opened again at once, a new row
                    self._streak = 0
                elif not self._stop.is_set():  # not there: back off, saying why where the node tells
                    problem = node_problem(self._config.device)
                    self._failed("camera %r did not open" + (f": {problem[1]}".replace("%", "%%") if problem else ""))
                continue
            read = self.camera.read()
            if read is None:  # hung (said, a new capture next: a new row) or closed
                self._streak = 0
                continue
            ok, image = read
            pixels = as_bgr8(within_limits(image), self._depth) if ok else None
            if pixels is not None:
                self.camera.frame_came()
                self._streak += 1
                if self._failures and self._streak >= STABLE_FRAMES:
                    logger.info("%s: camera back after %d failures", self.name, self._failures)
                    self._failures = 0
                self._counter += 1
                self._repeats.note(pixels)
                return Frame(
                    pixels=pixels,
                    frame_id=f"{self.name}:{self._session}-{self._counter:08d}",
                    source=self.name,
                    microns_per_pixel=self._scale_for(pixels.shape[1], pixels.shape[0]),
                )
            self.camera.release()
            self._failed("camera %r returned no frame" if not ok or image is None or image.size == 0 else
                         f"camera %r returned a frame the station cannot use ({described(image)})")
        return None

    def _scale_for(self, width: int, height: int) -> float | None:
        """The configured um/px for a frame of the first frame's size; None (said once) for another."""
        size, scale = (width, height), self._config.microns_per_pixel
        if self._scale_size is None:
            self._scale_size = size
        if size == self._scale_size:
            if self._other_size is not None:
                self._other_size = None
                logger.info("%s: the camera gives %dx%d px frames again%s", self.name, width, height,
                            "" if scale is None else f": {scale:g} um/px applies again")
            return scale
        if size != self._other_size:
            self._other_size = size
            first = f"{self._scale_size[0]}x{self._scale_size[1]}"
            logger.warning("%s: the camera now gives %dx%d px frames, not the %s its first frames had: a scale "
                           "calibrated at %s (%s) does not hold for them; they are analysed without one "
                           "(estimated from red-cell size) until it gives that size again",
                           self.name, width, height, first, first,
                           "none in [source]" if scale is None else f"[source] {scale:g} um/px")
        return None

    def _failed(self, what: str) -> None:
        self._failures += 1
        self._streak = 0
        delay = backoff_delay(
            self._failures, self._config.reconnect_initial_s, self._config.reconnect_max_s
        )
        # Log the first failure and then at 2, 4, 8 ... so a camera gone for days stays quiet.
        if self._failures & (self._failures - 1) == 0:
            logger.warning(
                "%s: " + what + "; retry %d in %.1f s",
                self.name, self._config.device, self._failures, delay,
            )
        self.camera.waiting(delay)
        self._stop.wait(delay)

    def _release(self) -> None:
        self.camera.release()


# --- replay ----------------------------------------------------------------------------------


class ReplaySource(FrameSource):
    """A folder of images (name order) or a video file, paced at `fps`, optionally looping."""

    def __init__(self, config: ReplaySourceConfig) -> None:
        super().__init__(config.name)
        self._config = config
        self._pacer = _Pacer(config.fps, self._stop)
        self._files: list[Path] = []
        self._video: Any = None
        self._limits = IngestLimits()
        self._depth = SampleDepth(config.name)  # a 16-bit video's samples: by the files' rule, only growing
        if config.path.is_dir():
            self._files = sorted(
                p for p in config.path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not self._files:
                raise SourceConfigurationError(f"no image files in {config.path}")
        elif not config.path.is_file():
            raise SourceConfigurationError(f"recording {config.path} does not exist")
        else:  # refused at start, said with its reason code, rather than a recording of no frames
            self._video = self._open_video()
        self._pass = 0
        self._index = 0
        self._yielded_this_pass = 0

    def _next_frame(self) -> Frame | None:
        while not self._stop.is_set():
            item = self._read_next()
            if item is None:  # end of the recording
                if not self._config.loop or self._yielded_this_pass == 0:
                    return None
                self._pass += 1
                self._index = 0
                self._yielded_this_pass = 0
                self._release()
                continue
            label, pixels = item
            if pixels is None:
                continue  # logged with its reason where it was read
            if not self._pacer.wait():
                return None
            self._yielded_this_pass += 1
            return Frame(
                pixels=pixels,
                frame_id=f"{self.name}:p{self._pass}:{label}",
                source=self.name,
                microns_per_pixel=self._config.microns_per_pixel,
            )
        return None

    def _read_next(self) -> tuple[str, np.ndarray | None] | None:
        if self._files:
            if self._index >= len(self._files):
                return None
            path = self._files[self._index]
            self._index += 1
            label = shown(path.name)  # a name not in UTF-8 as \xNN: the frame id goes into reports
            try:
                return label, load_image(path).pixels
            except IngestError as exc:
                logger.warning("%s: skipping %s: %s", self.name, label, exc)
                return label, None
        if self._video is None:
            try:
                self._video = self._open_video()
            except SourceConfigurationError as exc:  # changed since the start: the replay ends
                logger.error("%s: %s", self.name, exc)
                return None
        ok, image = self._video.read()
        if not ok:
            if self._index < (declared := declared_frames(self._video)):
                logger.warning("%s: %s ended after %d of the %d frames it declares (damaged or cut short)",
                               self.name, shown(self._config.path), self._index, declared)
            return None
        self._index += 1
        label = f"{shown(self._config.path.stem)}#{self._index:06d}"
        try:
            return label, as_bgr8(checked_frame(image, label, self._limits), self._depth)
        except IngestError as exc:
            logger.warning("%s: skipping %s: %s", self.name, label, exc)
            return label, None

    def _open_video(self) -> Any:
        try:
            return open_video(self._config.path, self._limits)
        except IngestError as exc:
            raise SourceConfigurationError(f"recording refused: {exc}") from exc

    def _release(self) -> None:
        if self._video is not None:
            self._video.release()
            self._video = None


# --- synthetic microscope --------------------------------------------------------------------


class SimulatedSource(FrameSource):
    """Renders synthetic smear fields (seed, seed+1, ...) as a virtual microscope."""

    def __init__(self, config: SimulatedSourceConfig) -> None:
        super().__init__(config.name)
        # Imported here so that only stations that simulate load the renderer.
        from smearscope.device.synthetic import render_field

        self._render = render_field
        self._config = config
        self._pacer = _Pacer(config.fps, self._stop)
        self._rendered = 0
        self.last_field: Any = None  # the SyntheticField behind the latest frame (ground truth)

    def _next_frame(self) -> Frame | None:
        cfg = self._config
        if cfg.fields is not None and self._rendered >= cfg.fields:
            return None
        if not self._pacer.wait():
            return None
        seed = cfg.seed + self._rendered
        frame_id = f"{self.name}:seed{seed}"
        field = self._render(
            seed=seed,
            width=cfg.width,
            height=cfg.height,
            microns_per_pixel=cfg.microns_per_pixel,
            frame_id=frame_id,
            source=self.name,
        )
        self._rendered += 1
        self.last_field = field
        frame: Frame = field.frame
        if not cfg.report_scale:
            frame = Frame(pixels=frame.pixels, frame_id=frame_id, source=self.name,
                          captured_at=frame.captured_at)
        return frame
