"""The HL7 v2.5.1 ORU^R01 message of a report: parsed and validated against the v2.5.1 ORU_R01
structure by an independent library (hl7apy, strict validation), and its fields checked against the
report and its FHIR bundle: statuses as the bundle's (P, F, C), codes and units from the one code
table, every delimiter a report's text holds escaped."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from test_fhir import as_sent, findings, graded_report, resources, specimen_report

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.report import Flag, Report, Verification
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.hl7.encode import text
from smearscope.service.hl7.oru import control_id, filler_order_number, oru_r01, placer_order_number

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "H|1^2~3\\4&5\r\nPID|6"
#: HL7's v2-to-FHIR mapping of result status (tables 0123, OBR-25, and 0085, OBX-11) to DiagnosticReport.status and
#: Observation.status (the V2-to-FHIR implementation guide's concept maps): C, a correction replacing a final result,
#: is `corrected`.
V2_TO_FHIR_STATUS = {"P": "preliminary", "F": "final", "C": "corrected"}


def parsed(message: str) -> Message:
    """The message parsed strictly by hl7apy and validated against v2.5.1's ORU_R01 (raises otherwise)."""
    assert message.endswith("\r") and "\n" not in message
    msg = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert msg.validate() is True
    return msg


def segments(message: str, name: str) -> list[list[str]]:
    return [s.split("|") for s in message.split("\r") if s.startswith(name + "|")]


def unescaped(value: str) -> str:
    """HL7 v2's escapes read back (section 2.7: F S T R E and hex \\Xhh\\), as a receiver decodes them."""
    named = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
    return re.sub(r"\\(F|S|T|R|E|X[0-9A-F]{2})\\",
                  lambda m: named.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), value)


def read(component) -> str:  # type: ignore[no-untyped-def]
    """A component's text as hl7apy parsed it (its ST as on the wire), decoded."""
    return unescaped(component.children[0].value.value)


def verified(report: Report, signed_again: bool = False, signer: str = "AB") -> Report:
    v = Verification(verified_by=signer, verified_at=report.created_at + 60, supersedes=report.report_id,
                     typed_cells=4, reclassified=[], supersedes_verified_by="CD" if signed_again else None,
                     supersedes_verified_at=report.created_at + 30 if signed_again else None)
    return report.model_copy(update={"report_id": report.report_id + "-v", "verification": v})


@pytest.mark.parametrize("signing", ["preliminary", "verified", "signed again"])
def test_a_specimen_report_of_real_analyses_is_a_valid_oru_r01_with_the_bundles_status(signing: str) -> None:
    report = specimen_report().model_copy(update={"specimen_id": "H-2026-0412"})
    if signing != "preliminary":
        report = verified(report, signed_again=signing == "signed again")
    message = oru_r01(report)
    msg = parsed(message)
    bundle = report_bundle(report)
    (dr,) = resources(bundle, "DiagnosticReport")
    # the bundle's status is what HL7's v2-to-FHIR mapping makes of the message's (OBR-25, each OBX-11 of a value)
    obr25 = segments(message, "OBR")[0][25]
    assert obr25 == {"preliminary": "P", "verified": "F", "signed again": "C"}[signing]
    assert dr["status"] == V2_TO_FHIR_STATUS[obr25]
    assert {V2_TO_FHIR_STATUS[s[11]] for s in segments(message, "OBX") if s[11] != "X"} == {
        o["status"] for o in resources(bundle, "Observation")} == {dr["status"]}

    msh = msg.msh
    assert msh.msh_3.value == "smearscope" and msh.msh_4.value == "bench-1"
    assert msh.msh_9.value == "ORU^R01^ORU_R01" and msh.msh_12.value == "2.5.1"
    assert msh.msh_18.value == "UNICODE UTF-8" and msh.msh_10.value == control_id(report.report_id)
    assert len(msh.msh_10.value) == 20
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.value == obr25
    assert order.obr.obr_2.value == order.orc.orc_2.value == "H-2026-0412"
    filler = filler_order_number(report.run_id)
    assert len(filler) == 11 and order.obr.obr_3.value == order.orc.orc_3.value == f"{filler}^smearscope"
    assert order.obr.obr_4.obr_4_1.value == codes.PANEL.code and order.obr.obr_4.obr_4_3.value == "LN"
    assert order.oru_r01_specimen.spm.spm_2.value == f"H-2026-0412^{filler}&smearscope"
    assert not segments(message, "PID")  # no patient, as the bundle has no subject

    # one OBX per Observation of a result and per component, one per flag; values and units are the bundle's
    observations = findings(bundle)
    obx = segments(message, "OBX")
    assert len(obx) == sum(1 + len(o.get("component", [])) for o in observations) + len(report.flags)
    assert [int(s[1]) for s in obx] == list(range(1, len(obx) + 1))
    for row in obx[:-len(report.flags) or None]:
        assert row[11] in (obr25, "X")
    heads = [s for s in obx if s[4] != ""]
    assert {s[4] for s in heads} >= {str(i) for i in range(1, len(observations) + 1)}
    for share in report.wbc_differential:
        if share.label not in codes.WBC_LOINC:
            continue
        (row,) = [s for s in obx if s[3].split("^")[0] == codes.WBC_LOINC[share.label].code]
        assert row[2] == "NM" and float(row[5]) == as_sent(share.percent) and row[6] == "%^%^UCUM"
        assert row[3].split("^")[2] == "LN" and row[3].split("^")[3] == share.label
    flag_rows = obx[len(obx) - len(report.flags):]
    assert [r[3].split("^")[0] for r in flag_rows] == [
        f.code for f in sorted(report.flags, key=lambda f: ("critical", "warning", "info").index(f.severity))]
    for row in flag_rows:
        severity = next(f.severity for f in report.flags if f.code == row[3].split("^")[0])
        assert row[8] == {"critical": "AA", "warning": "A", "info": ""}[severity]

    notes = [s[3] for s in segments(message, "NTE")]
    assert notes[0].startswith("Not for clinical diagnosis")
    assert notes[1] == text(dr["conclusion"], 65536)
    assert unescaped(notes[2]) == f"Run id: {report.run_id} (ORC-3, OBR-3 and SPM-2 carry {filler}^smearscope: HL7 v2.5.1 " \
        "gives a filler order number 22 characters, its namespace included)"
    if signing == "preliminary":
        assert order.obr.obr_32.value == ""
    else:
        assert order.obr.obr_32.value == "&AB" and notes[1].startswith("Verified by AB")
    assert oru_r01(report) == message  # the same report, the same message


def test_results_without_a_value_are_x_with_a_note_saying_why() -> None:
    """Sizes at an estimated scale: the size-based findings and the diameter have no value (FHIR's
    dataAbsentReason), OBX-11 X and a note naming the reason."""
    report = graded_report([Flag(code="size_not_assessable_without_calibration", severity="warning",
                                 message="sizes need a calibration")])
    report = report.model_copy(update={"rbc_size": report.rbc_size.model_copy(update={"calibrated": False})})
    seen = 0
    message = oru_r01(report)
    parsed(message)
    lines = message.split("\r")
    for i, line in enumerate(lines):
        fields = line.split("|")
        if fields[0] == "OBX" and fields[3].split("^")[0] in ("802-9", "rbc-diameter"):
            assert fields[2] == "" and fields[5] == "" and fields[11] == "X", line
            assert lines[i + 1].startswith("NTE|1|L|Not assessable (size-not-assessable): "), lines[i + 1]
            seen += 1
    assert seen == 2


def test_hostile_specimen_ids_flags_and_signatures_cannot_break_the_message() -> None:
    """Delimiters and line breaks in every text a report carries are escaped: the message still
    parses as the same segments and fields, and hl7apy reads each text back as it was."""
    flags = [Flag(code="odd|code^x", severity="critical", message=HOSTILE * 40),
             Flag(code="many_unidentified_wbc", severity="warning", message=HOSTILE)]
    report = graded_report(flags).model_copy(update={"specimen_id": HOSTILE, "run_id": HOSTILE,
                                                     "station_id": "lab|7^x"})
    report = verified(report.model_copy(update={"report_id": "r|1"}), signer=HOSTILE)
    message = oru_r01(report)
    msg = parsed(message)
    names = [s.split("|")[0] for s in message.split("\r") if s]
    assert names[:3] == ["MSH", "ORC", "OBR"] and names[-1] == "SPM" and "PID" not in names
    assert set(names) == {"MSH", "ORC", "OBR", "NTE", "OBX", "SPM"}
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    # hl7apy splits the fields where the message has them and keeps their text escaped: read back, each is whole
    # as sent, the escaped id is over EI.1's 22 characters: the placer order number is its short form,
    # the whole id read back from the note under OBR
    assert read(order.obr.obr_2.obr_2_1) == read(order.orc.orc_2.orc_2_1) == placer_order_number(HOSTILE)
    assert len(order.orc.orc_2.value) <= 22
    assert f"Specimen id: {HOSTILE} (ORC-2, OBR-2 and SPM-2 carry {placer_order_number(HOSTILE)}: HL7 v2.5.1 " \
        "gives a placer order number 22 characters)" in [unescaped(nte[3]) for nte in segments(message, "NTE")]
    assert read(order.obr.obr_3.obr_3_1) == filler_order_number(HOSTILE) and read(order.obr.obr_3.obr_3_2) == \
        "smearscope"
    assert f"Run id: {HOSTILE} (ORC-3, OBR-3 and SPM-2 carry {filler_order_number(HOSTILE)}^smearscope: HL7 " \
        "v2.5.1 gives a filler order number 22 characters, its namespace included)" in \
        [unescaped(nte[3]) for nte in segments(message, "NTE")]
    assert read(msg.msh.msh_4.msh_4_1) == "lab|7^x"
    signer = order.obr.obr_32.obr_32_1  # NDL's name, its family name part (CNN-2)
    assert [c.name for c in signer.children] == ["CNN_2"] and read(signer) == HOSTILE
    for s in segments(message, "OBX") + segments(message, "NTE"):
        assert len(s) <= 20
    obx = segments(message, "OBX")
    odd = next(s for s in obx if s[3].startswith("odd"))
    assert odd[3].split("^")[0] == "odd\\F\\code\\S\\x" and odd[8] == "AA" and odd[11] == "F"
    # ST: cut at 199 characters as sent, never inside an escape; the whole message is in the note under it
    i = message.split("\r").index("|".join(odd))
    note = message.split("\r")[i + 1].split("|")
    assert note[0] == "NTE" and unescaped(note[3]) == HOSTILE * 40
    assert unescaped(odd[5]) == (HOSTILE * 40)[:len(unescaped(odd[5]))] and 190 <= len(odd[5]) <= 199


@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_the_analyzers_report_of_a_rendered_field_is_a_valid_oru_r01(tmp_path: Path) -> None:
    field = render_field(7, width=480, height=360, microns_per_pixel=0.1)
    image = tmp_path / "f7.png"
    cv2.imwrite(str(image), np.asarray(field.frame.pixels))
    proc = subprocess.run([sys.executable, "-m", "smearscope", "analyze", "--json", "--microns-per-pixel", "0.1",
                           str(image)], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = Report.model_validate(json.loads(proc.stdout))
    message = oru_r01(report)
    msg = parsed(message)
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.value == "P" and order.obr.obr_3.value == f"{filler_order_number(report.report_id)}^smearscope"
    assert len(segments(message, "OBX")) == sum(
        1 + len(o.get("component", [])) for o in findings(report_bundle(report))) + len(report.flags)


def test_a_specimen_id_over_22_characters_gets_a_short_placer_order_number_and_travels_whole() -> None:
    """HL7 v2.5.1 gives ORC-2/OBR-2's EI.1 22 characters; a specimen id takes up to 64. A longer one is sent
    as a deterministic short form (two ids differing only at their end differ in it too), the whole id in
    the note under OBR; one that fits is sent as the lab knows it, with no such note."""
    base = specimen_report()
    long_ids = ["LAB7-2026-11-30-HEMATOLOGY-SMEAR-" + "0" * 30 + end for end in "12"]
    assert all(len(i) == 64 for i in long_ids)
    placers = []
    for specimen_id in long_ids:
        message = oru_r01(base.model_copy(update={"specimen_id": specimen_id}))
        msg = parsed(message)
        order = msg.oru_r01_patient_result.oru_r01_order_observation
        placer = order.orc.orc_2.orc_2_1.value
        assert len(placer) <= 22 and placer.startswith("LAB720261-")
        assert order.obr.obr_2.obr_2_1.value == placer
        assert order.oru_r01_specimen.spm.spm_2.spm_2_1.value.split("^")[0] == placer
        notes = [unescaped(nte[3]) for nte in segments(message, "NTE")]
        assert f"Specimen id: {specimen_id} (ORC-2, OBR-2 and SPM-2 carry {placer}: HL7 v2.5.1 gives a placer " \
               "order number 22 characters)" in notes
        assert oru_r01(base.model_copy(update={"specimen_id": specimen_id})) == message  # the same, every time
        placers.append(placer)
    assert placers[0] != placers[1]

    for fits in ("H-2026-0412", "H" * 22):
        message = oru_r01(base.model_copy(update={"specimen_id": fits}))
        order = parsed(message).oru_r01_patient_result.oru_r01_order_observation
        assert order.orc.orc_2.value == order.obr.obr_2.value == fits
        assert not [nte for nte in segments(message, "NTE") if nte[3].startswith("Specimen id:")]


#: HL7 v2.5.1's length of each field built from an identifier, the whole field as sent (components, their
#: separators and escapes counted): the segment attribute tables of v2.5.1 chapter 2 (MSH), 4 (ORC, OBR) and 7
#: (OBX, SPM). (segment, field number): length.
V251_LENGTHS = {("MSH", 4): 227, ("MSH", 10): 20, ("ORC", 2): 22, ("ORC", 3): 22, ("OBR", 2): 22, ("OBR", 3): 22,
                ("OBR", 32): 200, ("OBX", 16): 250, ("OBX", 18): 22, ("SPM", 2): 80}


def field(fields: list[str], number: int) -> str:
    """Field `number` of a segment split at '|' (MSH-1 is the separator itself: MSH-n is its n-1th part)."""
    index = number - 1 if fields[0] == "MSH" else number
    return fields[index] if index < len(fields) else ""


@pytest.mark.parametrize("ids", ["long", "hostile", "uuid"])
def test_every_field_built_from_an_id_is_within_its_v251_length(ids: str) -> None:
    """A 64-character specimen, run and station id, hostile ones (each delimiter and a CR LF, escaped to several
    times their length) and a plain UUID run: ORC-2/3, OBR-2/3, SPM-2, MSH-4, MSH-10, OBR-32, OBX-16 and OBX-18 each
    within v2.5.1's length for the whole field as sent, the message valid, each whole id read back from a note,
    and a verified report of the run with the same ORC-3 as its preliminary one."""
    values = {"long": ("S" * 63 + "1", "R" * 63 + "1", "st" * 32, "A" * 64),
              "hostile": (HOSTILE * 4, HOSTILE * 5, (HOSTILE * 4)[:64], HOSTILE * 10),
              "uuid": ("H-2026-0412", "5b1e6f0a-3c2d-4e8f-9a7b-1c2d3e4f5a6b", "lab-7", "AB")}[ids]
    specimen_id, run_id, station_id, signer = values
    report = specimen_report().model_copy(update={"specimen_id": specimen_id, "run_id": run_id,
                                                  "station_id": station_id, "report_id": "r|" + run_id})
    preliminary = oru_r01(report)
    amended = oru_r01(verified(report, signer=signer))
    for message in (preliminary, amended):
        parsed(message)
        checked = set()
        for line in message.split("\r")[:-1]:
            fields = line.split("|")
            for (name, number), length in V251_LENGTHS.items():
                if fields[0] == name:
                    for value in field(fields, number).split("~"):  # OBX-18 repeats: its length is each one's
                        assert len(value) <= length, (name, number, value)
                    checked.add((name, number))
        assert checked == set(V251_LENGTHS)
        notes = [unescaped(nte[3]) for nte in segments(message, "NTE")]
        if ids != "uuid":
            assert any(n.startswith(f"Specimen id: {specimen_id} (") for n in notes)
            assert any(n.startswith(f"Station id: {station_id} (") for n in notes)
        assert any(n.startswith(f"Run id: {run_id} (ORC-3, OBR-3 and SPM-2 carry ") for n in notes)
    orc = [segments(m, "ORC")[0] for m in (preliminary, amended)]
    assert orc[0][3] == orc[1][3] and orc[0][2] == orc[1][2]  # the LIS matches the amended report with its original
    assert segments(preliminary, "SPM")[0][2] == segments(amended, "SPM")[0][2]
    other = oru_r01(report.model_copy(update={"run_id": run_id[:-1] + "2"}))
    assert segments(other, "ORC")[0][3] != orc[0][3]  # runs differing only at their end: two orders
