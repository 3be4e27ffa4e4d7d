"""One FHIR Device per station, software version and set of models, not one per report: every report of an
unchanged station (and a report sent again) names the same Device, id and identifier; a software or model update
names a new one, while the results made before keep pointing at theirs. The HL7 message's OBX-18 carries the
same identifier after the station id. Real fields through the shipped models (`smearscope analyze`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from realdata import DATA, needs_models
from test_fhir import resources, validate
from test_hl7 import parsed, segments

from smearscope.service.analysis.report import Report
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.hl7.oru import oru_r01

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [DATA / "chula_wbc_rpi" / "train" / "images" / name for name in ("B-30_0047.jpg", "B-30_0058.jpg")]


def device(bundle: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(fullUrl, device-id identifier, resource) of a bundle's one Device, each Observation checked to name it."""
    (entry,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"]
    resource = entry["resource"]
    assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
    (key,) = [i["value"] for i in resource["identifier"] if i["system"] == codes.ID_DEVICE]
    assert all(o["device"] == {"reference": entry["fullUrl"]} for o in resources(bundle, "Observation"))
    return entry["fullUrl"], key, resource


def equipment(message: str) -> set[str]:
    """The OBX-18 values of a message."""
    return {obx[18] for obx in segments(message, "OBX")}


@needs_models
@pytest.mark.skipif(not all(p.exists() for p in IMAGES), reason=f"chula_wbc_rpi not found under {DATA}")
def test_every_report_of_one_station_software_and_models_names_one_device(tmp_path: Path) -> None:
    out = tmp_path / "fhir"
    proc = subprocess.run([sys.executable, "-m", "smearscope", "analyze", "--json", "--microns-per-pixel", "0.1286",
                           *map(str, IMAGES), "--fhir", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = (Report.model_validate_json(line) for line in proc.stdout.splitlines())
    assert first.report_id != second.report_id and first.models and first.software_version
    # the analyzer's own bundles: two images, one analyzer, one Device
    written = [json.loads((out / f"{p.stem}.fhir.json").read_text()) for p in IMAGES]
    assert device(written[0])[:2] == device(written[1])[:2]

    # a station's reports: the same Device in each, and in a report sent again
    at = [r.model_copy(update={"station_id": "lab-7"}) for r in (first, second)]
    bundles = [report_bundle(r) for r in at]
    for bundle in bundles:
        validate(bundle)
    url, key, resource = device(bundles[0])
    assert device(bundles[1]) == (url, key, resource)
    assert report_bundle(at[0]) == bundles[0]
    assert {"system": codes.ID_STATION, "value": "lab-7"} in resource["identifier"]
    assert bundles[0]["entry"][0]["resource"]["id"] != bundles[1]["entry"][0]["resource"]["id"]  # two reports

    # another station, a software update, a model update, a model's new manifest: another Device each
    role = min(at[0].models)
    seg = at[0].models[role]
    changed = {
        "station": at[0].model_copy(update={"station_id": "lab-8"}),
        "software": at[0].model_copy(update={"software_version": at[0].software_version + ".post1"}),
        "model": at[0].model_copy(update={"models": {**at[0].models, role: seg.model_copy(update={
            "sha256": "0" * 64})}}),
        "manifest": at[0].model_copy(update={"models": {**at[0].models, role: seg.model_copy(update={
            "manifest_sha256": "1" * 64})}}),
    }
    # the station's own open-set thresholds (calibrate-atypical), which send other white cells to review
    wbc = at[0].models["wbc_head"]
    tightened = {"mahalanobis": 380.25, "energy": -2.5}  # the shipped head's tests, as calibrate-atypical fits them
    changed["open-set"] = at[0].model_copy(update={"models": {**at[0].models, "wbc_head": wbc.model_copy(update={
        "open_set_thresholds": tightened})}})
    changed["open-set refitted"] = at[0].model_copy(update={"models": {**at[0].models, "wbc_head": wbc.model_copy(
        update={"open_set_thresholds": {**tightened, "mahalanobis": 360.125}})}})
    seen = {(url, key)}
    for what, report in changed.items():
        bundle = report_bundle(report)
        validate(bundle)
        new_url, new_key, _ = device(bundle)
        assert (new_url, new_key) not in seen and new_url != url and new_key != key, what
        seen.add((new_url, new_key))
    assert device(report_bundle(at[1])) == (url, key, resource)  # the results made before keep their device
    # the Device says the thresholds it typed white cells by, whatever order the config listed them in
    said = [v["value"] for v in device(report_bundle(changed["open-set"]))[2]["version"]
            if v["type"]["text"] == "wbc_head open-set thresholds"]
    assert said == ["energy -2.5, mahalanobis 380.25"]
    reordered = changed["open-set"].model_copy(update={"models": {**at[0].models, "wbc_head": wbc.model_copy(update={
        "open_set_thresholds": dict(reversed(tightened.items()))})}})
    assert device(report_bundle(reordered))[:2] == device(report_bundle(changed["open-set"]))[:2]
    # and so does the HL7 message's SFT of the WBC head, beside its OBX-18 naming that Device
    (sft,) = [s for s in segments(oru_r01(changed["open-set"]), "SFT") if s[3] == "wbc_head"]
    assert sft[5].endswith("; open-set thresholds energy -2.5, mahalanobis 380.25")

    # HL7: OBX-18 is the station, then the Device's identifier, in every row of both messages
    messages = [oru_r01(r) for r in at]
    for message in messages:
        parsed(message)
        assert equipment(message) == {f"lab-7^smearscope~{key}^smearscope"}
    updated = oru_r01(changed["model"])
    parsed(updated)
    assert equipment(updated) == {f"lab-7^smearscope~{device(report_bundle(changed['model']))[1]}^smearscope"}
