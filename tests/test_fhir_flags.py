"""Each flag of a report as an Observation of its own in the FHIR bundle: the flag's local code, its
message as the value and its severity coded as the interpretation (critical AA, warning A, info N,
v3-ObservationInterpretation), so a consumer reads every flag's severity, not only those about a
finding, from a coded field; the HL7 message's flag rows (OBX-8) say the same. Validated by
fhir.resources (R4B models) as test_fhir does, and the HL7 message by hl7apy."""

from __future__ import annotations

from typing import Any

from test_fhir import current_report, findings, graded_report, resources, specimen_report, validate
from test_hl7 import parsed, segments, unescaped

from smearscope.service.analysis.report import Flag, Report
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import flags_by_severity, report_bundle
from smearscope.service.hl7.oru import oru_r01

INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
SEVERITY = {"critical": ("AA", "Critical abnormal"), "warning": ("A", "Abnormal")}  # info: none


def flag_observations(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in resources(bundle, "Observation") if o["code"]["coding"][0]["system"] == codes.LOCAL_FLAG]


def reports() -> list[Report]:
    """A specimen run of two real pipeline fields (specimen_incomplete, too_few_wbc_for_differential,
    sickle_cells_review), and one with a flag of each severity none of which is about one finding."""
    mixed = graded_report([
        Flag(code="scale_from_specimen", severity="info", message="scale 0.1 um/px estimated from the specimen"),
        Flag(code="calibration_suspect", severity="warning", message="red cells point to 0.14 um/px, not 0.1"),
        Flag(code="sickle_cells_present", severity="critical", message="5 sickle cells"),
        Flag(code="specimen_incomplete", severity="warning", message="stopped at 40 of 100 WBC")])
    return [specimen_report(), mixed]


def test_each_flag_is_an_observation_with_its_severity_as_the_interpretation() -> None:
    for report in reports():
        bundle = report_bundle(report)
        validate(bundle)
        (dr,) = resources(bundle, "DiagnosticReport")
        found = flag_observations(bundle)
        flags = flags_by_severity(report)
        assert {f.severity for f in flags} >= {"info", "warning"}
        assert len(found) == len(flags)
        for f, obs in zip(flags, found):  # critical first, as the conclusion and conclusionCode
            assert obs["code"] == {"coding": [codes.flag(f.code).coding()]}
            assert obs["valueString"] == f.message
            if f.severity == "info":  # says how the result was made: no N ("Normal") to be read as a normal result
                assert "interpretation" not in obs, obs
            else:
                code, display = SEVERITY[f.severity]
                assert obs["interpretation"] == [{"coding": [{"system": INTERPRETATION, "code": code, "display": display}]}]
            assert obs["status"] == dr["status"] and f"urn:uuid:{obs['id']}" in [r["reference"] for r in dr["result"]]
        assert [c["coding"][0]["code"] for c in dr["conclusionCode"]] == [f.code for f in flags]  # kept


def test_the_hl7_flag_rows_say_what_the_flag_observations_say() -> None:
    for report in reports():
        message = oru_r01(report)
        parsed(message)  # strict hl7apy v2.5.1 ORU_R01
        rows = [s for s in segments(message, "OBX") if s[3].split("^")[2] == "99SSF"]
        found = flag_observations(report_bundle(report))
        assert [(r[3].split("^")[0], unescaped(r[5]), r[8]) for r in rows] == [
            (o["code"]["coding"][0]["code"], o["valueString"],
             o["interpretation"][0]["coding"][0]["code"] if "interpretation" in o else "")
            for o in found]
        assert {r[8] for r in rows} >= {"A", ""}


def test_a_findings_hl7_row_carries_the_interpretation_its_fhir_observation_has() -> None:
    """A flag that says a finding is there marks that finding's Observation (sickle cells present AA, atypical
    white cells A); the finding's own OBX says the same in OBX-8, so a lab system showing the row's abnormal flag
    reads what a FHIR consumer reads. Its components' rows (count, interval) and the other results carry none."""
    report = current_report()
    report = report.model_copy(update={"flags": [*report.flags, Flag(
        code="sickle_cells_present", severity="critical", message="5 sickle cells")]})
    bundle = report_bundle(report)
    validate(bundle)
    message = oru_r01(report)
    parsed(message)
    rows = [s for s in segments(message, "OBX") if s[3].split("^")[2] != "99SSF"]
    marked = set()
    for group, obs in enumerate(findings(bundle), start=1):
        first, *parts = [r for r in rows if r[4] == str(group)]
        assert first[3].split("^")[0] == obs["code"]["coding"][0]["code"]
        expected = obs["interpretation"][0]["coding"][0]["code"] if "interpretation" in obs else ""
        assert first[8] == expected, (obs["code"]["coding"][0]["code"], first[8])
        assert all(p[8] == "" for p in parts)
        if expected:
            marked.add((first[3].split("^")[0], expected))
    assert marked == {("801-1", "AA"), ("atypical-wbc", "A")}
