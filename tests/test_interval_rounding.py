"""A 95 % interval's bounds are sent and printed at one decimal rounded outward, the lower bound down and the upper
up, in the FHIR bundle, the HL7 message and `smearscope analyze`'s summary (the dashboard and its printout:
tests/test_dashboard_print.py); the JSON report keeps its two decimals. Rounded to the nearest, none of 10 000 red
cells (an upper bound of 0.04 %) read as an interval of 0.0 to 0.0 %, a certainty the count does not have, and
every upper bound rounded down was narrower than the count's. A real field through the shipped models, and the
analyzer's own intervals (aggregate.share_rows) of 10 000 red cells."""

from __future__ import annotations

import re
from collections import Counter
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import pytest
from realdata import DATA, needs_models
from test_fhir import analyzed_with_fhir, component, graded_report, resources, validate
from test_hl7 import parsed, segments

from smearscope.cli.summary import summarize
from smearscope.service.analysis.aggregate import share_rows
from smearscope.service.analysis.report import ClassShare, Counts, Report
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.hl7.oru import oru_r01

IMAGE = DATA / "chula_wbc_rpi" / "train" / "images" / "B-30_0047.jpg"


def outward(low: float, high: float) -> tuple[float, float]:
    """The bounds at one decimal, the lower down and the upper up (decimal arithmetic on the report's figures)."""
    tenth = Decimal("0.1")
    return (float(Decimal(str(low)).quantize(tenth, ROUND_FLOOR)),
            float(Decimal(str(high)).quantize(tenth, ROUND_CEILING)))


def sent_intervals(bundle: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each result's ci95 component as sent, by its result identifier's last parts ("wbc/neutrophil")."""
    out = {}
    for obs in resources(bundle, "Observation"):
        if any(c["code"]["coding"][0]["code"] == "ci95" for c in obs.get("component", [])):
            ci = component(obs, "ci95")["valueRange"]
            assert "comparator" not in ci["low"] and "comparator" not in ci["high"]
            (key,) = [i["value"] for i in obs["identifier"] if i["system"] == codes.ID_RESULT]
            out["/".join(key.split("/")[-2:])] = (ci["low"]["value"], ci["high"]["value"])
    return out


def hl7_intervals(message: str) -> list[tuple[float, float]]:
    """Each ci95 row's SN `^low^-^high`, in the message's order."""
    out = []
    for obx in segments(message, "OBX"):
        if obx[3].startswith("ci95^"):
            m = re.fullmatch(r"\^([0-9.]+)\^-\^([0-9.]+)", obx[5])
            assert m and obx[2] == "SN", obx
            out.append((float(m.group(1)), float(m.group(2))))
    return out


def expected(report: Report) -> dict[str, tuple[float, float]]:
    rows = [("wbc", s) for s in report.wbc_differential if s.label != "erythroblast"]
    rows += [("rbc", s) for s in report.rbc_morphology if s.label != "normal" and s.assessable is not False]
    return {f"{kind}/{s.label}": outward(s.ci95_low, s.ci95_high) for kind, s in rows if s.ci95_low is not None}


def summary_intervals(report: Report) -> dict[str, tuple[float, float]]:
    """The summary's WBC line: each class's 'CI low-high'."""
    line = next(ln for ln in summarize(report).splitlines() if ln.startswith("  WBC: "))
    return {label: (float(lo), float(hi))
            for label, lo, hi in re.findall(r"(\w+) \d+ \([<0-9.]+%, 95% CI ([0-9.]+)-([0-9.]+)\)", line)}


@needs_models
@pytest.mark.skipif(not IMAGE.exists(), reason=f"chula_wbc_rpi not found under {DATA}")
def test_a_real_fields_intervals_are_rounded_outward_in_fhir_hl7_and_the_summary(tmp_path: Path) -> None:
    report, bundle = analyzed_with_fhir(IMAGE, tmp_path, microns_per_pixel=0.1286)
    want = expected(report)
    # rounding to the nearest would send some other bound (else this test would show nothing)
    nearest = {k: (float(f"{s.ci95_low:.1f}"), float(f"{s.ci95_high:.1f}"))
               for k, s in [(f"wbc/{s.label}", s) for s in report.wbc_differential]
               + [(f"rbc/{s.label}", s) for s in report.rbc_morphology] if k in want}
    assert nearest != want, want
    assert sent_intervals(bundle) == want
    message = oru_r01(report)
    parsed(message)
    assert hl7_intervals(message) == list(sent_intervals(bundle).values())
    wbc = {k.split("/")[1]: v for k, v in want.items() if k.startswith("wbc/")}
    assert wbc and summary_intervals(report) == wbc
    # the JSON report keeps two decimals
    assert any(s.ci95_high != round(s.ci95_high, 1) for s in report.wbc_differential + report.rbc_morphology
               if s.ci95_high is not None)


def test_none_of_ten_thousand_red_cells_is_an_interval_up_to_0_1_not_0_0() -> None:
    """The analyzer's own interval of 0 schistocytes among 10 000 red cells is 0 to 0.04 % (the report's two
    decimals): sent 0.0 to 0.1 in FHIR and HL7, never 0.0 to 0.0; the share itself stays 0.0, none seen."""
    rbc = share_rows(Counter(normal=9990, target=10, schistocyte=0))
    zero = next(s for s in rbc if s.label == "schistocyte")
    assert (zero.count, zero.ci95_low, zero.ci95_high) == (0, 0.0, 0.04)
    base = graded_report()
    report = base.model_copy(update={"rbc_morphology": [s.model_copy(update={"grade": "none"}) for s in rbc],
                                     "counts": Counts(rbc=10000, wbc=base.counts.wbc, platelet=80)})
    bundle = report_bundle(report)
    validate(bundle)
    sent = sent_intervals(bundle)
    assert sent["rbc/schistocyte"] == (0.0, 0.1) and sent["rbc/target"] == outward(*next(
        (s.ci95_low, s.ci95_high) for s in rbc if s.label == "target"))
    message = oru_r01(report)
    parsed(message)
    assert (0.0, 0.1) in hl7_intervals(message) and (0.0, 0.0) not in hl7_intervals(message)
    # the summary's differential of 10 000 white cells alike
    wbc = share_rows(Counter(neutrophil=9990, lymphocyte=10, basophil=0))
    line = summary_intervals(report.model_copy(update={"wbc_differential": wbc}))
    assert line["basophil"] == (0.0, 0.1) and line["neutrophil"] == outward(wbc[0].ci95_low, wbc[0].ci95_high)


def test_a_share_without_an_interval_is_summarized_without_one() -> None:
    report = graded_report().model_copy(update={"wbc_differential": [ClassShare(label="neutrophil", count=3,
                                                                                percent=100.0)]})
    assert "  WBC: neutrophil 3 (100.0%)" in summarize(report).splitlines()
