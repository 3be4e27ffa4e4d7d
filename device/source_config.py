"""Typed configuration of each frame source, joined in one discriminated union on `kind`.

Each source kind owns its config model; `SourceConfig` is what the station config embeds. The
`kind` strings are also the keys of the lazy registry in `device.sources`.
"""

from __future__ import annotations

import datetime
import logging
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from smearscope.device.config_fields import SCALE_RANGE_UM, ConfigPath

logger = logging.getLogger(__name__)

#: The files a folder or replay source picks up: what the decoder reads (BMP, WebP and GIF it
#: refuses, so a scanner's BMP would only ever land in rejected/).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class SourceBaseModel(BaseModel):
    """Strict base: unknown keys are errors, configs are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _CommonSourceFields(SourceBaseModel):
    name: str = Field(
        default="scope",
        title="Source name",
        description="Short name of this source; prefixes every frame id and is the Frame's source.",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    microns_per_pixel: float | None = Field(
        default=None,
        title="Scale (um/px)",
        description="Micrometres per pixel of the captured image (0.01 to 2; `smearscope calibrate-scale` "
        "measures it); leave unset to let the pipeline estimate it from red-cell size.",
        ge=SCALE_RANGE_UM[0],
        le=SCALE_RANGE_UM[1],
        allow_inf_nan=False,
    )
    microns_per_pixel_calibrated_on: datetime.date | None = Field(
        default=None,
        title="Date of the scale's calibration",
        description="The day microns_per_pixel was measured with a stage micrometer (YYYY-MM-DD; "
        "`smearscope calibrate-scale` prints the line). The station logs the calibration's age at start; "
        "it and `doctor` warn when it is older than microns_per_pixel_recheck_days, or unset while "
        "microns_per_pixel is set. Only with microns_per_pixel.",
    )
    microns_per_pixel_recheck_days: int = Field(
        default=365,
        title="Scale calibration due after (days)",
        description="Age of microns_per_pixel_calibrated_on from which the station's start and `doctor` "
        "warn that the scale is due to be measured again (the lab's own interval; 1 to 3650).",
        ge=1,
        le=3650,
    )

    @model_validator(mode="after")
    def _dated_scale_only(self) -> _CommonSourceFields:
        if self.microns_per_pixel_calibrated_on is not None and self.microns_per_pixel is None:
            raise ValueError("microns_per_pixel_calibrated_on dates a calibration, but microns_per_pixel is unset")
        return self


class CameraSourceConfig(_CommonSourceFields):
    """A live camera through OpenCV: V4L2 index or path, a GStreamer pipeline, or an RTSP URL."""

    kind: Literal["camera"] = Field(
        default="camera", title="Source kind", description="Selects the live camera source."
    )
    device: int | str = Field(
        default=0,
        title="Camera device",
        description="V4L2 index (0), device path (/dev/video0), GStreamer pipeline ending in "
        "'appsink' (Jetson CSI: 'nvarguscamerasrc ! ... ! appsink'), or an rtsp:// URL.",
    )
    api: Literal["auto", "v4l2", "gstreamer", "ffmpeg"] = Field(
        default="auto",
        title="OpenCV capture API",
        description="OpenCV backend; 'auto' picks GStreamer for pipelines, FFmpeg for URLs and "
        "V4L2 for indices and /dev paths.",
    )
    width: int | None = Field(
        default=None,
        title="Frame width",
        description="Requested width in pixels (V4L2 only).",
        gt=0,
    )
    height: int | None = Field(
        default=None,
        title="Frame height",
        description="Requested height in pixels (V4L2 only).",
        gt=0,
    )
    sample_bits: Literal["auto"] | Annotated[int, Field(ge=8, le=16)] = Field(
        default="auto",
        title="Camera sample depth (bits)",
        description="Bits per sample of a camera that gives 16-bit frames (8 to 16): 10 or 12 for the many "
        "machine-vision and USB cameras that put their samples in the low bits of 16-bit words, 16 for "
        "full-range ones; 16-bit samples are scaled from this depth to 8 bit. 'auto' takes the smallest of "
        "8, 10, 12, 14 and 16 bits that holds the highest sample of the first frame, growing only once 3 "
        "frames in a row are over it (one corrupt frame is read clipped and changes nothing), said in the "
        "log each time. 8-bit frames are used as they are.",
    )
    reconnect_initial_s: float = Field(
        default=1.0,
        title="First reconnect delay (s)",
        description="Wait before the first reconnect attempt after the camera vanishes.",
        gt=0.0, le=3600.0,
    )
    reconnect_max_s: float = Field(
        default=60.0,
        title="Longest reconnect delay (s)",
        description="Cap of the exponential reconnect backoff.",
        gt=0.0, le=3600.0,
    )
    read_timeout_s: float = Field(
        default=10.0,
        title="Longest camera read (s)",
        description="A single open or frame read of the camera taking longer than this is a hung camera "
        "(a stalled GStreamer/CSI pipeline or driver): said at ERROR, its thread abandoned and the camera "
        "opened again; more than 3 stuck at once stop the station for a restart. Waits between "
        "reconnects are never bounded by it. Keep it above a few frame periods of the camera. A network "
        "stream (FFmpeg) gets FFmpeg's own open and read timeouts at four fifths of it.",
        ge=1.0, le=600.0,
    )

    @model_validator(mode="after")
    def _backoff_ordered(self) -> CameraSourceConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self


class FolderSourceConfig(_CommonSourceFields):
    """A watched directory: each new image file is analyzed once, then moved aside."""

    kind: Literal["folder"] = Field(
        default="folder", title="Source kind", description="Selects the watched-folder source."
    )
    path: ConfigPath = Field(
        title="Watched directory",
        description="Directory polled for new image files (must exist when the source opens).",
    )
    poll_interval_s: float = Field(
        default=1.0, title="Poll interval (s)", description="Time between directory scans (10 ms to "
        "an hour: shorter would keep a core busy listing the folder).", ge=0.01, le=3600.0
    )
    settle_s: float = Field(
        default=2.0,
        title="Settle period (s)",
        description="A file is read only after its size and mtime have not changed for this long.",
        ge=0.0, le=3600.0,
    )
    decode_grace_s: float = Field(
        default=30.0,
        title="Undecodable grace (s)",
        description="How long a settled file that does not decode is waited for (decoded again only "
        "when its size or mtime changes) before it is rejected with the decoder's reason (a writer "
        "may pause mid-file; at most a day).",
        ge=0.0, le=86400.0,
    )
    max_file_mb: float = Field(
        default=200.0,
        title="Largest file (MB)",
        description="Larger files are rejected unread (the decoder reads at most 256 MB).",
        gt=0.0, le=256.0,
    )
    extensions: tuple[str, ...] = Field(
        default=IMAGE_EXTENSIONS,
        title="Image extensions",
        description="Lower-case file extensions treated as images; other files are rejected.",
        min_length=1,
    )
    done_dir: str = Field(
        default="done",
        title="Done subdirectory",
        description="Subdirectory of `path` that processed files are moved into (never emptied by the station: "
        "prune it on a schedule).",
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    rejected_dir: str = Field(
        default="rejected",
        title="Rejected subdirectory",
        description="Subdirectory of `path` for rejected files, each with a .reason.txt sidecar (never emptied "
        "by the station: prune it on a schedule).",
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    state_file: ConfigPath | None = Field(
        default=None,
        title="State file",
        description="Append-only record of processed files so a restart never reprocesses one; "
        "default `<path>/.smearscope-processed`; a regular file, not a symbolic link.",
    )
    state_max_entries: int = Field(
        default=10_000,
        title="State entries kept",
        description="The state file (and what the station holds of it) is compacted to this many most recent "
        "entries when opened, and again whenever it reaches twice as many.",
        ge=100,
    )
    max_attempts: int = Field(
        default=2,
        title="Interrupted attempts before rejection",
        description="A file the station's process died on (killed for memory, a crash in a decoder, an analysis "
        "the watchdog stopped) is analysed alone after the restart, nothing else meanwhile; one it dies on this "
        "many times goes to rejected/ as analysis_interrupted instead of stopping the station again (at least 2: "
        "a file that merely waited behind it is never rejected).",
        ge=2, le=100,
    )
    max_reboot_attempts: int = Field(
        default=3,
        title="Machine restarts before rejection",
        description="A file in hand when the whole machine went down (a power cut, a kernel panic, a reset of the "
        "board by its watchdog) is not counted against max_attempts, but it is analysed alone after the reboot; one "
        "in hand alone at this many restarts of the machine (a file whose analysis resets the board) goes to "
        "rejected/ as analysis_interrupted, so the files behind it are analysed (at least 2: one power cut never "
        "sets a file aside).",
        ge=2, le=100,
    )

    @model_validator(mode="after")
    def _dirs_distinct(self) -> FolderSourceConfig:
        if self.done_dir == self.rejected_dir:
            raise ValueError("done_dir and rejected_dir must differ")
        if {self.done_dir, self.rejected_dir} & {".", ".."}:  # the folder itself: files analysed again
            raise ValueError("done_dir and rejected_dir must name a subfolder of path, not '.' or '..'")
        if any(not e.startswith(".") or e != e.lower() for e in self.extensions):
            raise ValueError("extensions must be lower-case and start with '.', e.g. '.png'")
        return self


class ReplaySourceConfig(_CommonSourceFields):
    """Recorded frames (a folder of images or one video file) played back at a set rate."""

    kind: Literal["replay"] = Field(
        default="replay", title="Source kind", description="Selects the replay source."
    )
    path: ConfigPath = Field(
        title="Recording",
        description="A directory of image files (played in name order) or a video file (AVI, MP4/MOV or "
        "Matroska/WebM; frames held to an image file's size limits).",
    )
    fps: float = Field(
        default=1.0,
        title="Frames per second",
        description="Playback rate; 0 plays as fast as the consumer takes frames.",
        ge=0.0,
    )
    loop: bool = Field(
        default=False,
        title="Loop",
        description="Start again at the end; each pass gets new frame ids.",
    )


class SimulatedSourceConfig(_CommonSourceFields):
    """The synthetic renderer as a virtual microscope: seeded and reproducible."""

    kind: Literal["simulated"] = Field(
        default="simulated", title="Source kind", description="Selects the synthetic microscope."
    )
    seed: int = Field(
        default=0,
        title="Seed",
        description="Seed of the first field; field i uses seed + i.",
        ge=0,
    )
    fields: int | None = Field(
        default=20,
        title="Number of fields",
        description="How many fields to render before the source ends (default 20).",
        ge=1,
    )
    width: int = Field(
        default=1280, title="Field width", description="Rendered width in pixels.", ge=64, le=8192
    )
    height: int = Field(
        default=960, title="Field height", description="Rendered height in pixels.", ge=64, le=8192
    )
    fps: float = Field(
        default=1.0,
        title="Frames per second",
        description="Render rate; 0 renders as fast as the consumer takes frames.",
        ge=0.0,
    )
    microns_per_pixel: float = Field(  # type: ignore[assignment]
        default=0.2,
        title="Rendered scale (um/px)",
        description="Scale the synthetic smear is rendered at (the renderer supports 0.05-0.5).",
        ge=0.05,
        le=0.5,
    )
    report_scale: bool = Field(
        default=True,
        title="Report scale",
        description="Put the rendered scale on each Frame; false leaves it unset so the "
        "pipeline's scale estimate is exercised.",
    )


SourceConfig = Annotated[
    CameraSourceConfig | FolderSourceConfig | ReplaySourceConfig | SimulatedSourceConfig,
    Field(discriminator="kind"),
]

SOURCE_KINDS: tuple[str, ...] = ("camera", "folder", "replay", "simulated")
