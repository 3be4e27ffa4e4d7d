"""Nucleated red cells seen in a field of no white cell: the NRBC result is sent without a number (there is no 100
white cells to count them per), its reason and its count, never left out, which read as none looked for while the
flag nucleated_rbc_present said they were there. A real PBC image of an erythroblast through the shipped models."""

from __future__ import annotations

from pathlib import Path

import pytest
from realdata import DATA, needs_models
from test_fhir import analyzed_with_fhir, by_code, findings
from test_hl7 import parsed, segments, unescaped

from smearscope.service.fhir import codes
from smearscope.service.hl7.oru import oru_r01

IMAGE = DATA / "pbc" / "erythroblast" / "ERB_101031.jpg"


@needs_models
@pytest.mark.skipif(not IMAGE.exists(), reason=f"PBC not found under {DATA}")
def test_nrbc_of_a_field_without_white_cells_are_said_without_a_ratio(tmp_path: Path) -> None:
    report, bundle = analyzed_with_fhir(IMAGE, tmp_path)
    assert report.counts.wbc == 0 and report.counts.nrbc >= 1 and report.nrbc_per_100_wbc is None, report.counts
    assert "nucleated_rbc_present" in {f.code for f in report.flags}
    nrbc = by_code(bundle, codes.LOINC, codes.NRBC.code)
    assert not any(k.startswith("value") for k in nrbc)
    assert [c["code"] for c in nrbc["dataAbsentReason"]["coding"]] == ["no-wbc-seen", "unknown"]
    assert [(c["code"]["coding"][0]["code"], c["valueInteger"]) for c in nrbc["component"]] == [
        ("count", report.counts.nrbc)]
    assert "interpretation" not in nrbc  # no value to mark; the flag's own Observation says A
    # the HL7 row: no value, X, the reason under it, the count in the row after
    message = oru_r01(report)
    parsed(message)
    group = str(next(i for i, o in enumerate(findings(bundle), start=1) if o is nrbc))
    rows = [s for s in segments(message, "OBX") if s[4] == group]
    assert (rows[0][3].split("^")[0], rows[0][5], rows[0][11]) == (codes.NRBC.code, "", "X")
    assert (rows[1][3].split("^")[0], rows[1][5]) == ("count", str(report.counts.nrbc))
    notes = [unescaped(s.split("|")[3]) for s in message.split("\r") if s.startswith("NTE|")]
    assert any(n.startswith("Not assessable (no-wbc-seen)") for n in notes)
