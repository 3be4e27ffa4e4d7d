"""The station's predicted peak memory against the limit it runs under (doctor and the start say it).

The prediction is linear in the frame and in the fields analysed at once, from measured figures:

- one analysis, peak RSS (VmHWM, MiB) by frame size: 356 / 505 / 627 / 1036 at 1 / 4 / 16 / 64 MP
  (`bench/results/bench_pipeline-2cpu-2026-12-03-windows.txt`, docs/RESULTS.md "Time and peak
  memory grow linearly with the frame"); their least-squares line: 9.8 MiB per MP above 423 MiB;
- a running station (review gallery on) fed 64 MP frames with `concurrent_fields = 1`: 1665 MiB
  (docs/RESULTS.md "Large frames in a running station"), 616 MiB above that line at 64 MP: the
  next frame decoded, the overlay and gallery drawn, the allocator's kept memory.

Predicted peak = 423 + 616 + concurrent_fields x 9.8 x MP. It meets or exceeds every station peak
measured there: 64 MP with 2 fields at once 2291 predicted (1906 measured), 12 MP with 2: 1274
(987).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from smearscope.device.ingest.decode import IngestLimits
from smearscope.device.ingest.errors import shown
from smearscope.device.memory_limit import CgroupBound, MemoryLimits, read_memory_limits

logger = logging.getLogger(__name__)

MIB = 1024 * 1024

#: (frame MP, one analysis's peak RSS in MiB): bench/results/bench_pipeline-2cpu-2026-12-03-windows.txt.
ANALYSIS_PEAKS_MIB = ((1.0, 356.0), (4.0, 505.0), (16.0, 627.0), (64.0, 1036.0))
#: A running station's peak with 64 MP frames and concurrent_fields = 1 (docs/RESULTS.md, "Large frames").
STATION_PEAK_64MP_ONE_FIELD_MIB = 1665.0


def _fit() -> tuple[float, float]:
    xs, ys = [x for x, _ in ANALYSIS_PEAKS_MIB], [y for _, y in ANALYSIS_PEAKS_MIB]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


#: MiB per megapixel of each field in analysis, and the analyzer's base (the fit's intercept).
MIB_PER_MP, ANALYSIS_BASE_MIB = _fit()
#: What the station holds beside its analyses (measured at 64 MP, one field at once).
STATION_OVERHEAD_MIB = STATION_PEAK_64MP_ONE_FIELD_MIB - (ANALYSIS_BASE_MIB + MIB_PER_MP * 64.0)


def predicted_peak_mib(megapixels: float, concurrent_fields: int) -> float:
    """The station's predicted peak RSS in MiB with frames of `megapixels` and that many fields at once."""
    return ANALYSIS_BASE_MIB + STATION_OVERHEAD_MIB + concurrent_fields * MIB_PER_MP * megapixels


def largest_frame(source) -> tuple[float, str]:
    """The largest frame (MP) the configured source may hand the station, and where that figure comes from."""
    width, height = getattr(source, "width", None), getattr(source, "height", None)
    if width and height:
        return width * height / 1e6, f"{width}x{height} frames (source.width x source.height)"
    limit = IngestLimits().max_pixels
    return limit / 1e6, f"frames up to {limit / 1e6:g} MP (the largest frame the station accepts)"


@dataclass(frozen=True)
class MemoryVerdict:
    """Whether the predicted peak fits the memory limit: `fits`, and the sentence that says so."""

    fits: bool
    text: str


def _named(bound: CgroupBound, unit: str | None) -> str:
    """A limit in words: a systemd unit's setting, or a cgroup's file."""
    if unit is not None:
        return f"the unit {shown(unit)}'s {bound.file}"
    return f"the cgroup {bound.file} of {shown(bound.cgroup)}"


def memory_verdict(config, limits: MemoryLimits | None = None) -> MemoryVerdict:
    """The configured station's predicted peak against the tightest bound it runs under: its cgroup's
    memory.max (v1: memory.limit_in_bytes) and memory.high, or the systemd unit's MemoryMax and
    MemoryHigh where `limits` carries them, else the machine's RAM (MemTotal) and what is free now
    (MemAvailable)."""
    limits = read_memory_limits() if limits is None else limits
    megapixels, frames = largest_frame(config.source)
    fields = config.analysis.concurrent_fields
    peak = predicted_peak_mib(megapixels, fields)
    said = (f"predicted peak {peak:.0f} MiB with {frames} and analysis.concurrent_fields = {fields} "
            f"({ANALYSIS_BASE_MIB + STATION_OVERHEAD_MIB:.0f} MiB + {fields} x {MIB_PER_MP:.1f} MiB per MP "
            f"x {megapixels:g} MP; docs/STATION.md section 5)")
    advice = ("lower analysis.concurrent_fields, or raise the limit (systemctl edit smearscope: "
              "MemoryHigh=, MemoryMax=)")
    bounds: list[tuple[int, str, str]] = []
    if limits.max is not None:
        bounds.append((limits.max.bytes, _named(limits.max, limits.unit), "the kernel OOM-kills the station there"))
    if limits.high is not None:
        bounds.append((limits.high.bytes, _named(limits.high, limits.unit),
                       "above it the kernel reclaims memory and slows the station"))
    if limits.total is not None and (limits.max is None or limits.total < limits.max.bytes):
        bounds.append((limits.total, "the machine's RAM (MemTotal)", "the kernel OOM-kills the station there"))
    if limits.max is None and limits.available is not None:
        bounds.append((limits.available, "the memory free now (MemAvailable)",
                       "the kernel OOM-kills the station or another process there"))
    for limit, what, effect in bounds:
        if peak * MIB > limit:
            return MemoryVerdict(False, f"{said} is above {what}, {limit / MIB:.0f} MiB: {effect}; {advice}")
    if not bounds:
        return MemoryVerdict(True, f"{said}; no memory limit could be read")
    limit, what, _ = min(bounds)
    return MemoryVerdict(True, f"{said} fits {what}, {limit / MIB:.0f} MiB")


def say_memory_verdict(config) -> None:
    """Log the verdict at the station's start: WARNING when the predicted peak is above the limit."""
    verdict = memory_verdict(config)
    if verdict.fits:
        logger.info("memory: %s", verdict.text)
    else:
        logger.warning("memory: %s", verdict.text)
