"""Classification and detection metrics for training and evaluation (numpy only).

The runtime never imports this module: what the analyzer itself needs (softmax, box overlap)
lives in service/analysis and is imported from there.
"""

from __future__ import annotations

import itertools

import numpy as np

from smearscope.service.analysis.boxes import box_iou
from smearscope.service.analysis.classify import softmax

__all__ = ["average_precision", "box_iou", "classification_report", "detection_confusion", "detection_map50",
           "expected_calibration_error", "fit_temperature", "greedy_matches", "softmax"]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising validation NLL (1-D golden-section search on log T)."""
    def nll(log_t: float) -> float:
        p = softmax(logits / np.exp(log_t))
        return float(-np.log(p[np.arange(len(labels)), labels] + 1e-12).mean())

    lo, hi = np.log(0.2), np.log(10.0)
    phi = (np.sqrt(5) - 1) / 2
    a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
    for _ in range(60):
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_report(labels: np.ndarray, preds: np.ndarray, classes, logits: np.ndarray | None = None) -> dict:
    k = len(classes)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (labels, preds), 1)
    per = {}
    f1s = []
    for i, c in enumerate(classes):
        tp = cm[i, i]
        support = cm[i].sum()
        prec = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[c] = {"precision": round(float(prec), 4), "recall": round(float(rec), 4), "f1": round(float(f1), 4), "support": int(support)}
        if support:
            f1s.append(f1)
    out = {
        "accuracy": float((labels == preds).mean()) if len(labels) else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "per_class": per,
        "confusion_matrix": cm.tolist(),
    }
    if logits is not None:
        out["ece"] = expected_calibration_error(softmax(logits), labels)
    return out


def per_lab_report(labels: np.ndarray, preds: np.ndarray, labs: np.ndarray, n_classes: int) -> dict:
    """Accuracy and macro-F1 (over the classes the lab has) per lab; `unidentified` = -1 counts as wrong."""
    out = {}
    for lab in sorted(set(labs.tolist())):
        m = labs == lab
        y, p = labels[m], preds[m]
        f1s = []
        for c in sorted(set(y.tolist())):
            tp = int(((p == c) & (y == c)).sum())
            prec = tp / max(int((p == c).sum()), 1)
            rec = tp / max(int((y == c).sum()), 1)
            f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        out[lab] = {"n": int(m.sum()), "accuracy": round(float((y == p).mean()), 4),
                    "macro_f1": round(float(np.mean(f1s)), 4)}
    return out


def greedy_matches(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray,
                   iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One image, one class, matched as COCO matches (pycocotools' COCOeval.evaluateImg).

    Predictions in descending score, equal scores in their given order; each is a true positive
    when its best-overlapping truth box among those not matched yet has IoU >= threshold (of
    equal overlaps the later truth, as pycocotools), so a truth box is matched at most once.
    Returns (scores, hits) in that order.
    """
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    pred = np.asarray(pred, float).reshape(-1, 4)[order]
    sc = np.asarray(scores, float)[order]
    truth = np.asarray(truth, float).reshape(-1, 4)
    matched = np.zeros(len(truth), bool)
    hits = np.zeros(len(pred), bool)
    ious = box_iou(pred, truth) if len(truth) and len(pred) else np.zeros((len(pred), len(truth)))
    for i in range(len(pred)):
        cand = np.flatnonzero(~matched)
        if cand.size:
            j = cand[cand.size - 1 - np.argmax(ious[i, cand][::-1])]
            if ious[i, j] >= iou_threshold:
                matched[j] = hits[i] = True
    return sc, hits


def average_precision(images: list[tuple[np.ndarray, np.ndarray, np.ndarray]], iou_threshold: float = 0.5) -> float:
    """AP of one class over images [(pred_boxes, pred_scores, truth_boxes)], `greedy_matches`
    deciding true positives.

    All detections of all images ranked by score (ties: image order, then each image's order, as
    pycocotools), and the area under the precision envelope (at each recall the best precision
    at that recall or beyond) integrated over every recall step ("all-point", VOC 2010+). COCO
    samples the same envelope at 101 recall points instead, and keeps at most 100 detections per
    image and class; neither is done here. Boxes are continuous coordinates (no VOC "+1").
    tests/test_metrics_reference.py holds this against pycocotools.
    """
    n_truth = sum(len(t) for _, _, t in images)
    if n_truth == 0:
        return float("nan")
    scores, tp = [], []
    for pred, sc, truth in images:
        s, h = greedy_matches(pred, sc, truth, iou_threshold)
        scores.extend(s.tolist())
        tp.extend(h.tolist())
    if not scores:
        return 0.0
    order = np.argsort(-np.array(scores), kind="stable")
    tp_arr = np.array(tp, float)[order]
    ctp = np.cumsum(tp_arr)
    cfp = np.cumsum(1 - tp_arr)
    recall = ctp / n_truth
    precision = ctp / np.maximum(ctp + cfp, 1e-9)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[1.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def detection_map50(per_image: list[dict], classes: tuple[str, ...]) -> dict[str, float]:
    """mAP50 over classes. Each item: {"pred": [(cls, box, score)], "truth": [(cls, box)]}."""
    out = {}
    for c in classes:
        imgs = []
        for item in per_image:
            p = [(b, s) for k, b, s in item["pred"] if k == c]
            t = [b for k, b in item["truth"] if k == c]
            imgs.append((np.array([b for b, _ in p]).reshape(-1, 4), np.array([s for _, s in p]), np.array(t).reshape(-1, 4)))
        out[c] = average_precision(imgs, 0.5)
    vals = [v for v in out.values() if not np.isnan(v)]
    out["mAP50"] = float(np.mean(vals)) if vals else 0.0
    return out


def pair_by_iou(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> dict[int, int]:
    """Prediction index -> annotation index: boxes (N, 4) and (M, 4) paired by IoU >= `iou_threshold`,
    highest IoU first (ties in index order), each at most once."""
    if not len(pred) or not len(truth):
        return {}
    ious = box_iou(pred, truth)
    pi, ti = np.nonzero(ious >= iou_threshold)
    order = np.argsort(-ious[pi, ti], kind="stable")
    out: dict[int, int] = {}
    used_t: set[int] = set()
    for p, t in zip(pi[order], ti[order]):
        if int(p) not in out and int(t) not in used_t:
            out[int(p)] = int(t)
            used_t.add(int(t))
    return out


def detection_confusion(per_image: list[dict], classes: tuple[str, ...], iou_threshold: float = 0.5) -> dict:
    """Confusion matrix of detections against annotations, with a background row and column.

    Per image, predictions and annotations of any class are paired by IoU >= `iou_threshold`,
    highest IoU first, each at most once (like ultralytics' detection confusion matrix). A
    pair counts at [truth class, predicted class]; an annotation left unpaired at [class,
    background] (missed); a prediction left unpaired at [background, class] (not annotated).
    Items as for `detection_map50` (scores are not used: pass the cells a report counts).
    """
    names = list(classes) + ["background"]
    bg = len(classes)
    cm = np.zeros((bg + 1, bg + 1), np.int64)
    for item in per_image:
        pk = [classes.index(k) for k, _, _ in item["pred"]]
        tk = [classes.index(k) for k, _ in item["truth"]]
        pairs = pair_by_iou(np.array([b for _, b, _ in item["pred"]], float).reshape(-1, 4),
                            np.array([b for _, b in item["truth"]], float).reshape(-1, 4), iou_threshold)
        used_p, used_t = set(pairs), set(pairs.values())
        for p, t in pairs.items():
            cm[tk[t], pk[p]] += 1
        for t in set(range(len(tk))) - used_t:
            cm[tk[t], bg] += 1
        for p in set(range(len(pk))) - used_p:
            cm[bg, pk[p]] += 1
    per = {}
    for i, c in enumerate(classes):
        n_pred, n_truth = int(cm[:, i].sum()), int(cm[i, :].sum())
        per[c] = {"precision": float(cm[i, i] / n_pred) if n_pred else 0.0,
                  "recall": float(cm[i, i] / n_truth) if n_truth else 0.0, "n_pred": n_pred, "n_truth": n_truth}
    return {"classes": names, "matrix": cm.tolist(), "per_class": per}


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a held-out cell > score of a known cell), ties counted half (Mann-Whitney U)."""
    allv = np.concatenate([pos, neg])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    mid_rank = first + (counts + 1) / 2.0  # average 1-based rank of each distinct value
    r = mid_rank[inv][: len(pos)].sum()
    return float((r - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
