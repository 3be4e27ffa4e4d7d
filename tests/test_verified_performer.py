"""Who verified each result: in a verified (or signed again) report every FHIR Observation names the technician
as its performer, the DiagnosticReport's Practitioner in the same bundle; a preliminary report names no one.
Reports of real pipeline runs (oracle parts on rendered fields)."""

from __future__ import annotations

import pytest
from test_fhir import resources, specimen_report, validate
from test_hl7 import verified

from smearscope.service.analysis.report import Report
from smearscope.service.fhir.bundle import report_bundle


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
