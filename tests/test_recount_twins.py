"""Stage 8a (service.analysis.recount_twins): a red-cell detection the nucleated recheck re-counts
as a white cell, on top of a white cell the detector found, is that white cell: counted once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
from oracle import AlteredOracle
from realdata import DATA

from smearscope.service.analysis.boxes import box_iou
from smearscope.service.analysis.records import Box, CellDetection, CellKind, ClassifiedCell
from smearscope.service.analysis.recount_twins import TWIN_MIN_IOU, drop_recounted_twins

MODELS = Path(__file__).resolve().parents[1] / "models"
#: The stage after this one (service.analysis.kind_twins) also joins two overlapping white cells:
#: off here, so that each run shows what this stage alone does.
KIND_TWINS_OFF = {"kind_twin_min_iou": None, "white_piece_min_iou": None}


def _cell(kind: CellKind, box: Box, detected_as: CellKind | None = None, label: str = "neutrophil") -> ClassifiedCell:
    return ClassifiedCell(CellDetection(kind, box, 0.9), label, 0.95, 10.0, 78.5, detected_as=detected_as)


def test_only_a_recounted_red_cell_on_a_detected_white_cell_is_dropped():
    white = _cell(CellKind.WBC, Box(0, 0, 50, 50))
    twin = _cell(CellKind.WBC, Box(2, 1, 51, 50), detected_as=CellKind.RBC)  # IoU 0.94 with `white`
    nrbc_twin = _cell(CellKind.NRBC, Box(1, 0, 50, 52), detected_as=CellKind.RBC, label="erythroblast")
    neighbour = _cell(CellKind.WBC, Box(40, 0, 90, 50), detected_as=CellKind.RBC)  # touches it: IoU 0.11
    red = _cell(CellKind.RBC, Box(0, 0, 50, 50), label="normal")  # a red cell stays what the detector says
    head_moved = _cell(CellKind.PLATELET, Box(200, 200, 250, 250), detected_as=CellKind.WBC, label="platelet")
    its_twin = _cell(CellKind.WBC, Box(200, 200, 250, 249), detected_as=CellKind.RBC)  # on the detector's white cell
    cells = [white, twin, nrbc_twin, neighbour, red, head_moved, its_twin]
    assert drop_recounted_twins(cells) == [white, neighbour, red, head_moved]
    assert drop_recounted_twins(cells, None) == cells
    # without the detector's white cell, a re-counted red cell is the only count of its object
    assert drop_recounted_twins([twin, neighbour, red]) == [twin, neighbour, red]
    assert box_iou(np.array([white.detection.box.as_list()]), np.array([twin.detection.box.as_list()]))[0, 0] > TWIN_MIN_IOU


class _WhiteCellsTwice(AlteredOracle):
    """The oracle detector, except that each white cell also comes out as a red cell on the same
    outline (a detector whose per-kind merge leaves both)."""

    def alter(self, found):
        return found + [dataclasses.replace(d, kind=CellKind.RBC) for d in found if d.kind is CellKind.WBC]


@pytest.mark.parametrize("winner, kind", [("neutrophil", "wbc"), ("lymphocyte", "wbc"), ("erythroblast", "nrbc")])
def test_a_white_cell_found_twice_is_counted_once_through_the_analyzer(winner, kind):
    """Rendered field, each of its 3 white cells also detected as a red cell: with the recheck the
    twins are typed as white cells; the stage counts each white cell once and none of the twins as
    a red cell; turned off, every white cell is counted twice."""
    from oracle import OracleSegmenter
    from test_reclassify import _FixedHead

    from smearscope.device.synthetic import render_field
    from smearscope.engines.manifest import Preprocessing
    from smearscope.service.analysis.classify import CropClassifier
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

    field = render_field(5, width=600, height=500, n_wbc=3)
    assert sum(c.kind == "wbc" for c in field.cells) == 3

    def run(detector, twin_iou):
        head = _FixedHead(winner)  # the recheck reads densities against a lamp-corrected white
        head.manifest = head.manifest.model_copy(update={"preprocessing": Preprocessing(illumination="flatfield")})
        analyzer = Analyzer(detector(field), None, CropClassifier(head, 0.5),
                            options=AnalyzerOptions(max_lymphocyte_diameter_um=None, recounted_twin_min_iou=twin_iou,
                                                    **KIND_TWINS_OFF))
        return analyzer.analyze(field.frame).report

    plain = run(OracleSegmenter, TWIN_MIN_IOU)  # each white cell found once
    once, twice = run(_WhiteCellsTwice, TWIN_MIN_IOU), run(_WhiteCellsTwice, None)
    white = lambda r: r.counts.wbc + r.counts.nrbc
    assert white(plain) == 3 and getattr(plain.counts, kind) == 3
    assert white(twice) == 6  # the stage off: the twins re-counted on top
    assert (once.counts.rbc, once.counts.wbc, once.counts.nrbc) == (plain.counts.rbc, plain.counts.wbc, plain.counts.nrbc)
    assert sorted(c.bbox for c in once.cells) == sorted(c.bbox for c in plain.cells)


@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "chula_wbc_rpi").is_dir(), reason=f"chula_wbc_rpi not found under {DATA}")
@pytest.mark.skipif(not (MODELS / "seg.json").exists(), reason="committed models absent")
def test_a_pale_stations_white_cells_are_counted_once():
    """The Raspberry Pi station's validation fields where the committed models found a white cell
    twice (given scale): with the stage no two counted white cells overlap by IoU 0.5, and each
    annotated white cell is still found; without it, each field counts one twice."""
    from smearscope.device.frame import Frame
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
    from training.lab_table import lab_images

    stems = ("E-11_0675", "E-11_0676", "L-10_0221", "L-9_0082")
    images = [im for im in lab_images("rpi", "val") if im.path.stem in stems]
    assert len(images) == len(stems)
    twice: dict[float | None, int] = {}
    for bound in (TWIN_MIN_IOU, None):
        analyzer = Analyzer.from_models_dir(MODELS, options=AnalyzerOptions(recounted_twin_min_iou=bound, **KIND_TWINS_OFF),
                                              warmup=False)
        twice[bound] = 0
        try:
            for im in images:
                rep = analyzer.analyze(Frame(cv2.imread(str(im.path)), im.path.name, "rpi",
                                             microns_per_pixel=im.known_mpp)).report
                white = np.array([c.bbox for c in rep.cells if c.kind in ("wbc", "nrbc")], float).reshape(-1, 4)
                iou = box_iou(white, white) - np.eye(len(white))
                twice[bound] += int((iou >= 0.5).any(axis=1).sum()) // 2
                if bound is not None:
                    truth = np.array([[b.x0, b.y0, b.x1, b.y1] for b in im.boxes], float)
                    assert (box_iou(truth, white).max(axis=1) >= 0.5).all(), im.path.name
        finally:
            analyzer.close()
    assert twice == {TWIN_MIN_IOU: 0, None: len(stems)}
