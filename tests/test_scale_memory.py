"""A station at an unknown scale starts each field's scale search where its previous fields
settled (service.station.scale_memory); the field's own red cells still decide its scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_daemon import pool_factory, station_document, to_toml

from smearscope.device.frame import Frame
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
from smearscope.service.analysis.report import ScaleInfo
from smearscope.service.config import load_config
from smearscope.service.station.daemon import StationDaemon
from smearscope.service.station.scale_memory import ScaleMemory

ROOT = Path(__file__).resolve().parents[1]
TRUE_MPP = 0.13


def _scale(mpp: float, method: str = "rbc_size_detection", uncertain: bool = False) -> ScaleInfo:
    return ScaleInfo(microns_per_pixel=mpp, method=method, canonical_microns_per_pixel=0.2, uncertain=uncertain)


def test_memory_keeps_certain_measured_scales_and_hints_their_median():
    m = ScaleMemory(window=3)
    assert m.hint() is None
    m.record(_scale(0.10))
    for other in (_scale(0.5, "given"), _scale(0.9, uncertain=True), _scale(0.7, "previous_fields"),
                  _scale(0.3, "rbc_size_classical"), _scale(0.2, "default")):
        m.record(other)  # none of these was measured on the field's own red cells with certainty
    assert m.hint() == 0.10
    for v in (0.12, 0.30, 0.13, 0.14):
        m.record(_scale(v))
    assert m.hint() == 0.14  # the last three, 0.30 0.13 0.14: one odd field does not move it
    with pytest.raises(ValueError):
        ScaleMemory(window=0)


def test_a_frame_refuses_a_meaningless_hint():
    px = np.zeros((8, 8, 3), np.uint8)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            Frame(px, "f", "t", scale_hint=bad)


def test_the_station_hints_frames_of_unknown_scale_with_what_its_fields_measured(tmp_path: Path):
    doc = station_document(tmp_path, 1883, credentials=False)
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    workers = StationDaemon(load_config(config, {}), analyzer_factory=pool_factory(), config_path=config,
                            environ={}).workers
    px = np.zeros((8, 8, 3), np.uint8)
    unknown = Frame(px, "a", "t")
    assert workers.with_scale(unknown).scale_hint is None  # nothing measured yet
    workers.scale_memory.record(_scale(0.11))
    assert workers.with_scale(unknown).scale_hint == 0.11
    given = Frame(px, "b", "t", microns_per_pixel=0.2)
    assert workers.with_scale(given) is given  # a known scale needs no hint
    workers.scale_override = 0.09  # a calibrated station: the config's scale, no hint
    fixed = workers.with_scale(unknown)
    assert fixed.microns_per_pixel == 0.09 and fixed.scale_hint is None


@pytest.fixture(scope="module")
def analyzer():
    if not (ROOT / "models" / "seg.json").exists():
        pytest.skip("models/seg.json not present")
    a = Analyzer.from_models_dir(ROOT / "models", options=AnalyzerOptions(detector_views=("identity",)), warmup=False)
    yield a
    a.close()


def _passes(analyzer: Analyzer, frame: Frame) -> tuple[ScaleInfo, list[float]]:
    """The report's scale and the scale of every detection pass the analysis ran, in order."""
    calls: list[float] = []
    original = analyzer._detect_at

    def spy(frame_, mpp, *args, **kwargs):
        calls.append(mpp)
        return original(frame_, mpp, *args, **kwargs)

    analyzer._detect_at = spy  # type: ignore[method-assign]
    try:
        return analyzer.analyze(frame).report.scale, calls
    finally:
        del analyzer._detect_at


def test_a_hint_is_where_the_search_starts_and_the_field_still_measures_itself(analyzer):
    f = render_field(951, width=1024, height=768, microns_per_pixel=TRUE_MPP)
    near = TRUE_MPP * 1.04
    scale, calls = _passes(analyzer, Frame(f.frame.pixels, "x", "t", scale_hint=near))
    assert calls[0] == pytest.approx(near) and len(calls) <= 2
    assert scale.method == "rbc_size_detection" and not scale.uncertain
    assert abs(scale.microns_per_pixel / TRUE_MPP - 1) < 0.15
    # a hint from another objective (three times the scale): the field's own red cells win
    scale, calls = _passes(analyzer, Frame(f.frame.pixels, "x", "t", scale_hint=TRUE_MPP * 3))
    assert calls[0] == pytest.approx(TRUE_MPP * 3)
    assert abs(scale.microns_per_pixel / TRUE_MPP - 1) < 0.15


def test_a_field_without_red_cells_takes_the_hint_and_says_so(analyzer):
    glass = np.full((480, 640, 3), 228, np.uint8)
    report = analyzer.analyze(Frame(glass, "glass", "t", scale_hint=0.12)).report
    assert report.scale.method == "previous_fields" and report.scale.microns_per_pixel == pytest.approx(0.12)
    assert report.scale.uncertain and "scale_uncertain" in {f.code for f in report.flags}
