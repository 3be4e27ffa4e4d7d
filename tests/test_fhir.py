"""The FHIR R4 Bundle of a report: validated by an independent model library (fhir.resources,
its R4B models: R4B's Bundle, DiagnosticReport, Observation, Specimen and Device are R4's), and
its values checked against the report they came from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError
from realdata import DATA, needs_models
from test_daemon import oracle_pool

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.aggregate import aggregate
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.records import Box, CellDetection, CellKind, ClassifiedCell
from smearscope.service.analysis.report import (
    ClassShare,
    Counts,
    Flag,
    Report,
    SizeHistogram,
    SizeStats,
)
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.station.specimen import SpecimenRun

ROOT = Path(__file__).resolve().parents[1]


#: Required bindings fhir.resources does not check (it validates structure and datatypes, not
#: value sets): the codes R4 allows for the elements this mapping sets.
REQUIRED_CODES = {
    ("Bundle", "type"): {"document", "message", "transaction", "transaction-response", "batch",
                         "batch-response", "history", "searchset", "collection"},
    ("DiagnosticReport", "status"): {"registered", "partial", "preliminary", "final", "amended",
                                     "corrected", "appended", "cancelled", "entered-in-error", "unknown"},
    ("Observation", "status"): {"registered", "preliminary", "final", "amended", "corrected",
                                "cancelled", "entered-in-error", "unknown"},
}


#: HL7's DataAbsentReason code system (R4), which Observation.dataAbsentReason is bound to (extensible).
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
DATA_ABSENT_CODES = {"unknown", "asked-unknown", "temp-unknown", "not-asked", "asked-declined", "masked",
                     "not-applicable", "unsupported", "as-text", "error", "not-a-number", "negative-infinity",
                     "positive-infinity", "not-performed", "not-permitted"}


def validate(bundle: dict[str, Any]) -> None:
    """The bundle and every resource in it, each by its own R4B model (raises ValidationError),
    and the required bindings the models leave unchecked (AssertionError)."""
    Bundle.model_validate(bundle)
    assert bundle["type"] in REQUIRED_CODES[("Bundle", "type")]
    for entry in bundle["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        get_fhir_model_class(kind).model_validate(resource)
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
        if (kind, "status") in REQUIRED_CODES:
            assert resource["status"] in REQUIRED_CODES[(kind, "status")]
        for c in resource.get("component", []):  # obs-7: a component never repeats the code
            assert c["code"] != resource["code"]
        if "dataAbsentReason" in resource:  # obs-6
            assert not any(k.startswith("value") for k in resource)
            # its extensible binding: a code of HL7's DataAbsentReason, beside the local reason
            assert {c["code"] for c in resource["dataAbsentReason"]["coding"]
                    if c["system"] == DATA_ABSENT_REASON} <= DATA_ABSENT_CODES
            assert any(c["system"] == DATA_ABSENT_REASON for c in resource["dataAbsentReason"]["coding"])
    text = json.dumps(bundle, separators=(",", ":"))
    assert "[]" not in text  # FHIR JSON has no empty arrays
    full_urls = {entry["fullUrl"] for entry in bundle["entry"]}  # every reference resolves inside the bundle
    assert set(re.findall(r'"reference":"([^"]*)"', text)) <= full_urls


def analyzed_with_fhir(image: Path, tmp_path: Path, microns_per_pixel: float | None = None) -> tuple[Report, dict[str, Any]]:
    """`smearscope analyze --json IMAGE --fhir FILE` run as the user runs it: its report and its bundle, validated."""
    out = tmp_path / "b.fhir.json"
    scale = [] if microns_per_pixel is None else ["--microns-per-pixel", str(microns_per_pixel)]
    proc = subprocess.run([sys.executable, "-m", "smearscope", "analyze", "--json", *scale, str(image), "--fhir", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = json.loads(out.read_text())
    validate(bundle)
    return Report.model_validate_json(proc.stdout), bundle


def as_sent(value: float) -> float:
    """A share, bound, ratio or size as the bundle sends it: to one decimal, as `smearscope analyze` prints it."""
    return float(f"{value:.1f}")


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def by_code(bundle: dict[str, Any], system: str, code: str) -> dict[str, Any]:
    found = [o for o in resources(bundle, "Observation")
             if any(c["system"] == system and c["code"] == code for c in o["code"]["coding"])]
    assert len(found) == 1, (code, len(found))
    return found[0]


def component(observation: dict[str, Any], code: str) -> dict[str, Any]:
    return next(c for c in observation["component"] if c["code"]["coding"][0]["code"] == code)


def specimen_report() -> Report:
    """A specimen report over real pipeline runs (oracle parts) on four synthetic fields."""
    run = SpecimenRun(target_wbc=100, started_at=1000.0)
    for i, result in enumerate(oracle_pool()):
        run.add(result, 1001.0 + i)
    return run.report(station_id="bench-1", now=1010.0, end_reason="stopped")


def graded_report(flags: list[Flag] = ()) -> Report:
    """A specimen report with chosen shares, as reports were before grades and NRBC counted
    apart (erythroblasts in the differential): the derived values are known."""
    def share(label: str, count: int, n: int, ci: bool = True) -> ClassShare:
        pct = round(100 * count / n, 2)
        return ClassShare(label=label, count=count, percent=pct, ci95_low=max(0.0, pct - 3) if ci else None,
                          ci95_high=min(100.0, pct + 3) if ci else None)
    wbc = [share("neutrophil", 60, 110), share("lymphocyte", 30, 110), share("monocyte", 6, 110),
           share("eosinophil", 3, 110), share("basophil", 1, 110), share("erythroblast", 5, 110),
           share("unidentified", 5, 110)]
    rbc = [share("normal", 900, 1000, False), share("schistocyte", 15, 1000, False),
           share("spherocyte", 60, 1000, False), share("other_poikilocyte", 25, 1000, False)]
    return Report(report_id="r-1", kind="specimen", created_at=2_000_000_000.0, station_id="lab-7",
                  run_id="run-1", fields_analyzed=12, counts=Counts(rbc=1000, wbc=110, platelet=80),
                  wbc_differential=wbc, rbc_morphology=rbc,
                  rbc_size=SizeStats(n=900, mean_diameter_um=7.4, sd_um=0.6, cv_percent=8.1, median_diameter_um=7.3),
                  ratios={}, flags=list(flags), cells=[], timing_ms={"run_ms": 60_000.0})


def test_a_specimen_bundle_validates_and_carries_the_report_numbers() -> None:
    report = specimen_report()
    bundle = report_bundle(report)
    validate(bundle)
    assert bundle["type"] == "collection"
    assert bundle["identifier"] == {"system": codes.ID_REPORT, "value": report.report_id}
    (dr,) = resources(bundle, "DiagnosticReport")
    assert dr["status"] == "preliminary"
    assert dr["code"]["coding"][0] == {"system": codes.LOINC, "code": "57023-4",
                                       "display": "Auto Differential panel - Blood"}
    observations = resources(bundle, "Observation")
    assert sorted(r["reference"] for r in dr["result"]) == sorted(f"urn:uuid:{o['id']}" for o in observations)
    assert all(o["status"] == "preliminary" for o in observations)
    (specimen,) = resources(bundle, "Specimen")
    assert specimen["identifier"] == [{"system": codes.ID_RUN, "value": report.run_id}]
    for share in report.wbc_differential:
        if share.label not in codes.WBC_LOINC:
            continue
        obs = by_code(bundle, codes.LOINC, codes.WBC_LOINC[share.label].code)
        assert obs["valueQuantity"] == {"value": as_sent(share.percent), "unit": "%", "system": codes.UCUM, "code": "%"}
        ci = component(obs, "ci95")["valueRange"]
        # to one decimal, rounded outward (tests/test_interval_rounding.py)
        assert ci["low"]["value"] == as_sent(ci["low"]["value"]) <= share.ci95_low < ci["low"]["value"] + 0.1
        assert ci["high"]["value"] == as_sent(ci["high"]["value"]) >= share.ci95_high > ci["high"]["value"] - 0.1
        assert component(obs, "count")["valueInteger"] == share.count
        assert component(obs, "denominator")["valueInteger"] == report.counts.wbc
        assert "referenceRange" not in obs
    assert {"neutrophil", "lymphocyte"} <= {s.label for s in report.wbc_differential}
    flag_codes = {c["coding"][0]["code"] for c in dr["conclusionCode"]}
    assert flag_codes == {f.code for f in report.flags}
    assert all(f.message in dr["conclusion"] for f in report.flags)


def test_a_flags_coded_display_is_the_same_in_every_report_and_its_message_is_the_text() -> None:
    """conclusionCode's display is fixed per flag code (a consumer may map on it); the flag's own
    message, which counts this report's cells and fields, is the concept's text and in `conclusion`."""
    def run_report(fields: int) -> Report:
        run = SpecimenRun(target_wbc=100, started_at=1000.0)
        for i, result in enumerate(oracle_pool()[:fields]):
            run.add(result, 1001.0 + i)
        return run.report(station_id="bench-1", now=1010.0, end_reason="stopped")
    displays: dict[str, set[str]] = {}
    texts: dict[str, set[str]] = {}
    for report in (run_report(2), run_report(4)):
        bundle = report_bundle(report)
        validate(bundle)
        (dr,) = resources(bundle, "DiagnosticReport")
        messages = {f.code: f.message for f in report.flags}
        for concept in dr["conclusionCode"]:
            (coding,) = concept["coding"]
            assert coding["system"] == codes.LOCAL_FLAG
            assert coding["display"] == codes.FLAG_DISPLAY[coding["code"]]
            assert concept["text"] == messages[coding["code"]]
            assert concept["text"] in dr["conclusion"]
            displays.setdefault(coding["code"], set()).add(coding["display"])
            texts.setdefault(coding["code"], set()).add(concept["text"])
    # the two runs' messages differ (8 and 16 WBC classified), their displays do not
    assert len(texts["too_few_wbc_for_differential"]) == 2 and len(texts["specimen_incomplete"]) == 2
    assert all(len(d) == 1 for d in displays.values()), displays
    # every flag the docs list has its own fixed display
    documented = set()
    for line in (ROOT / "docs" / "CLI.md").read_text().split("## Report flags", 1)[1].splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    assert documented and documented <= set(codes.FLAG_DISPLAY), documented - set(codes.FLAG_DISPLAY)
    assert len(set(codes.FLAG_DISPLAY.values())) == len(codes.FLAG_DISPLAY)


def test_no_patient_and_only_the_identifiers_the_station_was_given() -> None:
    bundle = report_bundle(specimen_report())
    kinds = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert kinds == {"DiagnosticReport", "Specimen", "Device", "Observation"}
    text = json.dumps(bundle)
    assert '"subject"' not in text and "Patient" not in text
    identifier_systems = {i["system"] for e in bundle["entry"] for i in e["resource"].get("identifier", [])}
    assert identifier_systems <= {codes.ID_REPORT, codes.ID_RUN, codes.ID_FRAME, codes.ID_STATION, codes.ID_RESULT,
                                  codes.ID_DEVICE}


def test_a_run_started_for_a_specimen_names_it_as_the_specimens_accession_identifier() -> None:
    """start_run's specimen_id (the lab's accession number or slide label) is the Specimen's
    accessionIdentifier, with no system (the lab's numbering is not known to the station); a report
    without one has none."""
    named = specimen_report().model_copy(update={"specimen_id": "H-2026-0412"})
    bundle = report_bundle(named)
    validate(bundle)
    (specimen,) = resources(bundle, "Specimen")
    assert specimen["accessionIdentifier"] == {"value": "H-2026-0412"}
    assert "accessionIdentifier" not in resources(report_bundle(specimen_report()), "Specimen")[0]


def test_grades_nrbc_and_local_codes() -> None:
    bundle = report_bundle(graded_report())
    validate(bundle)
    schisto = by_code(bundle, codes.LOINC, "800-3")  # 1.5 % schistocytes: ICSH 2+ (1-2 %)
    assert schisto["valueCodeableConcept"]["coding"][0] == codes.grade("2+").coding()
    assert component(schisto, "percent")["valueQuantity"]["value"] == 1.5
    sphero = by_code(bundle, codes.LOINC, "802-9")  # 6 % spherocytes: 1+ (5-20 %)
    assert sphero["valueCodeableConcept"]["coding"][0]["code"] == "1+"
    other = by_code(bundle, codes.LOCAL_OBSERVATION, "rbc-other-poikilocyte")
    assert other["valueCodeableConcept"]["coding"][0]["code"] == "none"  # 2.5 % < 5 %
    nrbc = by_code(bundle, codes.LOINC, "58413-6")  # 5 NRBC per 105 leukocytes: 4.76, sent as read
    assert nrbc["valueQuantity"] == {"value": as_sent(100 * 5 / 105), "unit": "/100 WBC", "system": codes.UCUM, "code": "/100{WBCs}"}
    unidentified = by_code(bundle, codes.LOCAL_OBSERVATION, "wbc-unidentified")
    assert unidentified["valueQuantity"]["value"] == as_sent(100 * 5 / 110)
    with pytest.raises(AssertionError):  # erythroblasts are NRBC, not a leukocyte class
        by_code(bundle, codes.LOCAL_WBC_CLASS, "erythroblast")
    size = by_code(bundle, codes.LOCAL_OBSERVATION, "rbc-diameter")
    assert size["valueQuantity"] == {"value": 7.4, "unit": "um", "system": codes.UCUM, "code": "um"}


def current_report() -> Report:
    """A report with the analyzer's own grades, NRBC counted apart, an atypical-WBC flag, a
    not-assessable share and a diameter histogram."""
    base = graded_report([Flag(code="atypical_wbc_present", severity="warning", message="5 untyped")])
    wbc = [s for s in base.wbc_differential if s.label != "erythroblast"]
    rbc = [s.model_copy(update={"grade": "3+", "grade_ci_low": "2+", "grade_ci_high": "3+"})
           if s.label == "schistocyte" else s for s in base.rbc_morphology]
    rbc.append(ClassShare(label="macrocyte", count=7, percent=0.0, assessable=False))
    rbc.append(ClassShare(label="sickle", count=3, percent=0.3, grade="present", graded_count=1))  # 2 unsure calls
    size = base.rbc_size.model_copy(update={"histogram": SizeHistogram(bin_edges_um=[6.0, 7.0, 8.0],
                                                                       counts=[10, 300, 500, 90])})
    return base.model_copy(update={"wbc_differential": wbc, "rbc_morphology": rbc, "rbc_size": size,
                                   "counts": Counts(rbc=1000, wbc=105, platelet=80, nrbc=5),
                                   "nrbc_per_100_wbc": 4.76})


def test_the_reports_own_grades_nrbc_flags_and_histogram_are_used() -> None:
    bundle = report_bundle(current_report())
    validate(bundle)
    schisto = by_code(bundle, codes.LOINC, "800-3")  # the report says 3+ (derived would be 2+)
    assert schisto["valueCodeableConcept"]["coding"][0]["code"] == "3+"
    assert component(schisto, "grade-ci95")["valueString"] == "2+ to 3+"
    sickle = by_code(bundle, codes.LOINC, "801-1")
    assert component(sickle, "graded-count")["valueInteger"] == 1 and component(sickle, "count")["valueInteger"] == 3
    # only where the grade rests on fewer cells than the count
    assert "graded-count" not in [c["code"]["coding"][0]["code"] for c in schisto["component"]]
    macro = by_code(bundle, codes.LOINC, "738-5")
    assert "valueCodeableConcept" not in macro and macro["dataAbsentReason"]["coding"][0]["code"] == "size-not-assessable"
    assert [c["code"]["coding"][0]["code"] for c in macro["component"]] == ["count"]
    nrbc = by_code(bundle, codes.LOINC, "58413-6")
    assert nrbc["valueQuantity"]["value"] == as_sent(4.76)
    assert (component(nrbc, "count")["valueInteger"], component(nrbc, "denominator")["valueInteger"]) == (5, 105)
    assert by_code(bundle, codes.LOCAL_OBSERVATION, "atypical-wbc")["valueBoolean"] is True
    no_wbc = current_report().model_copy(update={"counts": Counts(rbc=1000, wbc=0, platelet=80, nrbc=0),
                                                  "wbc_differential": [], "nrbc_per_100_wbc": None, "flags": []})
    bundle_no_wbc = report_bundle(no_wbc)
    validate(bundle_no_wbc)
    atypical = by_code(bundle_no_wbc, codes.LOCAL_OBSERVATION, "atypical-wbc")
    assert "valueBoolean" not in atypical and atypical["dataAbsentReason"]["coding"][0]["code"] == "no-wbc-seen"
    size = by_code(bundle, codes.LOCAL_OBSERVATION, "rbc-diameter")
    bins = [(c["code"]["text"], c["valueInteger"]) for c in size["component"] if c["code"]["coding"][0]["code"] == "diameter-bin"]
    assert bins == [("< 6 um", 10), ("6 to < 7 um", 300), ("7 to < 8 um", 500), (">= 8 um", 90)]
    counted = by_code(bundle, codes.LOCAL_OBSERVATION, "cells-counted")
    assert component(counted, "nrbc")["valueInteger"] == 5
    uncalibrated = current_report().model_copy(update={"rbc_size": SizeStats(
        n=900, mean_diameter_um=None, sd_um=None, cv_percent=None, median_diameter_um=None, calibrated=False)})
    size = by_code(report_bundle(uncalibrated), codes.LOCAL_OBSERVATION, "rbc-diameter")
    assert "valueQuantity" not in size and size["dataAbsentReason"]["coding"][0]["code"] == "size-not-assessable"
    # no red cell at all (a calibrated field of white cells only): nothing was measured, and the
    # reason is not an estimated scale
    agg = aggregate([ClassifiedCell(CellDetection(CellKind.WBC, Box(0, 0, 60, 60), 0.9), "neutrophil", 0.9, 12.0,
                                    110.0, size_calibrated=True)])
    none_seen = current_report().model_copy(update={"counts": agg.counts, "rbc_size": agg.rbc_size,
                                                    "rbc_morphology": [], "flags": agg.flags})
    bundle_none = report_bundle(none_seen)
    validate(bundle_none)
    size = by_code(bundle_none, codes.LOCAL_OBSERVATION, "rbc-diameter")
    assert "valueQuantity" not in size and size["dataAbsentReason"]["coding"][0]["code"] == "no-rbc-seen"


def test_a_mixed_runs_size_based_share_names_its_own_denominator() -> None:
    """In a run mixing calibrated and estimated fields, spherocytes are a share of the calibrated
    fields' red cells (`of_cells`): the Observation's denominator is that, not every red cell."""
    base = current_report()
    rows = [s for s in base.rbc_morphology if s.label != "spherocyte"]
    rows.append(ClassShare(label="spherocyte", count=10, percent=12.5, ci95_low=6.9, ci95_high=21.5, of_cells=80))
    bundle = report_bundle(base.model_copy(update={"rbc_morphology": rows}))
    validate(bundle)
    sphero = by_code(bundle, codes.LOINC, "802-9")
    assert component(sphero, "count")["valueInteger"] == 10 and component(sphero, "denominator")["valueInteger"] == 80
    shape = next(s for s in rows if s.label not in ("normal", "spherocyte", "macrocyte", "microcyte")
                 and s.label in codes.RBC_LOINC)
    other = by_code(bundle, codes.LOINC, codes.RBC_LOINC[shape.label].code)
    assert component(other, "denominator")["valueInteger"] == base.counts.rbc  # a shape class: of every red cell


def test_size_based_calls_are_absent_when_the_scale_was_not_calibrated() -> None:
    flag = Flag(code="size_not_assessable_without_calibration", severity="info", message="estimated scale")
    bundle = report_bundle(graded_report([flag]))
    validate(bundle)
    sphero = by_code(bundle, codes.LOINC, "802-9")
    assert "valueCodeableConcept" not in sphero and sphero["dataAbsentReason"]["coding"][0]["code"] == "size-not-assessable"
    assert "valueCodeableConcept" in by_code(bundle, codes.LOINC, "800-3")  # shape-based: still graded


def test_the_same_report_gives_the_same_bundle() -> None:
    report = graded_report()
    assert report_bundle(report) == report_bundle(report)
    other = report_bundle(report.model_copy(update={"report_id": "r-2"}))
    assert other["entry"][0]["fullUrl"] != report_bundle(report)["entry"][0]["fullUrl"]


def test_the_validator_rejects_a_broken_bundle() -> None:
    """Control: the library catches what the tests rely on it for."""
    bundle = report_bundle(graded_report())
    validate(bundle)
    for path, bad in ((("entry", 0, "resource", "status"), "not-a-status"),
                      (("type",), "not-a-type"),
                      (("entry", 0, "resource", "issued"), "yesterday"),
                      (("entry", 1, "resource", "identifier"), "not-a-list"),
                      (("entry", 3, "resource", "valueQuantity"), {"value": "many"}),
                      (("entry", 3, "resource", "valueSomething"), 1)):
        broken = json.loads(json.dumps(bundle))
        target = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = bad
        with pytest.raises((ValidationError, AssertionError)):
            validate(broken)


@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_analyze_writes_a_valid_bundle_for_each_image(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for seed in (3, 4):
        field = render_field(seed, width=480, height=360, microns_per_pixel=0.1)
        cv2.imwrite(str(images / f"f{seed}.png"), np.asarray(field.frame.pixels))
    one = tmp_path / "one.fhir.json"
    run = [sys.executable, "-m", "smearscope", "analyze", "--json", "--microns-per-pixel", "0.1"]
    proc = subprocess.run([*run, str(images / "f3.png"), "--fhir", str(one)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    bundle = json.loads(one.read_text())
    validate(bundle)
    assert bundle["identifier"]["value"] == report["report_id"]
    (specimen,) = resources(bundle, "Specimen")
    assert specimen["identifier"] == [{"system": codes.ID_FRAME, "value": "f3.png"}]
    out = tmp_path / "bundles"
    proc = subprocess.run([*run, str(images), "--fhir", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["f3.fhir.json", "f4.fhir.json"]
    for p in out.iterdir():
        validate(json.loads(p.read_text()))
    bad = subprocess.run([*run, str(images / "f3.png"), "--fhir", str(tmp_path / "no" / "x.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["code"] == "bad_output"


@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_two_images_of_one_stem_get_a_bundle_each_joined_to_their_reports(tmp_path: Path) -> None:
    """a/f.png and b/f.png: f.fhir.json and f-2.fhir.json (docs/CLI.md), neither written over, each
    bundle's identifier its own report's report_id."""
    for folder, seed in (("a", 5), ("b", 6)):
        (tmp_path / folder).mkdir()
        field = render_field(seed, width=320, height=240, microns_per_pixel=0.1)
        cv2.imwrite(str(tmp_path / folder / "f.png"), np.asarray(field.frame.pixels))
    out = tmp_path / "bundles"
    proc = subprocess.run([sys.executable, "-m", "smearscope", "analyze", "--json", "--microns-per-pixel", "0.1",
                           str(tmp_path / "a" / "f.png"), str(tmp_path / "b" / "f.png"), "--fhir", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report_ids = [json.loads(line)["report_id"] for line in proc.stdout.splitlines()]
    assert sorted(p.name for p in out.iterdir()) == ["f-2.fhir.json", "f.fhir.json"]
    bundles = [json.loads((out / name).read_text()) for name in ("f.fhir.json", "f-2.fhir.json")]
    assert [b["identifier"]["value"] for b in bundles] == report_ids and len(set(report_ids)) == 2


@needs_models
@pytest.mark.skipif(not (DATA / "pbc" / "ig" / "IG_146565.jpg").exists(), reason=f"PBC not found under {DATA}")
def test_immature_granulocytes_carry_loincs_own_name_for_71695_1(tmp_path: Path) -> None:
    """A PBC image of an immature granulocyte through the real models: its share is coded 71695-1
    with LOINC's long common name, which says /Leukocytes (not /100 leukocytes, as 770-8's does): a
    consumer's validator checks the display against LOINC's."""
    out = tmp_path / "ig.fhir.json"
    proc = subprocess.run([sys.executable, "-m", "smearscope", "analyze", "--json",
                           str(DATA / "pbc" / "ig" / "IG_146565.jpg"), "--fhir", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the cell typed ig, every other class of the head's at 0
    assert [(s["label"], s["count"]) for s in json.loads(proc.stdout)["wbc_differential"]] == [
        ("ig", 1), ("basophil", 0), ("eosinophil", 0), ("lymphocyte", 0), ("monocyte", 0), ("neutrophil", 0)]
    bundle = json.loads(out.read_text())
    validate(bundle)
    ig = by_code(bundle, codes.LOINC, "71695-1")
    assert ig["code"]["coding"][0] == {"system": codes.LOINC, "code": "71695-1",
                                       "display": "Immature granulocytes/Leukocytes in Blood by Automated count"}
    assert ig["valueQuantity"] == {"value": 100.0, "unit": "%", "system": codes.UCUM, "code": "%"}


def test_a_loinc_presence_term_never_carries_a_quantity() -> None:
    """LOINC's "[Presence] in Blood by Light microscopy" terms are ordinal (PrThr, Ord): a finding the
    analyzer does not grade (the rendered fields' echinocytes) keeps its share under its local code
    alone, never as a percentage under the ordinal term."""
    bundle = report_bundle(specimen_report())
    validate(bundle)
    presence = {c.code for c in codes.RBC_LOINC.values()}
    ordinal = [o for o in resources(bundle, "Observation")
               if any(c["system"] == codes.LOINC and c["code"] in presence for c in o["code"]["coding"])]
    assert ordinal and all("valueQuantity" not in o for o in ordinal)
    assert all("valueCodeableConcept" in o or "dataAbsentReason" in o for o in ordinal)
    echinocyte = by_code(bundle, codes.LOCAL_RBC_MORPHOLOGY, "echinocyte")  # in the rendered fields, not graded
    assert [c["system"] for c in echinocyte["code"]["coding"]] == [codes.LOCAL_RBC_MORPHOLOGY]
    assert echinocyte["valueQuantity"]["code"] == "%"


def test_an_older_reports_grade_interval_and_nrbc_are_derived_or_left_out() -> None:
    """A report from before grades carries a share's 95 % interval: its ends' ICSH grades are the
    grade-ci95 component (schistocytes 0.3 to 2.5 %: 1+ to 3+). One from before NRBC were counted
    apart and without an erythroblast row measured no NRBC: no NRBC observation, not a 0."""
    old = graded_report()
    rbc = [s.model_copy(update={"ci95_low": 0.3, "ci95_high": 2.5}) if s.label == "schistocyte" else s
           for s in old.rbc_morphology]
    report = old.model_copy(update={"rbc_morphology": rbc})
    bundle = report_bundle(report)
    validate(bundle)
    schisto = by_code(bundle, codes.LOINC, "800-3")
    assert component(schisto, "grade-ci95")["valueString"] == "1+ to 3+"
    no_nrbc = report.model_copy(update={"wbc_differential": [s for s in report.wbc_differential
                                                             if s.label != "erythroblast"]})
    bundle = report_bundle(no_nrbc)
    validate(bundle)
    assert not [o for o in resources(bundle, "Observation")
                if any(c.get("code") == "58413-6" for c in o["code"].get("coding", []))]


def _sickle_bundle(sure: int, unsure: int = 0, n_rbc: int = 114) -> dict[str, Any]:
    """The bundle of a report whose red cells, morphology and flags come from `aggregate` over
    `n_rbc` red cells with `sure` sickle calls at 0.95 and `unsure` at 0.5."""
    from test_open_set_flags import _cell
    cells = ([_cell(CellKind.RBC, "normal")] * (n_rbc - sure - unsure) + [_cell(CellKind.RBC, "sickle", 0.95)] * sure
             + [_cell(CellKind.RBC, "sickle", 0.5)] * unsure)
    a = aggregate(cells)
    report = graded_report().model_copy(update={"rbc_morphology": a.rbc_morphology, "flags": a.flags})
    bundle = report_bundle(report)
    validate(bundle)
    return bundle


def test_a_flagged_finding_says_critical_or_abnormal_in_its_interpretation() -> None:
    """The critical sickle flag (5 sure calls of 114 red cells, through `aggregate`) marks the sickle
    cells' Observation AA (Critical abnormal, v3-ObservationInterpretation), as the HL7 message's
    flag row has OBX-8 AA: a consumer alerts on a coded field, not on the conclusion's words. The
    review flag (4 sure calls) marks nothing: it asks for a look, it does not say abnormal."""
    interpretation = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
    five = _sickle_bundle(5)
    assert by_code(five, codes.LOINC, "801-1")["interpretation"] == [
        {"coding": [{"system": interpretation, "code": "AA", "display": "Critical abnormal"}]}]
    assert [o for o in findings(five) if "interpretation" in o] == [by_code(five, codes.LOINC, "801-1")]
    four = _sickle_bundle(4)
    assert not [o for o in findings(four) if "interpretation" in o]


def findings(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The Observations of results, not of flags (each flag has one of its own: test_fhir_flags)."""
    return [o for o in resources(bundle, "Observation") if o["code"]["coding"][0]["system"] != codes.LOCAL_FLAG]


def test_sickle_cells_are_present_or_none_in_fhir_never_a_grade() -> None:
    """Sickle cells are an ICSH "present" (4 sure calls of 114 red cells, which a 1+ to 3+ scale
    reads 3+), beside the flag that says review or critical; no grade-ci95 component; unsure calls
    alone read "none" with the graded-count 0. An older report that graded them 3+ reads present."""
    def sickle_value(bundle: dict[str, Any]) -> tuple[str, list[str]]:
        obs = by_code(bundle, codes.LOINC, "801-1")
        return (obs["valueCodeableConcept"]["coding"][0]["code"],
                [c["code"]["coding"][0]["code"] for c in obs["component"]])

    def flags(bundle: dict[str, Any]) -> set[str]:  # the report's conclusion codes
        (dr,) = resources(bundle, "DiagnosticReport")
        return {c["code"] for concept in dr.get("conclusionCode", []) for c in concept["coding"]
                if c["system"] == codes.LOCAL_FLAG}

    four = _sickle_bundle(4)
    value, parts = sickle_value(four)
    assert value == "present" and "grade-ci95" not in parts and {"count", "percent"} <= set(parts)
    assert by_code(four, codes.LOINC, "801-1")["valueCodeableConcept"]["coding"][0] == codes.grade("present").coding()
    assert {"sickle_cells_review"} == {f for f in flags(four) if f.startswith("sickle")}
    five = _sickle_bundle(5)
    assert sickle_value(five)[0] == "present" and {"sickle_cells_present"} == {
        f for f in flags(five) if f.startswith("sickle")}
    unsure = _sickle_bundle(0, unsure=3)
    value, parts = sickle_value(unsure)
    assert value == "none" and "grade-ci95" not in parts
    assert component(by_code(unsure, codes.LOINC, "801-1"), "graded-count")["valueInteger"] == 0
    old = graded_report()
    graded = ClassShare(label="sickle", count=4, percent=3.51, ci95_low=1.37, ci95_high=8.68, grade="3+",
                        grade_ci_low="2+", grade_ci_high="3+")
    bundle = report_bundle(old.model_copy(update={"rbc_morphology": [*old.rbc_morphology, graded]}))
    validate(bundle)
    value, parts = sickle_value(bundle)
    assert value == "present" and "grade-ci95" not in parts
    ungraded = graded.model_copy(update={"grade": None, "grade_ci_low": None, "grade_ci_high": None})
    bundle = report_bundle(old.model_copy(update={"rbc_morphology": [*old.rbc_morphology, ungraded]}))
    assert sickle_value(bundle) == ("present", parts)  # from before grades: derived, no interval


@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_untyped_white_cells_too_few_for_the_flag_are_not_reported_as_no_atypical_cells() -> None:
    """A rendered field whose one white cell the WBC head put outside every trained type: too few
    for `atypical_wbc_present` (3 cells), yet not evidence that none is atypical, so the bundle's
    atypical-WBC observation has no value (it read `false`); a field whose white cells were all
    typed still says false, and a flagged one true."""
    analyzer = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    field = render_field(2, width=640, height=480, microns_per_pixel=0.1).frame
    report = analyzer.analyze(field).report
    assert report.counts.wbc == 1 and [c.atypical for c in report.cells if c.kind == "wbc"] == [True]
    assert "atypical_wbc_present" not in {f.code for f in report.flags}
    bundle = report_bundle(report)
    validate(bundle)
    atypical = by_code(bundle, codes.LOCAL_OBSERVATION, "atypical-wbc")
    assert "valueBoolean" not in atypical
    assert atypical["dataAbsentReason"]["coding"][0]["code"] == "wbc-left-for-review"
    typed = [s.model_copy(update={"label": "neutrophil"}) for s in report.wbc_differential]
    all_typed = report_bundle(report.model_copy(update={"wbc_differential": typed}))
    assert by_code(all_typed, codes.LOCAL_OBSERVATION, "atypical-wbc")["valueBoolean"] is False
    flagged = report_bundle(current_report())
    assert by_code(flagged, codes.LOCAL_OBSERVATION, "atypical-wbc")["valueBoolean"] is True


@pytest.mark.realdata
@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_the_diameter_cv_is_not_presented_as_an_rdw() -> None:
    """Normal-looking BCCD blood at its known scale: the red cells' diameters vary by about 7 %,
    under the 11.5-14.5 % an RDW-CV (of volumes) reads for normal blood. Called 'RDW-like' in the
    schema and the bundle, it read as a low RDW, and an anisocytosis's 10 % as a normal one; both
    now say it is of diameters, not an RDW."""
    from realdata import BCCD, BCCD_MICRONS_PER_PIXEL

    from smearscope.device.frame import Frame
    from smearscope.service.analysis.report import SizeStats

    images = sorted((BCCD / "JPEGImages").glob("*.jpg"))[:100:25]
    if not images:
        pytest.skip(f"BCCD not found under {BCCD}")
    analyzer = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    run = SpecimenRun(target_wbc=100, started_at=0.0)
    for img in images:
        assert run.add(analyzer.analyze(Frame(cv2.imread(str(img)), img.name, str(img),
                                              microns_per_pixel=BCCD_MICRONS_PER_PIXEL)), 1.0)
    report = run.report(station_id="s", now=2.0, end_reason="stopped")
    assert report.rbc_size.calibrated and report.rbc_size.n >= 20 and report.rbc_size.cv_percent < 11.5
    cv = component(by_code(report_bundle(report), codes.LOCAL_OBSERVATION, "rbc-diameter"), "cv")
    assert cv["valueQuantity"]["value"] == as_sent(report.rbc_size.cv_percent)
    for text in (cv["code"]["coding"][0]["display"], SizeStats.model_fields["cv_percent"].description):
        assert "not an RDW" in text or "not volumes" in text, text
        assert "RDW-like" not in text, text


@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_red_cells_counted_but_none_whole_to_measure_say_why_there_is_no_diameter(tmp_path: Path) -> None:
    """A 64 px crop of a rendered field at a given scale: its red cells are counted, but each is cut
    by the image's edge, so none is measured (rbc_size.n 0). The bundle had no rbc-diameter
    observation at all, where a count of no red cells or an estimated scale each say why; it now
    carries one with dataAbsentReason no-rbc-measured and its n component 0."""
    image = tmp_path / "crop.png"
    pixels = np.asarray(render_field(5, width=640, height=480).frame.pixels)
    cv2.imwrite(str(image), pixels[100:164, 100:164])
    out = tmp_path / "crop.fhir.json"
    proc = subprocess.run([sys.executable, "-m", "smearscope", "analyze", "--json", "--microns-per-pixel", "0.2",
                           str(image), "--fhir", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["counts"]["rbc"] > 0 and report["rbc_size"]["calibrated"] and report["rbc_size"]["n"] == 0
    bundle = json.loads(out.read_text())
    validate(bundle)
    diameter = by_code(bundle, codes.LOCAL_OBSERVATION, "rbc-diameter")
    assert diameter["dataAbsentReason"]["coding"][0]["code"] == "no-rbc-measured"
    assert component(diameter, "n")["valueInteger"] == 0
    assert not any(k.startswith("value") for k in diameter)


@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_every_local_code_of_a_bundle_is_displayed_as_the_code_table_says() -> None:
    """A rendered field of sickle cells, one of which the head called below the critical flag's
    confidence: its sickle row's grade rests on fewer calls than its count (`graded_count`), so the
    bundle carries the `graded-count` component. Every code of the local observation system in the
    bundle has the display codes.LOCAL_CODES gives it (an LIS shows that text; the HL7 message's
    OBX-3 too): `graded-count` had none and was displayed as its bare code."""
    analyzer = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    field = render_field(3, width=640, height=480, microns_per_pixel=0.1,
                         rbc_mix={"normal": 0.6, "sickle": 0.4}, n_wbc=1).frame
    report = analyzer.analyze(field).report
    sickle = next(s for s in report.rbc_morphology if s.label == "sickle")
    assert sickle.graded_count is not None and sickle.graded_count < sickle.count
    bundle = report_bundle(report)
    validate(bundle)

    def codings(node: Any):
        if isinstance(node, dict):
            if node.get("system") == codes.LOCAL_OBSERVATION and "code" in node:
                yield node
            for v in node.values():
                yield from codings(v)
        elif isinstance(node, list):
            for v in node:
                yield from codings(v)

    local = {c["code"]: c["display"] for c in codings(bundle)}
    assert "graded-count" in local
    assert {code: display for code, display in local.items() if codes.LOCAL_CODES.get(code) != display} == {}


def test_the_specimens_note_says_its_fields_in_words() -> None:
    """The Specimen's note, which an EHR shows a clinician: '1 field analysed' for a one-field run,
    '12 fields analysed' otherwise, never 'field(s)'."""
    twelve = graded_report()
    one = twelve.model_copy(update={"fields_analyzed": 1})
    notes = [resources(report_bundle(r), "Specimen")[0]["note"] for r in (one, twelve)]
    assert notes == [[{"text": "1 field analysed"}], [{"text": "12 fields analysed"}]], notes
