"""Stage 9: counts, WBC differential with confidence intervals, RBC morphology, size, ratios, flags.

Works on any list of classified cells (`aggregate`) through a tally of what it reads
(`CellTally`), so a specimen report is the same tally kept over the cells of all its fields as
they arrive.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from smearscope.service.analysis.classify import UNIDENTIFIED
from smearscope.service.analysis.morphology import (
    GRADED,
    REPORTED_PRESENT,
    SIZE_BASED,
    icsh_grade,
    size_distribution,
)
from smearscope.service.analysis.records import (
    ARTEFACT,
    KIND_FROM_HEAD_LABEL,
    CellKind,
    ClassifiedCell,
)
from smearscope.service.analysis.report import (
    ClassShare,
    Counts,
    Flag,
    ModelInfo,
    ReviewSummary,
    SizeHistogram,
    SizeStats,
)
from smearscope.service.analysis.review_counts import review_reason, review_summary
from smearscope.service.analysis.wording import counted

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (as fractions); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the ends (0 of n reaches down to 0, n of n up to 1): rounding left 5e-17 above 0,
    # which an ICSH bound "above 0 %" (schistocytes, sickle cells) reads as 1+
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def share_rows(c: Counter[str], of: int | None = None) -> list[ClassShare]:
    """Each label's count and percent (of `of` cells when given, else of the counted labels); a label
    counted 0 is a row of 0 % with its interval (from 0), none when there is nothing to be a share of."""
    n = sum(c.values()) if of is None else of
    if not n:
        return []
    out = []
    for label, k in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])):
        lo, hi = wilson_interval(k, n)
        out.append(ClassShare(label=label, count=k, percent=round(100.0 * k / n, 2),
                              ci95_low=outward(100 * lo, -1), ci95_high=outward(100 * hi, 1), of_cells=of))
    return out


def outward(percent: float, side: int, decimals: int = 2) -> float:
    """An interval bound at `decimals` rounded away from the interval's inside (`side` -1: the low bound
    down, 1: the high bound up), so an interval never claims more certainty than the count has: 0 of
    100 000 cells is 0.00-0.01 %, not 0.00-0.00 (the report, two decimals; every view reads the report's bounds
    again at one, service.fhir.report_view.interval_shown). A bound already on that grid, within float noise
    (read to a millionth of a step: 0.3 is 3.0000000000000004 tenths in binary), stays on it."""
    scale = 10 ** decimals
    scaled = round(percent * scale, 6)
    return (math.floor(scaled) if side < 0 else math.ceil(scaled)) / scale


def size_stats(diameters: Sequence[float]) -> SizeStats:
    """Red-cell diameters at a calibrated scale: mean, SD, CV (of diameters, not an RDW), median and a histogram."""
    dist = size_distribution(diameters)
    d = np.asarray(diameters, float)
    d = d[np.isfinite(d)]  # as the distribution's mean and SD
    return SizeStats(n=dist.n, mean_diameter_um=dist.mean_um, sd_um=dist.sd_um, cv_percent=dist.cv_percent,
                     median_diameter_um=round(float(np.median(d)), 3) if d.size else None, calibrated=True,
                     histogram=SizeHistogram(bin_edges_um=list(dist.bin_edges_um), counts=list(dist.counts)))


def sizes_not_assessed(n: int) -> SizeStats:
    """`n` red cells at an estimated scale: their sizes are circular (the scale came from them) and
    are left out."""
    return SizeStats(n=n, mean_diameter_um=None, sd_um=None, cv_percent=None, median_diameter_um=None,
                     calibrated=False)


#: Median red-cell diameter (um, calibrated scale) any blood has: normal cells 6 to 9 um; the
#: median of a microcytic or spherocytic smear stays above 5, a macrocytic one's below 10.5. Outside
#: it the calibration is wrong (a scale 2x off reads 15 or 3.7 um).
PLAUSIBLE_RBC_DIAMETER_UM = (5.0, 10.5)
#: Whole red cells measured before the median is judged.
MIN_RBC_FOR_SIZE_CHECK = 20
#: The flag a median outside PLAUSIBLE_RBC_DIAMETER_UM raises.
RBC_SIZE_IMPLAUSIBLE = "rbc_size_implausible"
#: The flag a field raises when its red cells point far from the calibration (service.analysis.calibration_check).
CALIBRATION_SUSPECT = "calibration_suspect"
#: The flag a station puts on calibrated reports while its fields' checks, over many runs, point
#: away from the calibration (service.station.calibration_watch).
CALIBRATION_DRIFT_SUSPECTED = "calibration_drift_suspected"
#: Flags that put a calibrated scale in doubt: sizes and size-based morphology are not to be read.
CALIBRATION_DOUBT_FLAGS = (RBC_SIZE_IMPLAUSIBLE, CALIBRATION_SUSPECT, CALIBRATION_DRIFT_SUSPECTED)


def sizes_in_doubt(rows: Sequence[ClassShare], flags: Sequence[Flag]) -> list[ClassShare]:
    """`rows` with their size-based classes not assessable (no grade; count and share kept for
    audit) when `flags` put the calibration in doubt, as every reader of the report treats them.
    Every size-based class is then listed, a class no cell was given with a count of 0 (as at an
    estimated scale): no row would read as "none seen", which no one can say at an unknown scale."""
    if not any(f.code in CALIBRATION_DOUBT_FLAGS for f in flags):
        return list(rows)
    off = {"assessable": False, "grade": None, "grade_ci_low": None, "grade_ci_high": None}
    return [r.model_copy(update=off) if r.label in SIZE_BASED else r for r in rows] + unlisted_size_rows(rows)


def unlisted_size_rows(rows: Sequence[ClassShare]) -> list[ClassShare]:
    """A not-assessable row with a count of 0 for each size-based class `rows` lack."""
    listed = {r.label for r in rows}
    return [ClassShare(label=label, count=0, percent=0.0, assessable=False) for label in sorted(SIZE_BASED - listed)]


def head_classes(models: Mapping[str, ModelInfo] | None, role: str) -> tuple[str, ...]:
    """The classes the head in `role` can call (its manifest's, recorded in the report's models),
    less those counted apart from its kind (erythroblast as NRBC, platelet as platelets: they are
    no row of the differential) and artefact; none when the models do not record them."""
    info = (models or {}).get(role)
    return tuple(c for c in (info.classes or []) if c not in KIND_FROM_HEAD_LABEL and c != ARTEFACT) if info else ()


def with_zeros(c: Counter[str], labels: Iterable[str]) -> Counter[str]:
    """`c` with a count of 0 for each of `labels` it lacks: a differential lists every class that
    was looked for, a class no cell was given at 0 % (a result, not "not done")."""
    out = Counter(c)
    for label in labels:
        out.setdefault(label, 0)
    return out


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
    #: `schistocytes_present`: more than 1 % schistocytes (ICSH 2021) and at least this many cells,
    #: counting the calls at or above this confidence (they are also what the grade rests on).
    schistocyte_min_cells: int = 3
    schistocyte_min_confidence: float = 0.6


@dataclass(frozen=True)
class Aggregates:
    counts: Counts
    wbc_differential: list[ClassShare]
    rbc_morphology: list[ClassShare]
    rbc_size: SizeStats
    ratios: dict[str, float | None]
    flags: list[Flag]
    nrbc_per_100_wbc: float | None = None
    review: ReviewSummary | None = None


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


class CellTally:
    """What `aggregate` reads of a list of cells, accumulated in one pass. A specimen run adds each
    field's cells once (`extend`), so its interim report costs the new field's cells, not every cell
    of the run again (at 300 red cells a field, 0.36 s a report after 1000 fields re-reading them).
    Cells are only ever appended: indices in the flags are positions in that list."""

    def __init__(self) -> None:
        self.of: list[ClassifiedCell] | None = None  # the list `caught_up` follows
        self.n = 0
        self.kinds: Counter[CellKind] = Counter()
        self.wbc_labels: Counter[str] = Counter()
        self.rbc_labels: Counter[str] = Counter()  # red cells whose shape was judged
        self.blurred_labels: Counter[str] = Counter()  # red cells of fields too blurred to judge (rbc_focus)
        self.n_calibrated_judged = 0  # whole red cells at a calibrated scale whose shape was judged: sized ones
        self.unassessed: Counter[str] = Counter()  # red cells' size calls held back (estimated scale, cut cell)
        self.n_calibrated = 0  # red cells at a calibrated scale
        self.diameters_calibrated: list[float] = []  # red cells off the frame edge, calibrated scale
        self.n_sized_estimated = 0  # red cells off the frame edge at an estimated scale
        self.unidentified_wbc: list[int] = []
        self.atypical_wbc = 0
        self.sickle: list[tuple[int, float]] = []  # (index, head confidence)
        self.sickle_typed = 0  # sickle cells a technician typed (verified run): confirmed
        self.schistocytes: list[tuple[int, float]] = []  # (index, head confidence)
        self.regrouped_platelets: list[int] = []  # found as white cells, typed as platelets
        self.nrbc: list[int] = []
        self.review: Counter[str] = Counter()  # cells awaiting review, per reason (review_counts)
        self.reviewed = 0  # cells a technician typed (verified run): reviewed, awaiting nothing

    def extend(self, cells: Iterable[ClassifiedCell]) -> CellTally:
        i = self.n
        for c in cells:
            kind = c.detection.kind
            self.kinds[kind] += 1
            self.reviewed += c.typed
            if not c.typed and (reason := review_reason(kind.value, c.label, c.atypical)) is not None:
                self.review[reason] += 1
            if kind is CellKind.RBC:
                label = c.label or UNIDENTIFIED
                if c.size_calibrated:
                    self.n_calibrated += 1
                    if not c.touches_frame_edge:
                        self.diameters_calibrated.append(c.diameter_um)
                elif not c.touches_frame_edge:
                    self.n_sized_estimated += 1
                if not c.shape_judged:  # counted and sized; its type kept for audit, in no grade or flag
                    self.blurred_labels[label] += 1
                    i += 1
                    continue
                self.rbc_labels[label] += 1
                # a cell the frame cuts has no size to read: no size-based type (service.analysis.pipeline);
                # one stored with a size call before (a run analysed by an earlier version) stays in that share
                self.n_calibrated_judged += c.size_calibrated and (not c.touches_frame_edge or label in SIZE_BASED)
                if c.unassessed_label:
                    self.unassessed[c.unassessed_label] += 1
                if label == "sickle":
                    self.sickle.append((i, c.label_score or 0.0))
                    self.sickle_typed += c.typed
                elif label == "schistocyte":
                    self.schistocytes.append((i, c.label_score or 0.0))
            elif kind is CellKind.WBC:
                self.wbc_labels[c.label or UNIDENTIFIED] += 1
                if not is_classified_wbc(c):
                    self.unidentified_wbc.append(i)
                    self.atypical_wbc += bool(c.atypical)
            elif kind is CellKind.PLATELET:
                if c.detected_as is CellKind.WBC:
                    self.regrouped_platelets.append(i)
            elif kind is CellKind.NRBC:
                self.nrbc.append(i)
            i += 1
        self.n = i
        return self

    @classmethod
    def caught_up(cls, tally: CellTally | None, cells: list[ClassifiedCell]) -> CellTally:
        """`tally` with the cells of `cells` past those it counted (a list only ever appended to);
        a new tally when `tally` counted another list (a copy of a run with other cells)."""
        if tally is None or tally.of is not cells or len(cells) < tally.n:
            tally = cls()
            tally.of = cells
        return tally.extend(cells[tally.n:]) if len(cells) > tally.n else tally

    def aggregates(self, th: AggregateThresholds = AggregateThresholds(),
                   models: Mapping[str, ModelInfo] | None = None) -> Aggregates:
        """The aggregates; with `models` recording their heads' classes, the differential lists each
        class of the WBC head's and the morphology each graded class of the RBC head's, 0 where no cell
        was given it (`head_classes`)."""
        n_rbc, n_wbc = self.kinds[CellKind.RBC], self.kinds[CellKind.WBC]
        n_plt, n_nrbc = self.kinds[CellKind.PLATELET], self.kinds[CellKind.NRBC]
        counts = Counts(rbc=n_rbc, wbc=n_wbc, platelet=n_plt, nrbc=n_nrbc, artefact=self.kinds[CellKind.ARTEFACT])
        diff = share_rows(with_zeros(self.wbc_labels, head_classes(models, "wbc_head")))
        morph = self.morphology(th, tuple(c for c in head_classes(models, "rbc_head") if c in GRADED))
        # diameters are measured only where the scale was calibrated (in a mixed run: those fields' cells)
        sizes = (size_stats(self.diameters_calibrated) if self.n_calibrated
                 else sizes_not_assessed(self.n_sized_estimated))
        wc = self.wbc_labels
        ratios = {
            "neutrophil_lymphocyte": _ratio(wc["neutrophil"], wc["lymphocyte"]),
            "platelet_rbc": _ratio(n_plt, n_rbc),
            "wbc_rbc": _ratio(n_wbc, n_rbc),
        }
        flags: list[Flag] = []
        if not self.n:
            flags.append(Flag(code="no_cells_found", severity="warning", message="no cells were detected in this image"))
        typed = n_wbc - len(self.unidentified_wbc)  # a differential needs typed cells: unidentified ones go to review
        if typed < th.min_wbc_for_differential:
            flags.append(Flag(code="too_few_wbc_for_differential", severity="info",
                              message=f"{typed} WBC classified ({n_wbc - typed} more unidentified); a differential "
                                      f"needs at least {th.min_wbc_for_differential}"))
        n_judged = self.n_judged
        if 0 < n_judged < th.min_rbc_for_morphology:
            judged = f" of {n_rbc} counted (the others too blurred)" if n_judged < n_rbc else " counted"
            flags.append(Flag(code="too_few_rbc_for_morphology", severity="info",
                              message=f"{counted(n_judged, 'red cell')}{judged}; morphology grades need at least "
                                      f"{th.min_rbc_for_morphology} (read them with their intervals, or over the specimen)"))
        median = sizes.median_diameter_um
        if sizes.calibrated and sizes.n >= MIN_RBC_FOR_SIZE_CHECK and median is not None and not (
                PLAUSIBLE_RBC_DIAMETER_UM[0] <= median <= PLAUSIBLE_RBC_DIAMETER_UM[1]):
            low, high = PLAUSIBLE_RBC_DIAMETER_UM
            flags.append(Flag(code=RBC_SIZE_IMPLAUSIBLE, severity="warning",
                              message=f"red cells measure a median {median:.1f} um at the calibrated scale ({sizes.n} "
                                      f"whole cells), where blood's lie between {low:g} and {high:g} um even in micro- "
                                      "or macrocytic anaemia: check the station's calibration (smearscope "
                                      "calibrate-scale) before reading sizes and size-based morphology"))
        for name, labels, n in (("wbc", self.wbc_labels, n_wbc), ("rbc", self.rbc_labels, n_judged)):
            if n:
                frac = labels[UNIDENTIFIED] / n
                if frac > th.max_unidentified_fraction:  # white cells: atypical ones (open set) too
                    why = " or were unlike any trained type" if name == "wbc" else ""
                    flags.append(Flag(code=f"many_unidentified_{name}", severity="warning",
                                      message=f"{100 * frac:.0f}% of {name.upper()} could not be classified with "
                                              f"confidence{why}: review"))
        flags += self._evidence_flags(th)
        nrbc_100 = round(100.0 * n_nrbc / n_wbc, 2) if n_wbc else None
        return Aggregates(counts, diff, morph, sizes, ratios, flags, nrbc_100,
                          review_summary(self.review, self.reviewed))

    @property
    def n_judged(self) -> int:
        """Red cells whose shape was judged (all but those of fields too blurred: service.analysis.rbc_focus)."""
        return self.kinds[CellKind.RBC] - sum(self.blurred_labels.values())

    def morphology(self, th: AggregateThresholds, graded: Sequence[str] = ()) -> list[ClassShare]:
        """RBC morphology shares with ICSH grades (and the grades at the ends of the 95 % interval;
        sickle cells "present" or "none", with no interval's grades: service.analysis.morphology).

        Size-based classes at an estimated scale are listed as not assessable, with the number of
        cells the head would have given them (those cells are counted under their shape class). Where
        only some cells could be sized, whole ones at a calibrated scale (cells cut by the frame's
        edge; a specimen run that took a field without a calibration), size-based classes are shares
        of those cells alone (`of_cells`), shape classes of all.

        Red cells of fields too blurred to judge their shape are in no share: the rows are of the
        other red cells (`of_cells`), and where every red cell was blurred, each row is their count
        and share, not assessable and without a grade.

        Each of the `graded` classes no judged cell was given is a row of 0, graded "none" (size-based
        ones only where some cell could be sized: at an estimated scale they are listed not assessable)."""
        n_rbc, n_calibrated = self.n_judged, self.n_calibrated_judged
        if not n_rbc and self.blurred_labels:
            off = {"assessable": False, "grade": None, "grade_ci_low": None, "grade_ci_high": None}
            blurred = [r.model_copy(update=off) for r in share_rows(self.blurred_labels)]
            return blurred + self._size_rows_unassessed() if not self.n_calibrated else blurred
        labels = with_zeros(self.rbc_labels, [c for c in graded if n_calibrated or c not in SIZE_BASED])
        mixed = 0 < n_calibrated < n_rbc
        if mixed:  # a size-based label is only ever given to a whole cell at a calibrated scale
            rows = share_rows(Counter({k: v for k, v in labels.items() if k not in SIZE_BASED}), of=n_rbc)
            rows += share_rows(Counter({k: v for k, v in labels.items() if k in SIZE_BASED}), of=n_calibrated)
            rows = [r.model_copy(update={"of_cells": r.of_cells if r.label in SIZE_BASED else None}) for r in rows]
            rows.sort(key=lambda r: (-r.count, r.label))
        else:
            rows = share_rows(labels)
        # a sickle or schistocyte call graded only when the head was as sure as its flag needs: one
        # unsure call must not print "sickle cells present" (it is listed for review by the flag instead)
        sure = {"sickle": self.sure_sickle(th), "schistocyte": self.sure_schistocytes(th)}
        out = []
        for share in rows:
            if share.label in GRADED:  # graded on the exact share, not the rounded percent
                of = share.of_cells or n_rbc  # every red cell is in one row
                k = sure.get(share.label, share.count)
                lo, hi = wilson_interval(k, of)
                ends = (None, None) if share.label in REPORTED_PRESENT else (
                    icsh_grade(share.label, 100.0 * lo), icsh_grade(share.label, 100.0 * hi))
                share = share.model_copy(update={
                    "grade": icsh_grade(share.label, 100.0 * k / of),
                    "grade_ci_low": ends[0], "grade_ci_high": ends[1],
                    "graded_count": k if k != share.count else None})
            if self.blurred_labels and share.of_cells is None:  # a share of the sharp fields' red cells
                share = share.model_copy(update={"of_cells": n_rbc})
            out.append(share)
        if n_rbc and n_calibrated == 0:
            out += self._size_rows_unassessed()
        return out

    def _size_rows_unassessed(self) -> list[ClassShare]:
        """Each size-based class at an estimated scale: not assessable, with the cells the head gave it."""
        return [ClassShare(label=label, count=self.unassessed.get(label, 0), percent=0.0, assessable=False)
                for label in sorted(SIZE_BASED)]

    def sure_sickle(self, th: AggregateThresholds) -> int:
        """Sickle calls at or above the confidence the critical flag (and the grade) need."""
        return sum(score >= th.sickle_min_confidence for _, score in self.sickle)

    def sure_schistocytes(self, th: AggregateThresholds) -> int:
        """Schistocyte calls at or above the confidence the flag (and the grade) need."""
        return sum(score >= th.schistocyte_min_confidence for _, score in self.schistocytes)

    def _evidence_flags(self, th: AggregateThresholds) -> list[Flag]:
        """Flags proportionate to evidence, each listing its cells (indices into the cells) for review."""
        flags: list[Flag] = []
        n_rbc, n_wbc = self.kinds[CellKind.RBC], self.kinds[CellKind.WBC]
        unid, n_calibrated = self.unidentified_wbc, self.n_calibrated
        if n_wbc and len(unid) >= th.atypical_wbc_min_count and len(unid) / n_wbc >= th.atypical_wbc_share:
            flags.append(Flag(code="atypical_wbc_present", severity="warning", cells=list(unid),
                              message=f"{len(unid)} of {counted(n_wbc, 'white cell')} ({100 * len(unid) / n_wbc:.0f}%) could not be "
                                      f"typed ({self.atypical_wbc} unlike any trained type): blasts or other abnormal cells "
                                      "are possible; review the smear"))
        sickle = [i for i, _ in self.sickle]
        n, n_sure, typed = len(sickle), self.sure_sickle(th), self.sickle_typed
        at = f"at confidence {th.sickle_min_confidence:g} or more"
        # in a verified run the cells a technician typed sickle are confirmed, not left for review
        sure = f"{n_sure} {at}" if not typed else f"{typed} confirmed by a technician" + (
            f", {n_sure - typed} more {at}" if n_sure > typed else "")
        if n_sure >= th.sickle_critical_min_cells:
            left = "" if typed == n else ": review the others" if typed else ": review"
            flags.append(Flag(code="sickle_cells_present", severity="critical", cells=sickle,
                              message=f"{counted(n, 'sickle cell')} seen ({sure}){left}"))
        elif sickle:
            left = "" if typed == n else ": review the others" if typed else ": review the listed cells"
            flags.append(Flag(code="sickle_cells_review", severity="warning", cells=sickle,
                              message=f"{counted(n, ('' if typed == n else 'possible ') + 'sickle cell')}, {sure}, fewer than the "
                                      f"{th.sickle_critical_min_cells} a critical flag needs{left}"))
        schisto, n_sure = [i for i, _ in self.schistocytes], self.sure_schistocytes(th)
        n_judged = self.n_judged
        if n_judged and n_sure >= th.schistocyte_min_cells and n_sure / n_judged > 0.01:
            flags.append(Flag(code="schistocytes_present", severity="warning", cells=schisto,
                              message=f"schistocytes {100 * n_sure / n_judged:.1f}% of red cells at confidence "
                                      f"{th.schistocyte_min_confidence:g} or more ({len(schisto)} called in all; over 1%: "
                                      "suspicious of a thrombotic microangiopathy): review"))
        if self.regrouped_platelets:
            flags.append(Flag(code="platelet_clumps_suspected", severity="warning", cells=list(self.regrouped_platelets),
                              message=f"{counted(len(self.regrouped_platelets), 'object')} found as white cells "
                                      f"{'was' if len(self.regrouped_platelets) == 1 else 'were'} typed as "
                                      "platelets (giant platelets or platelet clumps) and counted as platelets, not WBC: "
                                      "review the smear"))
        if self.nrbc:
            flags.append(Flag(code="nucleated_rbc_present", severity="warning", cells=list(self.nrbc),
                              message=f"{counted(len(self.nrbc), 'nucleated red cell')} (erythroblast"
                                      f"{'s' if len(self.nrbc) != 1 else ''}) seen, counted apart from the white cells"))
        if n_rbc and 0 < n_calibrated < n_rbc:
            flags.append(Flag(code="sizes_from_calibrated_fields_only", severity="info",
                              message=f"{n_rbc - n_calibrated} of {counted(n_rbc, 'red cell')} came from fields at an estimated "
                                      f"scale: microcytes, macrocytes, spherocytes and red-cell sizes are from the "
                                      f"{counted(n_calibrated, 'red cell')} of the calibrated fields only"))
        elif n_rbc and n_calibrated == 0:
            flags.append(Flag(code="size_not_assessable_without_calibration", severity="info",
                              message="the scale was estimated from the red cells themselves, so microcytes, macrocytes and "
                                      "spherocytes cannot be judged and red-cell sizes are not reported; calibrate the station "
                                      "(smearscope calibrate-scale) to assess them"))
        return flags


def is_classified_wbc(cell: ClassifiedCell) -> bool:
    """A white cell the head named with confidence (unidentified cells go to review, not count)."""
    return cell.detection.kind is CellKind.WBC and cell.label not in (None, UNIDENTIFIED)


def aggregate(cells: Sequence[ClassifiedCell], th: AggregateThresholds = AggregateThresholds(),
              models: Mapping[str, ModelInfo] | None = None) -> Aggregates:
    """A field's (or any list of cells') aggregates: `CellTally` over the cells at once."""
    return CellTally().extend(cells).aggregates(th, models)
