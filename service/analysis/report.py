"""Stage 10: the report, a pydantic model with a schema version and a committed JSON Schema.

`schemas/report.schema.json` is generated from this model (`smearscope schema --write`); a test
fails when the two differ, so consumers can rely on the file.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: "1.1": a morphology row's `grade` may read "present" (sickle cells are reported present or none, as
#: ICSH reports them). A "1.0" report is still read; it may grade sickle cells 1+ to 3+ (docs/MQTT.md).
#: "1.2": a report names the smearscope version that made it (`software_version`), and a specimen report
#: the lab's identifier of the specimen its run was started for (`specimen_id`, start_run).
#: "1.3": a report's models name the classes each can call (`classes`): its WBC differential lists each
#: class of the WBC head's and its morphology each graded class of the RBC head's, one no cell was given at 0.
#: "1.4": a report counts the cells that await a technician's review (`review`); absent in earlier reports.
#: "1.5": a specimen report names the smearscope versions that analysed its fields (`analysis_software`), which a
#: report verified after an update keeps (its `software_version` is the version that signed it).
SCHEMA_VERSION = "1.5"
#: A field stored by a station before it recorded which version analysed it (`analysis_software`).
NOT_RECORDED = "(not recorded)"


def analysed_in_order(field_software: list[str]) -> list[str]:
    """Each version that analysed one of a run's fields once, in the order of its latest field: the last one
    analysed most recently, however the station went back and forth between versions."""
    latest = {version: at for at, version in enumerate(field_software)}
    return sorted(latest, key=latest.__getitem__)
#: Longest specimen identifier (accession number, slide label) a run and its report may name.
MAX_SPECIMEN_ID = 64


@functools.cache
def software_version() -> str:
    """The installed smearscope's version, which every report names (what made this result)."""
    try:
        return version("smearscope")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ImageInfo(_Strict):
    width: int = Field(description="input image width in pixels")
    height: int = Field(description="input image height in pixels")


class SourceInfo(_Strict):
    frame_id: str
    source: str
    captured_at: float = Field(description="capture time, seconds since the epoch")
    image: ImageInfo


class ScaleInfo(_Strict):
    microns_per_pixel: float = Field(description="scale of the INPUT image")
    method: Literal["given", "rbc_size_classical", "rbc_size_detection", "specimen", "default"] = Field(
        description="given: calibrated (station config or frame); rbc_size_*: estimated from this field's red cells; "
                    "specimen: the scale the specimen's fields agree on, which replaced this field's own estimate "
                    "(service.analysis.specimen_scale, flag scale_from_specimen); default: nothing to measure")
    canonical_microns_per_pixel: float
    uncertain: bool = Field(False, description="estimated from the red cells but resting on a search, on few "
                            "cells or on a refinement that did not settle (flag scale_uncertain)")
    rbc_count: int = Field(0, description="whole red cells the estimate rests on (0 when given)")
    field_estimate_microns_per_pixel: float | None = Field(
        None, description="method specimen: this field's own estimate, which the specimen's scale replaced (none: the "
                          "field had no red cell to measure); method given, where the calibration was checked against "
                          "the field's red cells (a run's first fields): their own estimate (none: too few to "
                          "measure; flag calibration_suspect where it is far off)")


class IlluminationInfo(_Strict):
    applied: bool = Field(description="the field was divided by its own background (flat-field correction)")
    white_bgr: list[float] = Field(description="median background (glass) colour before correction, B G R 0-255")
    uniformity: float = Field(description="darkest / brightest background luminance over the field (1 = even)")
    greyscale: bool = Field(False, description="the input had no colour")
    reason: str | None = None


class RbcFocusInfo(_Strict):
    """How sharp the field's red cells are (service.analysis.rbc_focus)."""

    edge_width_um: float | None = Field(description="median width of the whole red cells' edge at the canonical "
                                        "scale (contrast against the glass over the steepest gradient across the "
                                        "outline): about 1 um in focus; null with too few whole red cells to judge")
    cells: int = Field(description="whole red cells the median is over")
    max_edge_width_um: float | None = Field(description="the bound above which the red cells' morphology is not "
                                            "graded (analysis.rbc_max_edge_width_um); null: not judged")
    judged: bool = Field(description="the red cells were sharp enough (or could not be judged) and their "
                         "morphology is graded; false: flag rbc_morphology_out_of_focus, morphology rows not assessable")


class StainInfo(_Strict):
    method: str
    applied: bool
    reason: str | None = None


class StationMeansInfo(_Strict):
    """The WBC head adapted to this station: white cells typed by the nearest of the station's own class means."""

    sha256: str = Field("", description="sha256 of the station means file (smearscope adapt-wbc wrote it)")
    cells: dict[str, int] = Field(description="typed cells per class the station's means were fitted on (other "
                                  "classes keep the head's trained mean)")
    leave_one_out_accuracy: float = Field(description="those cells typed right by the station means, each left out "
                                          "of its own class' mean")
    head_accuracy: float = Field(description="the same cells typed right by the head as trained")
    open_set_thresholds: dict[str, float] = Field(
        {}, description="per open-set test, its threshold with the station's typed cells (their quantile by the "
        "model's rule, where above the model's threshold); a test not named keeps the model's")
    fitted: str = Field("", description="when and on what (smearscope adapt-wbc)")


class ModelInfo(_Strict):
    name: str
    sha256: str = Field(description="sha256 of the model file (ONNX)")
    backend: str
    manifest_sha256: str | None = Field(
        None, description="sha256 of what the analyzer reads from the model's manifest (its calibration: temperature, "
        "prior shifts, test-time views, open-set thresholds; not its figures): a model recalibrated on the same file "
        "has another (engines.manifest.ModelManifest.runtime_sha256); absent in reports from before it was recorded")
    open_set_thresholds: dict[str, float] | None = Field(
        None, description="the WBC head's open-set thresholds where the station tightened them on its own normal "
        "specimens (smearscope calibrate-atypical); absent: the model's own")
    station_means: StationMeansInfo | None = Field(
        None, description="the WBC head types white cells by this station's own class means (smearscope "
        "adapt-wbc); absent: by the head as trained")
    classes: list[str] | None = Field(
        None, description="the classes the model can call, as its manifest lists them: the report's WBC differential "
        "lists each of the WBC head's (but those counted apart: erythroblast as NRBC, platelet as platelets) and its red "
        "cell morphology each graded class of the RBC head's, a class no cell was given with a count of 0; absent in "
        "reports from before it was recorded (their rows list only the classes some cell was given)")


class CellRecord(_Strict):
    kind: Literal["rbc", "wbc", "platelet", "nrbc", "artefact"]
    bbox: list[float] = Field(description="[x0, y0, x1, y1] in the INPUT image's pixels", min_length=4, max_length=4)
    score: float = Field(description="detector confidence")
    label: str | None = Field(description="head class, 'unidentified' below its threshold, null for platelets")
    label_score: float | None
    diameter_um: float = Field(description="equivalent-circle diameter from the mask area")
    area_um2: float
    field_id: str | None = Field(None, description="frame the cell came from (specimen reports)")
    atypical: bool = Field(False, description="the head's open-set score put the cell outside every trained type")
    unassessed_label: str | None = Field(None, description="a size-based class the head gave that an estimated scale, "
                                         "or a cell cut by the image's edge, cannot support (the label is then the "
                                         "most likely shape class)")
    machine_label: str | None = Field(None, description="verified reports: the label the analyzer gave a cell a "
                                      "technician typed otherwise (`label` and `kind` are then the technician's); a "
                                      "report published compact keeps its field cells messages as sent: apply "
                                      "`verification.reclassified` to them")


class ClassShare(_Strict):
    label: str
    count: int
    percent: float
    ci95_low: float | None = Field(None, description="Wilson 95% interval, percent, its bounds at two decimals rounded "
                                   "outward (low down, high up: the stored interval holds the exact one)")
    ci95_high: float | None = None
    grade: Literal["none", "1+", "2+", "3+", "present"] | None = Field(
        None, description="red-cell morphology: ICSH 2015 grade of the share (service.analysis.morphology); sickle "
        "cells are not graded but reported as ICSH does: \"present\" when the head called one at the confidence the "
        "critical flag needs (`graded_count`), else \"none\" (the sickle flag says critical or review)")
    grade_ci_low: Literal["none", "1+", "2+", "3+"] | None = Field(
        None, description="grade at the interval's low end (null for sickle cells: present or none, not graded)")
    grade_ci_high: Literal["none", "1+", "2+", "3+"] | None = Field(
        None, description="grade at the interval's high end (null for sickle cells: present or none, not graded)")
    assessable: bool = Field(True, description="false for size-based morphology at an estimated scale (`count` is "
                             "how many cells the head gave this class; they are counted under their shape class) or "
                             "when a flag puts the calibration in doubt (rbc_size_implausible, calibration_suspect, "
                             "calibration_drift_suspected: "
                             "`count` and `percent` kept for audit, no grade); microcyte, macrocyte and spherocyte are then each "
                             "listed, one no cell was given with a count of 0; every row is false when the red cells "
                             "were too blurred to judge their shape (flag rbc_morphology_out_of_focus; in a specimen "
                             "report, when no field's red cells were sharp enough: count and percent kept for audit)")
    of_cells: int | None = Field(None, description="the red cells `percent` and its interval are of, when not every "
                                 "counted one: size-based classes are shares of the red cells whose size could be read, "
                                 "whole ones (not cut by the image's edge) at a calibrated scale (in a specimen mixing "
                                 "calibrated fields and fields at an estimated scale, of the calibrated fields'); in a specimen "
                                 "some of whose fields were too blurred (flag rbc_morphology_out_of_focus), every row "
                                 "is a share of the sharp fields' red cells")
    graded_count: int | None = Field(None, description="the cells the grade rests on, when fewer than `count`: for "
                                     "sickle cells, those the head called at or above the confidence the critical flag "
                                     "needs (flags.sickle_min_confidence); the others are listed for review by the "
                                     "`sickle_cells_review` or `sickle_cells_present` flag; for schistocytes, those at or "
                                     "above flags.schistocyte_min_confidence (every call goes to review)")


class SizeHistogram(_Strict):
    bin_edges_um: list[float] = Field(description="inner bin edges; the first bin is below the first edge, the last "
                                      "above the last")
    counts: list[int] = Field(description="len(bin_edges_um) + 1 counts")


class SizeStats(_Strict):
    n: int
    mean_diameter_um: float | None
    sd_um: float | None
    cv_percent: float | None = Field(description="SD / mean of red-cell diameters, percent: anisocytosis, but of diameters, not volumes as an analyzer's RDW-CV, so about half of it (normal-looking BCCD blood, calibrated: 7 %); RDW's reference range does not apply")
    median_diameter_um: float | None
    calibrated: bool = Field(True, description="sizes come from a given (calibrated) scale; false: the scale was "
                             "estimated from the red cells, so their sizes are not reported")
    histogram: SizeHistogram | None = None


class Counts(_Strict):
    rbc: int
    wbc: int = Field(description="white cells, nucleated red cells not included (ICSH)")
    platelet: int
    nrbc: int = Field(0, description="nucleated red cells (erythroblasts), counted apart from the white cells")
    artefact: int = Field(0, description="verified reports: objects a technician typed as no cell (debris, stain "
                          "precipitate), in no other count")


class Flag(_Strict):
    code: str
    severity: Literal["info", "warning", "critical"]
    message: str
    cells: list[int] | None = Field(None, description="the cells this flag rests on, as indices into the report's "
                                    "cell list, for review and overlays; in a report published compact (`cell_detail` "
                                    "set, `cells` empty) into its cells as its `cells` messages carry them: a field's "
                                    "parts in `part` order, a specimen's fields in the order they joined the run "
                                    "(docs/MQTT.md)")


class Reclassified(_Strict):
    field_id: str
    cell: int = Field(description="the cell's index in its field report")
    machine_label: str | None
    label: str


class Verification(_Strict):
    """A technician reviewed the run's cells; the report counts the types they gave."""

    verified_by: str = Field(description="who verified (as they signed, e.g. initials)")
    verified_at: float
    supersedes: str = Field(description="report_id of the run's report this one replaces")
    supersedes_verified_by: str | None = Field(None, description="who signed the report this one replaces, when "
                                               "that one was verified too (a run signed again: its FHIR bundle is "
                                               "amended); absent: it replaces the analyzer's preliminary report")
    supersedes_verified_at: float | None = Field(None, description="when the report this one replaces was signed "
                                                 "(with supersedes_verified_by)")
    typed_cells: int = Field(description="cells of the run (white or red) the technician typed")
    reclassified: list[Reclassified] = Field(description="the typed cells whose type differs from the analyzer's")
    left_to_review: int = Field(0, description="cells the analyzer sent to review (unidentified, atypical, rare or "
                                "critical calls) that no one typed before signing: counted as the analyzer called them")


class ReviewSummary(_Strict):
    """The cells the analyzer did not decide, which await a technician's review (the review gallery's
    cells to review, whatever `[review] white_cells` adds to it; command verify_run signs them)."""

    cells: int = Field(description="cells awaiting review: the sum of the counts below")
    wbc_unidentified: int = Field(description="white cells the WBC head could not type with confidence "
                                  "(label unidentified), listed with the atypical ones by flag atypical_wbc_present")
    wbc_atypical: int = Field(description="white cells unlike any trained type (`atypical`: the head's open-set "
                              "tests; blasts or other abnormal cells are possible)")
    wbc_rare: int = Field(description="white cells of a rare class a person confirms (immature granulocytes, `ig`)")
    nrbc: int = Field(description="nucleated red cells (erythroblasts), listed by flag nucleated_rbc_present")
    rbc_unidentified: int = Field(description="red cells the RBC head could not type with confidence")
    rbc_flagged: int = Field(description="red cells called sickle or schistocyte: every such call goes to review, "
                             "the sure ones and those below the critical flag's evidence alike (the cells the flags "
                             "sickle_cells_review, sickle_cells_present and schistocytes_present list), and those of "
                             "fields too blurred to judge red-cell shapes, which no grade or flag counts")
    reviewed: int = Field(0, description="verified reports: cells a technician typed (no longer awaiting review; "
                          "`verification.typed_cells`), the counts above being those left; 0 in a preliminary report")


class CellDetail(_Strict):
    """Where the per-cell detail of a report a station publishes went (docs/MQTT.md)."""

    count: int = Field(description="cells of this report; its own `cells` list is left empty")
    topic: str | None = Field(description="MQTT topic of the `cells` messages (joined by report_id "
                              "for a field, by run_id for a specimen); null when not published")
    parts: int = Field(0, description="`cells` messages of this field report (0 for a specimen)")


class Report(_Strict):
    schema_version: Literal["1.0", "1.1", "1.2", "1.3", "1.4", "1.5"] = SCHEMA_VERSION
    report_id: str
    kind: Literal["field", "specimen"]
    created_at: float
    software_version: str | None = Field(None, description="the smearscope version that made this report (as "
                                         "`smearscope --version` prints it; a verified report: the version that "
                                         "signed it); absent in reports from before 1.2")
    analysis_software: list[str] | None = Field(
        None, description="specimen reports: the smearscope versions that analysed its fields, each once in the order "
        "of its latest field, the last the most recent (more than one: a run taken back by a station updated meanwhile; `(not recorded)`: "
        "fields stored by a version before 1.5), kept by the run's verified reports whatever version signed them: "
        "with `models`, what made the results; absent in field reports (`software_version` analysed them) and in "
        "reports from before 1.5")
    station_id: str | None = None
    run_id: str | None = Field(None, description="specimen run this field/report belongs to")
    specimen_id: str | None = Field(
        None, min_length=1, max_length=MAX_SPECIMEN_ID, description="specimen reports: the lab's identifier of the specimen (accession number, slide label) "
        "the run was started for (start_run's `specimen_id`); absent: none was given")
    fields_analyzed: int = 1
    source: SourceInfo | None = Field(None, description="the analysed frame (field reports)")
    scale: ScaleInfo | None = None
    illumination: IlluminationInfo | None = None
    stain: StainInfo | None = None
    rbc_focus: RbcFocusInfo | None = Field(None, description="field reports: how sharp the red cells are; absent in "
                                           "specimen reports and in reports from before it was measured")
    models: dict[str, ModelInfo] = {}
    counts: Counts
    wbc_differential: list[ClassShare]
    rbc_morphology: list[ClassShare]
    rbc_size: SizeStats
    nrbc_per_100_wbc: float | None = Field(None, description="nucleated red cells per 100 white cells")
    ratios: dict[str, float | None]
    flags: list[Flag]
    cells: list[CellRecord]
    cell_detail: CellDetail | None = Field(None, description="set when a station published this "
                                           "report compact: the cells travel in separate messages")
    timing_ms: dict[str, float] = {}
    end_reason: str | None = Field(None, description="final specimen reports: why the run ended (target_reached, "
                                   "stopped, idle_timeout, field_limit, shutdown, restart, ...); absent while it is open")
    review: ReviewSummary | None = Field(None, description="the cells awaiting a technician's review, by kind and "
                                         "reason; absent in reports from before 1.4: not counted (not 0)")
    verification: Verification | None = Field(None, description="specimen reports a technician verified "
                                              "(command verify_run); absent: the analyzer's preliminary result")


SCHEMA_ID = "https://smearscope.invalid/schemas/report.schema.json"


def report_json_schema() -> dict:
    """The report's JSON Schema (draft 2020-12, as pydantic writes it), named by `$schema`/`$id`."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            **Report.model_json_schema()}
