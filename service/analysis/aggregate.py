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
from smearscope.service.analysis.morphology import (
    ICSH_THRESHOLDS,
    SIZE_BASED,
    icsh_grade,
    size_distribution,
)
from smearscope.service.analysis.records import CellKind, ClassifiedCell
from smearscope.service.analysis.report import ClassShare, Counts, Flag, SizeHistogram, SizeStats

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


def shares(labels: Iterable[str], with_ci: bool, of: int | None = None) -> list[ClassShare]:
    """Each label's count and percent (of `of` cells when given, else of the labels)."""
    c = Counter(labels)
    n = sum(c.values()) if of is None else of
    out = []
    for label, k in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])):
        lo, hi = wilson_interval(k, n) if with_ci else (None, None)
        out.append(ClassShare(label=label, count=k, percent=round(100.0 * k / n, 2),
                              ci95_low=None if lo is None else round(100 * lo, 2),
                              ci95_high=None if hi is None else round(100 * hi, 2), of_cells=of))
    return out


def size_stats(diameters: Sequence[float], calibrated: bool) -> SizeStats:
    """Red-cell diameters: mean, SD, CV (RDW-like), median and a histogram, from a calibrated scale
    only. With an estimated scale the sizes are circular (the scale came from them) and are left out."""
    if not calibrated:
        return SizeStats(n=len(diameters), mean_diameter_um=None, sd_um=None, cv_percent=None, median_diameter_um=None,
                         calibrated=False)
    dist = size_distribution(diameters)
    d = np.asarray(diameters, float)
    return SizeStats(n=dist.n, mean_diameter_um=dist.mean_um, sd_um=dist.sd_um, cv_percent=dist.cv_percent,
                     median_diameter_um=round(float(np.median(d)), 3) if d.size else None, calibrated=True,
                     histogram=SizeHistogram(bin_edges_um=list(dist.bin_edges_um), counts=list(dist.counts)))


@dataclass(frozen=True)
class AggregateThresholds:
    min_wbc_for_differential: int = 100
    #: Below this many counted red cells the morphology grades rest on too few to be read alone.
    min_rbc_for_morphology: int = 200
    max_unidentified_fraction: float = 0.1
    #: `atypical_wbc_present` needs at least this many unidentified white cells AND this share.
    atypical_wbc_min_count: int = 3
    atypical_wbc_share: float = 0.10
    #: `sickle_cells_present` (critical) needs this many sickle cells at or above this confidence;
    #: fewer (or less confident) ones raise `sickle_cells_review` with the cells listed.
    sickle_critical_min_cells: int = 5
    sickle_min_confidence: float = 0.8
    #: `schistocytes_present`: more than 1 % schistocytes (ICSH 2021) and at least this many cells.
    schistocyte_min_cells: int = 3


@dataclass(frozen=True)
class Aggregates:
    counts: Counts
    wbc_differential: list[ClassShare]
    rbc_morphology: list[ClassShare]
    rbc_size: SizeStats
    ratios: dict[str, float | None]
    flags: list[Flag]
    nrbc_per_100_wbc: float | None = None


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def morphology(rbc: Sequence[ClassifiedCell], n_calibrated: int) -> list[ClassShare]:
    """RBC morphology shares with ICSH grades (and the grades at the ends of the 95 % interval).

    Size-based classes at an estimated scale are listed as not assessable, with the number of
    cells the head would have given them (those cells are counted under their shape class). Where
    only some cells were at a calibrated scale (a specimen run that took a field without one),
    size-based classes are shares of those cells alone (`of_cells`), shape classes of all.
    `n_calibrated`: how many of `rbc` were at a calibrated scale."""
    mixed = 0 < n_calibrated < len(rbc)
    rows = shares([c.label or UNIDENTIFIED for c in rbc if not (mixed and c.label in SIZE_BASED)], with_ci=True,
                  of=len(rbc) if mixed else None)
    if mixed:  # a size-based label is only ever given at a calibrated scale
        rows += shares([c.label for c in rbc if c.label in SIZE_BASED], with_ci=True, of=n_calibrated)
        rows = [r.model_copy(update={"of_cells": r.of_cells if r.label in SIZE_BASED else None}) for r in rows]
        rows.sort(key=lambda r: (-r.count, r.label))
    out = []
    for share in rows:
        if share.label in ICSH_THRESHOLDS:  # graded on the exact share, not the rounded percent
            exact = 100.0 * share.count / (share.of_cells or len(rbc))  # every red cell is in one row
            share = share.model_copy(update={
                "grade": icsh_grade(share.label, exact),
                "grade_ci_low": icsh_grade(share.label, share.ci95_low or 0.0),
                "grade_ci_high": icsh_grade(share.label, share.ci95_high or 0.0)})
        out.append(share)
    if rbc and n_calibrated == 0:
        held = Counter(c.unassessed_label for c in rbc if c.unassessed_label)
        for label in sorted(SIZE_BASED):
            out.append(ClassShare(label=label, count=held.get(label, 0), percent=0.0, assessable=False))
    return out


def is_classified_wbc(cell: ClassifiedCell) -> bool:
    """A white cell the head named with confidence (unidentified cells go to review, not count)."""
    return cell.detection.kind is CellKind.WBC and cell.label not in (None, UNIDENTIFIED)


def _indices(cells: Sequence[ClassifiedCell], pick) -> list[int]:
    return [i for i, c in enumerate(cells) if pick(c)]


def aggregate(cells: Sequence[ClassifiedCell], th: AggregateThresholds = AggregateThresholds()) -> Aggregates:
    by_kind: dict[CellKind, list[ClassifiedCell]] = {k: [] for k in CellKind}
    for c in cells:
        by_kind[c.detection.kind].append(c)
    rbc, wbc, plt, nrbc = (by_kind[k] for k in (CellKind.RBC, CellKind.WBC, CellKind.PLATELET, CellKind.NRBC))
    counts = Counts(rbc=len(rbc), wbc=len(wbc), platelet=len(plt), nrbc=len(nrbc))
    wbc_labels = [c.label or UNIDENTIFIED for c in wbc]
    rbc_labels = [c.label or UNIDENTIFIED for c in rbc]
    n_calibrated = sum(c.size_calibrated for c in rbc)
    diff = shares(wbc_labels, with_ci=True)
    morph = morphology(rbc, n_calibrated)
    # diameters are measured only where the scale was calibrated (in a mixed run: those fields' cells)
    sized = [c for c in rbc if c.size_calibrated] or rbc
    sizes = size_stats([c.diameter_um for c in sized if not c.touches_frame_edge], sized[0].size_calibrated if sized else False)
    wc = Counter(wbc_labels)
    ratios = {
        "neutrophil_lymphocyte": _ratio(wc["neutrophil"], wc["lymphocyte"]),
        "platelet_rbc": _ratio(len(plt), len(rbc)),
        "wbc_rbc": _ratio(len(wbc), len(rbc)),
    }
    flags: list[Flag] = []
    if not cells:
        flags.append(Flag(code="no_cells_found", severity="warning", message="no cells were detected in this image"))
    typed = sum(map(is_classified_wbc, wbc))  # unidentified cells go to review: no differential counts them
    if typed < th.min_wbc_for_differential:
        flags.append(Flag(code="too_few_wbc_for_differential", severity="info",
                          message=f"{typed} WBC classified ({len(wbc) - typed} more unidentified); a differential "
                                  f"needs at least {th.min_wbc_for_differential}"))
    if 0 < len(rbc) < th.min_rbc_for_morphology:
        flags.append(Flag(code="too_few_rbc_for_morphology", severity="info",
                          message=f"{len(rbc)} red cells counted; morphology grades need at least "
                                  f"{th.min_rbc_for_morphology} (read them with their intervals, or over the specimen)"))
    for name, labels in (("wbc", wbc_labels), ("rbc", rbc_labels)):
        if labels:
            frac = labels.count(UNIDENTIFIED) / len(labels)
            if frac > th.max_unidentified_fraction:
                flags.append(Flag(code=f"many_unidentified_{name}", severity="warning",
                                  message=f"{100 * frac:.0f}% of {name.upper()} could not be classified with confidence: review"))
    flags += _evidence_flags(cells, wbc, rbc, plt, nrbc, n_calibrated, th)
    nrbc_100 = round(100.0 * len(nrbc) / len(wbc), 2) if wbc else None
    return Aggregates(counts, diff, morph, sizes, ratios, flags, nrbc_100)


def _evidence_flags(cells, wbc, rbc, plt, nrbc, n_calibrated: int, th: AggregateThresholds) -> list[Flag]:
    """Flags proportionate to evidence, each listing its cells (indices into `cells`) for review."""
    flags: list[Flag] = []
    # one pass for the three lists (a specimen's interim report runs this over every cell of the run)
    unid, sickle, schisto = [], [], []
    for i, c in enumerate(cells):
        kind = c.detection.kind
        if kind is CellKind.WBC and (c.label or UNIDENTIFIED) == UNIDENTIFIED:
            unid.append(i)
        elif kind is CellKind.RBC and c.label in ("sickle", "schistocyte"):
            (sickle if c.label == "sickle" else schisto).append(i)
    if wbc and len(unid) >= th.atypical_wbc_min_count and len(unid) / len(wbc) >= th.atypical_wbc_share:
        n_atyp = sum(cells[i].atypical for i in unid)
        flags.append(Flag(code="atypical_wbc_present", severity="warning", cells=unid,
                          message=f"{len(unid)} of {len(wbc)} white cells ({100 * len(unid) / len(wbc):.0f}%) could not be "
                                  f"typed ({n_atyp} unlike any trained type): blasts or other abnormal cells are possible; "
                                  "review the smear"))
    sure = [i for i in sickle if (cells[i].label_score or 0.0) >= th.sickle_min_confidence]
    if len(sure) >= th.sickle_critical_min_cells:
        flags.append(Flag(code="sickle_cells_present", severity="critical", cells=sickle,
                          message=f"{len(sickle)} sickle cells seen ({len(sure)} at confidence >= "
                                  f"{th.sickle_min_confidence}): review"))
    elif sickle:
        flags.append(Flag(code="sickle_cells_review", severity="warning", cells=sickle,
                          message=f"{len(sickle)} possible sickle cell(s), {len(sure)} at confidence >= "
                                  f"{th.sickle_min_confidence}, fewer than the {th.sickle_critical_min_cells} a critical "
                                  "flag needs: review the listed cells"))
    if rbc and len(schisto) >= th.schistocyte_min_cells and len(schisto) / len(rbc) > 0.01:
        flags.append(Flag(code="schistocytes_present", severity="warning", cells=schisto,
                          message=f"schistocytes {100 * len(schisto) / len(rbc):.1f}% of red cells (over 1%: suspicious of "
                                  "a thrombotic microangiopathy): review"))
    n_regrouped = sum(c.detected_as is CellKind.WBC for c in plt)
    if n_regrouped:
        flags.append(Flag(code="platelet_clumps_suspected", severity="warning",
                          cells=_indices(cells, lambda c: c.detection.kind is CellKind.PLATELET and c.detected_as is CellKind.WBC),
                          message=f"{n_regrouped} object(s) found as white cells were typed as platelets (giant platelets or "
                                  f"platelet clumps) and counted as platelets, not WBC: review the smear"))
    if nrbc:
        flags.append(Flag(code="nucleated_rbc_present", severity="warning",
                          cells=_indices(cells, lambda c: c.detection.kind is CellKind.NRBC),
                          message=f"{len(nrbc)} nucleated red cells (erythroblasts) seen, counted apart from the white cells"))
    if rbc and 0 < n_calibrated < len(rbc):
        flags.append(Flag(code="sizes_from_calibrated_fields_only", severity="info",
                          message=f"{len(rbc) - n_calibrated} of {len(rbc)} red cells came from fields at an estimated "
                                  f"scale: microcytes, macrocytes, spherocytes and red-cell sizes are from the "
                                  f"{n_calibrated} red cells of the calibrated fields only"))
    elif rbc and n_calibrated == 0:
        flags.append(Flag(code="size_not_assessable_without_calibration", severity="info",
                          message="the scale was estimated from the red cells themselves, so microcytes, macrocytes and "
                                  "spherocytes cannot be judged and red-cell sizes are not reported; calibrate the station "
                                  "(smearscope calibrate-scale) to assess them"))
    return flags
