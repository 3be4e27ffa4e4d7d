"""Which cells the analyzer did not decide and leaves to a technician, and why: one rule for the
report's `review` counts (service.analysis.aggregate), the review gallery's cells to review and a
verification's cells left unreviewed (service.station.review, service.station.clinic)."""

from __future__ import annotations

import logging
from collections import Counter

from smearscope.service.analysis.report import ReviewSummary

logger = logging.getLogger(__name__)

UNIDENTIFIED = "unidentified"
#: Labels a technician should see even when the head was confident (rare or critical calls:
#: schistocytes over 1 % point to a thrombotic microangiopathy, and their flag asks for review).
ATYPICAL_LABELS = frozenset({"atypical", "erythroblast", "ig", "sickle", "schistocyte"})
#: The reasons `review_reason` gives, as the report's `review` names its counts.
REASONS = ("wbc_unidentified", "wbc_atypical", "wbc_rare", "nrbc", "rbc_unidentified", "rbc_flagged")


def review_reason(kind: str, label: str | None, atypical: bool) -> str | None:
    """Why a cell of `kind` ("wbc", "rbc", ...) with the head's `label` awaits review, None when it
    needs none: unidentified first, then atypical, rare or critical calls (ATYPICAL_LABELS)."""
    if label != UNIDENTIFIED and label not in ATYPICAL_LABELS and not atypical:
        return None
    if kind == "wbc":
        return "wbc_atypical" if atypical or label == "atypical" else (
            "wbc_unidentified" if label == UNIDENTIFIED else "wbc_rare")
    if kind == "nrbc":
        return "nrbc"
    if kind == "rbc":
        return "rbc_unidentified" if label == UNIDENTIFIED else "rbc_flagged"
    return None  # a platelet has no label to review; an artefact was typed by a person


def review_summary(reasons: Counter[str], reviewed: int) -> ReviewSummary:
    """The report's `review`: the cells awaiting review per reason, and those a technician typed."""
    counts = {r: reasons.get(r, 0) for r in REASONS}
    return ReviewSummary(cells=sum(counts.values()), reviewed=reviewed, **counts)
