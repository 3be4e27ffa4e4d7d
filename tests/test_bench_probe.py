"""bench.probe, which the performance table rests on: it must see every stage it names (a stage
renamed in the pipeline would silently move its time to "other"), record exactly the batches the
engines were given (the floor replays them), leave the analyzer as it found it, and give the
same report as an unprobed run. No timing is asserted: performance lives in bench/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.probe import STAGE_ORDER, Probe, probe_field
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

MODELS = Path(__file__).resolve().parents[1] / "models"
pytestmark = pytest.mark.skipif(not (MODELS / "seg.json").exists(), reason="committed models absent")
ONE = ("identity",)


@pytest.fixture(scope="module")
def analyzer():
    a = Analyzer.from_models_dir(MODELS, options=AnalyzerOptions(detector_views=ONE, rbc_views=ONE, wbc_views=ONE))
    yield a
    a.close()


def test_probe_sees_every_stage_and_every_engine_batch(analyzer):
    frame = render_field(101, width=640, height=480, microns_per_pixel=0.1).frame
    plain = analyzer.analyze(frame).report
    with Probe(analyzer) as probe:
        probed = analyzer.analyze(frame).report
    assert probe.missing == []
    assert [c.label for c in probed.cells] == [c.label for c in plain.cells]
    names = [engine.manifest.name for engine, _ in probe.batches]
    assert "seg" in names and "rbc_head" in names
    assert names.count("seg") == 1  # the detector's one batch, through run_parts, recorded once
    rbc_crops = sum(len(b) for engine, b in probe.batches if engine.manifest.name == "rbc_head")
    typed_rbc = sum(1 for c in probed.cells if c.kind == "rbc" and c.label is not None)
    assert rbc_crops == typed_rbc > 0  # one view: every typed red cell is one crop, nothing else
    for engine, batch in probe.batches:
        assert isinstance(batch, np.ndarray) and batch.shape[1:] == (3, engine.manifest.input_size,
                                                                     engine.manifest.input_size)
    stages = probe.breakdown(100.0)
    assert list(stages) == list(STAGE_ORDER)
    assert stages["detector engine"] > 0 and stages["head engines"] > 0 and stages["resample"] > 0


def test_probe_restores_the_analyzer_and_best_of_runs_keeps_one_breakdown(analyzer):
    from smearscope.service.analysis import detect_views

    before = (detect_views.merge_detections, analyzer.segmenter.engine.run)
    frame = render_field(102, width=640, height=480, microns_per_pixel=0.1).frame
    total, stages, floor, cells = probe_field(analyzer, frame, runs=2)
    assert (detect_views.merge_detections, analyzer.segmenter.engine.run) == before
    # the instance attributes are gone again
    assert "run" not in vars(analyzer.segmenter.engine) and "run_parts" not in vars(analyzer.segmenter.engine)
    assert cells == len(analyzer.analyze(frame).report.cells) > 0
    assert total > 0 and floor > 0 and set(stages) == set(STAGE_ORDER)
