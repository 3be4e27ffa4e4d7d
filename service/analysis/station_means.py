"""A station's own white-cell class means: the WBC head adapted to a new lab by cells its technician typed.

A head types the labs it was trained on well and a new lab's cells much worse (another
microscope, camera, lamp and stain move every cell's features). Measured with heads trained
without a lab (models/README.md, "a new station's own cells, a few typed by its technician"),
ten typed cells per class at that lab, used as the class means of the head's own penultimate
features under its shared precision matrix (nearest class mean, Mensink et al. 2013; the head's
Mahalanobis space, Lee et al. 2018), lift the lab's typing from 0.46 to 0.74 (Raspberry Pi
station) and 0.36 to 0.63 (PBC), where retraining is out of a station's reach.

`smearscope adapt-wbc` fits this file from fields and the technician's typed points;
`wbc_station_means` in the station config's `[analysis]` makes the analyzer use it. What it holds and how
it is used:

- per typed class with at least `min_cells` cells, the mean of those cells' features (the head's
  views averaged, as the analyzer runs them); every other class keeps the head's trained mean;
- a temperature fitted by leave-one-out on the typed cells of classes with a station mean (each
  cell against means that left it out), so the confidence gate (`wbc_min_confidence`) means what
  it means for the head (never certainty where every typed cell is nearest its own mean);
- the cells' leave-one-out accuracy under station means and the head's accuracy on the same
  cells (every typed cell, those of classes that kept the head's mean too): the command refuses
  to write a file that types the station's own cells worse than the head does (with 3 cells per class that check is noise; from 10 it picked station means in
  every draw on all three labs);
- the sha256 of the head and of its feature-space sidecar: a station file fitted for another head
  is refused at start, never silently applied.

At analysis a white cell's class is its nearest mean (softmax of -distance / 2T over the classes),
and the head's Mahalanobis open-set test reads the distance to the nearest of these means (a
station's cells now sit near its own means; a blast still sits far from all of them), each view's
distance averaged as the graph's own test averages them, so the model's threshold keeps its
meaning; the fit measures its typed cells the same way (the distance of the averaged features
would be smaller for a crop that ran in two views, about 12 % on rendered crops). The energy
test keeps reading the head's own logits. Each test's threshold is the model's, or the station's
typed cells' STATION_QUANTILE quantile (for the distance, each cell left out of its own mean)
where that is higher: the model's were set on the labs it was trained on, and a head unsure of a
whole new lab, with class means from ten cells each, would otherwise send the station's normal
cells to review by the dozen. A station's `[analysis.wbc_open_set]` may still tighten either
test (fit it with the means in place: `smearscope calibrate-atypical` records which means).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smearscope.engines.manifest import ModelManifest, sha256_file

SCHEMA = "smearscope.wbc_station_means/1"
#: A class needs this many typed cells for a station mean (fewer: the head's trained mean stays).
MIN_CELLS = 10
#: The open-set tests at a station with its own means: this quantile of its typed cells' scores
#: (distance to the nearest station mean, each cell left out of its own; the head's energy), where
#: above the model's threshold. The model's are the largest per-lab quantile over its validation
#: labs (0.95 of the distances, 0.99 of the energies, over hundreds of cells a lab); a station
#: types tens, whose 0.99 quantile is their largest: 0.95 for both, so that two or three odd
#: typed cells in fifty cannot set it.
STATION_QUANTILE = 0.95
#: Leave-one-out temperatures searched (distances are squared Mahalanobis, hundreds apart).
TEMPERATURES = np.geomspace(0.5, 2000.0, 161)


class StationMeansError(ValueError):
    """A station means file that cannot be used with this head (wrong head, bad content)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FeatureSpace:
    """The head's trained class means (classes x dim) and shared precision (dim x dim)."""

    classes: tuple[str, ...]
    means: np.ndarray
    precision: np.ndarray
    sha256: str

    def distances(self, feats: np.ndarray, means: np.ndarray | None = None) -> np.ndarray:
        """Squared Mahalanobis distances (N x classes) of features (N x dim) to `means` (the trained ones by default)."""
        m = self.means if means is None else means
        pf = feats @ self.precision
        return ((pf * feats).sum(1, keepdims=True) - 2.0 * pf @ m.T
                + np.einsum("kd,de,ke->k", m, self.precision, m)[None])


def load_feature_space(manifest: ModelManifest, models_dir: Path) -> FeatureSpace:
    """The sidecar the manifest names, checked against its sha256 and the head's classes."""
    fs = manifest.feature_space
    if fs is None:
        raise StationMeansError("no_feature_space", f"{manifest.name} has no feature_space (features output and "
                                "sidecar; python -m smearscope.export.feature_space)")
    path = Path(models_dir) / fs.file
    try:
        if sha256_file(path) != fs.sha256:
            raise StationMeansError("feature_space_mismatch", f"{path}: sha256 differs from {manifest.name}'s manifest")
        with np.load(path, allow_pickle=False) as z:
            means, precision, classes = z["means"].astype(np.float64), z["precision"].astype(np.float64), z["classes"]
    except OSError as exc:
        raise StationMeansError("feature_space_unreadable", f"{path}: {exc}") from exc
    if [str(c) for c in classes] != list(manifest.classes) or means.shape != (len(manifest.classes), fs.dim) \
            or precision.shape != (fs.dim, fs.dim):
        raise StationMeansError("feature_space_mismatch", f"{path}: classes or shapes do not fit {manifest.name}")
    return FeatureSpace(tuple(manifest.classes), means, precision, fs.sha256)


@dataclass(frozen=True)
class StationMeans:
    """Class means in the head's feature space: the station's where it typed enough cells, else the head's."""

    model_sha256: str
    feature_sha256: str
    means: np.ndarray  # classes x dim
    temperature: float
    #: typed cells per class (only classes with a station mean)
    cells: dict[str, int] = field(default_factory=dict)
    loo_accuracy: float = float("nan")
    head_accuracy: float = float("nan")
    fitted: str = ""
    #: Per open-set test, its threshold at this station: the model's, or the typed cells'
    #: STATION_QUANTILE quantile where higher; a test not named keeps the model's.
    thresholds: dict[str, float] = field(default_factory=dict)
    #: sha256 of the file it was read from ("" when fitted in memory): what thresholds fitted with
    #: these means (`[analysis.wbc_open_set]`) are tied to.
    file_sha256: str = ""
    #: The head's test-time views the features were averaged over (empty: not recorded); the
    #: analyzer refuses the means when it runs the head in others.
    views: tuple[str, ...] = ()
    #: The calibrated scale (um/px) the typed cells were analysed at (None: estimated, or not
    #: recorded): features move with the resample to the canonical scale.
    microns_per_pixel: float | None = None

    def logits(self, space: FeatureSpace, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(-distance / 2T per class, distance to the nearest mean) for features (N x dim)."""
        d = space.distances(np.asarray(feats, np.float64), self.means)
        return -d / (2.0 * self.temperature), d.min(1)

    def to_json(self, classes: Sequence[str]) -> dict:
        return {"schema": SCHEMA, "model_sha256": self.model_sha256, "feature_sha256": self.feature_sha256,
                "temperature": self.temperature, "fitted": self.fitted, "open_set_thresholds": self.thresholds,
                "views": list(self.views), "microns_per_pixel": self.microns_per_pixel,
                "leave_one_out": {"station_means": self.loo_accuracy, "head": self.head_accuracy},
                "classes": {c: {"cells": self.cells[c], "mean": [round(float(v), 6) for v in self.means[k]]}
                            for k, c in enumerate(classes) if c in self.cells}}


def check_means_views(means: StationMeans, views: Sequence[str]) -> None:
    """StationMeansError when the means were averaged over other views of the head than the ones it
    runs in (`views`): the features, and so the distances, differ."""
    if means.views and tuple(means.views) != tuple(views):
        raise StationMeansError("station_means_stale", f"the station means were fitted with the WBC head in views "
                                f"{'+'.join(means.views)}, the analyzer runs it in {'+'.join(views)}: run smearscope "
                                "adapt-wbc again, or set wbc_head_views back")


def same_scale(analysed: float | None, station: float | None) -> bool:
    """Whether a cell analysed at `analysed` um/px (None: an estimated scale) fits a station at
    `station` (None: it estimates its scale, any fits): within 1 % of the station's."""
    return station is None or (analysed is not None and abs(analysed - station) <= 0.01 * station)


def means_scale_problem(means: StationMeans, microns_per_pixel: float | None) -> str | None:
    """Why means fitted on cells analysed at a calibrated scale do not fit a station at another
    (by `same_scale`, the rule a fit leaves typed cells out by, or now estimated); None when they
    fit or the file does not say."""
    fitted = means.microns_per_pixel
    if fitted is None or (microns_per_pixel is not None and same_scale(fitted, microns_per_pixel)):
        return None
    now = "estimates its scale" if microns_per_pixel is None else f"runs at {microns_per_pixel:g} um/px"
    return (f"the station means were fitted on cells analysed at {fitted:g} um/px, the station {now} (recalibrated "
            "since?): their features differ; type cells at this scale and run smearscope adapt-wbc again")


def load_station_means(path: Path, manifest: ModelManifest, space: FeatureSpace) -> StationMeans:
    """A station means file for this head: its sha256s must match, its classes be the head's."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise StationMeansError("station_means_unreadable", f"{path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise StationMeansError("station_means_invalid", f"{path}: not a {SCHEMA} file")
    if doc.get("model_sha256") != manifest.sha256 or doc.get("feature_sha256") != space.sha256:
        raise StationMeansError(
            "station_means_stale", f"{path} was fitted for the WBC head {str(doc.get('model_sha256'))[:12]}, the models "
            f"hold {manifest.sha256[:12]}: run smearscope adapt-wbc again on the station's typed cells")
    means = space.means.copy()
    cells: dict[str, int] = {}

    def number(v, what: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise StationMeansError("station_means_invalid", f"{path}: {what} must be a finite number, not {v!r}")
        return float(v)

    try:
        temperature = number(doc.get("temperature"), "temperature")
        classes = doc.get("classes")
        if not isinstance(classes, dict):
            raise StationMeansError("station_means_invalid", f"{path}: classes must be an object of class: entry")
        for name, entry in classes.items():
            if name not in space.classes:
                raise StationMeansError("station_means_invalid", f"{path}: class {name!r} is not the head's")
            if not isinstance(entry, dict) or not isinstance(entry.get("mean"), list):
                raise StationMeansError("station_means_invalid", f"{path}: {name} needs cells and a mean list")
            mean = np.asarray([number(v, f"{name}'s mean") for v in entry["mean"]], np.float64)
            if mean.shape != (means.shape[1],):
                raise StationMeansError("station_means_invalid", f"{path}: {name}'s mean is not {means.shape[1]} numbers")
            n = entry.get("cells")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise StationMeansError("station_means_invalid", f"{path}: {name}'s cells must be a positive count")
            means[space.classes.index(name)] = mean
            cells[name] = n
        loo = doc.get("leave_one_out")
        if not isinstance(loo, dict):
            raise StationMeansError("station_means_invalid", f"{path}: leave_one_out must be an object")
        loo_acc, head_acc = number(loo.get("station_means"), "leave_one_out.station_means"), number(
            loo.get("head"), "leave_one_out.head")
    except (TypeError, ValueError) as exc:
        if isinstance(exc, StationMeansError):
            raise
        raise StationMeansError("station_means_invalid", f"{path}: {exc}") from exc
    if temperature <= 0 or not cells:
        raise StationMeansError("station_means_invalid", f"{path}: needs a positive temperature and at least one class")
    model = {t.method: t.threshold for t in manifest.open_set}
    thresholds = doc.get("open_set_thresholds") or {}
    if not isinstance(thresholds, dict) or any(
            m not in model or isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)
            or v < model[m] for m, v in thresholds.items()):
        raise StationMeansError("station_means_invalid", f"{path}: open_set_thresholds {thresholds!r} must name the "
                                f"head's tests ({', '.join(model) or 'none'}) with numbers at or above the model's")
    views = doc.get("views")
    if views is None:
        raise StationMeansError("station_means_stale", f"{path} does not say which views of the WBC head it was "
                                "fitted in: run smearscope adapt-wbc again")
    if not isinstance(views, list) or not views or not all(isinstance(v, str) for v in views):
        raise StationMeansError("station_means_invalid", f"{path}: views must be a list of view names")
    scale = doc.get("microns_per_pixel")
    if scale is not None and (number(scale, "microns_per_pixel") <= 0):
        raise StationMeansError("station_means_invalid", f"{path}: microns_per_pixel must be positive")
    return StationMeans(manifest.sha256, space.sha256, means, temperature, cells, loo_acc, head_acc,
                        str(doc.get("fitted", "")), {m: float(v) for m, v in thresholds.items()}, sha256_file(Path(path)),
                        tuple(views), None if scale is None else float(scale))


@dataclass(frozen=True)
class StationFit:
    means: StationMeans | None
    #: why no means were fitted: too_few_cells (no class reached min_cells) or head_better
    reason: str | None
    loo_accuracy: float
    head_accuracy: float
    cells: dict[str, int]
    #: per open-set test, the typed cells' STATION_QUANTILE quantile (what widened its threshold, where above)
    quantiles: dict[str, float] = field(default_factory=dict)


def _softmax_nll(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))


def _own_confidence(d: np.ndarray, labels: np.ndarray, t: float) -> float:
    """Mean softmax(-d / 2t) probability of each cell's own class."""
    z = -d / (2.0 * t)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return float(np.mean(p[np.arange(len(labels)), labels] / p.sum(1)))


def _fit_temperature(d: np.ndarray, labels: np.ndarray) -> float:
    """The temperature of the typed cells' leave-one-out distances `d` (cells x classes): the one
    with the best likelihood of their types. When every cell is nearest its own class' mean (one
    class typed, or classes apart), the likelihood only rises as the temperature falls, and the
    smallest searched would make every cell certain: then it is the smallest at which the cells'
    mean probability of their own type is at most (n + 1) / (n + 2), the rule of succession's
    estimate of how often means that typed n of n cells right are right."""
    temperature = float(min(TEMPERATURES, key=lambda t: _softmax_nll(-d / (2.0 * t), labels)))
    if (d.argmin(1) == labels).all():
        target = (len(labels) + 1) / (len(labels) + 2)
        temperature = max(temperature, float(next((t for t in TEMPERATURES if _own_confidence(d, labels, t) <= target),
                                                  TEMPERATURES[-1])))
    return temperature


def _without(means: np.ndarray, counts: np.ndarray, c: int, f: np.ndarray) -> np.ndarray:
    """Class `c`'s mean of `counts[c]` cells with the cell `f` left out (unchanged for a class
    with a single cell or none: the head's mean)."""
    return (means[c] * counts[c] - f) / (counts[c] - 1) if counts[c] > 1 else means[c]


def leave_one_out_distances(space: FeatureSpace, feats: np.ndarray, labels: np.ndarray, means: np.ndarray,
                            counts: np.ndarray) -> np.ndarray:
    """Each typed cell's distances to every class mean, its own class' mean taken without it."""
    d = space.distances(feats, means)
    for i, (f, c) in enumerate(zip(feats, labels)):
        if counts[c] > 1:
            d[i, c] = space.distances(f[None], _without(means, counts, c, f)[None])[0, 0]
    return d


def loo_view_distances(space: FeatureSpace, feats: np.ndarray, idx: np.ndarray, means: np.ndarray,
                       counts: np.ndarray, view_feats: Sequence[np.ndarray]) -> np.ndarray:
    """Each typed cell's distance test score as the analyzer takes it, each view's distance to the
    nearest mean averaged over its views, its own class' mean without it."""
    out = np.empty(len(feats))
    for i, (f, c) in enumerate(zip(feats, idx)):
        m = means.copy()
        m[c] = _without(means, counts, c, f)
        out[i] = space.distances(np.asarray(view_feats[i], np.float64), m).min(1).mean()
    return out


def fit_station_means(space: FeatureSpace, feats: np.ndarray, labels: Sequence[str], head_labels: Sequence[str],
                      model_sha256: str, min_cells: int = MIN_CELLS, fitted: str = "",
                      model_thresholds: dict[str, float] | None = None, energies: np.ndarray | None = None,
                      views: Sequence[str] = (), view_feats: Sequence[np.ndarray] | None = None) -> StationFit:
    """Station means from typed cells' features (N x dim) and types; `head_labels` what the head
    typed each as (its closed-set argmax), for the leave-one-out comparison; `model_thresholds`
    the head's open-set tests (method: threshold) to widen to the station's cells, with
    `energies` the cells' energy scores when the head has that test, and `view_feats` each cell's
    features in every view it ran in (views x dim): the distance test's score is each view's
    distance averaged, as at analysis (without them, the averaged features' distance: lower)."""
    if min_cells < 2:
        raise ValueError(f"min_cells must be at least 2 (a class' only cell cannot be left out of it), got {min_cells}")
    feats = np.asarray(feats, np.float64)
    idx = np.array([space.classes.index(c) for c in labels], int)
    all_counts = {c: int((idx == k).sum()) for k, c in enumerate(space.classes) if (idx == k).any()}
    typed = [k for k, c in enumerate(space.classes) if all_counts.get(c, 0) >= min_cells]
    if not typed:
        return StationFit(None, "too_few_cells", float("nan"), float("nan"), all_counts)
    # Every typed cell is scored, those of classes left with the head's mean too: station means
    # for some classes must not pull the others' cells away unseen.
    head = np.array([h == space.classes[k] for h, k in zip(head_labels, idx)])
    means = space.means.copy()
    counts = np.zeros(len(space.classes), int)
    for k in typed:
        means[k] = feats[idx == k].mean(0)
        counts[k] = int((idx == k).sum())
    d = leave_one_out_distances(space, feats, idx, means, counts)
    loo = float((d.argmin(1) == idx).mean())
    head_acc = float(head.mean())
    cells = {space.classes[k]: int(counts[k]) for k in typed}
    if loo < head_acc:
        return StationFit(None, "head_better", loo, head_acc, cells)
    # The temperature is fitted on the cells of classes with a station mean: a class that kept
    # the head's mean may have none worth the name (a class the head never saw trained), and its
    # few cells, far from it, would flatten every probability.
    own = np.isin(idx, typed)
    temperature = _fit_temperature(d[own], idx[own])
    station_scores = {"mahalanobis": d.min(1) if view_feats is None
                      else loo_view_distances(space, feats, idx, means, counts, view_feats)}
    if energies is not None:
        station_scores["energy"] = np.asarray(energies, np.float64)
    quantiles = {m: float(np.quantile(station_scores[m], STATION_QUANTILE))
                 for m in (model_thresholds or {}) if m in station_scores}
    thresholds = {m: max(v, quantiles[m]) for m, v in (model_thresholds or {}).items() if m in quantiles}
    return StationFit(StationMeans(model_sha256, space.sha256, means, temperature, cells, loo, head_acc, fitted,
                                   thresholds, views=tuple(views)), None, loo, head_acc, cells, quantiles)
