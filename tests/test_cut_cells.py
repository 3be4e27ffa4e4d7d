"""Red cells cut by the image's edge: their size cannot be read, so they are left out of the
diameters and get no size-based type (microcyte, macrocyte, spherocyte), as at an estimated scale;
the size-based shares are of the whole red cells, the ones the diameters are of."""

from __future__ import annotations

from pathlib import Path

import pytest

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.morphology import SIZE_BASED
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.records import CellKind
from smearscope.service.station.specimen import SpecimenRun, cell_keys

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")


@pytest.fixture(scope="module")
def run() -> SpecimenRun:
    """Four rendered fields at their given scale (0.1 um/px), the renderer's mix of red cells."""
    analyzer = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    run = SpecimenRun(target_wbc=100, started_at=0.0)
    for seed in range(1, 5):
        field = render_field(seed, width=960, height=720, microns_per_pixel=0.1, n_wbc=2)
        assert run.add(analyzer.analyze(field.frame), float(seed))
    return run


def test_a_red_cell_cut_by_the_frame_edge_gets_no_size_based_type(run: SpecimenRun) -> None:
    """Of the 261 red cells, the renderer drew 13 spherocytes, 1 of them among the 85 the frame's
    edge cuts; the head typed the 12 whole ones spherocytes and 13 of the cut ones, so the report
    read 25 spherocytes, 9.58 % of the red cells (ICSH 1+). Now the cut cells' size calls are held
    back as at an estimated scale (`unassessed_label`, the cell typed by its shape), and the
    spherocyte share is of the 176 whole red cells (`of_cells`, those the diameters are of): 12,
    6.82 %, the renderer's 12 of 176."""
    rbc = [c for c in run.cells if c.detection.kind is CellKind.RBC]
    cut = [c for c in rbc if c.touches_frame_edge]
    whole = [c for c in rbc if not c.touches_frame_edge]
    assert cut and whole and all(c.size_calibrated and c.shape_judged for c in rbc)
    assert [c.label for c in cut if c.label in SIZE_BASED] == []
    assert any(c.unassessed_label in SIZE_BASED for c in cut)  # the head's size calls on them, kept for audit
    assert not any(c.unassessed_label for c in whole)
    report = run.report(station_id="s", now=9.0, end_reason="stopped")
    assert report.rbc_size.n == len(whole)
    rows = {r.label: r for r in report.rbc_morphology}
    sphero = rows["spherocyte"]
    assert (sphero.count, sphero.of_cells, sphero.percent) == (12, 176, 6.82), sphero
    for label in SIZE_BASED & rows.keys():
        row = rows[label]
        assert (row.of_cells, row.percent) == (len(whole), round(100 * row.count / len(whole), 2)), row
    assert rows["normal"].of_cells is None and rows["normal"].count == sum(c.label == "normal" for c in rbc)


def test_a_technicians_size_based_type_on_a_cut_red_cell_is_not_counted(run: SpecimenRun) -> None:
    """As at an estimated scale, no one can judge a cut cell's size: a technician's microcyte on it
    is not counted (the run's other cells keep theirs)."""
    keys = list(cell_keys(run.records))
    cut = next(k for k, c in zip(keys, run.cells) if c.detection.kind is CellKind.RBC and c.touches_frame_edge)
    whole = next(k for k, c in zip(keys, run.cells) if c.detection.kind is CellKind.RBC and not c.touches_frame_edge)
    assert run.verified({cut: ("rbc", "microcyte")})[2] == 0
    assert run.verified({whole: ("rbc", "microcyte")})[2] == 1
    assert run.verified({cut: ("rbc", "target")})[2] == 1  # its shape is still typed


def test_a_cut_cells_size_call_stored_by_an_earlier_version_stays_in_its_share() -> None:
    """A run analysed before cut cells' size calls were held back (verified or taken back after the
    update) holds cut red cells typed spherocyte: each stays in the spherocyte share's cells, so the
    share is of the cells it counts (1 of 4 whole cells and 3 cut ones read 4 of 7, not 4 of 4)."""
    from dataclasses import replace

    from test_open_set_flags import _cell

    from smearscope.service.analysis.aggregate import aggregate

    cells = ([_cell(CellKind.RBC, "normal")] * 3 + [_cell(CellKind.RBC, "spherocyte")]
             + [replace(_cell(CellKind.RBC, "spherocyte"), touches_frame_edge=True)] * 3
             + [replace(_cell(CellKind.RBC, "normal"), touches_frame_edge=True)] * 2)
    rows = {r.label: r for r in aggregate(cells).rbc_morphology}
    assert (rows["spherocyte"].count, rows["spherocyte"].of_cells, rows["spherocyte"].percent) == (4, 7, 57.14)


def test_the_summary_names_the_red_cells_a_size_based_share_is_of(run: SpecimenRun) -> None:
    """The printed spherocyte share is of the 176 whole red cells, not of the 261 the line above
    counts: it says so (as the dashboard's " of N RBC"), or 6.8 % would read as 18 of 261."""
    from smearscope.cli.summary import summarize

    text = summarize(run.report(station_id="s", now=9.0, end_reason="stopped"))
    shares = next(line for line in text.splitlines() if line.startswith("  RBC: "))
    assert "spherocyte 6.8% of 176 RBC (1+" in shares and "normal 87.7%," in shares, shares


def test_a_calibrated_field_whose_red_cells_are_all_cut_says_why_their_sizes_are_not_assessable() -> None:
    """A 64 px crop of a rendered field at a given scale: its 5 red cells are all cut by the image's
    edge, so no size-based class can be judged. That is not an estimated scale: the summary and the
    FHIR bundle say no whole red cell was there to size (the diameter's own reason, no-rbc-measured)."""
    import dataclasses

    import numpy as np

    from smearscope.cli.summary import summarize
    from smearscope.service.fhir.bundle import report_bundle

    field = render_field(5, width=640, height=480).frame
    crop = dataclasses.replace(field, pixels=np.ascontiguousarray(np.asarray(field.pixels)[100:164, 100:164]),
                               microns_per_pixel=0.2)
    report = Analyzer.from_models_dir(ROOT / "models", warmup=False).analyze(crop).report
    assert report.scale.method == "given" and report.counts.rbc > 0 and report.rbc_size.n == 0
    rows = [r for r in report.rbc_morphology if r.label in SIZE_BASED]
    assert sorted(r.label for r in rows) == sorted(SIZE_BASED) and not any(r.assessable for r in rows)
    text = summarize(report)
    assert "estimated scale" not in text, text
    assert ("  RBC macrocyte 0, microcyte 0, spherocyte 0: not assessable, no whole red cell to size (each cut "
            "by the image's edge)") in text.splitlines(), text
    reasons = {o["code"]["coding"][0]["display"].split(" ")[0]: o["dataAbsentReason"]["coding"][0]["code"]
               for e in report_bundle(report)["entry"] if (o := e["resource"])["resourceType"] == "Observation"
               and "dataAbsentReason" in o}
    assert {k: reasons[k] for k in ("Macrocytes", "Microcytes", "Spherocytes")} == dict.fromkeys(
        ("Macrocytes", "Microcytes", "Spherocytes"), "no-rbc-measured"), reasons
