"""The scale a specimen's fields agree on (service.analysis.specimen_scale): the bookkeeping, the
specimen run that keeps it, and the analyzer taking it where a field's own estimate is far off."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_specimen import FakeClock, fake_field

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.report import ScaleInfo
from smearscope.service.analysis.specimen_scale import (
    SPECIMEN_SCALE_AGREEMENT,
    SPECIMEN_SCALE_MIN_FIELDS,
    SPECIMEN_SCALE_TOLERANCE,
    SPECIMEN_SCALE_WINDOW,
    SpecimenScale,
    replaces,
)
from smearscope.service.station.specimen import SpecimenPolicy, SpecimenTracker

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_a_field_gives_way_only_when_far_off_or_without_an_estimate_and_never_when_calibrated():
    t = SPECIMEN_SCALE_TOLERANCE
    assert not replaces(0.1, "rbc_size_detection", None)
    assert not replaces(0.1 * (1 + t * 0.9), "rbc_size_detection", 0.1)
    assert not replaces(0.1 * (1 - t * 0.9), "rbc_size_classical", 0.1)
    assert replaces(0.1 * (1 + t * 1.1), "rbc_size_detection", 0.1)
    assert replaces(0.1 * (1 - t * 1.1), "rbc_size_detection", 0.1)
    assert replaces(0.3, "default", 0.1) and replaces(0.1, "default", 0.1)  # nothing measured
    assert not replaces(0.5, "given", 0.1)  # a calibration always wins


def test_the_specimens_scale_is_the_median_of_its_latest_own_estimates():
    pool = SpecimenScale()
    for k in range(SPECIMEN_SCALE_MIN_FIELDS - 1):
        pool.add("rbc_size_detection", 0.10 + 0.001 * k)
        assert pool.scale() is None  # too few fields yet
    pool.add("rbc_size_detection", 0.30)  # one far-off field does not move the median
    assert pool.scale() == pytest.approx(0.102)
    # a given or default scale is not an estimate; a field analysed at the specimen's scale
    # pools its own estimate, not the specimen's
    pool.add("given", 5.0)
    pool.add("default", 5.0)
    pool.add("specimen", 0.102, field_estimate=0.104)
    pool.add("specimen", 0.102, field_estimate=None)
    assert len(pool) == SPECIMEN_SCALE_MIN_FIELDS + 1
    assert pool.scale() == pytest.approx((0.102 + 0.103) / 2)  # not 0.102: the own estimate is pooled


def test_no_scale_while_the_fields_disagree():
    """A slide's first fields, two of them far off, must not make a scale a good field would
    then have to take (a three-field median once landed at 0.41 of the truth)."""
    pool = SpecimenScale()
    for mpp in (0.30, 0.13, 0.20, 0.29, 0.12):
        pool.add("rbc_size_detection", mpp)
    assert pool.scale() is None  # only 0.20 within the tolerance of the median 0.20
    n = 0
    while pool.scale() is None:  # the fields that follow agree
        pool.add("rbc_size_detection", 0.30)
        n += 1
    assert pool.scale() == pytest.approx(0.30, rel=0.04) and n <= SPECIMEN_SCALE_WINDOW
    assert SPECIMEN_SCALE_AGREEMENT > 0.5


def test_a_specimen_whose_scale_changes_is_followed_within_a_window():
    """Another objective mid-specimen: a few fields still get the old scale, then the fields keep
    their own estimates until the new scale is agreed on."""
    pool = SpecimenScale()
    for _ in range(SPECIMEN_SCALE_WINDOW):
        pool.add("rbc_size_detection", 0.10)
    seen = []
    for _ in range(SPECIMEN_SCALE_WINDOW):
        seen.append(pool.scale())  # what the next field (at the new objective) is given
        pool.add("rbc_size_detection", 0.25)
    old = sum(v == pytest.approx(0.10) for v in seen)
    assert 1 <= old <= SPECIMEN_SCALE_WINDOW // 3
    assert seen[-1] == pytest.approx(0.25) and None in seen


def test_the_open_run_keeps_its_fields_scales_and_a_new_run_starts_afresh():
    tracker = SpecimenTracker(SpecimenPolicy(target_wbc=1000), clock=FakeClock())
    assert tracker.specimen_scale() is None  # no run
    run = tracker.run_for_next_field()
    for k, mpp in enumerate([0.11, 0.12, 0.4, 0.13, 0.125, 0.12]):
        field = fake_field(f"f{k}", {"neutrophil": 1}, run_id=run)
        scale = ScaleInfo(microns_per_pixel=mpp, method="rbc_size_detection", canonical_microns_per_pixel=0.2)
        tracker.add(field.__class__(field.report.model_copy(update={"scale": scale}), field.cells, 1.0))
    assert tracker.specimen_scale() == pytest.approx(0.1225)
    tracker.stop()
    tracker.run_for_next_field()
    assert tracker.specimen_scale() is None


@pytest.fixture(scope="module")
def analyzer():
    from smearscope.service.analysis.pipeline import Analyzer

    a = Analyzer.from_models_dir(MODELS, warmup=False)
    yield a
    a.close()


@pytest.mark.skipif(not (MODELS / "seg.onnx").exists(), reason="committed models missing (models/)")
def test_a_field_far_from_its_specimens_scale_is_analysed_at_it_and_says_so(analyzer):
    rendered = render_field(5, width=900, height=700, microns_per_pixel=0.12).frame
    frame = dataclasses.replace(rendered, microns_per_pixel=None)  # an uncalibrated station
    alone = analyzer.analyze(frame).report
    own = alone.scale.microns_per_pixel
    assert alone.scale.method == "rbc_size_detection" and abs(own / 0.12 - 1) < 0.15
    # a specimen that agrees with the field: the field keeps its own estimate
    near = analyzer.analyze(frame, specimen_scale=own * 1.1).report
    assert near.scale.method == "rbc_size_detection" and near.scale.microns_per_pixel == own
    assert near.scale.field_estimate_microns_per_pixel is None
    # a specimen whose fields agree on another scale: the field is analysed at it
    far = analyzer.analyze(frame, specimen_scale=own * 1.5).report
    assert far.scale.method == "specimen"
    assert far.scale.microns_per_pixel == pytest.approx(own * 1.5, rel=1e-4)
    assert far.scale.field_estimate_microns_per_pixel == pytest.approx(own, rel=1e-4)
    assert not far.scale.uncertain
    assert "scale_from_specimen" in {f.code for f in far.flags}
    # cells measured at 1.5 times the scale are 1.5 times as wide
    def median_rbc_um(report):
        return float(np.median([c.diameter_um for c in report.cells if c.kind == "rbc"]))

    assert median_rbc_um(far) == pytest.approx(1.5 * median_rbc_um(alone), rel=0.2)
    # sizes rest on an estimate still: size-based red-cell types stay unassessed
    assert "size_not_assessable_without_calibration" in {f.code for f in far.flags}
    # a calibrated frame never takes it
    given = analyzer.analyze(rendered, specimen_scale=0.3).report
    assert given.scale.method == "given" and given.scale.microns_per_pixel == 0.12


class _EstimatingAnalyzer:
    """Analyzer-like: field i's own scale estimate is `own[i]`; records the frame's scale and the
    specimen scale each field was given."""

    def __init__(self, own: list[float]) -> None:
        from test_daemon import oracle_pool

        self.pool, self.own, self.given, self.calls = oracle_pool(), own, [], 0

    def analyze(self, frame, run_id=None, specimen_scale=None, check_calibration=False):
        from smearscope.service.analysis.pipeline import FieldResult

        i = self.calls
        self.calls += 1
        self.given.append((frame.microns_per_pixel, specimen_scale))
        base = self.pool[i % len(self.pool)]
        scale = ScaleInfo(microns_per_pixel=self.own[i], method="rbc_size_detection", canonical_microns_per_pixel=0.2)
        report = base.report.model_copy(update={
            "report_id": str(uuid.uuid4()), "run_id": run_id, "scale": scale,
            "source": base.report.source.model_copy(update={"frame_id": frame.frame_id})})
        return FieldResult(report, base.cells, base.input_to_canonical)


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_station_gives_each_field_its_specimens_scale_unless_calibrated(tmp_path, calibrated):
    import cv2
    from test_daemon import station_document, to_toml

    from smearscope.service.config import load_config
    from smearscope.service.station.daemon import StationDaemon

    recording = tmp_path / "recording"
    recording.mkdir()
    for k in range(8):
        assert cv2.imwrite(str(recording / f"f{k:02d}.png"), render_field(900 + k, width=320, height=240).frame.pixels)
    analysis = {"microns_per_pixel": 0.1} if calibrated else {}
    doc = station_document(tmp_path, 1, credentials=False, target_wbc=1000, analysis=analysis,
                           source={"kind": "replay", "path": str(recording), "fps": 0.0})
    (tmp_path / "station.toml").write_text(to_toml(doc))
    analyzer = _EstimatingAnalyzer([0.10, 0.11, 0.10, 0.30, 0.10, 0.10, 0.10, 0.10])
    daemon = StationDaemon(load_config(tmp_path / "station.toml", {}), analyzer_factory=lambda cfg: analyzer,
                           max_fields=8, environ={})
    assert daemon.run() == 0
    assert analyzer.calls == 8
    if calibrated:  # a calibrated station never pools
        assert all(mpp == 0.1 and spec is None for mpp, spec in analyzer.given)
    else:  # one specimen run: the first five fields build its scale, the next ones are given it
        assert all(mpp is None for mpp, _ in analyzer.given)
        assert [spec for _, spec in analyzer.given[:SPECIMEN_SCALE_MIN_FIELDS]] == [None] * SPECIMEN_SCALE_MIN_FIELDS
        assert analyzer.given[-1][1] == pytest.approx(0.10)


def test_an_uncalibrated_station_refuses_blurred_fields_once_its_run_agrees_on_a_scale(tmp_path):
    """Focus cannot be judged at an unknown scale, so an uncalibrated station analyses its very
    first field however blurred; once the open run's fields agree on a scale, a blurred field is
    refused as out_of_focus at that scale and never analysed."""
    import cv2
    from test_daemon import station_document, to_toml

    from smearscope.device.quality import OUT_OF_FOCUS
    from smearscope.service.config import load_config
    from smearscope.service.station.daemon import StationDaemon

    recording = tmp_path / "recording"
    recording.mkdir()
    blurred = {0, 10, 12}  # the capture thread is at most 3 fields ahead of the analysis: 10 comes
    for k in range(14):    # after the run's first SPECIMEN_SCALE_MIN_FIELDS fields are analysed
        pixels = render_field(920 + k, width=640, height=480, microns_per_pixel=0.1).frame.pixels
        if k in blurred:
            pixels = cv2.GaussianBlur(pixels, (0, 0), 20)  # 2 um
        assert cv2.imwrite(str(recording / f"f{k:02d}.png"), pixels)
    doc = station_document(tmp_path, 1, credentials=False, target_wbc=1000,
                           source={"kind": "replay", "path": str(recording), "fps": 0.0})
    (tmp_path / "station.toml").write_text(to_toml(doc))
    analyzer = _EstimatingAnalyzer([0.10] * 14)  # each field's own estimate: its true scale
    daemon = StationDaemon(load_config(tmp_path / "station.toml", {}), analyzer_factory=lambda cfg: analyzer,
                           environ={})
    assert daemon.run() == 0
    outcome = {fid.rsplit(":", 1)[1]: (o, r) for fid, o, r in daemon.outcomes}
    assert outcome["f00.png"] == ("analysed", None)  # no scale yet: its focus not judged
    assert outcome["f10.png"] == outcome["f12.png"] == ("rejected", OUT_OF_FOCUS)
    assert analyzer.calls == 12
    assert daemon.stats.snapshot()["rejected"] == {OUT_OF_FOCUS: 2}


def test_only_real_estimates_are_pooled():
    """A missing, infinite, zero or negative estimate is no scale (a field whose measurement failed)."""
    pool = SpecimenScale()
    for v in (float("nan"), float("inf"), 0.0, -0.1):
        pool.add("rbc_size_detection", v)
        pool.add("specimen", 0.1, field_estimate=v)
    assert len(pool) == 0


def test_a_pool_holds_to_its_own_window_agreement_and_tolerance():
    # agreement is inclusive: 7 of 10 within the tolerance of the median is 0.7 of them
    pool = SpecimenScale(window=10, min_fields=10, agreement=0.7)
    for v in [0.1] * 7 + [0.3] * 3:
        pool.add("rbc_size_detection", v)
    assert pool.scale() == pytest.approx(0.1)
    pool.add("rbc_size_detection", 0.3)  # the oldest 0.1 leaves the window: 6 of 10
    assert pool.scale() is None
    # a wider tolerance takes estimates 40 % off the median as agreeing; the default does not
    wide, default = SpecimenScale(tolerance=0.5), SpecimenScale()
    for v in (0.1, 0.1, 0.1, 0.14, 0.14):
        wide.add("rbc_size_detection", v)
        default.add("rbc_size_detection", v)
    assert wide.scale() == pytest.approx(0.1) and default.scale() is None


@pytest.mark.parametrize("args", [
    {"window": 0}, {"min_fields": 0}, {"window": 4, "min_fields": 5}, {"agreement": 1.5}, {"agreement": -0.1},
    {"tolerance": 0.0},
])
def test_a_pool_refuses_settings_that_cannot_agree(args):
    with pytest.raises(ValueError):
        SpecimenScale(**args)


@pytest.mark.skipif(not (MODELS / "seg.onnx").exists(), reason="committed models missing (models/)")
def test_a_field_with_no_red_cell_takes_its_specimens_scale_and_has_no_estimate_of_its_own(analyzer):
    """Glass alone at an unknown scale: no estimate of its own (method default), so it gives way
    to its specimen's scale; the report has no own estimate to show (None, not the assumed
    fallback) and the flag says there was no red cell to measure (mutation audit)."""
    blank = render_field(5, width=640, height=480, microns_per_pixel=0.12, rbc_density=0.0, n_wbc=0, n_platelets=0)
    frame = dataclasses.replace(blank.frame, microns_per_pixel=None)
    rep = analyzer.analyze(frame, specimen_scale=0.12).report
    assert rep.scale.method == "specimen" and rep.scale.microns_per_pixel == pytest.approx(0.12)
    assert rep.scale.field_estimate_microns_per_pixel is None
    flag = next(f for f in rep.flags if f.code == "scale_from_specimen")
    assert flag.severity == "info" and "no red cell to measure" in flag.message
