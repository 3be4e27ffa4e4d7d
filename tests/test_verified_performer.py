"""Who verified each result: in a verified (or signed again) report every FHIR Observation names the technician
as its performer, the DiagnosticReport's Practitioner in the same bundle, and every OBX of the HL7 message names
them in OBX-16 (Responsible Observer) as OBR-32 does; a preliminary report names no one. Reports of real pipeline
runs (oracle parts on rendered fields)."""

from __future__ import annotations

import pytest
from test_fhir import resources, specimen_report, validate
from test_hl7 import HOSTILE, parsed, read, segments, verified

from smearscope.service.analysis.report import Report
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.hl7.oru import oru_r01


def _signed(signing: str, signer: str) -> Report:
    report = specimen_report()
    return report if signing == "preliminary" else verified(report, signing == "signed again", signer)


@pytest.mark.parametrize("signing", ["preliminary", "verified", "signed again"])
def test_every_observation_of_a_verified_report_names_the_technician_who_verified_it(signing: str) -> None:
    """The technician of a verified report, and the one who signed again (not the one they amend: CD), is the
    performer of each Observation, flags' included: the DiagnosticReport's Practitioner, resolved in the bundle."""
    bundle = report_bundle(_signed(signing, "EF"))
    validate(bundle)  # every reference resolves inside the bundle
    (dr,) = resources(bundle, "DiagnosticReport")
    observations = resources(bundle, "Observation")
    practitioners = resources(bundle, "Practitioner")
    if signing == "preliminary":
        assert practitioners == [] and "performer" not in dr
        assert not any("performer" in o for o in observations)
        return
    (practitioner,) = practitioners
    assert practitioner["name"] == [{"text": "EF"}]
    reference = next(e["fullUrl"] for e in bundle["entry"] if e["resource"] is practitioner)
    assert dr["performer"] == [{"reference": reference, "display": "EF"}]
    assert len(observations) > 10 and all(o["performer"] == dr["performer"] for o in observations)


@pytest.mark.parametrize("signing", ["preliminary", "verified", "signed again"])
def test_every_obx_of_a_verified_report_names_its_responsible_observer_as_obr_32_does(signing: str) -> None:
    """OBX-16 (XCN, its family name part) on each result, component and flag row, as OBR-32 names the signer
    and as the bundle's Observations name their performer; empty on a preliminary report. Valid v2.5.1."""
    report = _signed(signing, "EF")
    message = oru_r01(report)
    order = parsed(message).oru_r01_patient_result.oru_r01_order_observation
    rows = [group.obx for group in order.oru_r01_observation]
    assert len(rows) == len(segments(message, "OBX")) > 20
    if signing == "preliminary":
        assert all(row.obx_16.value == "" for row in rows)
        return
    assert read(order.obr.obr_32.obr_32_1) == "EF"
    for row in rows:
        assert [c.name for c in row.obx_16.children] == ["XCN_2"] and read(row.obx_16.xcn_2) == "EF"
    assert {p["display"] for o in resources(report_bundle(report), "Observation") for p in o["performer"]} == {"EF"}


def test_a_signature_holding_delimiters_is_read_back_whole_from_every_obx_16() -> None:
    """A signature of HL7 delimiters and a line break, escaped: each OBX-16 reads back as it was signed, as
    OBR-32 does, and the message stays valid."""
    message = oru_r01(_signed("verified", HOSTILE))
    order = parsed(message).oru_r01_patient_result.oru_r01_order_observation
    assert read(order.obr.obr_32.obr_32_1) == HOSTILE
    for group in order.oru_r01_observation:
        assert read(group.obx.obx_16.xcn_2) == HOSTILE
