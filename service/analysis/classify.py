"""Stage 8: classify crops with a head engine, in batches, with calibrated confidence.

Each crop runs in the head's first test-time view (manifest `tta`, service.analysis.tta); the crops
the head is unsure of there (top probability below `EXTRA_VIEWS_BELOW`) run in its other views too
and their views' logits are averaged: the views pay where the answer can change (with the heads
of 2026-11-27, about 15 % of red and 5 % of white cells ran in the other views, and each head kept
its every-view macro-F1). Softmax uses the manifest's calibration temperature, after its
`class_log_prior_shift` (the RBC head: schistocyte -2.0 and normal +1.5 at the temperature they
were chosen at, the same logit shifts kept at its refitted one: -1.85 and +1.39, so a normal-looking
lab's small red cells are not called schistocytes by the balanced training mix's prior, nor its
normal ones spherocytes, stomatocytes or microcytes); a cell whose top probability is below the head's threshold becomes UNIDENTIFIED (sent for human
review), never a guessed class. A head whose manifest has `open_set` tests also sends a crop
beyond any test's calibrated threshold to UNIDENTIFIED, marked atypical: a blast or a smudge
cell can be confidently "some class" to a softmax. A test reads either a graph output (the WBC
head's Mahalanobis distance of the crop's features to the nearest trained class: far from
everything it was trained on, such as another lab's cells) or the free energy of the logits
(`energy`, -logsumexp: no class claims the crop strongly, as for a cell type it never saw).

A station may tighten a test's threshold (`open_set_thresholds`: fitted on its own normal
specimens by `smearscope calibrate-atypical`), never loosen it: the manifest's threshold is the
one validated across every training lab, and a threshold above it would let through cells the
model itself calls unlike anything it knows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from smearscope.engines.base import Engine
from smearscope.engines.batching import run_batched
from smearscope.engines.manifest import ManifestError, OpenSet
from smearscope.engines.preprocess import to_model_input
from smearscope.service.analysis.crops import CropSpec
from smearscope.service.analysis.records import CellCrop, HeadFeatures
from smearscope.service.analysis.station_means import FeatureSpace, StationMeans, check_means_views
from smearscope.service.analysis.tta import check_views, view_crops

logger = logging.getLogger(__name__)

UNIDENTIFIED = "unidentified"
#: Crops classified per engine run (times the views): bounds memory on crowded fields.
CHUNK_CROPS = 512
#: A crop whose first-view top probability is below this also runs in the head's other views.
EXTRA_VIEWS_BELOW = 0.9


def energy(logits: np.ndarray) -> np.ndarray:
    """Free energy of (N, K) logits, -logsumexp per row (Liu et al. 2020): high where no class
    has a large logit, as for a cell unlike every trained class."""
    m = logits.max(axis=1)
    return -(m + np.log(np.exp(logits - m[:, None]).sum(axis=1)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, shifted by each row's maximum for stability."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class HeadResult:
    label: str
    score: float
    #: Calibrated probabilities over the head's classes (the manifest's order).
    probs: tuple[float, ...] = ()
    #: A test's score is beyond its calibrated threshold: unlike every trained class.
    atypical: bool = False
    #: Every open-set test's score, in the manifest's order (what a station calibrates on).
    open_set_scores: tuple[float, ...] = ()
    #: Features and the head's own class, when the classifier keeps them (`keep_features`).
    head_features: HeadFeatures | None = None

    @property
    def ood(self) -> float | None:
        """The first open-set test's score (manifest `open_set`: energy or distance), None when the head has none."""
        return self.open_set_scores[0] if self.open_set_scores else None


class OpenSetThresholdError(ValueError):
    """A station's open-set thresholds do not fit the head: an unknown test, or looser than the model's."""


#: The calibration a test widened by station means is said to have.
WITH_STATION_MEANS = "with the station's typed cells (adapt-wbc)"


def with_station_means(tests: Sequence[OpenSet], means_thresholds: Mapping[str, float]) -> list[OpenSet]:
    """The head's open-set tests where station means are in place: each widened to the threshold the
    means file carries (never tighter than the model's: the station joins the model's calibration
    labs). What a station's own `[analysis.wbc_open_set]` may then only tighten."""
    return [t.model_copy(update={"threshold": max(t.threshold, means_thresholds[t.method]),
                                 "calibration": WITH_STATION_MEANS})
            if t.method in means_thresholds else t for t in tests]


def station_thresholds(name: str, tests: Sequence[OpenSet], station: Mapping[str, float]) -> np.ndarray:
    """Each test's threshold: the manifest's, or the station's (by method) where it is at or below
    it. OpenSetThresholdError for a method the head has no test for, or a looser threshold."""
    methods = [t.method for t in tests]
    unknown = sorted(set(station) - set(methods))
    if unknown:
        raise OpenSetThresholdError(f"{name}: station open-set thresholds for {', '.join(unknown)}, but the head's "
                                    f"tests are {', '.join(methods) or 'none'}")
    out = []
    for t in tests:
        v = station.get(t.method, t.threshold)
        if not np.isfinite(v) or v > t.threshold:
            raise OpenSetThresholdError(
                f"{name}: station threshold {t.method} = {v:g} is looser than the model's {t.threshold:g}"
                f"{' (with the station means)' if t.calibration == WITH_STATION_MEANS else ''}; "
                "a station may only tighten it (smearscope calibrate-atypical)")
        out.append(v)
    return np.array(out, np.float64)


class CropClassifier:
    def __init__(self, engine: Engine, min_confidence: float, views: Sequence[str] | None = None,
                 use_open_set: bool = True, extra_views_below: float | None = EXTRA_VIEWS_BELOW,
                 open_set_thresholds: Mapping[str, float] | None = None,
                 station: tuple[FeatureSpace, StationMeans] | None = None, keep_features: bool = False) -> None:
        self.engine = engine
        m = engine.manifest
        if m.task != "classification" or m.crop is None:  # a classification manifest has its crop
            raise ManifestError(f"{m.name}: a {m.task} model where a crop classifier belongs")
        self.logits_output = m.logits_output
        self.crop_spec = CropSpec(extent_um=m.crop.extent_um, input_size=m.crop.input_size)
        self.classes = list(m.classes)
        self.temperature = m.temperature
        #: Added to the raw logits: the manifest's prior shift in calibrated units, times the temperature.
        self.logit_shift = np.array([m.class_log_prior_shift.get(c, 0.0) for c in self.classes], np.float32) * m.temperature
        self.min_confidence = min_confidence
        #: Open-set tests (energy of the logits, or a graph output) and their thresholds: a crop
        #: beyond any of them is atypical. Station means carry the station's thresholds.
        self.open_sets = list(m.open_set) if use_open_set else []
        if station is not None:
            self.open_sets = with_station_means(self.open_sets, station[1].thresholds)
        #: Each test's threshold: the manifest's, or the station's tighter one (`open_set_thresholds`,
        #: by method).
        self.thresholds = station_thresholds(m.name, self.open_sets, open_set_thresholds or {})
        #: Graph outputs holding open-set scores, in the order of their tests.
        self.score_outputs = [t.output for t in self.open_sets if t.output is not None]
        for name in self.score_outputs:
            if name not in engine.output_names:
                raise ManifestError(f"{m.name}: open_set output {name!r} is not among {engine.output_names}")
        #: A station's own class means (service.analysis.station_means) in the head's feature space:
        #: crops are typed by the nearest of them, and the Mahalanobis test reads the distance to it.
        self.station = station
        if station is not None and station[1].model_sha256 != m.sha256:
            raise ValueError(f"{m.name}: station means were fitted for another head")
        if station is not None:
            check_means_views(station[1], check_views(m.tta if views is None else views))
        #: Each crop's features and closed-set class go into its result (smearscope adapt-wbc).
        self.keep_features = keep_features
        #: Graph output holding the penultimate features, read only when something uses them.
        self.features_output = None
        if station is not None or keep_features:
            if m.feature_space is None or m.feature_space.output not in engine.output_names:
                raise ValueError(f"{m.name}: no features output (manifest feature_space): station means need one")
            self.features_output = m.feature_space.output
        #: Test-time views of each crop; the temperature was fitted for the manifest's (m.tta).
        self.views = check_views(m.tta if views is None else views)
        #: Views after the first run only on crops whose first-view top probability is below this
        #: (None: every crop in every view).
        self.extra_views_below = extra_views_below
        if self.views != tuple(m.tta):
            logger.warning("%s runs in views %s but its temperature was fitted for %s: confidences are "
                           "off their calibration", m.name, "+".join(self.views), "+".join(m.tta))

    def outputs(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, classes) of N crops (N, S, S, 3 uint8 BGR) and the open-set scores (N,
        tests) when the head has any: a graph output averaged over the views the crop ran in
        (all of them, or only the first where the head is sure of it there:
        `extra_views_below`), or the energy of the view-averaged logits. The logits carry the
        manifest's prior shift (`logit_shift`); the energy is taken before it. With station
        means the Mahalanobis test's score is each view's distance to the nearest station mean,
        averaged over the views (as the graph's own distance is).

        Crops go to the engine in chunks of CHUNK_CROPS, so memory stays bounded however many
        cells a field holds; each pass sends all its views to the engine in one batched run."""
        logits, scores, _ = self.forward(pixels)
        return logits, scores

    def forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`outputs`, and the view-averaged features (N, dim) when the classifier reads them."""
        logits, scores, feats, _ = self._forward(pixels)
        return logits, scores, feats

    def _forward(self, pixels: np.ndarray):
        """`forward`, and with `keep_features` each crop's features per view it ran in."""
        n = len(pixels)
        if n == 0:
            dim = self.engine.manifest.feature_space.dim if self.features_output else 0
            return (np.zeros((0, len(self.classes)), np.float32),
                    np.zeros((0, len(self.open_sets)), np.float32) if self.open_sets else None,
                    np.zeros((0, dim), np.float32) if self.features_output else None, [])
        parts = [self._chunk_outputs(pixels[i : i + CHUNK_CROPS]) for i in range(0, n, CHUNK_CROPS)]
        per_view = [f for p in parts for f in p[2]] if self.keep_features else None
        logits = np.concatenate([p[0] for p in parts])
        graph = np.concatenate([p[1] for p in parts]) if parts[0][1] is not None else None
        k = len(self.score_outputs) + (self.station is not None)
        feats = graph[:, k:] if self.features_output else None
        if not self.open_sets:
            return logits, None, feats, per_view
        cols = dict(zip(self.score_outputs, graph[:, : len(self.score_outputs)].T)) if self.score_outputs else {}
        if self.station is not None:
            # each view's distance to the nearest station mean, averaged as the graph's own is
            cols = {t.output: graph[:, k - 1] for t in self.open_sets if t.method == "mahalanobis"}
        scores = [energy(logits - self.logit_shift) if t.method == "energy" else cols[t.output] for t in self.open_sets]
        return logits, np.stack(scores, axis=1), feats, per_view

    def _shifted(self, logits: np.ndarray) -> np.ndarray:
        return logits + self.logit_shift if self.logit_shift.any() else logits

    def _chunk_outputs(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray] | None]:
        """View-averaged logits and graph columns, and with `keep_features` each crop's features in
        every view it ran in (views x dim)."""
        first, rest = self.views[:1], self.views[1:]
        if not rest or self.extra_views_below is None:
            logits, graph = self.views_out(pixels, self.views)
            per_view = self._per_view(graph, range(len(pixels)))
            return logits.mean(0), None if graph is None else graph.mean(0), per_view
        logits, graph = self.views_out(pixels, first)
        per_view = self._per_view(graph, range(len(pixels)))
        logits, dist = logits[0], None if graph is None else graph[0]
        unsure = np.flatnonzero(softmax(logits / self.temperature).max(1) < self.extra_views_below)
        if unsure.size:
            more, more_dist = self.views_out(pixels[unsure], rest)
            logits[unsure] = np.concatenate([logits[unsure][None], more]).mean(0)
            if dist is not None and more_dist is not None:
                dist[unsure] = np.concatenate([dist[unsure][None], more_dist]).mean(0)
            if per_view is not None:
                for j, i in enumerate(unsure.tolist()):
                    per_view[i] = np.concatenate([per_view[i], more_dist[:, j, -per_view[i].shape[1]:]])
        return logits, dist, per_view

    def _per_view(self, graph: np.ndarray | None, crops) -> list[np.ndarray] | None:
        """Each crop's features per view (views x dim) from per-view graph columns, when kept."""
        if not self.keep_features or graph is None:
            return None
        dim = self.engine.manifest.feature_space.dim
        return [graph[:, i, -dim:].copy() for i in crops]

    def views_out(self, pixels: np.ndarray, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Per view, logits (V, N, classes) with `logit_shift` added, and the graph's open-set scores,
        then with station means the distance to the nearest, then features when read (V, N,
        outputs [+ 1] + dim), or None."""
        n = len(pixels)
        stacked = pixels if tuple(views) == ("identity",) else np.concatenate([view_crops(pixels, v) for v in views])
        out = run_batched(self.engine, to_model_input(stacked, self.engine.manifest.preprocessing))
        logits = self._shifted(out[self.logits_output])
        logits = logits.reshape(len(views), n, logits.shape[-1])
        cols = [out[name].reshape(len(views), n, 1) for name in self.score_outputs]
        if self.features_output:
            feats = out[self.features_output].reshape(len(views), n, -1)
            if self.station is not None:
                space, means = self.station
                nearest = means.logits(space, feats.reshape(len(views) * n, -1))[1]
                cols.append(nearest.reshape(len(views), n, 1))
            cols.append(feats)
        return logits, np.concatenate(cols, axis=-1) if cols else None

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        return self.outputs(pixels)[0]

    def classify(self, crops: Sequence[CellCrop]) -> list[HeadResult]:
        """Calibrated class per crop; UNIDENTIFIED below the confidence threshold or, for a head
        with an open-set score, beyond its threshold (then also `atypical`)."""
        if not crops:
            return []
        logits, scores, feats, per_view = self._forward(np.stack([c.pixels for c in crops]))
        head_probs = softmax(logits / self.temperature)
        if self.station is not None:
            space, means = self.station
            probs = softmax(means.logits(space, feats)[0])
        else:
            probs = head_probs
        idx = probs.argmax(1)
        kept = ([HeadFeatures(tuple(f), self.classes[h], tuple(map(tuple, v.tolist())))
                 for f, h, v in zip(feats.tolist(), head_probs.argmax(1).tolist(), per_view)]
                if self.keep_features else None)
        beyond = None if scores is None else (scores > self.thresholds).any(axis=1).tolist()
        score_rows = [] if scores is None else scores.tolist()
        rows = probs.tolist()  # Python floats, as float(v) of each would give
        out = []
        for i, k in enumerate(idx.tolist()):
            p = rows[i][k]
            atypical = beyond is not None and beyond[i]
            label = self.classes[k] if p >= self.min_confidence and not atypical else UNIDENTIFIED
            out.append(HeadResult(label, p, tuple(rows[i]), atypical, tuple(score_rows[i]) if score_rows else (),
                                  kept[i] if kept else None))
        return out
