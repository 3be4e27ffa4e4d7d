"""A head class that is not the kind the head serves ("platelet") moves the cell to the platelet
count. From the WBC head (PBC's giant platelets and platelet clumps) it also raises a review
flag; WBC counts never include it. From the RBC head it leaves the red-cell count."""

from __future__ import annotations

import numpy as np
from oracle import OracleSegmenter

from smearscope.device.synthetic import render_field
from smearscope.engines.manifest import (
    BatchProfile,
    CropInfo,
    ModelManifest,
    Preprocessing,
    TensorSpec,
)
from smearscope.service.analysis.classify import CropClassifier
from smearscope.service.analysis.pipeline import Analyzer

WBC_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


RBC_CLASSES = ["normal", "spherocyte", "sickle", "platelet"]


class _FixedHead:
    """Engine double: every crop gets the same logits (the routing after the head is under test)."""

    def __init__(self, winner: str, classes=WBC_CLASSES, extent_um=25.6, size=96) -> None:
        self.manifest = ModelManifest(
            name="head", task="classification", file="x.onnx", sha256="0" * 64, opset=17,
            inputs=[TensorSpec(name="input", shape=[-1, 3, size, size])],
            outputs=[TensorSpec(name="logits", shape=[-1, len(classes)])],
            batch=BatchProfile(min=1, opt=1, max=64), input_size=size, canonical_um_per_px=0.2,
            preprocessing=Preprocessing(), classes=list(classes), crop=CropInfo(extent_um=extent_um, input_size=size))
        self.output_names = ["logits"]
        self.pads_to_opt = False
        self.logits = np.where(np.array(classes) == winner, 8.0, 0.0).astype(np.float32)

    def run(self, batch):
        return {"logits": np.repeat(self.logits[None], batch.shape[0], 0)}


def _analyze(winner: str):
    field = render_field(5, width=600, height=500, n_wbc=3)
    analyzer = Analyzer(OracleSegmenter(field), None, CropClassifier(_FixedHead(winner), 0.5))
    report = analyzer.analyze(field.frame).report
    truth = {k: sum(c.kind == k for c in field.cells) for k in ("rbc", "wbc", "platelet")}
    return report, truth


def test_wbc_typed_as_platelet_counts_as_platelet_and_is_flagged():
    report, truth = _analyze("platelet")
    assert truth["wbc"] == 3
    assert report.counts.wbc == 0
    assert report.counts.platelet == truth["platelet"] + truth["wbc"]
    assert report.wbc_differential == []
    flag = next(f for f in report.flags if f.code == "platelet_clumps_suspected")
    assert flag.message.startswith("3 ")
    moved = [c for c in report.cells if c.kind == "platelet" and c.label is None]
    assert len(moved) == truth["platelet"] + truth["wbc"]


def test_white_cell_types_stay_white_cells():
    report, truth = _analyze("neutrophil")
    assert report.counts.wbc == truth["wbc"]
    assert report.counts.platelet == truth["platelet"]
    assert [s.label for s in report.wbc_differential] == ["neutrophil"]
    assert not any(f.code == "platelet_clumps_suspected" for f in report.flags)


def test_red_cells_typed_as_platelets_count_as_platelets_without_the_clump_flag():
    field = render_field(6, width=600, height=500, n_wbc=2)
    wbc_head = CropClassifier(_FixedHead("neutrophil"), 0.5)

    def run(rbc_label):
        rbc_head = CropClassifier(_FixedHead(rbc_label, RBC_CLASSES, 11.2, 40), 0.3)
        return Analyzer(OracleSegmenter(field), rbc_head, wbc_head).analyze(field.frame).report

    base, moved = run("normal"), run("platelet")
    assert base.counts.rbc > 20 and base.counts.platelet > 0
    assert moved.counts.rbc == 0
    assert moved.counts.platelet == base.counts.platelet + base.counts.rbc
    assert moved.counts.wbc == base.counts.wbc == 2
    assert moved.rbc_morphology == [] and moved.rbc_size.n == 0
    assert not any(f.code == "platelet_clumps_suspected" for f in moved.flags)
