"""A differential lists every class that was looked for: a class of the committed WBC head's no
white cell was given is a row of 0 % with its Wilson interval from 0 (in the JSON report, the FHIR
bundle and the HL7 message), not left out (a laboratory system would read it "not done"); the red
cell morphology likewise lists every graded class of the RBC head's, "none" where no cell was given
it. Reports from before models named their classes (schema 1.2) still load, and give no zero row."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import jsonschema
import pytest
from realdata import BCCD, BCCD_MICRONS_PER_PIXEL, needs_bccd, needs_models
from test_fhir import by_code, validate
from test_hl7 import segments

from smearscope.device.frame import Frame
from smearscope.service.analysis.aggregate import wilson_interval
from smearscope.service.analysis.morphology import GRADED
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.report import Report
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.hl7.oru import oru_r01
from smearscope.service.station.specimen import SpecimenRun

ROOT = Path(__file__).resolve().parents[1]
#: BCCD's first three test images: one white cell each (two neutrophils and a monocyte by BCCD's
#: labels), none of them an eosinophil.
IMAGES = ("BloodImage_00007", "BloodImage_00011", "BloodImage_00015")


@pytest.fixture(scope="module")
def specimen() -> tuple[Report, Counter]:
    """The three fields' specimen report, and the labels the analyzer gave their white cells."""
    analyzer = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    run = SpecimenRun(target_wbc=100, started_at=1000.0)
    typed: Counter = Counter()
    for i, image in enumerate(IMAGES):
        frame = Frame(cv2.imread(str(BCCD / "JPEGImages" / f"{image}.jpg")), image, "bccd",
                      microns_per_pixel=BCCD_MICRONS_PER_PIXEL)
        result = analyzer.analyze(frame)
        typed.update(c.label for c in result.report.cells if c.kind == "wbc")
        run.add(result, 1001.0 + i)
    return run.report(station_id="bench-1", now=1010.0, end_reason="stopped"), typed


@pytest.fixture(scope="module")
def report(specimen: tuple[Report, Counter]) -> Report:
    return specimen[0]


pytestmark = [needs_bccd, needs_models]


def test_a_specimen_without_eosinophils_reports_them_at_0_percent(specimen: tuple[Report, Counter]) -> None:
    report, typed = specimen
    rows = {s.label: s for s in report.wbc_differential}
    n = sum(s.count for s in report.wbc_differential)
    assert sum(typed.values()) == n == 3 and typed["eosinophil"] == 0, typed  # one white cell per field
    assert {label: s.count for label, s in rows.items() if s.count} == dict(typed)  # the counted rows: the calls
    # every class of the head's, but those counted apart (erythroblast as NRBC, platelet as platelets)
    assert set(rows) - {"unidentified"} == {"basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil"}
    assert report.models["wbc_head"].classes == json.loads((ROOT / "models" / "wbc_head.json").read_text())["classes"]
    eos = rows["eosinophil"]
    assert (eos.count, eos.percent, eos.ci95_low) == (0, 0.0, 0.0)
    assert eos.ci95_high == round(100 * wilson_interval(0, n)[1], 2) == 56.15
    # the classes no cell was given after the counted ones, in name order
    zero = [s.label for s in report.wbc_differential if s.count == 0]
    assert "eosinophil" in zero and [s.label for s in report.wbc_differential][-len(zero):] == sorted(zero)
    schema = json.loads((ROOT / "schemas" / "report.schema.json").read_text())
    jsonschema.validate(json.loads(report.model_dump_json()), schema)
    assert Report.model_validate_json(report.model_dump_json()) == report


def test_every_graded_red_cell_class_is_listed_none_where_no_cell_was_given_it(report: Report) -> None:
    rows = {s.label: s for s in report.rbc_morphology}
    rbc_classes = report.models["rbc_head"].classes
    assert rbc_classes and {c for c in rbc_classes if c in GRADED} <= set(rows)
    zero = [s for s in report.rbc_morphology if s.count == 0]
    assert {"sickle", "teardrop"} <= {s.label for s in zero}
    assert all(s.grade == "none" and s.percent == 0.0 and s.ci95_low == 0.0 and s.assessable for s in zero)


def test_the_fhir_bundle_and_the_hl7_message_carry_eosinophils_at_0(report: Report) -> None:
    bundle = report_bundle(report)
    validate(bundle)
    loinc = codes.WBC_LOINC["eosinophil"].code
    obs = by_code(bundle, codes.LOINC, loinc)
    assert obs["valueQuantity"]["value"] == 0 and obs["valueQuantity"]["code"] == "%"
    (row,) = [s for s in segments(oru_r01(report), "OBX") if s[3].split("^")[0] == loinc]
    assert row[2] == "NM" and float(row[5]) == 0.0 and row[6] == "%^%^UCUM"


def test_a_report_from_before_models_named_their_classes_still_loads_with_its_rows(report: Report) -> None:
    """A 1.2 report (no `classes`, only the rows some cell was given) validates, loads and maps; a
    run whose models do not name their classes (stored by the version before) gets no zero row."""
    stored = json.loads(report.model_dump_json())
    stored["schema_version"] = "1.2"
    for m in stored["models"].values():
        del m["classes"]
    stored["wbc_differential"] = [s for s in stored["wbc_differential"] if s["count"]]
    jsonschema.validate(stored, json.loads((ROOT / "schemas" / "report.schema.json").read_text()))
    old = Report.model_validate_json(json.dumps(stored))
    bundle = report_bundle(old)
    validate(bundle)
    assert not [o for o in bundle["entry"] if o["resource"].get("code", {}).get("coding", [{}])[0].get("code")
                == codes.WBC_LOINC["eosinophil"].code]
    assert oru_r01(old)


def test_the_stored_interval_holds_the_exact_one_and_is_never_empty_of_doubt() -> None:
    """Bounds are stored at two decimals rounded outward: the stored interval always holds the exact Wilson
    interval, and 0 of 100 000 cells keeps an upper bound above 0 (rounded to the nearest it read 0.00-0.00:
    certainty the count does not have)."""
    from collections import Counter

    from smearscope.service.analysis.aggregate import share_rows, wilson_interval

    for k, n in [(0, 100_000), (1, 3), (7, 13), (50, 100), (123, 4567), (99_999, 100_000), (2, 77_000)]:
        row = next(r for r in share_rows(Counter({"a": k, "b": n - k}), of=n) if r.label == "a")
        lo, hi = wilson_interval(k, n)
        assert row.ci95_low <= 100 * lo + 1e-9 and row.ci95_high >= 100 * hi - 1e-9, (k, n, row)
        assert row.ci95_high - 100 * hi < 0.01 + 1e-9 and 100 * lo - row.ci95_low < 0.01 + 1e-9
        assert round(row.ci95_low, 2) == row.ci95_low and round(row.ci95_high, 2) == row.ci95_high
    zero = next(r for r in share_rows(Counter({"a": 0, "b": 100_000}), of=100_000) if r.label == "a")
    assert (zero.ci95_low, zero.ci95_high) == (0.0, 0.01)
