"""What a lab's interface analyst sets up and checks in the ORU^R01 (docs/HL7.md): MSH-4/5/6 as HL7
HDs the archive is given (anything else refused, naming the option), SFT segments naming the
software and models that made the report (as the FHIR Device does), and every coded field a value
of its HL7 v2.5.1 table (hl7apy's tables, read independently of the code), each OBX-5 as its OBX-2
says, the observation and analysis times and the equipment as the FHIR bundle has them."""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest
from hl7apy.v2_5_1.tables import TABLES
from test_fhir import graded_report, resources, specimen_report
from test_hl7 import parsed, segments, unescaped, verified

from smearscope.cli import main
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.report import Flag, Report
from smearscope.service.config.archive import ArchiveConfig
from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.hl7.encode import dtm
from smearscope.service.hl7.header import Addressing
from smearscope.service.hl7.oru import oru_r01

ROOT = Path(__file__).resolve().parents[1]
LAB = Addressing("LAB7^2.16.840.1.113883.19.4.6^ISO", "LIS^lis.clinic.lan^DNS", "MAIN")


def table(number: str) -> tuple[str, ...]:
    return TABLES[f"HL7{number}"][1]


def test_msh_4_5_6_are_the_hds_the_lab_gave() -> None:
    report = specimen_report()
    msh = parsed(oru_r01(report, LAB)).msh
    assert [msh.msh_4.hd_1.value, msh.msh_4.hd_2.value, msh.msh_4.hd_3.value] == [
        "LAB7", "2.16.840.1.113883.19.4.6", "ISO"]
    assert [msh.msh_5.hd_1.value, msh.msh_5.hd_2.value, msh.msh_5.hd_3.value] == ["LIS", "lis.clinic.lan", "DNS"]
    assert msh.msh_6.value == "MAIN"
    plain = parsed(oru_r01(report)).msh  # none given: the station id, receivers empty
    assert plain.msh_4.value == "bench-1" and plain.msh_5.value == "" and plain.msh_6.value == ""



def test_a_station_id_longer_than_an_hds_namespace_id_is_msh_4_whole_and_valid() -> None:
    """Station ids take up to 64 characters, an HD's namespace id 20 (IS): without
    --hl7-sending-facility, a longer one goes whole into MSH-4's universal id, type L (local)."""
    for station in ("clinic-north-wing-microscope-02", "s" * 64):
        report = specimen_report().model_copy(update={"station_id": station})
        msg = parsed(oru_r01(report))  # strict v2.5.1: a namespace id over 20 characters fails it
        assert [msg.msh.msh_4.hd_1.value, msg.msh.msh_4.hd_2.value, msg.msh.msh_4.hd_3.value] == ["", station, "L"]
    short = parsed(oru_r01(specimen_report().model_copy(update={"station_id": "n" * 20}))).msh
    assert short.msh_4.value == "n" * 20  # up to 20: the namespace id, as before

BAD_HDS = ["LIS|X", "LIS&X", "LIS~X", "LIS\\X", "LIS\rMSH", "LIS^1.2.3", "LIS^^ISO", "LIS^1.2.3^OID",
           "A^B^ISO^D", "N" * 21, "",
           "LAB\udcff"]  # a byte that is no UTF-8 in the command line or archive.env (Python's surrogateescape)


@pytest.mark.parametrize("bad", BAD_HDS)
def test_an_hd_with_a_delimiter_a_missing_type_or_too_long_is_refused(bad: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):
        Addressing(receiving_facility=bad)
    with pytest.raises(pydantic.ValidationError):
        ArchiveConfig(mqtt=MqttConfig(host="broker"), directory=tmp_path, hl7_receiving_facility=bad)
    # the archive refuses it before it opens anything: exit 2, naming the option
    assert main(["archive", "--broker", "mqtt://127.0.0.1:1", "--dir", str(tmp_path / "a"),
                 "--hl7-receiving-facility", bad]) == 2
    assert "--hl7-receiving-facility: " in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_report_naming_its_software_has_sft_for_it_and_none_without() -> None:
    report = specimen_report()
    assert report.software_version and not report.models
    message = oru_r01(report)
    order = [s.split("|")[0] for s in message.split("\r") if s]
    assert order[:2] == ["MSH", "SFT"]  # SFT right after MSH, as v2.5.1's ORU_R01 has it
    sft = parsed(message).sft
    assert [sft.sft_1.value, sft.sft_2.value, sft.sft_3.value, sft.sft_4.value] == [
        "smearscope", report.software_version, "smearscope", report.software_version]
    older = report.model_copy(update={"software_version": None, "analysis_software": None})  # before schema 1.2
    assert not segments(oru_r01(older), "SFT")
    parsed(oru_r01(older))


@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_sft_names_each_model_as_the_fhir_device_does() -> None:
    from smearscope.service.analysis.pipeline import Analyzer

    analyzer = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    report = analyzer.analyze(render_field(7, width=480, height=360, microns_per_pixel=0.1).frame).report
    assert report.software_version and report.models
    message = oru_r01(report)
    parsed(message)
    sft = segments(message, "SFT")
    assert len(sft) == 1 + len(report.models)
    (device,) = resources(report_bundle(report), "Device")
    versions = {v["type"]["text"]: v["value"] for v in device["version"]}
    assert sft[0][1:5] == ["smearscope", report.software_version, "smearscope", report.software_version]
    assert sft[0][5] == f"smearscope {versions['software']}"
    for row, (role, model) in zip(sft[1:], sorted(report.models.items()), strict=True):
        assert row[3] == role and row[4] == model.sha256[:20] and len(row[2]) <= 15
        means = versions.get(f"{role} station means")
        assert unescaped(row[5]) == f"{role}: {versions[role]}" + (f"; station means {means}" if means else "")


def messages() -> list[tuple[Report, str]]:
    flags = [Flag(code="schistocytes_present", severity="critical", message="schistocytes 1.5 %"),
             Flag(code="left_shift", severity="warning", message="band forms")]
    reports = [specimen_report(), verified(specimen_report()), graded_report(flags)]
    return [(r, oru_r01(r)) for r in reports]


NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def test_coded_fields_are_values_of_their_v2_5_1_tables_and_each_value_its_type() -> None:
    systems = set(table("0396")) | {"UCUM", "HL70136", "HL70487"} | {s for s in
                                                                   ("99SSO", "99SSW", "99SSR", "99SSG", "99SSF")}
    kinds: set[str] = set()
    for report, message in messages():
        parsed(message)
        bundle = report_bundle(report)
        (dr,) = resources(bundle, "DiagnosticReport")
        (specimen,) = resources(bundle, "Specimen")
        (obr,) = segments(message, "OBR")
        assert obr[4].split("^")[:3] == [codes.PANEL.code, codes.PANEL.display + obr[4].split("^")[1][
            len(codes.PANEL.display):], "LN"] and dr["code"]["coding"][0]["code"] == codes.PANEL.code
        assert obr[7] == dtm(dr["effectiveDateTime"]) and obr[22] == dtm(dr["issued"])
        assert obr[24] in table("0074") and obr[25] in table("0123")
        (spm,) = segments(message, "SPM")
        spm4 = spm[4].split("^")
        assert spm4[0] in table("0487") and spm4[2] == "HL70487" and spm4[8] == specimen["type"]["text"]
        assert spm4[:2] == [specimen["type"]["coding"][0]["code"], specimen["type"]["coding"][0]["display"]]
        assert specimen["type"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0487"
        for nte in segments(message, "NTE"):
            assert nte[2] in table("0105") and nte[4] in table("0364")
        for obx in segments(message, "OBX"):
            kind, value = obx[2], obx[5]
            assert (kind == "") == (value == "")
            if kind:
                kinds.add(kind)
                assert kind in table("0125"), obx
            if kind == "NM":
                assert NUMBER.fullmatch(value), obx
            elif kind == "SN":
                assert re.fullmatch(rf"\^{NUMBER.pattern}\^-\^{NUMBER.pattern}", value), obx
            elif kind == "CE":
                parts = value.split("^")
                assert parts[0] and len(parts) in (3, 6) and parts[2] in systems and \
                    (len(parts) == 3 or parts[5] in systems), obx
            assert obx[3].split("^")[2] in systems
            if obx[6]:
                assert obx[6].split("^")[2] == "UCUM"
            assert obx[8] in ("", *table("0078")) and obx[11] in table("0085")
            assert obx[14] == obr[7] and obx[19] == obr[22]
            (key,) = [i["value"] for d in resources(bundle, "Device") for i in d["identifier"]
                      if i["system"] == codes.ID_DEVICE]
            assert obx[18] == f"{report.station_id}^smearscope~{key}^smearscope"
    assert kinds == {"NM", "SN", "CE", "ST"}
