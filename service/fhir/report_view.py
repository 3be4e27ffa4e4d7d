"""What a report says about grades, NRBC, atypical cells and sizes, read in one place.

Reports carry ICSH grades per morphology with the grades at their interval's ends, shares that
are not assessable (size-based at an estimated scale), NRBC per 100 WBC, the
`atypical_wbc_present` and `size_not_assessable_without_calibration` flags and a calibrated
diameter histogram. A report from before those fields (an older outbox, a stored file) has
none of them: then the grade is derived from the share with the analyzer's ICSH thresholds
(service.analysis.morphology) and NRBC from erythroblasts in the differential. Sickle cells are
reported present, never graded 1+ to 3+: a report from when they were graded reads "present"
for any such grade, with no interval's grades. The FHIR bundle, the text summary and the
dashboard's live run state all read through this module.
"""

from __future__ import annotations

import logging

from smearscope.service.analysis.aggregate import (
    CALIBRATION_DOUBT_FLAGS,
    outward,
    unlisted_size_rows,
)
from smearscope.service.analysis.classify import UNIDENTIFIED
from smearscope.service.analysis.morphology import (
    GRADED,
    PRESENT,
    REPORTED_PRESENT,
    SIZE_BASED,
    icsh_grade,
)
from smearscope.service.analysis.report import ClassShare, Report

logger = logging.getLogger(__name__)

SIZE_FLAG = "size_not_assessable_without_calibration"
#: A field's red cells too blurred to judge their shape (service.analysis.rbc_focus).
FOCUS_FLAG = "rbc_morphology_out_of_focus"
ATYPICAL_FLAG = "atypical_wbc_present"
#: The WBC head's NRBC class (older reports had it in the differential).
NRBC_LABEL = "erythroblast"
NOT_ASSESSABLE = "not assessable"


def size_not_assessable(report: Report) -> bool:
    """Sizes cannot be read: the scale was estimated, or the calibration is in doubt."""
    return report_flagged(report, SIZE_FLAG, *CALIBRATION_DOUBT_FLAGS)


def no_whole_rbc_sized(report: Report) -> bool:
    """Red cells counted at a calibrated scale, none whole to size (each cut by the image's edge):
    no size-based class can be judged, though the scale is known."""
    s = report.rbc_size
    return report.counts.rbc > 0 and s.calibrated and s.n == 0 and not calibration_in_doubt(report)


def calibration_in_doubt(report: Report) -> bool:
    """A calibrated scale no blood fits (rbc_size_implausible) or the red cells point away from
    (calibration_suspect; calibration_drift_suspected, over the station's runs): sizes are not read."""
    return report_flagged(report, *CALIBRATION_DOUBT_FLAGS)


def report_flagged(report: Report, *codes: str) -> bool:
    return any(f.code in codes for f in report.flags)


def morphology_rows(report: Report) -> list[ClassShare]:
    """The report's red-cell morphology rows, every size-based class among them when sizes cannot
    be assessed: a report from before each was listed then (service.analysis.aggregate.sizes_in_doubt)
    has no row for a class no cell was given, which would read as "none seen"."""
    rows = list(report.rbc_morphology)
    return rows + unlisted_size_rows(rows) if size_not_assessable(report) else rows


def assessable(report: Report, share: ClassShare) -> bool:
    """False for a size-based finding at an estimated scale, or of a report whose calibration is in
    doubt (rbc_size_implausible, calibration_suspect, calibration_drift_suspected): the share has no
    value then."""
    return share.assessable and not (share.label in SIZE_BASED and size_not_assessable(report))


def out_of_focus(report: Report, share: ClassShare) -> bool:
    """The row is not assessable because the red cells were too blurred to judge their shape (every
    row of a field flagged rbc_morphology_out_of_focus; of a specimen none of whose fields was sharp).
    A specimen with some sharp fields carries the flag too, its rows graded on those: a size-based
    row not assessable there is so for its sizes, as it is whatever the focus when they cannot be read."""
    if share.assessable or not report_flagged(report, FOCUS_FLAG):
        return False
    if share.label in SIZE_BASED and size_not_assessable(report):
        return False
    return not any(s.assessable for s in report.rbc_morphology)


def grade(share: ClassShare) -> str | None:
    """The share's ICSH grade: the report's, else from its percentage (None: not graded); a sickle
    row's "present" or "none", also where an older report graded it 1+ to 3+."""
    g = share.grade if share.grade is not None else (
        icsh_grade(share.label, share.percent) if share.label in GRADED else None)
    if share.label in REPORTED_PRESENT and g not in (None, "none"):
        return PRESENT
    return g


def grade_interval(share: ClassShare) -> tuple[str, str] | None:
    """The grades at the ends of the share's 95 % interval (the report's, else derived); None for
    sickle cells, reported present or not, never graded."""
    if share.label in REPORTED_PRESENT:
        return None
    if share.grade_ci_low is not None and share.grade_ci_high is not None:
        return share.grade_ci_low, share.grade_ci_high
    if share.label in GRADED and share.ci95_low is not None and share.ci95_high is not None:
        return icsh_grade(share.label, share.ci95_low), icsh_grade(share.label, share.ci95_high)
    return None


def shown_grade(label: str, grade: str) -> str:
    """A grade as a reader sees it: ICSH's "none" of a graded finding is a share below its 1+
    threshold (its cells still counted), so "below 1+"; a sickle row's "none" is no call at the
    critical flag's confidence, and there is no 1+ to be below."""
    return "below 1+" if grade == "none" and label not in REPORTED_PRESENT else grade


def rbc_grades(report: Report) -> dict[str, str]:
    """Grade per red-cell morphology; size-based ones 'not assessable' without calibration or with a
    calibration no blood fits."""
    out = {}
    for share in morphology_rows(report):
        g = grade(share) if assessable(report, share) else NOT_ASSESSABLE
        if g is not None:
            out[share.label] = g
    return out


def share_read(percent: float, count: int, of: int | None = None) -> tuple[str, float]:
    """A share of `count` cells of `of` as every view reads and sends it, at one decimal: ("", value), or where one
    decimal would say none or all, ("<", 0.1) for some cell's share that reads 0.0 and (">", 99.9) for one that
    reads 100.0 with not every cell of that type (9999 of 10 000). `of` None (NRBC per 100 white cells, which may
    pass 100): the first alone. runview.js shareText() reads them the same."""
    value = float(f"{percent:.1f}")
    if count and value == 0:
        return "<", 0.1
    if of is not None and count < of and value >= 100:
        return ">", 99.9
    return "", value


def differential_of(report: Report) -> int:
    """The white cells the differential's shares are of: its rows' counts together (a report from before NRBC were
    counted apart has them among its rows), which share_read() needs to tell 19 999 of 20 000 from every cell."""
    return sum(s.count for s in report.wbc_differential)


def share_text(percent: float, count: int, of: int | None = None) -> str:
    """share_read() as printed: '53.6', '<0.1', '>99.9'."""
    comparator, value = share_read(percent, count, of)
    return f"{comparator}{value:.1f}"


def interval_shown(low: float, high: float) -> tuple[float, float]:
    """A 95 % interval's bounds as every view reads them, at one decimal rounded outward (the lower down, the upper
    up): 0 of 10 000 red cells (0 to 0.04 %) reads 0.0 to 0.1, never 0.0 to 0.0, a certainty the count lacks.
    The rule of the report's own bounds (aggregate.outward), at one decimal."""
    return outward(low, -1, 1), outward(high, 1, 1)


def nrbc_per_100_wbc(report: Report) -> tuple[float, int, int] | None:
    """(NRBC per 100 white cells, NRBC counted, white cells counted), None when not measurable."""
    if report.nrbc_per_100_wbc is not None:
        return report.nrbc_per_100_wbc, report.counts.nrbc, report.counts.wbc
    counts = {s.label: s.count for s in report.wbc_differential}
    if NRBC_LABEL not in counts:  # a report from before NRBC were counted apart
        return None
    leukocytes = report.counts.wbc - counts[NRBC_LABEL]
    if leukocytes <= 0:
        return None
    return round(100.0 * counts[NRBC_LABEL] / leukocytes, 2), counts[NRBC_LABEL], leukocytes


def atypical_wbc_present(report: Report) -> bool:
    return report_flagged(report, ATYPICAL_FLAG)


def untyped_wbc(report: Report) -> int:
    """White cells the analyzer left untyped (the differential's unidentified row): for review."""
    return sum(s.count for s in report.wbc_differential if s.label == UNIDENTIFIED)


def awaiting_review(report: Report) -> str | None:
    """The cells awaiting a technician's review, in words ("41 white cells and 3 red cells await
    review", "no cell awaits review"); None for a report from before they were counted (schema
    1.4): not counted, which is not none."""
    rv = report.review
    if rv is None:
        return None
    groups = [(rv.wbc_unidentified + rv.wbc_atypical + rv.wbc_rare, "white cell"),
              (rv.nrbc, "nucleated red cell"), (rv.rbc_unidentified + rv.rbc_flagged, "red cell")]
    named = [f"{n} {what}{'' if n == 1 else 's'}" for n, what in groups if n]
    if not named:
        return "no cell awaits review"
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return f"{listed} {'awaits' if rv.cells == 1 else 'await'} review"


def review_reasons(report: Report) -> str:
    """What the cells awaiting review are, reason by reason ("38 white cells unidentified, 3 atypical")."""
    rv = report.review
    if rv is None:
        return ""
    parts = [(rv.wbc_unidentified, "white cell", " unidentified"), (rv.wbc_atypical, "white cell", " atypical"),
             (rv.wbc_rare, "white cell", " of a rare class (ig)"), (rv.nrbc, "nucleated red cell", ""),
             (rv.rbc_unidentified, "red cell", " unidentified"),
             (rv.rbc_flagged, "red cell", " called sickle or schistocyte")]
    return ", ".join(f"{n} {what}{'' if n == 1 else 's'}{how}" for n, what, how in parts if n)


def left_as_called(n: int) -> str:
    """Cells sent to review that no one typed before signing, as every view of a verified report says
    them ("3 cells left as the analyzer called them"; runview.js leftAsCalled, the same words)."""
    return f"{n} cell left as the analyzer called it" if n == 1 else f"{n} cells left as the analyzer called them"


def verified_review(report: Report) -> str:
    """A verified report's cells sent to review, in the one wording the summary, the dashboard (screen
    and paper) and the FHIR and HL7 conclusion use ("3 cells left as the analyzer called them (3 red
    cells called sickle or schistocyte); 44 typed by a technician", "every cell sent to review was
    typed; 44 typed by a technician"): the signature's own counts (`verification`), never "await
    review", which would read as cells still waiting. runview.js verifiedReview says the same."""
    v = report.verification
    if v is None:
        raise ValueError("verified_review of a report not verified")
    left, typed = v.left_to_review, v.typed_cells
    # the reasons where the report's review counts the same cells the signature left
    reasons = review_reasons(report) if report.review is not None and report.review.cells == left else ""
    text = (left_as_called(left) + (f" ({reasons})" if reasons else "") if left
            else "every cell sent to review was typed" if typed else "no cell was sent to review")
    return text + (f"; {typed} typed by a technician" if typed else "")


def review_line(report: Report, state: str = "Preliminary") -> str:
    """The line below a run's figures: a verified report's cells left and typed (verified_review); else
    the cells awaiting review and why, after `state` ("Preliminary", or "Interim" for an open run);
    a report from before they were counted says so (not 0). runview.js reviewText says the same."""
    if report.verification is not None:
        return "Verified: " + verified_review(report)
    text = awaiting_review(report)
    if text is None:
        return f"Cells awaiting review: not counted (report schema {report.schema_version})"
    reasons = review_reasons(report)
    return f"{state}: {text}" + (f" ({reasons})" if reasons else "")
