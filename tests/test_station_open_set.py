"""A station tightens the WBC head's open-set thresholds on its own normal specimens, never loosens them.

The fit (`service.analysis.open_set_fit`), the classifier's use of the station's thresholds, the
config section and its checks at start-up, and `smearscope calibrate-atypical` end to end on
rendered fields with the committed models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tomllib
from realdata import DATA
from test_open_set_flags import _crops, _Head

from smearscope.device.synthetic import render_field
from smearscope.engines.manifest import load_manifest
from smearscope.service.analysis.classify import UNIDENTIFIED, CropClassifier, OpenSetThresholdError
from smearscope.service.analysis.open_set_fit import fit_station_thresholds
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR
from smearscope.service.config import parse_config
from smearscope.service.config.analysis import AnalysisConfig
from smearscope.service.station.startup import StartupError, build_analyzer

REPO = Path(__file__).resolve().parents[1]


# -- the fit ----------------------------------------------------------------------------------

def _station(n=1000, seed=0):
    """A well-matched station's normal cells: distances around 100, energies around -6, far
    below the model's thresholds (430, -2); 2 % of them unsure."""
    rng = np.random.default_rng(seed)
    scores = np.stack([rng.normal(100, 20, n), rng.normal(-6, 0.5, n)], axis=1)
    unsure = rng.random(n) < 0.02
    return scores, unsure


def test_a_well_matched_station_tightens_to_its_budget():
    scores, unsure = _station()
    fit = fit_station_thresholds(scores, unsure, ["mahalanobis", "energy"], [430.0, -2.0], budget=0.05)
    assert fit.thresholds is not None and fit.reason is None
    md, en = fit.thresholds["mahalanobis"], fit.thresholds["energy"]
    assert md < 200 and en < -4  # far tighter than the model's 430 / -2
    # within budget, and the lowest such quantile: one grid step lower is over it
    review = (unsure | (scores[:, 0] > md) | (scores[:, 1] > en)).mean()
    assert review <= 0.05 and fit.review_share == pytest.approx(review)
    lower = np.quantile(scores, fit.quantile - 0.0025, axis=0)
    assert (unsure | (scores > lower).any(axis=1)).mean() > 0.05
    assert fit.review_share_model == pytest.approx(unsure.mean())


def test_a_station_never_loosens_a_threshold():
    """A station whose distances run high: the distance threshold stays the model's (capped), the
    energy, well inside, is tightened."""
    scores, unsure = _station()
    scores[:, 0] += 320  # around 420: a third of the cells beyond the model's 430
    fit = fit_station_thresholds(scores, np.zeros(len(unsure), bool), ["mahalanobis", "energy"], [430.0, -2.0],
                                 budget=0.40)
    assert fit.thresholds is not None
    assert np.quantile(scores[:, 0], fit.quantile) > 430.0  # its own quantile would have loosened it
    assert fit.thresholds["mahalanobis"] <= 430.0
    assert fit.thresholds["energy"] < -2.0


def test_over_budget_and_too_few_cells_keep_the_models_thresholds():
    scores, unsure = _station()
    unsure[:100] = True  # 10 % unsure whatever the thresholds
    fit = fit_station_thresholds(scores, unsure, ["mahalanobis", "energy"], [430.0, -2.0], budget=0.05)
    assert fit.thresholds is None and fit.reason == "over_budget"
    few = fit_station_thresholds(scores[:50], unsure[:50] & False, ["mahalanobis", "energy"], [430.0, -2.0], 0.05)
    assert few.thresholds is None and few.reason == "too_few_white_cells" and few.n_cells == 50


def test_exactly_the_budget_with_exactly_the_fewest_cells_fits():
    """200 normal cells (MIN_CELLS, enough) scoring 0..199, none unsure, budget 5 %: the 0.95
    quantile (189.05) sends cells 190..199, exactly 10 = 5 %, to review; that is within budget, and
    the 0.9475 quantile (188.55) sends 11."""
    scores = np.arange(200, dtype=np.float64)[:, None]
    fit = fit_station_thresholds(scores, np.zeros(200, bool), ["mahalanobis"], [1000.0], budget=0.05)
    assert fit.reason is None and fit.n_cells == 200
    assert fit.quantile == pytest.approx(0.95) and fit.review_share == 0.05
    assert 189.0 < fit.thresholds["mahalanobis"] < 190.0


def test_the_fitted_share_counts_cells_beyond_the_threshold_not_at_it():
    """The fit counts review as the classifier decides it (a score above its threshold): 190 cells
    at 1.0 and 10 at 2.0 fit at the first quantile (0.80 reads 1.0), 10 of 200 beyond it."""
    scores = np.array([1.0] * 190 + [2.0] * 10)[:, None]
    fit = fit_station_thresholds(scores, np.zeros(200, bool), ["mahalanobis"], [5.0], budget=0.05)
    assert fit.thresholds == {"mahalanobis": 1.0} and fit.quantile == pytest.approx(0.80)
    assert fit.review_share == 0.05
    head = _Head({"neutrophil": 8.0}, ood=1.0, threshold=5.0)
    at = CropClassifier(head, 0.5, open_set_thresholds=fit.thresholds).classify(_crops(1))[0]
    assert at.label == "neutrophil" and not at.atypical  # a cell at the fitted threshold is typed


def test_a_capped_threshold_never_reads_above_the_models():
    """A model threshold with more decimals than the fit keeps (430.123456): a capped test's
    threshold is rounded down (430.1234), so the station may use it; rounded to nearest it would read
    430.1235, looser than the model's, and be refused."""
    scores, _ = _station()
    scores[:, 0] += 320  # around 420: the distance test is capped at the model's
    model = [430.123456, -2.0]
    fit = fit_station_thresholds(scores, np.zeros(len(scores), bool), ["mahalanobis", "energy"], model, budget=0.40)
    assert fit.thresholds is not None and np.quantile(scores[:, 0], fit.quantile) > model[0]
    assert fit.thresholds["mahalanobis"] == 430.1234
    head = _Head({"neutrophil": 8.0}, ood=300.0, threshold=model[0], energy_threshold=model[1])
    clf = CropClassifier(head, 0.5, open_set_thresholds=fit.thresholds)
    assert clf.thresholds[0] == 430.1234


def test_a_station_whose_only_fit_is_the_models_own_thresholds_writes_none():
    """188 cells at 10 and 12 exactly at the model's 100: every grid quantile reading 10 sends the
    12 (6 %) to review, over a 5 % budget; the first reading 100 (0.945) is the model's own
    threshold: nothing tighter fits, so the station keeps the model's (no thresholds of its own),
    and says so: not "over budget", which the model's thresholds (none of these to review) are not."""
    scores = np.array([10.0] * 188 + [100.0] * 12)[:, None]
    fit = fit_station_thresholds(scores, np.zeros(200, bool), ["mahalanobis"], [100.0], budget=0.05)
    assert fit.thresholds is None and fit.quantile is None and fit.review_share_model == 0.0
    assert fit.reason == "nothing_tighter"
    # nothing on the grid fits a budget of 0.3 % (its last quantile, 0.9975, sends 0.33 % of 300 to
    # review), but the model's threshold sends none: still nothing_tighter, not over_budget
    uniform = np.random.default_rng(0).random((300, 1))
    fit = fit_station_thresholds(uniform, np.zeros(300, bool), ["energy"], [5.0], budget=0.003)
    assert fit.thresholds is None and fit.review_share_model == 0.0 and fit.reason == "nothing_tighter"


def test_a_budget_must_be_a_share_strictly_between_nothing_and_everything():
    scores, unsure = _station()
    for budget in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="budget"):
            fit_station_thresholds(scores, unsure, ["mahalanobis", "energy"], [430.0, -2.0], budget=budget)


# -- the classifier ---------------------------------------------------------------------------

def test_the_station_threshold_sends_a_cell_between_it_and_the_models_to_review():
    head = _Head({"neutrophil": 8.0}, ood=300.0, threshold=430.0)
    model = CropClassifier(head, 0.5).classify(_crops(1))[0]
    station = CropClassifier(head, 0.5, open_set_thresholds={"mahalanobis": 250.0}).classify(_crops(1))[0]
    assert model.label == "neutrophil" and not model.atypical
    assert station.label == UNIDENTIFIED and station.atypical
    assert station.open_set_scores == (300.0,)


def test_a_looser_or_unknown_station_threshold_is_refused():
    head = _Head({"neutrophil": 8.0}, ood=300.0, threshold=430.0)
    with pytest.raises(OpenSetThresholdError, match="looser"):
        CropClassifier(head, 0.5, open_set_thresholds={"mahalanobis": 431.0})
    with pytest.raises(OpenSetThresholdError, match="energy"):
        CropClassifier(head, 0.5, open_set_thresholds={"energy": -3.0})


def test_a_station_threshold_that_is_not_a_number_is_refused():
    """NaN compares false both ways: taken as a threshold no score would ever be beyond it, and
    every cell, a blast too, would be typed."""
    head = _Head({"neutrophil": 8.0}, ood=300.0, threshold=430.0, energy_threshold=-2.0)
    for bad in ({"mahalanobis": float("nan")}, {"energy": float("nan")}):
        with pytest.raises(OpenSetThresholdError, match="looser"):
            CropClassifier(head, 0.5, open_set_thresholds=bad)


# -- the config and start-up ------------------------------------------------------------------

def _config(tmp_path: Path, section: str):
    text = f"""
station_id = "bench-1"
[source]
kind = "simulated"
[analysis]
models_dir = "{DEFAULT_MODELS_DIR}"
{section}
[mqtt.outbox]
path = "{tmp_path / 'outbox.sqlite'}"
"""
    return parse_config(tomllib.loads(text), environ={})


def _wbc_sha() -> str:
    return load_manifest(DEFAULT_MODELS_DIR / "wbc_head.json").sha256


def test_start_up_applies_the_station_thresholds_and_reports_them(tmp_path):
    model = load_manifest(DEFAULT_MODELS_DIR / "wbc_head.json")
    tighter = {t.method: round(t.threshold * 0.5 if t.threshold > 0 else t.threshold - 1.0, 3) for t in model.open_set}
    thresholds = ", ".join(f"{m} = {v}" for m, v in tighter.items())
    cfg = _config(tmp_path, f'[analysis.wbc_open_set]\nthresholds = {{ {thresholds} }}\nmodel_sha256 = "{_wbc_sha()}"')
    analyzer = build_analyzer(cfg)
    try:
        assert analyzer.wbc_head.thresholds.tolist() == list(tighter.values())
        report = analyzer.analyze(render_field(3, width=320, height=240).frame).report
        assert report.models["wbc_head"].open_set_thresholds == tighter
    finally:
        analyzer.close()


def test_start_up_refuses_thresholds_of_another_head_or_looser_ones(tmp_path):
    model = load_manifest(DEFAULT_MODELS_DIR / "wbc_head.json")
    md = next(t.threshold for t in model.open_set if t.method == "mahalanobis")
    other = _config(tmp_path, f'[analysis.wbc_open_set]\nthresholds = {{ mahalanobis = {md / 2} }}\n'
                              f'model_sha256 = "{"0" * 64}"')
    with pytest.raises(StartupError) as exc:
        build_analyzer(other)
    assert exc.value.field == "analysis.wbc_open_set" and "calibrate-atypical" in exc.value.reason
    looser = _config(tmp_path, f'[analysis.wbc_open_set]\nthresholds = {{ mahalanobis = {md + 1} }}\n'
                               f'model_sha256 = "{_wbc_sha()}"')
    with pytest.raises(StartupError) as exc:
        build_analyzer(looser)
    assert exc.value.field == "analysis.wbc_open_set" and "looser" in exc.value.reason


def test_the_section_is_strict():
    with pytest.raises(ValueError):
        AnalysisConfig.model_validate({"wbc_open_set": {"thresholds": {"cosine": 1.0}, "model_sha256": _wbc_sha()}})
    with pytest.raises(ValueError):
        AnalysisConfig.model_validate({"wbc_open_set": {"thresholds": {}, "model_sha256": _wbc_sha()}})


# -- the command ------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smearscope", *args], check=False, capture_output=True,
                          text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def normal_fields(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("normal")
    for seed in range(6):
        f = render_field(40 + seed, width=640, height=480, microns_per_pixel=0.1)
        cv2.imwrite(str(folder / f"field{seed}.png"), f.frame.pixels)
    return folder


@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "pbc").is_dir(), reason=f"PBC not found under {DATA} (set SMEARSCOPE_DATA)")
def test_calibrate_atypical_prints_a_section_the_station_starts_with(tmp_path):
    """PBC's normal white cells as a station's normal specimens (one CellaVision lab, 0.165 um/px
    by the analyzer's ruler): 50 crops of each mature type. The model's thresholds were set for
    the worst-matched lab, so this well-matched one gets tighter ones, within its budget (10 %:
    with the model's own thresholds 7.1 % of these cells go to review at this scale, 3.9 % at
    PBC's nominal 0.19, where a 5 % budget leaves nothing to tighten)."""
    listing = tmp_path / "normal.txt"
    paths = [p for cls in ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
             for p in sorted((DATA / "pbc" / cls).glob("*.jpg"))[:50]]
    listing.write_text("\n".join(map(str, paths)) + "\n")
    out = _cli("calibrate-atypical", f"@{listing}", "--microns-per-pixel", "0.165", "--budget", "0.10")
    assert out.returncode == 0, out.stdout + out.stderr
    section = tomllib.loads(out.stdout)["analysis"]["wbc_open_set"]
    assert section["model_sha256"] == _wbc_sha() and "in 250 fields" in section["fitted"]
    model = {t.method: t.threshold for t in load_manifest(DEFAULT_MODELS_DIR / "wbc_head.json").open_set}
    assert set(section["thresholds"]) == set(model)
    assert all(section["thresholds"][m] <= model[m] for m in model)
    assert any(section["thresholds"][m] < 0.9 * model[m] if model[m] > 0 else section["thresholds"][m] < model[m] - 0.5
               for m in model)
    thresholds = ", ".join(f"{m} = {v}" for m, v in section["thresholds"].items())
    cfg = _config(tmp_path, f'[analysis.wbc_open_set]\nthresholds = {{ {thresholds} }}\n'
                            f'model_sha256 = "{section["model_sha256"]}"')
    build_analyzer(cfg).close()


def test_calibrate_atypical_needs_enough_white_cells(normal_fields):
    out = _cli("calibrate-atypical", str(normal_fields), "--microns-per-pixel", "0.1", "--json")
    assert out.returncode == 2
    line = json.loads(out.stdout)
    assert line["error"]["code"] == "too_few_white_cells" and line["white_cells"] < 200


def test_doctor_says_whose_thresholds_and_fails_a_stale_section(tmp_path):
    from smearscope.cli.doctor import open_set_checks

    model = {t.method: t.threshold for t in load_manifest(DEFAULT_MODELS_DIR / "wbc_head.json").open_set}
    (status, _, detail), = open_set_checks(_config(tmp_path, "").analysis)
    assert status == "OK" and "the model's thresholds" in detail
    md = model["mahalanobis"]
    fitted = _config(tmp_path, f'[analysis.wbc_open_set]\nthresholds = {{ mahalanobis = {md / 2} }}\n'
                               f'model_sha256 = "{_wbc_sha()}"\nfitted = "300 white cells"')
    (status, _, detail), = open_set_checks(fitted.analysis)
    assert status == "OK" and "the station's thresholds" in detail and "300 white cells" in detail
    stale = _config(tmp_path, f'[analysis.wbc_open_set]\nthresholds = {{ mahalanobis = {md / 2} }}\n'
                              f'model_sha256 = "{"1" * 64}"')
    (status, _, detail), = open_set_checks(stale.analysis)
    assert status == "FAIL" and "calibrate-atypical" in detail
    looser = _config(tmp_path, f'[analysis.wbc_open_set]\nthresholds = {{ mahalanobis = {md * 2} }}\n'
                               f'model_sha256 = "{_wbc_sha()}"')
    (status, _, detail), = open_set_checks(looser.analysis)
    assert status == "FAIL" and "looser" in detail


def test_calibrate_atypical_refuses_a_budget_outside_a_share_and_no_fields_before_any_work(tmp_path):
    """--budget must lie in (0, 0.5): 0 and 0.5 are refused (bad_budget); a folder without an
    image is no_images, not a fit on no cells."""
    image = tmp_path / "f.png"
    cv2.imwrite(str(image), render_field(1, width=320, height=240).frame.pixels)
    for budget in ("0", "0.5", "0.7", "-0.1"):
        out = _cli("calibrate-atypical", str(image), "--budget", budget, "--models", str(tmp_path / "none"), "--json")
        assert out.returncode == 2 and json.loads(out.stdout)["error"]["code"] == "bad_budget", (budget, out.stdout)
    out = _cli("calibrate-atypical", str(image), "--budget", "0.49", "--models", str(tmp_path / "none"), "--json")
    assert json.loads(out.stdout)["error"]["code"] == "engine_unavailable", out.stdout  # a budget taken
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _cli("calibrate-atypical", str(empty), "--json")
    assert out.returncode == 2 and json.loads(out.stdout)["error"]["code"] == "no_images", out.stdout
