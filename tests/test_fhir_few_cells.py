"""Too few cells for a differential or for grades, said at each result it concerns: a note on the FHIR Observation
and an NTE under its HL7 row, in the dashboard's words above the table ("Not a differential: ..."), so a chart
showing "Neutrophils 100 %" of one white cell shows why it is not a differential. A real field through the
shipped models (one white cell, 118 red cells); a report of enough cells has no such note."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from realdata import DATA, needs_models
from test_fhir import analyzed_with_fhir, findings, graded_report, validate
from test_hl7 import parsed, unescaped

from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import FEW_CELLS, report_bundle
from smearscope.service.hl7.oru import oru_r01

ROOT = Path(__file__).resolve().parents[1]
IMAGE = DATA / "chula_wbc_rpi" / "train" / "images" / "B-30_0047.jpg"


def concerns(obs: dict[str, Any]) -> str | None:
    """The few-cells flag an Observation of a result with a value is about: the differential's (each class, the
    unidentified, NRBC per 100 WBC) or the morphology's (each finding with a value)."""
    coding = {(c["system"], c["code"]) for c in obs["code"]["coding"]}
    if not any(k.startswith("value") for k in obs):
        return None
    if any(s == codes.LOCAL_WBC_CLASS for s, _ in coding) or (codes.LOCAL_OBSERVATION, "wbc-unidentified") in coding \
            or (codes.LOINC, codes.NRBC.code) in coding:
        return "too_few_wbc_for_differential"
    if any(s == codes.LOCAL_RBC_MORPHOLOGY for s, _ in coding) or coding & {
            (codes.LOCAL_OBSERVATION, "rbc-unidentified"), (codes.LOCAL_OBSERVATION, "rbc-other-poikilocyte")}:
        return "too_few_rbc_for_morphology"
    return None


def notes_after(message: str) -> dict[str, list[str]]:
    """Each OBX's code (OBX-3.1 and sub-id) -> the NTE texts right after it, decoded."""
    out: dict[str, list[str]] = {}
    last = None
    for seg in message.split("\r"):
        fields = seg.split("|")
        if fields[0] == "OBX":
            last = f"{fields[3].split('^')[0]}/{fields[4]}"
            out[last] = []
        elif fields[0] == "NTE" and last is not None:
            out[last].append(unescaped(fields[3]))
    return out


@needs_models
@pytest.mark.skipif(not IMAGE.exists(), reason=f"chula_wbc_rpi not found under {DATA}")
def test_a_field_of_one_white_cell_says_at_each_share_it_is_not_a_differential(tmp_path: Path) -> None:
    report, bundle = analyzed_with_fhir(IMAGE, tmp_path, microns_per_pixel=0.1286)
    messages = {f.code: f.message for f in report.flags}
    assert set(FEW_CELLS) <= set(messages) and report.counts.wbc < 100 and report.counts.rbc < 200
    expected = {code: f"{before}{messages[code]}{after}" for code, (before, after) in FEW_CELLS.items()}
    results = findings(bundle)
    said = {code: 0 for code in FEW_CELLS}
    for obs in results:
        code = concerns(obs)
        if code is None:
            assert "note" not in obs, obs["code"]
        else:
            assert obs["note"] == [{"text": expected[code]}], obs["code"]
            said[code] += 1
    assert said["too_few_wbc_for_differential"] >= 7 and said["too_few_rbc_for_morphology"] >= 10, said
    # the HL7 message: an NTE under each such result's row, the same words
    message = oru_r01(report)
    parsed(message)
    after = notes_after(message)
    for group, obs in enumerate(results, start=1):
        notes = after[f"{obs['code']['coding'][0]['code']}/{group}"]
        code = concerns(obs)
        assert (expected[code] in notes) if code else not any(n in expected.values() for n in notes)
    # the dashboard says the same words above its tables
    js = (ROOT / "service" / "dashboard" / "static" / "runview.js").read_text()
    for before, end in FEW_CELLS.values():
        assert f'"{before}"' in js and f'"{end}"' in js


def test_a_report_of_enough_cells_has_no_such_note() -> None:
    report = graded_report()  # 110 white cells, 1000 red cells
    assert not set(FEW_CELLS) & {f.code for f in report.flags}
    bundle = report_bundle(report)
    validate(bundle)
    assert not any("note" in obs for obs in findings(bundle))
    prefixes = tuple(before for before, _ in FEW_CELLS.values())
    assert not any(n.startswith(prefixes) for notes in notes_after(oru_r01(report)).values() for n in notes)
