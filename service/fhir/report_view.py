"""What a report says about grades, NRBC and atypical cells, read in one place.

The report is gaining these fields (ICSH grades per morphology with their intervals, NRBC per
100 WBC, `atypical_wbc_present`, the size-not-assessable flag). Until a report carries one, the
value is derived here from what it has (shares, counts, flags) the way the analyzer will compute
it (service.analysis.morphology); once it does, the report's own value is used. The FHIR bundle
and the dashboard's live run state both read through this module.
"""

from __future__ import annotations

import logging

from smearscope.service.analysis.morphology import ICSH_THRESHOLDS, SIZE_BASED, icsh_grade
from smearscope.service.analysis.report import ClassShare, Report

logger = logging.getLogger(__name__)

SIZE_FLAG = "size_not_assessable_without_calibration"
NRBC_LABEL = "erythroblast"
NOT_ASSESSABLE = "not assessable"


def size_not_assessable(report: Report) -> bool:
    return bool(getattr(report, SIZE_FLAG, False)) or any(f.code == SIZE_FLAG for f in report.flags)


def grade(share: ClassShare) -> str | None:
    """The share's ICSH grade: the report's, else from its percentage (None: not graded)."""
    own = getattr(share, "grade", None)
    if own is not None:
        return str(own)
    return icsh_grade(share.label, share.percent) if share.label in ICSH_THRESHOLDS else None


def grade_interval(share: ClassShare) -> tuple[str, str] | None:
    """The grades at the ends of the share's 95 % interval (the report's, else derived)."""
    lo, hi = getattr(share, "grade_ci95_low", None), getattr(share, "grade_ci95_high", None)
    if lo is not None and hi is not None:
        return str(lo), str(hi)
    if share.label in ICSH_THRESHOLDS and share.ci95_low is not None and share.ci95_high is not None:
        return icsh_grade(share.label, share.ci95_low), icsh_grade(share.label, share.ci95_high)
    return None


def rbc_grades(report: Report) -> dict[str, str]:
    """Grade per red-cell morphology; size-based ones 'not assessable' without calibration."""
    no_size = size_not_assessable(report)
    out = {}
    for share in report.rbc_morphology:
        g = NOT_ASSESSABLE if no_size and share.label in SIZE_BASED else grade(share)
        if g is not None:
            out[share.label] = g
    return out


def nrbc_per_100_wbc(report: Report) -> tuple[float, int, int] | None:
    """(NRBC per 100 leukocytes, NRBC counted, leukocytes counted), or None when not measurable.

    Leukocytes are the cells found as white cells less the nucleated red cells among them."""
    counts = {s.label: s.count for s in report.wbc_differential}
    nrbc = counts.get(NRBC_LABEL, 0)
    leukocytes = report.counts.wbc - nrbc
    own = getattr(report, "nrbc_per_100_wbc", None)
    if own is not None:
        return float(own), nrbc, leukocytes
    if NRBC_LABEL not in counts or leukocytes <= 0:
        return None
    return round(100.0 * nrbc / leukocytes, 2), nrbc, leukocytes


def atypical_wbc_present(report: Report) -> bool | None:
    value = getattr(report, "atypical_wbc_present", None)
    return None if value is None else bool(value)
