"""Classification and detection metrics shared by training and evaluation (numpy only)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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
    for lo, hi in zip(edges[:-1], edges[1:]):
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
