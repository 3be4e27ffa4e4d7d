"""Stage 8b (service.analysis.size_gate): a "lymphocyte" wider than any lymphocyte goes to review,
and enough of them raise atypical_wbc_present."""

from __future__ import annotations

import numpy as np
import pytest

from smearscope.service.analysis.aggregate import AggregateThresholds, aggregate
from smearscope.service.analysis.records import Box, CellDetection, CellKind, ClassifiedCell
from smearscope.service.analysis.size_gate import MAX_LYMPHOCYTE_DIAMETER_UM, gate_lymphocyte_size


def _cell(kind: CellKind, label: str, diameter_um: float) -> ClassifiedCell:
    r_px = diameter_um / 0.2 / 2
    det = CellDetection(kind, Box(0, 0, 2 * r_px, 2 * r_px), 0.9)
    return ClassifiedCell(det, label, 0.95, diameter_um, np.pi * (diameter_um / 2) ** 2)


def test_only_oversized_lymphocytes_are_unidentified_and_atypical():
    cells = [_cell(CellKind.WBC, "lymphocyte", 11.0), _cell(CellKind.WBC, "lymphocyte", 17.5),
             _cell(CellKind.WBC, "monocyte", 17.5), _cell(CellKind.RBC, "normal", 7.5),
             _cell(CellKind.WBC, "lymphocyte", MAX_LYMPHOCYTE_DIAMETER_UM)]
    out = gate_lymphocyte_size(cells)
    assert [(c.label, c.atypical) for c in out] == [("lymphocyte", False), ("unidentified", True),
                                                    ("monocyte", False), ("normal", False), ("lymphocyte", False)]
    assert out[1].label_score == 0.95 and out[1].diameter_um == 17.5  # the rest of the record is kept
    assert gate_lymphocyte_size(cells, None) == cells


def test_a_smear_of_large_lymphocyte_like_cells_is_not_reported_clean():
    """Five blast-sized cells the head typed lymphocyte among twenty white cells: flagged."""
    cells = ([_cell(CellKind.WBC, "neutrophil", 13.0)] * 15 + [_cell(CellKind.WBC, "lymphocyte", 17.0)] * 5)
    flags = {f.code for f in aggregate(gate_lymphocyte_size(cells), AggregateThresholds()).flags}
    assert "atypical_wbc_present" in flags
    assert "atypical_wbc_present" not in {f.code for f in aggregate(cells, AggregateThresholds()).flags}


def test_the_analyzer_applies_its_bound():
    """PBC test lymphocytes through the analyzer: typed lymphocyte under the default bound, and
    every one of those unidentified and atypical when the bound is below their size."""
    import cv2
    from realdata import DATA, ROOT

    if not (DATA / "pbc").is_dir() or not (ROOT / "models" / "seg.json").exists():
        pytest.skip(f"PBC not found under {DATA} (set SMEARSCOPE_DATA) or models absent")
    from smearscope.device.frame import Frame
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
    from training.head_data import PBC_CLASSES, pbc_splits
    from training.lab_table import PBC_MICRONS_PER_PIXEL

    paths = [DATA / "pbc" / rel for rel, ci in pbc_splits()["test"] if PBC_CLASSES[ci] == "lymphocyte"][:4]
    labels = {}
    for bound in (MAX_LYMPHOCYTE_DIAMETER_UM, 5.0):
        analyzer = Analyzer.from_models_dir(ROOT / "models", options=AnalyzerOptions(max_lymphocyte_diameter_um=bound),
                                            warmup=False)
        try:
            labels[bound] = [[(c.label, c.atypical, c.diameter_um) for c in analyzer.analyze(
                Frame(cv2.imread(str(p)), p.name, "pbc", microns_per_pixel=PBC_MICRONS_PER_PIXEL)).report.cells
                if c.kind == "wbc"] for p in paths]
        finally:
            analyzer.close()
    typed = [(k, j) for k, cells in enumerate(labels[MAX_LYMPHOCYTE_DIAMETER_UM])
             for j, (label, _, _) in enumerate(cells) if label == "lymphocyte"]
    assert len(typed) >= 3
    assert all(labels[5.0][k][j][:2] == ("unidentified", True) and labels[5.0][k][j][2] > 5.0 for k, j in typed)
