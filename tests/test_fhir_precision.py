"""The precision of what the FHIR bundle and the HL7 message send: every share, interval bound, ratio and size
to one decimal, as the printed report, `smearscope analyze` and the dashboard read it (the report keeps two, three
for sizes, for audit); a share some cell was given that one decimal reads 0 is "< 0.1", never 0 (none seen).
Real images through the shipped models, validated as test_fhir and test_hl7 do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from realdata import DATA, needs_models
from test_fhir import analyzed_with_fhir, as_sent, by_code, component, graded_report, validate
from test_hl7 import parsed, segments

from smearscope.service.analysis.report import ClassShare, Counts
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.hl7.oru import oru_r01

IMAGE = DATA / "chula_wbc_rpi" / "train" / "images" / "B-30_0047.jpg"


def quantities(element: Any) -> list[dict[str, Any]]:
    """Every Quantity in a resource or bundle (a dict with a UCUM code and a value)."""
    if isinstance(element, list):
        return [q for e in element for q in quantities(e)]
    if not isinstance(element, dict):
        return []
    own = [element] if element.get("system") == codes.UCUM and "value" in element else []
    return own + [q for v in element.values() for q in quantities(v)]


@needs_models
@pytest.mark.skipif(not IMAGE.exists(), reason=f"chula_wbc_rpi not found under {DATA}")
def test_a_real_fields_bundle_sends_each_value_to_the_decimal_its_report_is_read_at(tmp_path: Path) -> None:
    report, bundle = analyzed_with_fhir(IMAGE, tmp_path, microns_per_pixel=0.1286)
    # the report keeps more decimals than it is read at (else this test would show nothing)
    kept = [s.percent for s in report.wbc_differential + report.rbc_morphology] + [report.rbc_size.mean_diameter_um]
    assert any(v != as_sent(v) for v in kept), kept
    sent = quantities(bundle)
    assert sent and all(q["value"] == as_sent(q["value"]) for q in sent), [q["value"] for q in sent]
    size = by_code(bundle, codes.LOCAL_OBSERVATION, "rbc-diameter")
    assert size["valueQuantity"]["value"] == as_sent(report.rbc_size.mean_diameter_um)
    assert component(size, "sd")["valueQuantity"]["value"] == as_sent(report.rbc_size.sd_um)
    for share in report.wbc_differential:
        if share.label in codes.WBC_LOINC:
            obs = by_code(bundle, codes.LOINC, codes.WBC_LOINC[share.label].code)
            assert obs["valueQuantity"]["value"] == as_sent(share.percent)
            assert component(obs, "count")["valueInteger"] == share.count  # the count itself is whole
    for share in report.rbc_morphology:
        if share.label in codes.RBC_LOINC and share.assessable:
            obs = by_code(bundle, codes.LOINC, codes.RBC_LOINC[share.label].code)
            assert component(obs, "percent")["valueQuantity"]["value"] == as_sent(share.percent)
    # the HL7 message, made of the bundle, says the same figure
    message = oru_r01(report)
    parsed(message)
    (row,) = [s for s in segments(message, "OBX") if s[3].startswith("rbc-diameter^")]
    assert float(row[5]) == as_sent(report.rbc_size.mean_diameter_um)


def test_a_share_of_some_cell_under_a_tenth_of_a_percent_is_sent_as_less_than_0_1_not_0() -> None:
    """1 schistocyte among 2500 red cells (0.04 %): "< 0.1 %" in FHIR (comparator) and SN "<^0.1" in HL7; a class
    no cell was given stays 0.0, a result of none seen."""
    base = graded_report()
    rbc = [ClassShare(label="normal", count=2499, percent=99.96),
           ClassShare(label="schistocyte", count=1, percent=0.04, ci95_low=0.01, ci95_high=0.23),
           ClassShare(label="target", count=0, percent=0.0, ci95_low=0.0, ci95_high=0.15)]
    report = base.model_copy(update={"rbc_morphology": rbc, "counts": Counts(rbc=2500, wbc=110, platelet=80)})
    bundle = report_bundle(report)
    validate(bundle)
    schisto = component(by_code(bundle, codes.LOINC, "800-3"), "percent")["valueQuantity"]
    assert (schisto["comparator"], schisto["value"]) == ("<", 0.1)
    target = component(by_code(bundle, codes.LOINC, "10381-2"), "percent")["valueQuantity"]
    assert target["value"] == 0.0 and "comparator" not in target
    message = oru_r01(report)
    parsed(message)
    rows = segments(message, "OBX")
    group = next(r[4] for r in rows if r[3].startswith("800-3^"))
    (percent,) = [r for r in rows if r[4] == group and r[3].startswith("percent^")]
    assert (percent[2], percent[5], percent[6]) == ("SN", "<^0.1", "%^%^UCUM")


def test_a_share_of_all_but_some_cells_is_sent_as_more_than_99_9_not_100() -> None:
    """19 999 lymphocytes of 20 000 white cells: the report keeps 100.0 (99.995 at two decimals) and 9999 target
    cells of 10 000 red cells 99.99, each of which one decimal reads 100.0, every cell of that type, beside a
    neutrophil and a red cell of another shape counted. Sent as "> 99.9 %" (FHIR's comparator) and SN ">^99.9"
    in HL7, the mirror of "< 0.1"; a share of every cell (2500 of 2500) stays 100.0."""
    from collections import Counter

    from smearscope.service.analysis.aggregate import share_rows

    base = graded_report()
    report = base.model_copy(update={
        "counts": Counts(rbc=10000, wbc=20000, platelet=80), "nrbc_per_100_wbc": None,
        "wbc_differential": share_rows(Counter(lymphocyte=19999, neutrophil=1)),
        "rbc_morphology": share_rows(Counter(target=9999, schistocyte=1))})
    assert report.wbc_differential[0].percent == 100.0  # only the count tells it from every cell
    bundle = report_bundle(report)
    validate(bundle)
    lymph = by_code(bundle, codes.LOINC, "736-9")["valueQuantity"]
    assert (lymph["comparator"], lymph["value"]) == (">", 99.9)
    target = component(by_code(bundle, codes.LOINC, "10381-2"), "percent")["valueQuantity"]
    assert (target["comparator"], target["value"]) == (">", 99.9)
    message = oru_r01(report)
    parsed(message)
    rows = segments(message, "OBX")
    assert [(r[2], r[5], r[6]) for r in rows if r[3].startswith("736-9^")] == [("SN", ">^99.9", "%^%^UCUM")]
    group = next(r[4] for r in rows if r[3].startswith("10381-2^"))
    (percent,) = [r for r in rows if r[4] == group and r[3].startswith("percent^")]
    assert (percent[2], percent[5], percent[6]) == ("SN", ">^99.9", "%^%^UCUM")

    every = base.model_copy(update={"counts": Counts(rbc=10000, wbc=2500, platelet=80), "nrbc_per_100_wbc": None,
                                    "wbc_differential": share_rows(Counter(lymphocyte=2500, neutrophil=0))})
    lymph = by_code(report_bundle(every), codes.LOINC, "736-9")["valueQuantity"]
    assert lymph["value"] == 100.0 and "comparator" not in lymph
    assert [(r[2], r[5]) for r in segments(oru_r01(every), "OBX") if r[3].startswith("736-9^")] == [("NM", "100")]
