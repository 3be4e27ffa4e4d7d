"""Frame quality gate: only sharp, well-exposed, stained, new fields reach the analysis.

All metrics are computed on a downscaled copy (at a fixed um/px when the frame's scale is known,
else at a fixed width), so thresholds do not depend on the camera's resolution. Focus is judged
only at a known scale, or at the scale an uncalibrated station's open run agrees on (a fifth
finer: an estimate too coarse must not refuse sharp fields, so a 1 um blur may pass there; and
not at all once it refused five fields in a row, until a field is sharp there or it moves): the
Laplacian's variance at a fixed width reads a finely sampled sharp
field as blurred (BCCD's 640x480 fields at 0.072 um/px: 7 to 11, where its fields at 0.5 um/px
read 82 to 314 and a 1 um blur of them 4 to 7). The default threshold passes every validation
field of the seven labs in `training.labs` at its scale (the palest, a Raspberry Pi camera, from
19) and refuses a 1 um blur of BCCD's and the Raspberry Pi station's.

A field is empty when neither a share of stained pixels (HSV saturation) nor a share of material
(pixels 0.05 OD darker, in any channel, than their glass: a grey closing over 20 um) is there.
Saturation alone refused 13 of Chula RBC-12's 59 validation fields, full fields of pale red cells
on greenish glass (stained 0.000 to 0.029 of 0.03 asked); the material share of every validation
field of the seven labs is 0.13 or more at its scale (Chula from 0.134, the Raspberry Pi station
0.133) and 0.10 or more at an unknown one (BCCD 0.104, Chula 0.111), against 0.006 or less for
rendered blank glass (corners a quarter darker, colour casts, noise, JPEG, lamp-only frames) and
0.073 with 8 dust specks 2 to 12 um across in a 112 x 84 um field: the default 0.08 lies between.
On the test fields (looked at once) no field is empty (Chula's 10 of 57 by saturation alone),
but the margin is thin: a Raspberry Pi field reads 0.074 at its scale and a TXL-PBC 575 field
0.071 at an unknown one, both passed by their stain (saturation 0.54 and 0.36).
Checks run in a fixed order so the reported reason is the most basic one: a black frame is "underexposed", not
"out_of_focus".
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from smearscope.device.frame import Frame

logger = logging.getLogger(__name__)

DUPLICATE_FRAME_ID = "duplicate_frame_id"
UNDEREXPOSED = "underexposed"
OVEREXPOSED = "overexposed"
EMPTY_FIELD = "empty_field"
OUT_OF_FOCUS = "out_of_focus"
SAME_FIELD = "same_field"
#: Every reason code, in the order the checks run.
REJECT_REASONS: tuple[str, ...] = (
    DUPLICATE_FRAME_ID, UNDEREXPOSED, OVEREXPOSED, EMPTY_FIELD, OUT_OF_FOCUS, SAME_FIELD,
)


class QualityGateConfig(BaseModel):
    """Thresholds of the frame quality gate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True,
        title="Gate enabled",
        description="When false every frame is accepted (duplicate frame ids are still refused).",
    )
    metric_microns_per_pixel: float = Field(
        default=0.5,
        title="Metric scale (um/px)",
        description="Frames whose scale is known are resampled to this scale before any metric "
        "is computed, so one focus threshold holds across cameras and objectives.",
        gt=0.0,
        le=10.0,
    )
    analysis_width: int = Field(
        default=512,
        title="Metric width (px)",
        description="Frames of unknown scale are downscaled to this width instead.",
        ge=64,
        le=4096,
    )
    min_focus: float = Field(
        default=15.0,
        title="Minimum focus",
        description="Variance of the Laplacian of the gray image at metric_microns_per_pixel (or "
        "the frame's own scale if coarser); below is out_of_focus. Judged only where the frame's "
        "scale is known, or its open run's fields agree on one: at an unknown scale a finely sampled "
        "sharp field reads as blurred.",
        ge=0.0,
    )
    dark_level: int = Field(
        default=20, title="Dark level", description="Gray value at or below which a pixel is dark.",
        ge=0, le=254,
    )
    max_dark_fraction: float = Field(
        default=0.5,
        title="Largest dark fraction",
        description="More dark pixels than this fraction is underexposed.",
        gt=0.0, le=1.0,
    )
    clipped_level: int = Field(
        default=250, title="Clipped level",
        description="Gray value at or above which a pixel counts as clipped white.", ge=1, le=255,
    )
    max_clipped_fraction: float = Field(
        default=0.6,
        title="Largest clipped fraction",
        description="More clipped-white pixels than this fraction is overexposed.",
        gt=0.0, le=1.0,
    )
    stain_saturation: int = Field(
        default=40, title="Stain saturation",
        description="HSV saturation (0-255) at or above which a pixel counts as stained material.",
        ge=1, le=255,
    )
    min_stained_fraction: float = Field(
        default=0.03,
        title="Smallest stained fraction",
        description="Fewer stained pixels than this fraction, and too little material darker than "
        "its glass (min_material_fraction), is an empty_field.",
        ge=0.0, le=1.0,
    )
    glass_window_microns: float = Field(
        default=20.0,
        title="Glass window (um)",
        description="Side of the window whose brightest level per channel (a grey closing: vignetting "
        "and a lamp's colour cast follow it) is the glass a pixel is compared with. At an unknown "
        "scale taken at metric_microns_per_pixel.",
        gt=0.0, le=200.0,
    )
    material_density: float = Field(
        default=0.05,
        title="Material optical density",
        description="Optical density (log10 of glass over pixel, in its darkest channel) at or above "
        "which a pixel counts as material on the glass, however pale its stain.",
        gt=0.0, le=2.0,
    )
    min_material_fraction: float = Field(
        default=0.08,
        title="Smallest material fraction",
        description="Fewer material pixels than this fraction, and fewer stained ones than "
        "min_stained_fraction, is an empty_field.",
        ge=0.0, le=1.0,
    )
    thumbnail_px: int = Field(
        default=64, title="Thumbnail size (px)",
        description="Side of the gray thumbnail compared with the previous accepted frame.",
        ge=8, le=512,
    )
    same_field_correlation: float = Field(
        default=0.97,
        title="Same-field correlation",
        description="Normalized cross-correlation with the previous accepted frame at or above "
        "which the stage is judged not to have moved (same_field).",
        gt=0.0, le=1.0,
    )
    remembered_frame_ids: int = Field(
        default=100_000,
        title="Remembered frame ids",
        description="How many frame ids the gate remembers to refuse repeats (oldest forgotten).",
        ge=1000,
    )

    @model_validator(mode="after")
    def _levels_ordered(self) -> QualityGateConfig:
        if self.dark_level >= self.clipped_level:
            raise ValueError("dark_level must be below clipped_level")
        return self


@dataclass(frozen=True)
class QualityVerdict:
    """The gate's decision on one frame; `reason` is one of REJECT_REASONS or None."""

    frame_id: str
    accepted: bool
    reason: str | None
    metrics: Mapping[str, float] = field(default_factory=dict)


def measure(
    pixels: np.ndarray, config: QualityGateConfig, microns_per_pixel: float | None = None
) -> tuple[dict[str, float], np.ndarray]:
    """Quality metrics of a BGR uint8 image, and its gray thumbnail for the same-field check."""
    h, w = pixels.shape[:2]
    small_mpp = config.metric_microns_per_pixel  # assumed at an unknown scale
    if microns_per_pixel:
        scale = min(1.0, microns_per_pixel / config.metric_microns_per_pixel)
        small_mpp = max(microns_per_pixel, config.metric_microns_per_pixel)
    else:
        scale = min(1.0, config.analysis_width / w)
    small = pixels
    if scale < 1.0:
        small = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    saturation = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)[:, :, 1]
    metrics = {
        "focus": float(cv2.Laplacian(gray, cv2.CV_64F).var()),
        "dark_fraction": float(np.mean(gray <= config.dark_level)),
        "clipped_fraction": float(np.mean(gray >= config.clipped_level)),
        "stained_fraction": float(np.mean(saturation >= config.stain_saturation)),
        "material_fraction": material_fraction(small, config, small_mpp),
        "mean_gray": float(gray.mean()),
    }
    side = config.thumbnail_px
    thumb = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    return metrics, thumb


def material_fraction(small: np.ndarray, config: QualityGateConfig, microns_per_pixel: float) -> float:
    """Share of pixels at least `material_density` darker (OD, any channel) than their local glass.

    The glass is a grey closing over `glass_window_microns` of a 3x3 mean (sensor noise): it fills
    anything smaller than the window with the glass around it and follows a smooth lamp fall-off
    (vignetting) and, per channel, a colour cast, so only what lies on the glass reads as dense.
    """
    side = max(3, round(config.glass_window_microns / microns_per_pixel) | 1)
    smooth = cv2.blur(small, (3, 3))
    glass = cv2.morphologyEx(smooth, cv2.MORPH_CLOSE, np.ones((side, side), np.uint8))
    # OD >= material_density is (pixel + 1) * 10**density <= glass + 1: the brightest dense pixel
    # under each glass level, looked up (integer compares: a third of the cost of float ones)
    levels = np.arange(256, dtype=np.float64)
    brightest_dense = np.clip(np.floor((levels + 1) / 10.0 ** config.material_density - 1), 0, 255)
    dense = cv2.compare(smooth, cv2.LUT(glass, brightest_dense.astype(np.uint8)), cv2.CMP_LE)
    blue, green, red = cv2.split(dense)
    return cv2.countNonZero(cv2.max(cv2.max(blue, green), red)) / float(blue.size)


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean NCC of two equal-shape images in [-1, 1]; 1.0 for two flat identical images."""
    da = a - a.mean()
    db = b - b.mean()
    denom = float(np.sqrt((da * da).sum() * (db * db).sum()))
    if denom < 1e-6:
        return 1.0 if float(np.abs(a - b).mean()) < 1.0 else 0.0
    return float((da * db).sum() / denom)


#: A scale hint is judged at this share of itself (finer: lenient), and is taken as moved beyond it.
HINT_MARGIN = 0.8
#: Focus refusals in a row at one scale hint before focus is no longer judged at it.
HINTED_REFUSALS_MAX = 5


class QualityGate:
    """Decides which frames are worth analyzing; counts rejections per reason.

    Thread-safe. A frame id is judged once: a repeat is refused as duplicate_frame_id however
    good the frame is. Only accepted frames become the reference for the same-field check.
    """

    def __init__(self, config: QualityGateConfig | None = None) -> None:
        self.config = config or QualityGateConfig()
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._previous_thumb: np.ndarray | None = None
        self._rejections: Counter[str] = Counter()
        self._accepted = 0
        self._said_no_scale = False
        #: Focus refusals in a row judged at a scale hint; the hint focus is not judged at (after
        #: HINTED_REFUSALS_MAX of them) until a field is sharp there or the hint moves.
        self._hinted_refusals = 0
        self._hint_off: float | None = None

    def _judging_scale(self, frame: Frame, hint: float | None) -> tuple[float | None, bool, bool]:
        """(the scale metrics are measured at, whether focus is judged there, whether it is a hint).
        A hint is the run's agreed scale, an estimate: judged at HINT_MARGIN of it (finer reads
        sharper: a hint too coarse must not refuse sharp fields). Once it refused
        HINTED_REFUSALS_MAX fields in a row (a wrong estimate, an objective changed mid-run: only
        fields it lets through can move it) focus is measured there but not judged, until a field
        passes there (the technician refocused: the hint was right) or the hint moves by more
        than the margin."""
        if frame.microns_per_pixel:
            return frame.microns_per_pixel, True, False
        if not hint:
            return None, False, False
        with self._lock:
            off = self._hint_off
            if off is not None and abs(hint / off - 1) > 1 - HINT_MARGIN:
                self._hint_off = off = None
        return hint * HINT_MARGIN, off is None, True

    def check(self, frame: Frame, scale_hint: float | None = None) -> QualityVerdict:
        """Judge one frame; `scale_hint`: the scale a frame of unknown scale is judged at (an
        uncalibrated station's open run: the scale its fields agree on), focus unjudged without."""
        cfg = self.config
        mpp, judged, hinted = self._judging_scale(frame, scale_hint)
        with self._lock:
            if frame.frame_id in self._seen:
                return self._verdict(frame, DUPLICATE_FRAME_ID, {})
            self._remember(frame.frame_id)
            prev = self._previous_thumb
        # Metrics outside the lock: the expensive part, and it touches no shared state.
        metrics, thumb = measure(frame.pixels, cfg, mpp)
        if not mpp and cfg.enabled and not self._said_no_scale:
            self._said_no_scale = True
            logger.warning("frames of unknown scale: focus is not judged until a run's fields agree on a "
                           "scale (a finely sampled sharp field reads as blurred at a fixed width); give "
                           "[source] microns_per_pixel (smearscope calibrate-scale)")
        if prev is not None:
            metrics["same_field_ncc"] = normalized_cross_correlation(prev, thumb)
        reason: str | None = None
        if cfg.enabled:
            if metrics["dark_fraction"] > cfg.max_dark_fraction:
                reason = UNDEREXPOSED
            elif metrics["clipped_fraction"] > cfg.max_clipped_fraction:
                reason = OVEREXPOSED
            elif (metrics["stained_fraction"] < cfg.min_stained_fraction
                  and metrics["material_fraction"] < cfg.min_material_fraction):
                reason = EMPTY_FIELD
            elif judged and metrics["focus"] < cfg.min_focus:
                reason = OUT_OF_FOCUS
            elif metrics.get("same_field_ncc", -1.0) >= cfg.same_field_correlation:
                reason = SAME_FIELD
        with self._lock:
            if reason is None:
                self._previous_thumb = thumb
            if hinted and reason not in (UNDEREXPOSED, OVEREXPOSED, EMPTY_FIELD):  # fields whose focus says something
                sharp = metrics["focus"] >= cfg.min_focus
                if not judged and sharp:
                    self._hint_off = None  # a sharp field at the hint: it fits the optics, judged again
                    logger.info("a field is sharp at the run's scale again: focus is judged there")
                elif judged:
                    self._hinted_refusals = 0 if sharp else self._hinted_refusals + 1
            if self._hinted_refusals >= HINTED_REFUSALS_MAX:
                self._hint_off, self._hinted_refusals = scale_hint, 0
                logger.warning("%d fields in a row out of focus at the scale the run's fields agree on (%.4f um/px): "
                               "focus is not judged at it until a field is sharp there or it moves (a wrong "
                               "estimate, or an objective changed); calibrate the station (smearscope calibrate-scale)",
                               HINTED_REFUSALS_MAX, scale_hint)
            return self._verdict(frame, reason, metrics)

    def _verdict(
        self, frame: Frame, reason: str | None, metrics: dict[str, float]
    ) -> QualityVerdict:
        if reason is None:
            self._accepted += 1
        else:
            self._rejections[reason] += 1
            logger.debug("frame %s rejected: %s %s", frame.frame_id, reason, metrics)
        return QualityVerdict(
            frame_id=frame.frame_id,
            accepted=reason is None,
            reason=reason,
            metrics=MappingProxyType(metrics),
        )

    def explain(self, verdict: QualityVerdict) -> str:
        """A refusal in a sentence: the reason, the measure that decided it and its limit."""
        cfg, m = self.config, verdict.metrics
        said = {
            DUPLICATE_FRAME_ID: "a frame of this id (the same file name and pixels) was analysed already",
            UNDEREXPOSED: f"underexposed: {m.get('dark_fraction', 0.0):.0%} of the pixels dark "
                          f"(max_dark_fraction {cfg.max_dark_fraction:g})",
            OVEREXPOSED: f"overexposed: {m.get('clipped_fraction', 0.0):.0%} of the pixels clipped "
                         f"(max_clipped_fraction {cfg.max_clipped_fraction:g})",
            EMPTY_FIELD: f"empty field: {m.get('stained_fraction', 0.0):.1%} stained, {m.get('material_fraction', 0.0):.1%} "
                         f"material (min_stained_fraction {cfg.min_stained_fraction:g}, min_material_fraction "
                         f"{cfg.min_material_fraction:g})",
            OUT_OF_FOCUS: f"out of focus: focus {m.get('focus', 0.0):.1f} (min_focus {cfg.min_focus:g})",
            SAME_FIELD: f"same field as the last one (correlation {m.get('same_field_ncc', 0.0):.3f}, "
                        f"same_field_correlation {cfg.same_field_correlation:g}): move the stage",
        }
        return f"the quality gate refused {verdict.frame_id}: {said.get(verdict.reason or '', verdict.reason)}"

    def _remember(self, frame_id: str) -> None:
        self._seen[frame_id] = None
        while len(self._seen) > self.config.remembered_frame_ids:
            self._seen.popitem(last=False)

    @property
    def rejections(self) -> dict[str, int]:
        """Rejected frames per reason code (every code present, zero included)."""
        with self._lock:
            return {reason: self._rejections[reason] for reason in REJECT_REASONS}

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    def reset_reference(self) -> None:
        """Forget the previous field (e.g. a new slide was loaded)."""
        with self._lock:
            self._previous_thumb = None
