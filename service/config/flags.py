"""`[flags]`: how much evidence each report flag needs (service.analysis.aggregate)."""

from __future__ import annotations

from pydantic import Field

from smearscope.service.config.base import StationBaseModel


class FlagsConfig(StationBaseModel):
    """Evidence thresholds of the report flags; the defaults follow the model card's measurements."""

    min_wbc_for_differential: int = Field(
        default=100, ge=1, le=1000, title="WBC for a differential",
        description="Below this many typed white cells (unidentified ones, sent to review, do not count) a "
        "report says the differential is not yet reliable (too_few_wbc_for_differential).")
    min_rbc_for_morphology: int = Field(
        default=200, ge=1, le=100_000, title="Red cells for morphology grades",
        description="Below this many red cells a report says its morphology grades rest on too few cells.")
    max_unidentified_fraction: float = Field(
        default=0.1, gt=0.0, le=1.0, title="Unidentified share for 'many_unidentified'",
        description="Share of white or red cells the heads could not type above which the report says so.")
    atypical_wbc_min_count: int = Field(
        default=3, ge=1, title="Atypical WBC: minimum count",
        description="`atypical_wbc_present` needs at least this many untyped white cells ...")
    atypical_wbc_share: float = Field(
        default=0.10, gt=0.0, le=1.0, title="Atypical WBC: minimum share",
        description="... and at least this share of the white cells (normal smears from a new lab send a few "
        "per cent to review; a leukaemic smear far more).")
    sickle_critical_min_cells: int = Field(
        default=5, ge=1, title="Sickle cells for the critical flag",
        description="`sickle_cells_present` (critical) needs this many sickle cells at or above "
        "sickle_min_confidence over the specimen; fewer raise `sickle_cells_review` with the cells listed.")
    sickle_min_confidence: float = Field(
        default=0.8, gt=0.0, le=1.0, title="Sickle confidence",
        description="Calibrated head confidence a sickle cell needs to count toward the critical flag.")
    schistocyte_min_cells: int = Field(
        default=3, ge=1, title="Schistocytes for the flag",
        description="`schistocytes_present` needs more than 1 % schistocytes (ICSH) and at least this many cells, "
        "counting the calls at or above schistocyte_min_confidence.")
    schistocyte_min_confidence: float = Field(
        default=0.6, gt=0.0, le=1.0, title="Schistocyte confidence",
        description="Calibrated head confidence a schistocyte call needs to count toward `schistocytes_present` and "
        "the schistocyte grade (the count keeps every call; all go to review). Chosen on validation: BCCD val, a "
        "normal-looking lab, had 2.5 % of its red cells typed schistocyte and 0.8 % at 0.6 (ICSH's flag is over 1 %), "
        "while 110 of the head's 117 right schistocyte calls on Chula val were at 0.6 or above.")
