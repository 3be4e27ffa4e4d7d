"""A WBC-head class that is not a white cell (PBC's "platelet": giant platelets, platelet clumps)
moves the cell to the platelet count and raises a review flag; WBC counts never include it."""

from __future__ import annotations

import numpy as np
from oracle import OracleSegmenter

from device.synthetic import render_field
from engines.manifest import BatchProfile, CropInfo, ModelManifest, Preprocessing, TensorSpec
from service.classify import CropClassifier
from service.pipeline import Analyzer

WBC_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


class _FixedHead:
    """Engine double: every crop gets the same logits (the routing after the head is under test)."""

    def __init__(self, winner: str) -> None:
        self.manifest = ModelManifest(
            name="wbc_head", task="classification", file="x.onnx", sha256="0" * 64, opset=17,
            inputs=[TensorSpec(name="input", shape=[-1, 3, 96, 96])], outputs=[TensorSpec(name="logits", shape=[-1, 8])],
            batch=BatchProfile(min=1, opt=1, max=64), input_size=96, canonical_um_per_px=0.2,
            preprocessing=Preprocessing(), classes=WBC_CLASSES, crop=CropInfo(extent_um=25.6, input_size=96))
        self.output_names = ["logits"]
        self.pads_to_opt = False
        self.logits = np.where(np.array(WBC_CLASSES) == winner, 8.0, 0.0).astype(np.float32)

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
