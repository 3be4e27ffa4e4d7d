"""A station types white cells by its own class means, fitted on cells its technician typed.

The fit (leave-one-out, temperature, refusals), the file and its checks against the head, the
features output added to the committed WBC head, the classifier typing by station means, start-up
and the report, and `smearscope adapt-wbc` end to end on rendered fields: the project's renderer
is a lab the committed head never saw (it sends most rendered white cells to review)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tomllib
from test_station_open_set import _config

from smearscope.cli.adapt import read_labels
from smearscope.device.synthetic import render_field
from smearscope.engines.manifest import load_manifest
from smearscope.export.feature_space import add_feature_space
from smearscope.service.analysis.classify import UNIDENTIFIED, CropClassifier
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR, Analyzer, AnalyzerOptions
from smearscope.service.analysis.station_means import (
    TEMPERATURES,
    FeatureSpace,
    StationMeans,
    StationMeansError,
    fit_station_means,
    leave_one_out_distances,
    load_feature_space,
    load_station_means,
)
from smearscope.service.config import parse_config
from smearscope.service.station.startup import StartupError, build_analyzer

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b", "c")


def _space(dim=4) -> FeatureSpace:
    means = np.zeros((3, dim))
    means[0, 0], means[1, 1], means[2, 2] = 4.0, 4.0, 4.0
    return FeatureSpace(CLASSES, means, np.eye(dim), "f" * 64)


def _lab(space, shift, n=12, seed=0, classes=(0, 1)):
    """A new lab's cells of `classes`: the trained means moved by `shift`, unit noise."""
    rng = np.random.default_rng(seed)
    feats = np.concatenate([space.means[k] + shift + rng.normal(0, 0.5, (n, space.means.shape[1])) for k in classes])
    labels = [CLASSES[k] for k in classes for _ in range(n)]
    return feats, labels


# -- the fit ----------------------------------------------------------------------------------

def test_a_shifted_lab_gets_its_own_means_and_untyped_classes_keep_the_heads():
    space = _space()
    shift = np.array([-3.0, 3.0, 0.0, 0.0])  # class a's cells now sit nearest b's trained mean
    feats, labels = _lab(space, shift)
    head = [CLASSES[k] for k in space.distances(feats).argmin(1)]
    fit = fit_station_means(space, feats, labels, head, "e" * 64, min_cells=10)
    assert fit.reason is None and fit.means is not None
    assert fit.head_accuracy < 0.6 and fit.loo_accuracy == 1.0
    lab = np.array(labels)
    assert np.allclose(fit.means.means[0], feats[lab == "a"].mean(0))
    assert np.allclose(fit.means.means[1], feats[lab == "b"].mean(0))
    assert np.array_equal(fit.means.means[2], space.means[2])  # c: not typed, the head's mean stays
    assert fit.cells == {"a": 12, "b": 12}
    assert 0.5 <= fit.means.temperature <= 2000


def test_the_open_set_thresholds_widen_to_the_typed_cells_never_narrow():
    """Each test: the typed cells' 0.95 quantile (of the leave-one-out distance to the nearest
    mean; of the energy) where above the model's threshold."""
    space = _space()
    feats, labels = _lab(space, np.array([-3.0, 3.0, 0.0, 0.0]))
    head = [CLASSES[k] for k in space.distances(feats).argmin(1)]
    energies = np.linspace(-5.0, -1.0, len(labels))
    fit = fit_station_means(space, feats, labels, head, "e" * 64, model_thresholds={"mahalanobis": 0.1, "energy": -2.0},
                            energies=energies)
    idx = np.array([CLASSES.index(c) for c in labels])
    d = leave_one_out_distances(space, feats, idx, fit.means.means, np.bincount(idx, minlength=3))
    assert fit.means.thresholds["energy"] == pytest.approx(np.quantile(energies, 0.95))
    assert fit.means.thresholds["mahalanobis"] == pytest.approx(np.quantile(d.min(1), 0.95))
    fit = fit_station_means(space, feats, labels, head, "e" * 64, model_thresholds={"mahalanobis": 1e6, "energy": -2.0},
                            energies=energies - 10)
    assert fit.means.thresholds == {"mahalanobis": 1e6, "energy": -2.0}
    # no energies: the energy test is not touched
    fit = fit_station_means(space, feats, labels, head, "e" * 64, model_thresholds={"mahalanobis": 0.1, "energy": -2.0})
    assert set(fit.means.thresholds) == {"mahalanobis"}


def test_the_distance_quantile_is_taken_per_view_as_the_analyzer_takes_it():
    """Cells that ran in two views: the fitted threshold is the 0.95 quantile of each view's
    distance averaged (leave one out), above that of the averaged features."""
    from smearscope.service.analysis.station_means import loo_view_distances

    space = _space()
    feats, labels = _lab(space, np.array([-3.0, 3.0, 0.0, 0.0]))
    rng = np.random.default_rng(7)
    spread = rng.normal(0, 0.8, feats.shape)
    view_feats = [np.stack([f + e, f - e]) for f, e in zip(feats, spread)]  # two views averaging to f
    head = [CLASSES[k] for k in space.distances(feats).argmin(1)]
    fit = fit_station_means(space, feats, labels, head, "e" * 64, model_thresholds={"mahalanobis": 0.0},
                            view_feats=view_feats)
    plain = fit_station_means(space, feats, labels, head, "e" * 64, model_thresholds={"mahalanobis": 0.0})
    idx = np.array([CLASSES.index(c) for c in labels])
    per_view = loo_view_distances(space, feats, idx, fit.means.means, np.bincount(idx, minlength=3), view_feats)
    assert fit.means.thresholds["mahalanobis"] == pytest.approx(np.quantile(per_view, 0.95))
    assert fit.means.thresholds["mahalanobis"] > plain.means.thresholds["mahalanobis"] + 0.5


def test_a_class_with_too_few_cells_keeps_the_heads_mean_and_none_at_all_is_refused():
    space = _space()
    feats, labels = _lab(space, np.zeros(4), n=6)
    head = list(labels)
    fit = fit_station_means(space, feats, labels, head, "e" * 64, min_cells=10)
    assert fit.means is None and fit.reason == "too_few_cells" and fit.cells == {"a": 6, "b": 6}
    feats2 = np.concatenate([feats, _lab(space, np.zeros(4), n=10, seed=3, classes=(0,))[0]])
    labels2 = labels + ["a"] * 10
    fit = fit_station_means(space, feats2, labels2, labels2, "e" * 64, min_cells=10)
    assert fit.means is not None and fit.cells == {"a": 16}
    assert np.array_equal(fit.means.means[1], space.means[1])


def test_cells_of_a_class_that_kept_the_heads_mean_count_in_the_check():
    """Every class moved along one axis; a and b get station means, c (8 cells, under min_cells)
    keeps the trained mean, and its cells now sit nearest b's station mean: the head typed them
    right, the station's means would not, so nothing is written."""
    space = FeatureSpace(CLASSES, np.array([[0.0, 0, 0, 0], [4.0, 0, 0, 0], [8.0, 0, 0, 0]]), np.eye(4), "f" * 64)
    rng = np.random.default_rng(1)
    shift = np.array([-5.0, 0, 0, 0])
    feats = np.concatenate([space.means[k] + shift + rng.normal(0, 0.3, (n, 4)) for k, n in ((0, 10), (1, 10), (2, 8))])
    labels = ["a"] * 10 + ["b"] * 10 + ["c"] * 8
    fit = fit_station_means(space, feats, labels, labels, "e" * 64, min_cells=10)
    assert fit.means is None and fit.reason == "head_better" and fit.loo_accuracy < 0.8


def test_fewer_than_two_cells_per_mean_is_refused():
    space = _space()
    feats, labels = _lab(space, np.zeros(4), n=3)
    with pytest.raises(ValueError, match="at least 2"):
        fit_station_means(space, feats, labels, labels, "e" * 64, min_cells=1)


def test_means_that_type_the_cells_worse_than_the_head_are_refused():
    """Noise wider than the classes' spread apart: leave-one-out misses some, the head (told right here) none."""
    space = _space()
    rng = np.random.default_rng(5)
    feats = np.concatenate([space.means[k] + rng.normal(0, 2.5, (10, 4)) for k in (0, 1)])
    labels = ["a"] * 10 + ["b"] * 10
    fit = fit_station_means(space, feats, labels, labels, "e" * 64)
    assert fit.means is None and fit.reason == "head_better"
    assert fit.loo_accuracy < fit.head_accuracy == 1.0


def test_leave_one_out_takes_each_cell_out_of_its_own_mean():
    space = _space()
    feats, labels = _lab(space, np.ones(4), n=5, seed=2)
    idx = np.array([CLASSES.index(c) for c in labels])
    means = space.means.copy()
    counts = np.zeros(3, int)
    for k in (0, 1):
        means[k], counts[k] = feats[idx == k].mean(0), (idx == k).sum()
    d = leave_one_out_distances(space, feats, idx, means, counts)
    for i in range(len(feats)):
        others = (idx == idx[i]) & (np.arange(len(feats)) != i)
        own = feats[others].mean(0)
        assert d[i, idx[i]] == pytest.approx(float(((feats[i] - own) ** 2).sum()))
        other = 1 - idx[i]
        assert d[i, other] == pytest.approx(float(((feats[i] - means[other]) ** 2).sum()))


def test_the_temperature_is_the_leave_one_out_likelihoods_best():
    space = _space()
    rng = np.random.default_rng(4)
    feats = np.concatenate([space.means[k] + rng.normal(0, 1.6, (15, 4)) for k in (0, 1)])
    labels = ["a"] * 15 + ["b"] * 15
    fit = fit_station_means(space, feats, labels, ["c"] * 30, "e" * 64)
    t = fit.means.temperature
    assert 0.5 < t < 2000  # inside the searched range: classes that overlap a little
    idx = np.array([CLASSES.index(c) for c in labels])
    counts = np.bincount(idx, minlength=3)
    d = leave_one_out_distances(space, feats, idx, fit.means.means, counts)

    def nll(temp):
        z = -d / (2 * temp)
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(idx)), idx]))

    assert nll(t) <= min(nll(t * 2), nll(t / 2))


def test_one_typed_class_does_not_make_every_cell_certain():
    """Every typed cell nearest its own mean: the likelihood alone takes the smallest temperature
    searched (each cell's probability 1.0, no confidence gate ever bites); instead the cells' mean
    probability of their own type is the rule of succession's (n + 1) / (n + 2), and no more."""
    space = _space()
    feats, labels = _lab(space, np.zeros(4), n=16, seed=3, classes=(0,))
    fit = fit_station_means(space, feats, labels, labels, "e" * 64, min_cells=10)
    assert fit.means is not None and fit.cells == {"a": 16}
    t = fit.means.temperature
    idx = np.array([CLASSES.index(c) for c in labels])
    d = leave_one_out_distances(space, feats, idx, fit.means.means, np.bincount(idx, minlength=3))
    assert (d.argmin(1) == idx).all()

    def confidence(temp):
        z = -d / (2 * temp)
        p = np.exp(z - z.max(1, keepdims=True))
        return float(np.mean(p[:, 0] / p.sum(1)))

    assert t > TEMPERATURES[0] and confidence(TEMPERATURES[0]) > 0.999
    assert confidence(t) <= 17 / 18 < confidence(TEMPERATURES[list(TEMPERATURES).index(t) - 1])


# -- the file ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head():
    manifest = load_manifest(DEFAULT_MODELS_DIR / "wbc_head.json")
    return manifest, load_feature_space(manifest, DEFAULT_MODELS_DIR)


def _station_file(tmp_path, manifest, space, shift_class="lymphocyte", **over) -> Path:
    means = space.means.copy()
    k = space.classes.index(shift_class)
    means[k] = means[k] + 1.0
    sm = StationMeans(manifest.sha256, space.sha256, means, 50.0, {shift_class: 12}, 0.9, 0.5, "test",
                      views=tuple(manifest.tta))
    doc = sm.to_json(space.classes)
    doc.update(over)
    path = tmp_path / "station.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_station_file_round_trips_and_is_refused_for_another_head(tmp_path, head):
    manifest, space = head
    loaded = load_station_means(_station_file(tmp_path, manifest, space), manifest, space)
    k = space.classes.index("lymphocyte")
    assert np.allclose(loaded.means[k], space.means[k] + 1.0, atol=1e-5)
    others = [i for i in range(len(space.classes)) if i != k]
    assert np.array_equal(loaded.means[others], space.means[others])
    assert loaded.cells == {"lymphocyte": 12} and loaded.temperature == 50.0 and loaded.views == tuple(manifest.tta)
    with pytest.raises(StationMeansError) as exc:  # written before files said which views they were fitted in
        load_station_means(_station_file(tmp_path, manifest, space, views=None), manifest, space)
    assert exc.value.code == "station_means_stale"
    with pytest.raises(StationMeansError) as exc:
        load_station_means(_station_file(tmp_path, manifest, space, model_sha256="0" * 64), manifest, space)
    assert exc.value.code == "station_means_stale" and "adapt-wbc" in exc.value.message
    bad = _station_file(tmp_path, manifest, space)
    doc = json.loads(bad.read_text())
    doc["classes"]["blast"] = doc["classes"]["lymphocyte"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(StationMeansError) as exc:
        load_station_means(bad, manifest, space)
    assert exc.value.code == "station_means_invalid"
    with pytest.raises(StationMeansError) as exc:
        load_station_means(_station_file(tmp_path, manifest, space, temperature=-1), manifest, space)
    assert exc.value.code == "station_means_invalid"
    for broken in ({"leave_one_out": None}, {"leave_one_out": {"station_means": "x", "head": 0.5}},
                   {"leave_one_out": {"head": 0.5}}, {"classes": []}, {"temperature": True},
                   {"classes": {"lymphocyte": {"cells": 0, "mean": list(space.means[0])}}},
                   {"classes": {"lymphocyte": {"cells": 3, "mean": [float("nan")] * len(space.means[0])}}},
                   {"classes": {"lymphocyte": {"cells": 3, "mean": "0 1 2"}}}):
        with pytest.raises(StationMeansError) as exc:
            load_station_means(_station_file(tmp_path, manifest, space, **broken), manifest, space)
        assert exc.value.code == "station_means_invalid", broken
    model = {t.method: t.threshold for t in manifest.open_set}
    wider = load_station_means(_station_file(tmp_path, manifest, space,
                                             open_set_thresholds={"energy": model["energy"] + 1}), manifest, space)
    assert wider.thresholds == {"energy": model["energy"] + 1}
    for bad in ({"energy": model["energy"] - 1}, {"mahalanobis": model["mahalanobis"] / 2}, {"cosine": 1.0},
                {"mahalanobis": True}):
        with pytest.raises(StationMeansError, match="open_set_thresholds"):
            load_station_means(_station_file(tmp_path, manifest, space, open_set_thresholds=bad), manifest, space)


def test_a_station_file_with_a_zero_temperature_is_refused(tmp_path, head):
    """-distance / 2T at T = 0 is no probability at all: a file saying so is refused, not applied."""
    manifest, space = head
    with pytest.raises(StationMeansError) as exc:
        load_station_means(_station_file(tmp_path, manifest, space, temperature=0.0), manifest, space)
    assert exc.value.code == "station_means_invalid"


def test_a_tampered_sidecar_is_refused(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    manifest = load_manifest(models / "wbc_head.json")
    side = models / manifest.feature_space.file
    with np.load(side) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["means"] = arrays["means"] + 1.0
    np.savez(side, **arrays)
    with pytest.raises(StationMeansError) as exc:
        load_feature_space(manifest, models)
    assert exc.value.code == "feature_space_mismatch"


def test_station_class_scores_are_minus_the_distance_over_twice_the_temperature():
    """A cell on class a's mean is 0 from it and 32 (squared) from b's and c's: its class scores
    are -d / 2T, so at T = 4 it is a with probability 1 / (1 + 2 e^-4) = 0.9647, at T = 1 with
    1 / (1 + 2 e^-16): the station's temperature is what the confidence gate reads."""
    from smearscope.service.analysis.classify import softmax

    space = _space()
    feats = space.means[:1].copy()
    for t, p in ((4.0, 1.0 / (1.0 + 2.0 * np.exp(-4.0))), (1.0, 1.0 / (1.0 + 2.0 * np.exp(-16.0)))):
        sm = StationMeans("0" * 64, space.sha256, space.means, t, {"a": 10})
        logits, nearest = sm.logits(space, feats)
        np.testing.assert_allclose(logits, [[0.0, -32.0 / (2 * t), -32.0 / (2 * t)]], atol=1e-9)
        assert nearest == pytest.approx([0.0], abs=1e-9)
        assert softmax(logits)[0, 0] == pytest.approx(p, rel=1e-9)


def test_station_means_widen_a_test_never_tighten_it_below_the_models():
    """With station means each test's threshold is the model's or the means' where higher; a test
    the means do not name keeps the model's."""
    from smearscope.engines.manifest import OpenSet
    from smearscope.service.analysis.classify import WITH_STATION_MEANS, with_station_means

    tests = [OpenSet(method="mahalanobis", output="ood", threshold=430.0), OpenSet(method="energy", threshold=-2.0)]
    wider = with_station_means(tests, {"mahalanobis": 500.0, "energy": -3.0})
    assert [t.threshold for t in wider] == [500.0, -2.0]
    assert all(t.calibration == WITH_STATION_MEANS for t in wider)
    only = with_station_means(tests, {"energy": -1.0})
    assert [t.threshold for t in only] == [430.0, -1.0] and only[0] == tests[0]


# -- the committed head's features output -----------------------------------------------------

def _wbc_crops(n_fields=3):
    """Crops of rendered white cells, as the analyzer cuts them."""
    from smearscope.service.analysis.crops import WBC_CROP, crop_cell

    crops = []
    for s in range(n_fields):
        f = render_field(300 + s, width=640, height=480, microns_per_pixel=0.1, n_wbc=3)
        canonical = cv2.resize(f.frame.pixels, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        for t in f.cells:
            if t.kind == "wbc" and not t.cut_by_frame_edge:
                crops.append(crop_cell(canonical, (t.center[0] / 2, t.center[1] / 2), WBC_CROP))
    return np.stack(crops)


def test_the_sidecar_reproduces_the_graphs_distance_on_real_crops(head):
    from smearscope.engines.registry import create_engine

    manifest, space = head
    engine = create_engine("onnxruntime", DEFAULT_MODELS_DIR / "wbc_head.json").load()
    try:
        clf = CropClassifier(engine, 0.5, views=["identity"], keep_features=True)
        crops = _wbc_crops()
        _, scores, feats = clf.forward(crops)
        ood = scores[:, [t.method for t in clf.open_sets].index("mahalanobis")]
        assert feats.shape == (len(crops), manifest.feature_space.dim)
        assert np.allclose(space.distances(feats.astype(np.float64)).min(1), ood, rtol=1e-3, atol=0.5)
    finally:
        engine.close()


def test_adding_the_feature_space_is_idempotent_and_keeps_the_outputs(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    before = load_manifest(models / "wbc_head.json")
    after = add_feature_space(models / "wbc_head.json")
    assert after.sha256 == before.sha256 and after.feature_space == before.feature_space
    assert [o.name for o in after.outputs] == [o.name for o in before.outputs]


def test_a_graph_whose_distance_the_sidecar_cannot_reproduce_is_refused(tmp_path):
    """The sidecar is written only where the distances recomputed from it equal the graph's `ood`:
    a head whose graph doubles its distance (a score that is not the plain squared Mahalanobis
    distance) is refused, and its manifest and sidecar are left as they were."""
    import onnx
    from onnx import helper, numpy_helper

    from smearscope.export.feature_space import FeatureSpaceError

    models = tmp_path / "models"
    models.mkdir()
    for name in ("wbc_head.json", "wbc_head.features.npz"):
        shutil.copy(DEFAULT_MODELS_DIR / name, models / name)
    model = onnx.load(str(DEFAULT_MODELS_DIR / "wbc_head.onnx"))
    g = model.graph
    last = next(n for n in g.node if "ood" in n.output)
    last.output[list(last.output).index("ood")] = "ood_single"
    g.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "ood_twice"))
    g.node.append(helper.make_node("Mul", ["ood_single", "ood_twice"], ["ood"]))
    onnx.save(model, str(models / "wbc_head.onnx"))
    before = {p.name: p.read_bytes() for p in models.iterdir() if p.suffix != ".onnx"}
    with pytest.raises(FeatureSpaceError, match="differ from the graph's 'ood'"):
        add_feature_space(models / "wbc_head.json", check_batch=2)
    assert {p.name: p.read_bytes() for p in models.iterdir() if p.suffix != ".onnx"} == before


# -- typing by station means ------------------------------------------------------------------

def test_station_means_equal_to_the_heads_give_the_graphs_distance_in_every_view(head):
    """Means that are the head's own: the distance test reads what the graph's does, each view's
    distance averaged (not the distance of the averaged features, which is smaller)."""
    from smearscope.engines.registry import create_engine

    manifest, space = head
    engine = create_engine("onnxruntime", DEFAULT_MODELS_DIR / "wbc_head.json").load()
    try:
        crops = _wbc_crops(2)
        md = [t.method for t in manifest.open_set].index("mahalanobis")
        plain = CropClassifier(engine, 0.5, extra_views_below=None, keep_features=True)
        _, graph_scores, feats = plain.forward(crops)
        same = StationMeans(manifest.sha256, space.sha256, space.means.copy(), 20.0, {"neutrophil": 10})
        _, station_scores, _ = CropClassifier(engine, 0.5, extra_views_below=None, station=(space, same)).forward(crops)
        assert np.allclose(station_scores[:, md], graph_scores[:, md], rtol=1e-3, atol=0.5)
        of_mean = space.distances(feats.astype(np.float64)).min(1)
        assert (of_mean < graph_scores[:, md] - 1.0).mean() > 0.5  # the averaged features' distance is smaller
    finally:
        engine.close()


def test_kept_features_per_view_are_what_the_distance_test_reads(head):
    """Each crop's kept features per view: one view where the head was sure, every view where not,
    averaging to its features; the station's distance score is their distances averaged, which
    the fit's leave-one-out score reproduces for a single view."""
    from smearscope.engines.registry import create_engine
    from smearscope.service.analysis.records import CellCrop
    from smearscope.service.analysis.station_means import loo_view_distances

    manifest, space = head
    engine = create_engine("onnxruntime", DEFAULT_MODELS_DIR / "wbc_head.json").load()
    try:
        records = [CellCrop(None, c) for c in _wbc_crops(3)]
        means = space.means + 0.5
        station = StationMeans(manifest.sha256, space.sha256, means, 20.0, {"neutrophil": 10})
        out = CropClassifier(engine, 0.5, station=(space, station), keep_features=True).classify(records)
        views = [len(r.head_features.view_features) for r in out]
        assert set(views) <= {1, len(manifest.tta)} and len(manifest.tta) in views and len(manifest.tta) > 1
        md = [t.method for t in manifest.open_set].index("mahalanobis")
        for r in out:
            v = np.array(r.head_features.view_features)
            assert np.allclose(v.mean(0), r.head_features.features, atol=1e-5)
            assert r.open_set_scores[md] == pytest.approx(space.distances(v, means).min(1).mean(), rel=1e-4)
    finally:
        engine.close()
    feats, labels = _lab(_space(), np.zeros(4), n=6)
    sp = _space()
    idx = np.array([CLASSES.index(c) for c in labels])
    counts = np.bincount(idx, minlength=3)
    m = sp.means.copy()
    for k in (0, 1):
        m[k] = feats[idx == k].mean(0)
    assert np.allclose(loo_view_distances(sp, feats, idx, m, counts, [f[None] for f in feats]),
                       leave_one_out_distances(sp, feats, idx, m, counts).min(1))


def test_means_fitted_in_other_views_are_refused(head):
    from smearscope.engines.registry import create_engine

    manifest, space = head
    engine = create_engine("onnxruntime", DEFAULT_MODELS_DIR / "wbc_head.json").load()
    try:
        fitted = StationMeans(manifest.sha256, space.sha256, space.means.copy(), 20.0, {"neutrophil": 10},
                              views=("identity",))
        CropClassifier(engine, 0.5, views=["identity"], station=(space, fitted))
        with pytest.raises(StationMeansError) as exc:
            CropClassifier(engine, 0.5, station=(space, fitted))  # the manifest's identity+hflip
        assert exc.value.code == "station_means_stale" and "views" in exc.value.message
    finally:
        engine.close()


def test_the_classifier_types_by_the_station_means_and_measures_distance_to_them(head):
    """A station whose eosinophil mean sits on one crop's features: that crop is typed eosinophil
    (whatever the head said) with a Mahalanobis score of about zero."""
    from smearscope.engines.registry import create_engine
    from smearscope.service.analysis.records import CellCrop

    manifest, space = head
    engine = create_engine("onnxruntime", DEFAULT_MODELS_DIR / "wbc_head.json").load()
    try:
        plain = CropClassifier(engine, 0.5, views=["identity"], keep_features=True)
        crops = _wbc_crops(2)
        records = [CellCrop(None, c) for c in crops]
        before = plain.classify(records)
        target = next(i for i, r in enumerate(before) if r.head_features.closed_set_label != "eosinophil")
        means = space.means.copy()
        k = space.classes.index("eosinophil")
        means[k] = np.array(before[target].head_features.features)
        station = StationMeans(manifest.sha256, space.sha256, means, 20.0, {"eosinophil": 10})
        adapted = CropClassifier(engine, 0.5, views=["identity"], station=(space, station)).classify(records)
        assert adapted[target].label == "eosinophil" and adapted[target].probs[k] > 0.9
        md = [t.method for t in plain.open_sets].index("mahalanobis")
        assert adapted[target].open_set_scores[md] == pytest.approx(0.0, abs=1.0)
        assert before[target].open_set_scores[md] > 50
        # the energy test still reads the head's own logits
        en = [t.method for t in plain.open_sets].index("energy")
        assert adapted[target].open_set_scores[en] == pytest.approx(before[target].open_set_scores[en], rel=1e-5)
        wide = StationMeans(manifest.sha256, space.sha256, means, 20.0, {"eosinophil": 10}, thresholds={"energy": 5.0})
        clf = CropClassifier(engine, 0.5, views=["identity"], station=(space, wide))
        assert clf.thresholds[en] == 5.0 and clf.thresholds[md] == plain.thresholds[md]
        with pytest.raises(ValueError, match="another head"):
            CropClassifier(engine, 0.5, station=(space, StationMeans("0" * 64, space.sha256, means, 20.0, {"a": 1})))
    finally:
        engine.close()


def test_start_up_reports_the_station_means_and_refuses_a_stale_file(tmp_path, head):
    manifest, space = head
    good = _station_file(tmp_path, manifest, space)
    from smearscope.engines.manifest import sha256_file
    from smearscope.service.fhir.bundle import report_bundle

    analyzer = build_analyzer(_config(tmp_path, f'wbc_station_means = "{good}"'))
    try:
        report = analyzer.analyze(render_field(3, width=320, height=240).frame).report
        info = report.models["wbc_head"].station_means
        assert info is not None and info.cells == {"lymphocyte": 12} and info.leave_one_out_accuracy == 0.9
        assert info.sha256 == sha256_file(good)
        # the FHIR Device names the means beside the models
        device = next(e["resource"] for e in report_bundle(report)["entry"] if e["resource"]["resourceType"] == "Device")
        assert {"type": {"text": "wbc_head station means"}, "value": f"sha256:{info.sha256}"} in device["version"]
    finally:
        analyzer.close()
    stale = _station_file(tmp_path, manifest, space, model_sha256="1" * 64)
    with pytest.raises(StartupError) as exc:
        build_analyzer(_config(tmp_path, f'wbc_station_means = "{stale}"'))
    assert exc.value.field == "analysis.wbc_station_means" and "station_means_stale" in exc.value.reason
    plain = build_analyzer(_config(tmp_path, ""))
    try:
        assert plain.analyze(render_field(3, width=320, height=240).frame).report.models["wbc_head"].station_means is None
    finally:
        plain.close()


# -- the command, end to end on rendered fields -----------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smearscope", *args], check=False, capture_output=True,
                          text=True, timeout=900, cwd=REPO)


MIX = {"neutrophil": 0.5, "lymphocyte": 0.5}


def _fields(folder: Path, seeds) -> list[tuple[Path, tuple]]:
    """Rendered 640x480 fields at 0.1 um/px with four white cells each; their white cells' truth."""
    out = []
    for s in seeds:
        f = render_field(s, width=640, height=480, microns_per_pixel=0.1, n_wbc=4, wbc_mix=MIX)
        path = folder / f"field{s}.png"
        cv2.imwrite(str(path), f.frame.pixels)
        out.append((path, tuple(t for t in f.cells if t.kind == "wbc" and not t.cut_by_frame_edge)))
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("station")
    train, test = _fields(folder, range(500, 512)), _fields(folder, range(600, 606))
    labels = folder / "typed.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "type"])
        for path, cells in train:
            w.writerows([path.name, round(t.center[0], 1), round(t.center[1], 1), t.subtype] for t in cells)
    return folder, labels, test


def _typed(analyzer: Analyzer, test) -> tuple[int, int, int]:
    """(test white cells under a counted cell, typed right as reported, sent to review)."""
    from smearscope.cli.adapt import cell_at
    from smearscope.device.frame import Frame

    found = right = review = 0
    for path, cells in test:
        pixels = cv2.imread(str(path))
        res = analyzer.analyze(Frame(pixels, path.name, str(path), microns_per_pixel=0.1))
        for t in cells:
            i = cell_at(res.cells, t.center[0], t.center[1], res.input_to_canonical, pixels.shape, typed_only=False)
            if i is not None:
                found += 1
                right += res.cells[i].label == t.subtype
                review += res.cells[i].label == UNIDENTIFIED
    return found, right, review


def _per_view_threshold(analyzer: Analyzer, labels: Path, station: Path) -> float:
    """The 0.95 quantile of the typed cells' per-view distances to the station's means (each left
    out of its own), as the fit should have taken it."""
    from smearscope.cli.adapt import cell_at, read_labels
    from smearscope.device.frame import Frame
    from smearscope.service.analysis.station_means import loo_view_distances

    manifest = analyzer.wbc_head.engine.manifest
    space = load_feature_space(manifest, DEFAULT_MODELS_DIR)
    sm = load_station_means(station, manifest, space)
    points = read_labels(labels, list(manifest.classes))
    feats, views, idx = [], [], []
    for image in dict.fromkeys(p.image for p in points):
        pixels = cv2.imread(str(image))
        res = analyzer.analyze(Frame(pixels, image.name, str(image), microns_per_pixel=0.1))
        taken = set()
        for p in (p for p in points if p.image == image):
            i = cell_at(res.cells, p.x, p.y, res.input_to_canonical, pixels.shape)
            if i is None or i in taken:
                continue
            taken.add(i)
            feats.append(res.cells[i].head_features.features)
            views.append(np.array(res.cells[i].head_features.view_features))
            idx.append(space.classes.index(p.type))
    idx = np.array(idx)
    counts = np.array([sm.cells.get(c, 0) for c in space.classes])
    per_view = loo_view_distances(space, np.array(feats), idx, sm.means, counts, views)
    return float(np.quantile(per_view, 0.95))


def test_adapt_wbc_types_a_new_labs_cells_the_head_sent_to_review(rendered, tmp_path):
    _, labels, test = rendered
    out = tmp_path / "station.json"
    run = _cli("adapt-wbc", "--labels", str(labels), "--out", str(out), "--microns-per-pixel", "0.1", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    line = json.loads(run.stdout)
    assert line["written"] == str(out) and set(line["cells_per_class"]) == set(MIX)
    assert json.loads(out.read_text())["views"] == list(load_manifest(DEFAULT_MODELS_DIR / "wbc_head.json").tta)
    assert line["leave_one_out_accuracy"] > line["head_accuracy"]
    # a third or more of these cells the head sends to review: not held against the typing (adapt_guard)
    assert sum(row.get("(review)", 0) for row in line["confusion"].values()) >= line["matched"] / 3, line["confusion"]
    # the head is unsure of this whole lab: its energy test is widened to the typed cells' 0.95 quantile
    assert line["open_set_thresholds"]["energy"] > line["model_open_set_thresholds"]["energy"]
    assert line["matched"] >= 20 and line["unmatched_count"] == line["typed"] - line["matched"]
    plain = Analyzer.from_models_dir(options=AnalyzerOptions(keep_wbc_features=True), warmup=False)
    adapted = Analyzer.from_models_dir(options=AnalyzerOptions(keep_wbc_features=True, wbc_station_means=out),
                                       warmup=False)
    try:
        found, right_plain, review_plain = _typed(plain, test)
        found2, right_adapted, review_adapted = _typed(adapted, test)
        expected_md = _per_view_threshold(plain, labels, out)
    finally:
        plain.close()
        adapted.close()
    # the distance test's quantile is of each typed cell's per-view distances, as analysis reads them
    assert line["typed_cells_quantiles"]["mahalanobis"] == pytest.approx(expected_md, rel=1e-3)
    assert found == found2 >= 10
    # the head as trained types fewer than 8 in 10 of these cells right (sending some to review); the
    # station's means type at least 8 in 10, sending fewer to review
    assert right_adapted / found >= 0.8 > right_plain / found
    assert review_adapted < review_plain and review_adapted / found < 0.2
    # the TOML lines it prints start the station, and say which marks were not used
    text = _cli("adapt-wbc", "--labels", str(labels), "--out", str(out), "--microns-per-pixel", "0.1").stdout
    assert tomllib.loads(text)["analysis"]["wbc_station_means"] == str(out.resolve())
    assert (f"# {line['unmatched_count']} marks found no white cell" in text) == (line["unmatched_count"] > 0), text
    # every mark twice: the second of each on a cell already marked, counted once and said so
    twice = labels.with_name("twice.csv")  # beside it: image paths are relative to the file
    rows = labels.read_text().splitlines()
    twice.write_text("\n".join([rows[0], *rows[1:], *rows[1:]]) + "\n")
    run = _cli("adapt-wbc", "--labels", str(twice), "--out", str(tmp_path / "twice.json"), "--microns-per-pixel",
               "0.1", "--json")
    again = json.loads(run.stdout)
    assert (again["matched"], again["unmatched_count"]) == (line["matched"], 2 * line["unmatched_count"])
    assert again["duplicate_count"] == line["matched"] and again["cells_per_class"] == line["cells_per_class"]


def test_adapt_wbc_refuses_bad_labels_and_too_few_cells(rendered, tmp_path):
    folder, labels, _ = rendered
    for name, text in (("empty-image.csv", "image,x,y,type\n,10,10,neutrophil\n"),
                       ("nan.csv", "image,x,y,type\nfield500.png,nan,10,neutrophil\n"),
                       ("short.csv", "image,x,y,type\nfield500.png,10\n")):
        (folder / name).write_text(text)
        run = _cli("adapt-wbc", "--labels", str(folder / name), "--out", str(tmp_path / "s.json"), "--json")
        assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "bad_labels", (name, run.stdout)
        assert ":2:" in json.loads(run.stdout)["error"]["message"]
    run = _cli("adapt-wbc", "--labels", str(labels), "--out", str(tmp_path / "s.json"), "--min-cells", "1", "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "bad_min_cells"
    bad = folder / "bad.csv"
    bad.write_text("image,x,y,type\nfield500.png,10,10,blast\n")
    run = _cli("adapt-wbc", "--labels", str(bad), "--out", str(tmp_path / "s.json"), "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "bad_labels"
    assert "blast" in json.loads(run.stdout)["error"]["message"]
    nocols = folder / "nocols.csv"
    nocols.write_text("file,x,y\nfield500.png,10,10\n")
    run = _cli("adapt-wbc", "--labels", str(nocols), "--out", str(tmp_path / "s.json"), "--json")
    assert run.returncode == 2 and "image" in json.loads(run.stdout)["error"]["message"]
    run = _cli("adapt-wbc", "--labels", str(labels), "--out", str(tmp_path / "s.json"), "--microns-per-pixel", "0.1",
               "--min-cells", "500", "--json")
    line = json.loads(run.stdout)
    assert run.returncode == 2 and line["error"]["code"] == "too_few_cells" and not (tmp_path / "s.json").exists()


def test_adapt_wbc_skips_an_image_path_no_file_can_have_without_a_traceback(tmp_path):
    """A typed-cells CSV naming an image by a path with a NUL character in it (a damaged export):
    that image is unreadable, named in the journal line with \\x00 and in `unreadable`; the call
    ends with its error line, not a ValueError traceback (exit 1) from a stat of the path."""
    labels = tmp_path / "typed.csv"
    labels.write_text("image,x,y,type\n/data/a\x00b.png,10,10,neutrophil\n")
    run = _cli("adapt-wbc", "--labels", str(labels), "--out", str(tmp_path / "s.json"), "--json")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-800:]
    line = json.loads(run.stdout)
    assert line["error"]["code"] == "too_few_cells" and line["unreadable"] == ["/data/a\x00b.png"], line
    assert "/data/a\\x00b.png: not_found" in run.stderr and "\x00" not in run.stderr, run.stderr


def test_doctor_names_the_station_means_and_fails_a_stale_file(tmp_path, head):
    from smearscope.cli.doctor import model_checks, station_means_checks

    manifest, space = head
    (status, _, detail), = station_means_checks(_config(tmp_path, "").analysis)
    assert status == "OK" and "adapt-wbc" in detail
    good = _station_file(tmp_path, manifest, space)
    (status, _, detail), = station_means_checks(_config(tmp_path, f'wbc_station_means = "{good}"').analysis)
    assert status == "OK" and "lymphocyte 12" in detail and "leave-one-out 90.0%" in detail
    stale = _station_file(tmp_path, manifest, space, model_sha256="2" * 64)
    (status, _, detail), = station_means_checks(_config(tmp_path, f'wbc_station_means = "{stale}"').analysis)
    assert status == "FAIL" and "station_means_stale" in detail
    assert ("features wbc_head" in [w for _, w, _ in model_checks(DEFAULT_MODELS_DIR)])
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    (models / manifest.feature_space.file).write_bytes(b"not the sidecar")
    failed = [(s, d) for s, w, d in model_checks(models) if w == "features wbc_head"]
    assert failed and failed[0][0] == "FAIL" and "install-models" in failed[0][1]


def _simulated_station(tmp_path: Path) -> str:
    """A simulated station's config up to its [analysis] section's first keys (the committed models)."""
    return f"""
station_id = "bench-1"
[source]
kind = "simulated"
[mqtt.outbox]
path = "{tmp_path / 'outbox.sqlite'}"
[analysis]
models_dir = "{DEFAULT_MODELS_DIR}"
"""


def test_means_fitted_in_other_views_fail_validate_config_and_doctor_as_they_fail_start_up(tmp_path, head, capsys):
    """wbc_head_views changed after the fit (one view classifies faster): validate-config and
    doctor had said OK of a config the station then refused at start (exit 78)."""
    from smearscope.cli.doctor import station_means_checks
    from smearscope.cli.station import validate_config_main

    manifest, space = head
    means = _station_file(tmp_path, manifest, space)  # fitted in the manifest's identity+hflip
    config = tmp_path / "station.toml"
    for views, ok in (("", True), ('wbc_head_views = ["identity"]', False)):
        config.write_text(f'{_simulated_station(tmp_path)}wbc_station_means = "{means}"\n{views}\n')
        analysis = parse_config(tomllib.loads(config.read_text()), environ={}).analysis
        (status, _, detail), = station_means_checks(analysis)
        assert (status == "OK") == ok, detail
        assert (validate_config_main(config, {}) == 0) == ok
        if not ok:
            assert "station_means_stale" in detail and "views identity+hflip" in detail
            assert "analysis.wbc_station_means: station_means_stale" in capsys.readouterr().err
            with pytest.raises(StartupError) as exc:
                build_analyzer(parse_config(tomllib.loads(config.read_text()), environ={}))
            assert exc.value.field == "analysis.wbc_station_means" and "views" in exc.value.reason


def test_a_spreadsheets_csv_reads_as_typed(tmp_path):
    """A byte-order mark, spaced and capitalised headers, blank lines: the same cells; line numbers
    as in the file."""
    from smearscope.cli.adapt import LabelsError, read_labels

    path = tmp_path / "typed.csv"
    path.write_text("\ufeffImage, x , y ,Type\nf1.png,10,20,Neutrophil\n\nsub\\f2.png,30,40,lymphocyte\n",
                    encoding="utf-8")
    points = read_labels(path, ["neutrophil", "lymphocyte"])
    assert [(p.image.relative_to(tmp_path).as_posix(), p.x, p.y, p.type, p.line) for p in points] == [
        ("f1.png", 10.0, 20.0, "neutrophil", 2), ("sub/f2.png", 30.0, 40.0, "lymphocyte", 4)]
    path.write_text("image,x,y,type\nf1.png,10,20,neutrophil\n\nf2.png,30,40,blast\n")
    with pytest.raises(LabelsError, match=":4:"):
        read_labels(path, ["neutrophil"])


def test_adapt_wbc_says_when_the_head_has_no_features_output(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    doc = json.loads((models / "wbc_head.json").read_text())
    doc["feature_space"] = None
    (models / "wbc_head.json").write_text(json.dumps(doc))
    labels = tmp_path / "typed.csv"
    labels.write_text("image,x,y,type\nf.png,1,1,neutrophil\n")
    run = _cli("adapt-wbc", "--labels", str(labels), "--out", str(tmp_path / "s.json"), "--models", str(models), "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "no_feature_space", run.stdout + run.stderr


def test_open_set_thresholds_are_tied_to_the_means_they_were_fitted_with(tmp_path, head):
    from smearscope.engines.manifest import sha256_file

    manifest, space = head
    means = _station_file(tmp_path, manifest, space)
    md = next(t.threshold for t in manifest.open_set if t.method == "mahalanobis")
    section = f'[analysis.wbc_open_set]\nthresholds = {{ mahalanobis = {md / 2} }}\nmodel_sha256 = "{manifest.sha256}"'
    with pytest.raises(StartupError) as exc:  # fitted without means, means now in place
        build_analyzer(_config(tmp_path, f'wbc_station_means = "{means}"\n{section}'))
    assert exc.value.field == "analysis.wbc_open_set" and "without station means" in exc.value.reason
    tied = f'{section}\nstation_means_sha256 = "{sha256_file(means)}"'
    build_analyzer(_config(tmp_path, f'wbc_station_means = "{means}"\n{tied}')).close()
    with pytest.raises(StartupError) as exc:  # fitted with means no longer configured
        build_analyzer(_config(tmp_path, tied))
    assert "the config has none" in exc.value.reason


def test_a_station_section_is_judged_against_the_thresholds_the_means_widened_by_doctor_as_at_start(tmp_path, head):
    """Station means widen the distance test (adapt-wbc): a station's own section may then go up to
    the widened threshold, not beyond it; doctor says what start-up does, and names both."""
    from smearscope.cli.doctor import open_set_checks
    from smearscope.engines.manifest import sha256_file

    manifest, space = head
    md = next(t.threshold for t in manifest.open_set if t.method == "mahalanobis")
    means = _station_file(tmp_path, manifest, space, open_set_thresholds={"mahalanobis": md + 10})
    tied = f'model_sha256 = "{manifest.sha256}"\nstation_means_sha256 = "{sha256_file(means)}"'
    (status, _, detail), = open_set_checks(_config(tmp_path, f'wbc_station_means = "{means}"').analysis)
    assert status == "OK" and f"with the station means thresholds (mahalanobis {md + 10:g}" in detail, detail
    between = _config(tmp_path, f'wbc_station_means = "{means}"\n[analysis.wbc_open_set]\n'
                                f'thresholds = {{ mahalanobis = {md + 5} }}\n{tied}')
    build_analyzer(between).close()  # above the model's, within the means': starts
    (status, _, detail), = open_set_checks(between.analysis)
    assert status == "OK" and f"mahalanobis {md + 5:g} (the model's with the station means {md + 10:g})" in detail
    beyond = _config(tmp_path, f'wbc_station_means = "{means}"\n[analysis.wbc_open_set]\n'
                               f'thresholds = {{ mahalanobis = {md + 20} }}\n{tied}')
    with pytest.raises(StartupError) as exc:
        build_analyzer(beyond)
    (status, _, detail), = open_set_checks(beyond.analysis)
    assert status == "FAIL" and detail == exc.value.reason, (detail, exc.value.reason)
    assert "(with the station means)" in detail


def test_validate_config_refuses_an_open_set_section_the_station_would_refuse(tmp_path, head, capsys):
    """validate-config says what start-up says of the section: fitted with means the config lacks,
    for another head, or looser than the thresholds the station runs with."""
    from smearscope.cli.station import validate_config_main
    from smearscope.engines.manifest import sha256_file

    manifest, space = head
    md = next(t.threshold for t in manifest.open_set if t.method == "mahalanobis")
    means = _station_file(tmp_path, manifest, space)
    base = _simulated_station(tmp_path)
    cases = {"ok": (f'wbc_station_means = "{means}"', md / 2, manifest.sha256, sha256_file(means)),
             "no means": ("", md / 2, manifest.sha256, sha256_file(means)),
             "other head": ("", md / 2, "3" * 64, None),
             "looser": ("", md + 1, manifest.sha256, None)}
    codes = {}
    for name, (means_line, value, sha, means_sha) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.toml"
        tied = f'\nstation_means_sha256 = "{means_sha}"' if means_sha else ""
        path.write_text(f'{base}{means_line}\n[analysis.wbc_open_set]\nthresholds = {{ mahalanobis = {value} }}\n'
                        f'model_sha256 = "{sha}"{tied}\n')
        codes[name] = validate_config_main(path, environ={})
        said = capsys.readouterr()
        out = said.out + said.err
        assert (codes[name] == 0) == ("OK" in out) and (codes[name] == 0 or "analysis.wbc_open_set" in out), out
    assert codes == {"ok": 0, "no means": 78, "other head": 78, "looser": 78}


def test_a_template_of_the_stations_white_cells_typed_and_fitted(rendered, tmp_path):
    """--template lists every white cell the station finds (type left empty, numbered as on the
    overlays); the technician types the ones they are sure of, and the same file fits the means."""
    folder, _, _ = rendered
    fields = sorted(folder.glob("field5*.png"))
    template, overlays = tmp_path / "typed.csv", tmp_path / "overlays"
    run = _cli("adapt-wbc", *map(str, fields), "--template", str(template), "--overlays", str(overlays),
               "--microns-per-pixel", "0.1", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    line = json.loads(run.stdout)
    with open(template, newline="") as f:
        rows = list(csv.DictReader(f))
    assert line["white_cells"] == len(rows) >= 20 and line["overlays"] == len(list(overlays.glob("*.cells.png"))) > 0
    assert all(r["type"] == "" and r["suggested"] for r in rows)
    per_field = {}
    for r in rows:
        per_field.setdefault(r["image"], []).append(int(r["cell"]))
    assert all(ns == list(range(1, len(ns) + 1)) for ns in per_field.values())
    # the technician: each row typed from the truth under it, one in five left empty
    truth = {}
    for s in range(500, 512):
        f = render_field(s, width=640, height=480, microns_per_pixel=0.1, n_wbc=4, wbc_mix=MIX)
        truth[f"field{s}.png"] = [t for t in f.cells if t.kind == "wbc"]
    for i, r in enumerate(rows):
        x, y = float(r["x"]), float(r["y"])
        near = min(truth[Path(r["image"]).name], key=lambda t: (t.center[0] - x) ** 2 + (t.center[1] - y) ** 2)
        if i % 5 and (near.center[0] - x) ** 2 + (near.center[1] - y) ** 2 < 15**2:
            r["type"] = near.subtype
    typed = sum(bool(r["type"]) for r in rows)
    with open(template, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "station.json"
    run = _cli("adapt-wbc", "--labels", str(template), "--out", str(out), "--microns-per-pixel", "0.1", "--min-cells",
               "5", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    fit = json.loads(run.stdout)
    assert fit["typed"] == typed and fit["matched"] == typed  # every typed row is a white cell the station found
    assert fit["leave_one_out_accuracy"] > fit["head_accuracy"]
    run = _cli("adapt-wbc", "--labels", str(template), "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "bad_arguments"
    # the template's fields were analysed at 0.1 um/px: a fit at an estimated scale is refused
    run = _cli("adapt-wbc", "--labels", str(template), "--out", str(out), "--min-cells", "5", "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "scale_mismatch"
    # the template command run again over the typed file, or onto a field, writes nothing; nor
    # does a fit whose --out is the typed file
    before = template.read_bytes()
    for target, code in ((template, "would_overwrite_types"), (fields[0], "bad_output")):
        kept = target.read_bytes()
        run = _cli("adapt-wbc", *map(str, fields), "--template", str(target), "--microns-per-pixel", "0.1", "--json")
        assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == code, run.stdout
        assert target.read_bytes() == kept
    resaved = tmp_path / "resaved.csv"  # a spreadsheet's re-save in another encoding: cannot be judged safe
    resaved.write_bytes(before.replace(b"image,", b"im\xe4ge,", 1))
    run = _cli("adapt-wbc", *map(str, fields), "--template", str(resaved), "--microns-per-pixel", "0.1", "--json")
    assert json.loads(run.stdout)["error"]["code"] == "would_overwrite_types" and resaved.read_bytes()[:5] == b"im\xe4ge"
    run = _cli("adapt-wbc", "--labels", str(template), "--out", str(template), "--microns-per-pixel", "0.1",
               "--min-cells", "5", "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "bad_output"
    assert template.read_bytes() == before


def test_a_template_from_a_config_takes_the_scale_its_source_holds(rendered, tmp_path):
    """A calibrated station keeps its scale in [source] (where calibrate-scale says to put it): the
    template's fields are analysed at it (they were at an estimated scale when only [analysis]
    was read)."""
    folder, _, _ = rendered
    config = tmp_path / "station.toml"
    config.write_text(f"""station_id = "bench-1"
[source]
kind = "simulated"
microns_per_pixel = 0.1
[analysis]
models_dir = "{DEFAULT_MODELS_DIR}"
[mqtt.outbox]
path = "{tmp_path / 'outbox.sqlite'}"
""")
    template = tmp_path / "typed.csv"
    run = _cli("adapt-wbc", str(folder / "field500.png"), "--template", str(template), "--config", str(config), "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    with open(template, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["microns_per_pixel"] for r in rows} == {"0.1"}


def test_template_overlays_of_fields_with_one_name_do_not_overwrite_each_other(rendered, tmp_path):
    folder, _, _ = rendered
    for sub, seed in (("a", "field500.png"), ("b", "field501.png")):
        (tmp_path / sub).mkdir()
        shutil.copy(folder / seed, tmp_path / sub / "field.png")
    template, overlays = tmp_path / "typed.csv", tmp_path / "overlays"
    run = _cli("adapt-wbc", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a" / "field.png"),
               "--template", str(template), "--overlays", str(overlays), "--microns-per-pixel", "0.1")
    assert run.returncode == 0, run.stdout + run.stderr
    with open(template, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["image"] for r in rows} == {"a/field.png", "b/field.png"}  # a field named twice is listed once
    by_image = {r["image"]: r["overlay"] for r in rows}
    assert by_image["a/field.png"] != by_image["b/field.png"]
    assert sorted(p.name for p in overlays.iterdir()) == sorted(set(by_image.values()))
    assert {r["microns_per_pixel"] for r in rows} == {"0.1"}
    assert "--microns-per-pixel 0.1" in run.stdout  # the printed next step fits at the same scale
    run = _cli("adapt-wbc", str(tmp_path / "a"), "--template", str(template), "--labels", str(template), "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "bad_arguments"
    (tmp_path / "plain").write_text("")
    run = _cli("adapt-wbc", str(tmp_path / "a"), "--template", str(template), "--overlays", str(tmp_path / "plain"),
               "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "cannot_write"


def test_a_few_cells_of_a_class_without_a_station_mean_do_not_flatten_the_temperature():
    """Two classes with station means, three stray cells of a third class whose trained mean is
    nowhere near them (a class the head never saw): the temperature is the two classes' own."""
    space = _space()
    feats, labels = _lab(space, np.array([-3.0, 3.0, 0.0, 0.0]))
    head = [CLASSES[k] for k in space.distances(feats).argmin(1)]
    alone = fit_station_means(space, feats, labels, head, "e" * 64)
    stray = np.array([[40.0, 40.0, 0.0, 0.0]] * 3)
    with_stray = fit_station_means(space, np.concatenate([feats, stray]), labels + ["c"] * 3, head + ["c"] * 3, "e" * 64)
    assert with_stray.means is not None
    assert with_stray.means.temperature == alone.means.temperature


def test_adapt_wbc_refuses_options_that_do_not_go_together_before_any_work(tmp_path):
    """Each mode takes its own options (exit 2, bad_arguments / no_images / bad_min_cells, said
    before a config or model is read), and a template never replaces a CSV that is not an untyped
    template (here another file with no type column)."""
    field = tmp_path / "f.png"
    cv2.imwrite(str(field), render_field(1, width=320, height=240).frame.pixels)
    labels, out, config = tmp_path / "typed.csv", tmp_path / "s.json", tmp_path / "none.toml"
    labels.write_text("image,x,y,type\nf.png,10,10,neutrophil\n")
    for args, code in (((str(field), "--labels", str(labels), "--out", str(out)), "bad_arguments"),
                       (("--station", "--config", str(config), "--out", str(out), "--labels", str(labels)), "bad_arguments"),
                       (("--station", "--config", str(config), "--out", str(out), str(field)), "bad_arguments"),
                       (("--station", "--config", str(config), "--out", str(out), "--min-cells", "1"), "bad_min_cells"),
                       (("--template", str(tmp_path / "t.csv")), "no_images"),
                       ((str(field), "--template", str(tmp_path / "t.csv"), "--out", str(out)), "bad_arguments")):
        models = () if "--config" in args else ("--models", str(tmp_path / "no-models"))  # not both: refused
        run = _cli("adapt-wbc", *args, *models, "--json")
        assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == code, (args, run.stdout)
        assert not out.exists() and not (tmp_path / "t.csv").exists()
    other = tmp_path / "counts.csv"
    other.write_text("image,x,y,note\nf.png,10,10,a cell the technician circled\n")
    kept = other.read_bytes()
    run = _cli("adapt-wbc", str(field), "--template", str(other), "--models", str(tmp_path / "no-models"), "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "would_overwrite_types", run.stdout
    assert other.read_bytes() == kept


def test_models_named_beside_a_config_are_refused_not_ignored(tmp_path):
    """With --config the station's analysis.models_dir runs: another --models beside it would be
    ignored, and the means or thresholds fitted for a head the user did not mean. Each command
    refuses the pair (exit 2, bad_arguments, nothing written); --models alone or --config alone run."""
    field = tmp_path / "f.png"
    cv2.imwrite(str(field), render_field(1, width=320, height=240, microns_per_pixel=0.1).frame.pixels)
    labels, out, config = tmp_path / "typed.csv", tmp_path / "s.json", tmp_path / "station.toml"
    labels.write_text("image,x,y,type\nf.png,10,10,neutrophil\n")
    config.write_text(f'station_id = "t"\n[source]\nkind = "simulated"\n[analysis]\nmodels_dir = "{REPO / "models"}"\n'
                      f'[mqtt.outbox]\npath = "{tmp_path / "outbox.sqlite3"}"\n')
    other = ("--models", str(tmp_path / "other-models"))
    for command in (("adapt-wbc", "--labels", str(labels), "--out", str(out)),
                    ("adapt-wbc", str(field), "--template", str(tmp_path / "t.csv")),
                    ("adapt-wbc", "--station", "--out", str(out)),
                    ("calibrate-atypical", str(field), "--microns-per-pixel", "0.1")):
        run = _cli(*command, "--config", str(config), *other, "--json")
        assert run.returncode == 2, (command, run.stdout, run.stderr)
        error = json.loads(run.stdout)["error"]
        assert error["code"] == "bad_arguments" and "--models" in error["message"], (command, error)
        assert not out.exists() and not (tmp_path / "t.csv").exists()
    # either alone is taken: the config's models run (here: too few white cells to fit on)
    run = _cli("calibrate-atypical", str(field), "--microns-per-pixel", "0.1", "--config", str(config), "--json")
    assert json.loads(run.stdout)["error"]["code"] == "too_few_white_cells", run.stdout
    run = _cli("calibrate-atypical", str(field), "--microns-per-pixel", "0.1", *other, "--json")
    assert json.loads(run.stdout)["error"]["code"] == "engine_unavailable", run.stdout


def test_adapt_wbc_refuses_a_fit_at_a_scale_a_percent_off_the_templates(tmp_path):
    """The template's fields were analysed at 0.1 um/px: a fit at 0.102 (2 % off) takes other
    features: scale_mismatch, nothing written."""
    labels, out = tmp_path / "typed.csv", tmp_path / "s.json"
    labels.write_text("image,x,y,type,microns_per_pixel\nf.png,10,10,neutrophil,0.1\n")
    run = _cli("adapt-wbc", "--labels", str(labels), "--out", str(out), "--microns-per-pixel", "0.102", "--json")
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "scale_mismatch", run.stdout
    assert not out.exists()


def test_a_reload_after_the_means_were_refitted_in_place_says_a_restart_is_needed(tmp_path, head):
    """adapt-wbc --out onto the file the config already names changes no line of the config: the
    reload must still say the running station types by the means it loaded, not the new ones."""
    from smearscope.service.config import load_config
    from smearscope.service.station.daemon import StationDaemon

    manifest, space = head
    means = _station_file(tmp_path, manifest, space)
    config = tmp_path / "station.toml"
    config.write_text(f"""
station_id = "bench-1"
[source]
kind = "simulated"
[analysis]
models_dir = "{DEFAULT_MODELS_DIR}"
wbc_station_means = "{means}"
[mqtt.outbox]
path = "{tmp_path / 'outbox.sqlite'}"
""")
    cfg = load_config(config, {})
    daemon = StationDaemon(cfg, config_path=config, environ={})
    daemon.analyzer = build_analyzer(cfg)  # as run() loads it
    try:
        assert daemon.reload()["requires_restart"] == []  # the file it loaded: nothing to do
        _station_file(tmp_path, manifest, space, shift_class="monocyte")  # refitted, same path
        assert daemon.reload()["requires_restart"] == ["analysis"]
        means.unlink()  # gone: a restart would refuse it, and the running means are not the config's
        assert daemon.reload()["requires_restart"] == ["analysis"]
    finally:
        daemon.analyzer.close()


def test_means_are_flagged_at_a_station_scale_whose_fit_would_leave_their_cells_out(head):
    """doctor's and the start's warning about means fitted at another scale uses the rule a fit
    leaves typed cells out by (within 1 % of the station's scale): means whose cells were analysed
    at 0.101 um/px on a station at 0.1 were said to fit (1 % of 0.101), while a fit there leaves
    those very cells out (other_scale)."""
    from smearscope.service.analysis.station_means import means_scale_problem, same_scale

    manifest, space = head
    means = StationMeans(manifest.sha256, space.sha256, space.means.copy(), 50.0, {"lymphocyte": 12}, 0.9, 0.5,
                         "test", views=tuple(manifest.tta))
    for fitted, station in ((0.101, 0.1), (0.1, 0.101), (0.1, 0.1005), (0.1, 0.1), (0.135, 0.15), (0.2, 0.1)):
        problem = means_scale_problem(dataclasses.replace(means, microns_per_pixel=fitted), station)
        assert (problem is None) == same_scale(fitted, station), (fitted, station, problem)
    assert means_scale_problem(dataclasses.replace(means, microns_per_pixel=0.101), 0.1) is not None
    assert means_scale_problem(dataclasses.replace(means, microns_per_pixel=0.1), None) is not None  # now estimated
    assert means_scale_problem(means, 0.1) is None  # the file does not say


def test_a_template_names_a_field_whose_name_holds_a_zero_width_non_joiner_so_labels_read_it_back(rendered, tmp_path):
    """A Persian file name is spelled with U+200C: the template's image column carries it as it is,
    and --labels finds that file (written as \\u200c, the backslash read it as a Windows path)."""
    folder, _, _ = rendered
    name = "\u06af\u0644\u200c\u0647\u0627.png"
    shutil.copy(folder / "field500.png", tmp_path / name)
    template = tmp_path / "typed.csv"
    run = _cli("adapt-wbc", str(tmp_path / name), "--template", str(template), "--microns-per-pixel", "0.1", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    with open(template, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["image"] for r in rows} == {name}
    rows[0]["type"] = "neutrophil"
    with open(template, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    points = read_labels(template, ["neutrophil", "lymphocyte"])
    assert [p.image for p in points] == [tmp_path / name] and points[0].image.is_file()
