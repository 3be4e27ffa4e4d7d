"""Code tables of the FHIR mapping: LOINC for what LOINC names, a local code system otherwise.

Every LOINC code here was checked against LOINC's published names (docs/FHIR.md lists each with
its long common name). Local codes live under `LOCAL_BASE`, a URI in the reserved `.invalid`
domain (RFC 2606): it can never collide with a published code system, and a site that needs a
resolvable one maps it in its terminology server.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

logger = logging.getLogger(__name__)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
LOCAL_BASE = "http://smearscope.invalid/fhir"
#: Local code systems (stated in docs/FHIR.md).
LOCAL_OBSERVATION = f"{LOCAL_BASE}/CodeSystem/observation"
LOCAL_WBC_CLASS = f"{LOCAL_BASE}/CodeSystem/wbc-class"
LOCAL_RBC_MORPHOLOGY = f"{LOCAL_BASE}/CodeSystem/rbc-morphology"
LOCAL_GRADE = f"{LOCAL_BASE}/CodeSystem/icsh-grade"
LOCAL_FLAG = f"{LOCAL_BASE}/CodeSystem/flag"
#: Identifier systems: the report, the specimen run, the analysed frame, the station, each result.
ID_REPORT = f"{LOCAL_BASE}/NamingSystem/report-id"
ID_RUN = f"{LOCAL_BASE}/NamingSystem/run-id"
ID_FRAME = f"{LOCAL_BASE}/NamingSystem/frame-id"
ID_STATION = f"{LOCAL_BASE}/NamingSystem/station-id"
#: The Device's own identifier: one station with one software version and one set of models (bundle.device_key), the
#: same in every report they make, so a FHIR server keeps one Device for them and a new one after an update.
ID_DEVICE = f"{LOCAL_BASE}/NamingSystem/device-id"
#: Each Observation's identifier: "<run id>/<result>" (a field report of no run: "<report id>/<result>"), the same
#: in every report of a run, so a verified or amended report's results update the preliminary ones.
ID_RESULT = f"{LOCAL_BASE}/NamingSystem/result-id"

OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
#: Observation.dataAbsentReason's code system (an extensible binding): each local reason goes with "unknown"
#: (the value exists, the analyzer could not determine it), which a consumer knowing no local code reads.
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"


class Code(NamedTuple):
    system: str
    code: str
    display: str

    def coding(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, "display": self.display}


#: HL7 v2 table 0487 (specimen type) as a FHIR code system: Specimen.type, and SPM-4 of the HL7 message.
SPECIMEN_TYPES = "http://terminology.hl7.org/CodeSystem/v2-0487"
#: Specimen.type: the smear is of peripheral (whole) blood; table 0487 (v2.5.1) has no smear.
SPECIMEN_TYPE = Code(SPECIMEN_TYPES, "BLD", "Whole blood")

#: DiagnosticReport.code: LOINC 57023-4 "Auto Differential panel - Blood".
PANEL = Code(LOINC, "57023-4", "Auto Differential panel - Blood")

#: WBC head classes -> LOINC "<cell>/100 leukocytes in Blood by Automated count" (UCUM %), each display
#: LOINC's long common name.
WBC_LOINC: dict[str, Code] = {
    "neutrophil": Code(LOINC, "770-8", "Neutrophils/100 leukocytes in Blood by Automated count"),
    "lymphocyte": Code(LOINC, "736-9", "Lymphocytes/100 leukocytes in Blood by Automated count"),
    "monocyte": Code(LOINC, "5905-5", "Monocytes/100 leukocytes in Blood by Automated count"),
    "eosinophil": Code(LOINC, "713-8", "Eosinophils/100 leukocytes in Blood by Automated count"),
    "basophil": Code(LOINC, "706-2", "Basophils/100 leukocytes in Blood by Automated count"),
    # LOINC's long common name for this newer term says "/Leukocytes" (its property is the same number fraction, %)
    "ig": Code(LOINC, "71695-1", "Immature granulocytes/Leukocytes in Blood by Automated count"),
}

#: NRBC per 100 WBC (UCUM /100{WBCs}).
NRBC = Code(LOINC, "58413-6",
            "Nucleated erythrocytes/100 leukocytes [Ratio] in Blood by Automated count")

#: RBC head classes -> LOINC "<finding> [Presence] in Blood by Light microscopy" (ordinal scale:
#: the value is the ICSH grade, for sickle cells "present" or "none"). Members of LOINC's
#: Erythrocyte morphology panel (58408-6).
RBC_LOINC: dict[str, Code] = {
    "microcyte": Code(LOINC, "741-9", "Microcytes [Presence] in Blood by Light microscopy"),
    "macrocyte": Code(LOINC, "738-5", "Macrocytes [Presence] in Blood by Light microscopy"),
    "hypochromia": Code(LOINC, "728-6", "Hypochromia [Presence] in Blood by Light microscopy"),
    "spherocyte": Code(LOINC, "802-9", "Spherocytes [Presence] in Blood by Light microscopy"),
    "target": Code(LOINC, "10381-2", "Target cells [Presence] in Blood by Light microscopy"),
    "stomatocyte": Code(LOINC, "10380-4", "Stomatocytes [Presence] in Blood by Light microscopy"),
    "ovalocyte": Code(LOINC, "774-0", "Ovalocytes [Presence] in Blood by Light microscopy"),
    "elliptocyte": Code(LOINC, "11274-8", "Elliptocytes [Presence] in Blood by Light microscopy"),
    "teardrop": Code(LOINC, "7791-7", "Dacrocytes [Presence] in Blood by Light microscopy"),
    "burr": Code(LOINC, "7790-9", "Burr cells [Presence] in Blood by Light microscopy"),
    "echinocyte": Code(LOINC, "7790-9", "Burr cells [Presence] in Blood by Light microscopy"),
    "schistocyte": Code(LOINC, "800-3", "Schistocytes [Presence] in Blood by Light microscopy"),
    "sickle": Code(LOINC, "801-1", "Sickle cells [Presence] in Blood by Light microscopy"),
}

#: Local observation codes (LOCAL_OBSERVATION) and the components' codes.
LOCAL_CODES: dict[str, str] = {
    "wbc-unidentified": "White cells not classified with confidence (for review), per 100 white cells",
    "rbc-unidentified": "Red cells not classified with confidence (for review), per 100 red cells",
    "rbc-other-poikilocyte": "Other poikilocytes [Presence] in Blood by automated image analysis",
    "rbc-diameter": "Red cell equivalent-circle diameter in Blood smear by automated image analysis",
    "cells-counted": "Cells counted on the smear by automated image analysis",
    "atypical-wbc": "Atypical white cells [Presence] in Blood by automated image analysis",
    "count": "Cells of this class counted",
    "denominator": "Cells in the denominator of the share",
    "percent": "Share of cells, percent",
    "ci95": "Wilson score 95% confidence interval of the share",
    "grade-ci95": "ICSH grades at the ends of the share's 95% confidence interval",
    "graded-count": "Cells the grade rests on: the calls at the confidence the finding's flag needs",
    "size-not-assessable": "Size-based call not assessable: the scale was estimated, not calibrated, or "
                           "is a calibration in doubt (flags rbc_size_implausible, calibration_suspect, "
                           "calibration_drift_suspected)",
    "rbc-out-of-focus": "Red-cell morphology not assessable: the red cells were too blurred to judge their shape "
                        "(flag rbc_morphology_out_of_focus; in a specimen, no field's red cells were sharp enough)",
    "no-wbc-seen": "No white cell was counted: no atypical white cell to judge, no 100 white cells to count "
                   "nucleated red cells per",
    "no-rbc-seen": "No red cell was counted: no diameter to measure",
    "no-rbc-measured": "Red cells were counted, but none whole to measure (each cut by the image's edge)",
    "wbc-left-for-review": "White cells left untyped for review, fewer than the atypical_wbc_present flag "
                           "needs: atypical white cells neither shown nor excluded",
    "diameter-bin": "Red cells in this diameter bin (the code's text names the bin)",
    "nrbc": "Nucleated red cells",
    "artefact": "Objects a technician typed as no cell (verified reports)",
    "sd": "Standard deviation", "cv": "Coefficient of variation of red-cell diameters (not an RDW, which is of volumes: about half of it)", "median": "Median",
    "n": "Cells measured", "rbc": "Red cells", "wbc": "White cells", "platelet": "Platelets",
}


#: Flag codes (LOCAL_FLAG) -> one fixed display each (docs/CLI.md, Report flags). The flag's own
#: message varies per report (counts, shares, fields) and goes to the DiagnosticReport's
#: `conclusion` and the concept's `text`, never the coding's display.
FLAG_DISPLAY: dict[str, str] = {
    "no_cells_found": "No cells found",
    "too_few_wbc_for_differential": "Too few white cells for a differential",
    "too_few_rbc_for_morphology": "Too few red cells for morphology grades",
    "calibration_suspect": "Calibration suspect: red cells point to another scale",
    "calibration_drift_suspected": "Calibration drift suspected: the station's recent checks point to another scale",
    "rbc_size_implausible": "Red-cell sizes implausible at the calibrated scale",
    "rbc_morphology_out_of_focus": "Red cells too blurred to judge their morphology",
    "many_unidentified_wbc": "Many white cells not classified with confidence",
    "many_unidentified_rbc": "Many red cells not classified with confidence",
    "atypical_wbc_present": "Atypical white cells present (blasts or other abnormal cells possible)",
    "sickle_cells_present": "Sickle cells present",
    "sickle_cells_review": "Possible sickle cells: review",
    "schistocytes_present": "Schistocytes present",
    "nucleated_rbc_present": "Nucleated red cells present",
    "platelet_clumps_suspected": "Platelet clumps suspected",
    "size_not_assessable_without_calibration": "Red-cell sizes not assessable without calibration",
    "sizes_from_calibrated_fields_only": "Sizes from the calibrated fields only",
    "scale_unknown": "Scale unknown: a default was assumed",
    "scale_uncertain": "Scale estimate uncertain",
    "scale_from_specimen": "Scale taken from the specimen's fields",
    "greyscale_input": "Greyscale image: no colour",
    "uneven_illumination": "Uneven illumination (corrected)",
    "no_background_found": "No background found to measure the lamp",
    "stain_normalization_skipped": "Stain normalization skipped",
    "specimen_complete": "Specimen complete",
    "specimen_incomplete": "Specimen incomplete: run stopped early",
    "specimen_in_progress": "Specimen in progress",
}


#: v3-ObservationInterpretation, Observation.interpretation: a flag's severity on the finding it is about.
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
#: A flag's severity as an interpretation, on the finding it is about and on the flag's own Observation
#: (the HL7 message's OBX-8 of its row): critical AA, warning A. An info flag has none: it says how the
#: result was made (the scale came from the specimen, too few white cells for a differential), and N
#: ("Normal") beside it would read as a normal result to a system that shows the interpretation as a flag.
SEVERITY_INTERPRETATION = {"critical": Code(INTERPRETATION, "AA", "Critical abnormal"),
                           "warning": Code(INTERPRETATION, "A", "Abnormal")}
#: Flags that say a finding is there, and the observation of that finding (bundle's names). Review
#: flags (sickle_cells_review) are not among them: they ask for a look, they do not say abnormal.
FINDING_FLAGS = {"sickle_cells_present": "rbc/sickle", "schistocytes_present": "rbc/schistocyte",
                 "nucleated_rbc_present": "nrbc", "atypical_wbc_present": "atypical-wbc"}


def flag(code: str) -> Code:
    """A flag code with its fixed display (a code this table lacks: the code itself, words spaced)."""
    return Code(LOCAL_FLAG, code, FLAG_DISPLAY.get(code, code.replace("_", " ")))


def local(code: str, system: str = LOCAL_OBSERVATION, display: str | None = None) -> Code:
    return Code(system, code, display if display is not None else LOCAL_CODES.get(code, code))


# ICSH's "none": a share below the finding's 1+ threshold (not significant), cells may be counted;
# of sickle cells, which ICSH reports present and never grades, no call at the critical flag's
# confidence (less sure ones are counted and listed by the review flag). One display per code.
GRADE_DISPLAY = {"none": "none (below 1+, not significant; sickle cells: none at the critical flag's confidence)",
                 "1+": "1+ (slight)", "2+": "2+ (moderate)", "3+": "3+ (marked)",
                 "present": "present (sickle cells: reported present, not graded)"}


def grade(value: str) -> Code:
    return Code(LOCAL_GRADE, value, GRADE_DISPLAY.get(value, value))


def absent(reason: str) -> tuple[Code, Code]:
    """A local reason for a value left out and HL7's DataAbsentReason "unknown" (the local one first:
    the HL7 message's note names it)."""
    return local(reason), Code(DATA_ABSENT_REASON, "unknown", "Unknown")
