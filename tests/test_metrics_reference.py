"""Box matching and mAP (training.metrics) against pycocotools, on crafted and random cases.

The real case, the BCCD test split through the committed models, is in test_realdata_bccd.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from coco_reference import AP_TOLERANCE, coco_ap, coco_eval, coco_hits

from training.metrics import average_precision, detection_map50, greedy_matches

KINDS = ("rbc", "wbc", "platelet")


def _project_hits(per_image: list[dict], classes: tuple[str, ...]) -> dict[tuple[int, str], list[bool]]:
    out = {}
    for i, item in enumerate(per_image):
        for c in classes:
            pred = [(b, s) for k, b, s in item["pred"] if k == c]
            truth = [b for k, b in item["truth"] if k == c]
            _, hits = greedy_matches(np.array([b for b, _ in pred], float).reshape(-1, 4),
                                     np.array([s for _, s in pred], float), np.array(truth, float).reshape(-1, 4))
            out[(i, c)] = hits.tolist()
    return out


def _assert_agree(per_image: list[dict], classes: tuple[str, ...] = KINDS) -> dict[str, float]:
    ev = coco_eval(per_image, classes)
    assert _project_hits(per_image, classes) == coco_hits(ev, len(per_image), classes)
    ours, ref = detection_map50(per_image, classes), coco_ap(ev, classes)
    for c in (*classes, "mAP50"):
        if np.isnan(ref[c]):
            assert np.isnan(ours[c]), (c, ours, ref)
        else:
            assert ours[c] == pytest.approx(ref[c], abs=AP_TOLERANCE), (c, ours, ref)
    return ours


def test_a_truth_two_detections_overlap_is_matched_once() -> None:
    truth = [("rbc", [0, 0, 10, 10])]
    pred = [("rbc", [0, 0, 10, 10], 0.9), ("rbc", [0, 0, 10, 9], 0.8)]  # both IoU >= 0.5
    _, hits = greedy_matches(np.array([p[1] for p in pred], float), np.array([0.9, 0.8]),
                             np.array([truth[0][1]], float))
    assert hits.tolist() == [True, False]
    # One truth found at precision 1, then a false positive: AP is 1, not more.
    assert _assert_agree([{"pred": pred, "truth": truth}], ("rbc",))["rbc"] == pytest.approx(1.0)


def test_the_second_detection_takes_the_truth_the_first_left() -> None:
    """The best unmatched truth, not the best truth: the higher-scored detection takes the truth
    both overlap most, and the other one may still match a truth it overlaps less."""
    truth = [("wbc", [0, 0, 10, 10]), ("wbc", [4, 0, 14, 10])]
    pred = [("wbc", [1, 0, 11, 10], 0.9), ("wbc", [2, 0, 12, 10], 0.8)]
    assert _assert_agree([{"pred": pred, "truth": truth}], ("wbc",))["wbc"] == pytest.approx(1.0)


def test_precision_envelope() -> None:
    """Ranks FP, TP, TP over 2 truths: precision 0, 1/2, 2/3 at recall 0, 1/2, 1. The envelope
    lifts the first half of recall to 2/3: AP = 2/3, where a sum without it gives 7/12."""
    truth = [("rbc", [0, 0, 10, 10]), ("rbc", [20, 0, 30, 10])]
    pred = [("rbc", [50, 50, 60, 60], 0.9), ("rbc", [0, 0, 10, 10], 0.8), ("rbc", [20, 0, 30, 10], 0.7)]
    assert _assert_agree([{"pred": pred, "truth": truth}], ("rbc",))["rbc"] == pytest.approx(2 / 3)


def test_iou_exactly_at_the_threshold_matches() -> None:
    truth = [("platelet", [0, 0, 10, 10])]
    pred = [("platelet", [0, 0, 10, 5], 0.6)]  # IoU 50 / 100 = 0.5 exactly
    assert _assert_agree([{"pred": pred, "truth": truth}], ("platelet",))["platelet"] == pytest.approx(1.0)


def test_equal_overlaps_and_equal_scores_break_ties_as_coco() -> None:
    """A detection overlapping two truths equally takes the later one; equal scores keep their
    order. Either choice changes which later detection can match."""
    truth = [("rbc", [0, 0, 10, 10]), ("rbc", [10, 0, 20, 10])]
    pred = [("rbc", [5, 0, 15, 10], 0.7),   # IoU 1/3 with both: no match at 0.5
            ("rbc", [0, 0, 20, 10], 0.5),   # IoU 0.5 with both: takes the later truth
            ("rbc", [0, 0, 10, 10], 0.5),   # same score, listed later: ranks after, matches the first
            ("rbc", [10, 0, 20, 10], 0.4)]  # its truth is taken: a false positive
    _assert_agree([{"pred": pred, "truth": truth}], ("rbc",))
    _, hits = greedy_matches(np.array([p[1] for p in pred], float), np.array([p[2] for p in pred]),
                             np.array([t[1] for t in truth], float))
    assert hits.tolist() == [False, True, True, False]


def test_classes_without_truth_or_without_detections() -> None:
    per_image = [{"pred": [("rbc", [0, 0, 10, 10], 0.9), ("platelet", [30, 30, 34, 34], 0.8)],
                  "truth": [("rbc", [0, 0, 10, 10]), ("wbc", [50, 50, 70, 70])]},
                 {"pred": [], "truth": []}]
    m = _assert_agree(per_image)
    assert m["rbc"] == 1.0 and m["wbc"] == 0.0 and np.isnan(m["platelet"])
    assert np.isnan(average_precision([(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4)))]))


@pytest.mark.parametrize("seed", range(12))
def test_random_crowded_fields(seed: int) -> None:
    """Clustered boxes (many overlaps near the threshold), jittered detections, duplicates,
    false positives and rounded scores (ties), over several images and classes."""
    rng = np.random.default_rng(seed)
    per_image = []
    for _ in range(int(rng.integers(1, 6))):
        truth, pred = [], []
        for _ in range(int(rng.integers(0, 25))):
            kind = KINDS[int(rng.integers(0, 3))]
            x, y = rng.integers(0, 60, 2)
            w, h = rng.integers(4, 20, 2)
            box = [float(x), float(y), float(x + w), float(y + h)]
            truth.append((kind, box))
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections per truth
                jitter = rng.normal(0, 0.25 * min(w, h), 4)
                b = sorted([box[0] + jitter[0], box[2] + jitter[2]]) + sorted([box[1] + jitter[1], box[3] + jitter[3]])
                pred.append((kind, [b[0], b[2], b[1], b[3]], round(float(rng.uniform(0.05, 1.0)), 1)))
        for _ in range(int(rng.integers(0, 6))):  # false positives anywhere
            x, y = rng.uniform(0, 70, 2)
            pred.append((KINDS[int(rng.integers(0, 3))], [x, y, x + 8, y + 8], round(float(rng.uniform(0, 1)), 1)))
        per_image.append({"pred": [p for p in pred if p[1][2] > p[1][0] and p[1][3] > p[1][1]], "truth": truth})
    _assert_agree(per_image)
