"""Stage 9: counts, WBC differential with confidence intervals, RBC morphology, size, ratios, flags.

Works on any list of classified cells, so a specimen report is the same function over the cells
of all its fields.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from smearscope.service.analysis.classify import UNIDENTIFIED
from smearscope.service.analysis.records import CellKind, ClassifiedCell
from smearscope.service.analysis.report import ClassShare, Counts, Flag, SizeStats

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (as fractions); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def shares(labels: Iterable[str], with_ci: bool) -> list[ClassShare]:
    c = Counter(labels)
    n = sum(c.values())
    out = []
    for label, k in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])):
        lo, hi = wilson_interval(k, n) if with_ci else (None, None)
        out.append(ClassShare(label=label, count=k, percent=round(100.0 * k / n, 2),
                              ci95_low=None if lo is None else round(100 * lo, 2),
                              ci95_high=None if hi is None else round(100 * hi, 2)))
    return out


def size_stats(diameters: Sequence[float]) -> SizeStats:
    d = np.asarray(diameters, float)
    if d.size == 0:
        return SizeStats(n=0, mean_diameter_um=None, sd_um=None, cv_percent=None, median_diameter_um=None)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return SizeStats(n=int(d.size), mean_diameter_um=round(mean, 3), sd_um=round(sd, 3),
                     cv_percent=round(100 * sd / mean, 2) if mean else None, median_diameter_um=round(float(np.median(d)), 3))


@dataclass(frozen=True)
class AggregateThresholds:
    min_wbc_for_differential: int = 100
    max_unidentified_fraction: float = 0.1


@dataclass(frozen=True)
class Aggregates:
    counts: Counts
    wbc_differential: list[ClassShare]
    rbc_morphology: list[ClassShare]
    rbc_size: SizeStats
    ratios: dict[str, float | None]
    flags: list[Flag]


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def aggregate(cells: Sequence[ClassifiedCell], th: AggregateThresholds = AggregateThresholds()) -> Aggregates:
    by_kind: dict[CellKind, list[ClassifiedCell]] = {k: [] for k in CellKind}
    for c in cells:
        by_kind[c.detection.kind].append(c)
    rbc, wbc, plt = by_kind[CellKind.RBC], by_kind[CellKind.WBC], by_kind[CellKind.PLATELET]
    counts = Counts(rbc=len(rbc), wbc=len(wbc), platelet=len(plt))
    wbc_labels = [c.label or UNIDENTIFIED for c in wbc]
    rbc_labels = [c.label or UNIDENTIFIED for c in rbc]
    diff = shares(wbc_labels, with_ci=True)
    morph = shares(rbc_labels, with_ci=False)
    sizes = size_stats([c.diameter_um for c in rbc if not c.touches_frame_edge])
    wc = Counter(wbc_labels)
    ratios = {
        "neutrophil_lymphocyte": _ratio(wc["neutrophil"], wc["lymphocyte"]),
        "platelet_rbc": _ratio(len(plt), len(rbc)),
        "wbc_rbc": _ratio(len(wbc), len(rbc)),
    }
    flags: list[Flag] = []
    if not cells:
        flags.append(Flag(code="no_cells_found", severity="warning", message="no cells were detected in this image"))
    if len(wbc) < th.min_wbc_for_differential:
        flags.append(Flag(code="too_few_wbc_for_differential", severity="info",
                          message=f"{len(wbc)} WBC classified; a differential needs at least {th.min_wbc_for_differential}"))
    for name, labels in (("wbc", wbc_labels), ("rbc", rbc_labels)):
        if labels:
            frac = labels.count(UNIDENTIFIED) / len(labels)
            if frac > th.max_unidentified_fraction:
                flags.append(Flag(code=f"many_unidentified_{name}", severity="warning",
                                  message=f"{100 * frac:.0f}% of {name.upper()} could not be classified with confidence: review"))
    n_sickle = Counter(rbc_labels)["sickle"]
    if n_sickle:
        flags.append(Flag(code="sickle_cells_present", severity="critical", message=f"{n_sickle} sickle-shaped red cells seen: review"))
    n_regrouped = sum(c.detected_as is CellKind.WBC for c in plt)
    if n_regrouped:
        flags.append(Flag(code="platelet_clumps_suspected", severity="warning",
                          message=f"{n_regrouped} object(s) found as white cells were typed as platelets (giant platelets or "
                                  f"platelet clumps) and counted as platelets, not WBC: review the smear"))
    n_nrbc = wc["erythroblast"]
    if n_nrbc:
        flags.append(Flag(code="nucleated_rbc_present", severity="warning", message=f"{n_nrbc} nucleated red cells (erythroblasts) seen"))
    return Aggregates(counts, diff, morph, sizes, ratios, flags)
