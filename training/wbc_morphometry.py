"""Hand-measured white-cell features, typed by a logistic regression, left out one lab at a time.

    python -m training.wbc_morphometry [--lam 1e-3]

The question: do features a hematologist would name (nucleus size and shape, lobes, chromatin
and cytoplasm colour relative to the field's own red cells, granularity, N:C ratio), measured on
the analyzer's own lamp-corrected head crops (25.6 um in 96 px), carry a cell's type to a lab the
classifier never saw better than the CNN head does? Features per crop (`features`): the nucleus is
the Otsu mask of the red-light optical density (a nucleus absorbs red light, a red cell and most
cytoplasm do not), kept within 7 um of the crop centre; the cytoplasm a ring 1-4 um outside it;
colours are divided by the crop's red cells' optical density. A multinomial logistic regression
(L2, L-BFGS, each lab's classes weighted by 1/sqrt(n) and each lab to one share) on the features
standardized ("linear") and with their pairwise products ("quadratic"), trained on every lab's
train split but the held-out one; printed: accuracy / macro-F1 on each lab's test split (the
held-out lab's row is the leave-one-lab-out figure to set against `training.evaluate`'s).

An experiment for the model card, not part of the product.
"""

from __future__ import annotations

import argparse
import functools
import logging

import cv2
import numpy as np
from scipy.optimize import minimize
from tqdm import tqdm

from smearscope.service.analysis.crops import WBC_CROP
from training.head_data import PBC_CLASSES
from training.wbc_data import WBC_LABS, load_contexts, to_crops

logger = logging.getLogger(__name__)

#: A crop pixel (um): the head's crop, 25.6 um in 96 px.
UM = WBC_CROP.extent_um / WBC_CROP.input_size

#: Nucleus pieces this close to the crop centre are lobes of the centre cell's nucleus (um).
LOBE_REACH_UM = 7.0
#: The cytoplasm ring: from 2 px outside the nucleus to this far beyond it (um), near its centre.
RING_UM, NEAR_UM = 4.0, 9.0


def _nucleus(od_red: np.ndarray) -> np.ndarray:
    """The centre cell's nucleus (uint8 mask): Otsu on red-light density, pieces near the centre."""
    h, w = od_red.shape
    scaled = (od_red * 255 / max(float(od_red.max()), 1e-3)).astype(np.uint8)
    t, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = cv2.morphologyEx((scaled > t).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, lab, stats, cents = cv2.connectedComponentsWithStats(mask, 8)
    keep = np.zeros_like(mask)
    if n > 1:
        d = np.hypot(cents[1:, 0] - w / 2, cents[1:, 1] - h / 2)
        sel = np.where((stats[1:, cv2.CC_STAT_AREA] >= 15) & (d < LOBE_REACH_UM / UM))[0] + 1
        keep[np.isin(lab, sel if len(sel) else [int(np.argmin(d)) + 1])] = 1
    return keep


def _shape(keep: np.ndarray) -> dict[str, float]:
    area = float(keep.sum())
    if area < 10:
        return dict.fromkeys(("solidity", "circularity", "thick_ratio", "mean_thick_um", "lobes", "elongation",
                              "extent_um"), 0.0)
    cnts, _ = cv2.findContours(keep, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    perim = sum(cv2.arcLength(c, True) for c in cnts)
    hull = max(cv2.contourArea(cv2.convexHull(np.concatenate(cnts))), 1.0)
    dt = cv2.distanceTransform(keep, cv2.DIST_L2, 3)
    m = cv2.moments(keep)
    mu20, mu02, mu11 = m["mu20"] / area, m["mu02"] / area, m["mu11"] / area
    spread = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11 ** 2)
    major, minor = (mu20 + mu02) / 2 + spread, (mu20 + mu02) / 2 - spread
    return {"solidity": area / hull, "circularity": 4 * np.pi * area / max(perim, 1.0) ** 2,
            "thick_ratio": float(dt.max()) / np.sqrt(area / np.pi), "mean_thick_um": float(dt[keep > 0].mean()) * UM,
            "lobes": float(cv2.connectedComponents(cv2.erode(keep, np.ones((5, 5), np.uint8)), 8)[0] - 1),
            "elongation": float(np.sqrt(max(minor, 1e-6) / max(major, 1e-6))), "extent_um": 4 * np.sqrt(max(major, 0.0)) * UM}


def features(crop: np.ndarray) -> dict[str, float]:
    """Named features of one lamp-corrected BGR head crop (`UM` per pixel)."""
    od = -np.log((crop.astype(np.float32) + 1.0) / 256.0)
    total = od.sum(axis=2)
    h, w = total.shape
    keep = _nucleus(od[..., 2])
    area = int(keep.sum())
    f = {"nucleus_area_um2": area * UM * UM, **{f"nucleus_{k}": v for k, v in _shape(keep).items()}}
    ys, xs = np.nonzero(keep)
    ncx, ncy = (xs.mean(), ys.mean()) if area else (w / 2, h / 2)
    inner = cv2.dilate(keep, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    outer = cv2.dilate(keep, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(2 * RING_UM / UM) | 1,) * 2))
    yy, xx = np.mgrid[:h, :w]
    near = np.hypot(xx - ncx, yy - ncy) < NEAR_UM / UM
    ring = (outer > 0) & (inner == 0) & near
    cyto = ring & (total > 0.08)
    other = (total > 0.25) & (keep == 0)
    far = other & ~near
    red_cells = od[far].mean(0) if far.sum() > 30 else od[other].mean(0) if other.any() else np.full(3, 0.3)
    rel = 1.0 / max(float(red_cells.sum()), 0.05)
    nuc_od = od[keep > 0].mean(0) if area else np.zeros(3)
    cyto_od = od[cyto].mean(0) if cyto.sum() > 5 else np.zeros(3)
    for i, c in enumerate("bgr"):
        f[f"nucleus_od_{c}"] = float(nuc_od[i]) * rel
        f[f"cytoplasm_od_{c}"] = float(cyto_od[i]) * rel
    f["nucleus_red_share"] = float(nuc_od[2] / max(nuc_od.sum(), 1e-3))
    f["nucleus_blue_share"] = float(nuc_od[0] / max(nuc_od.sum(), 1e-3))
    f["cytoplasm_red_share"] = float(cyto_od[2] / max(cyto_od.sum(), 1e-3))
    f["cytoplasm_blue_share"] = float(cyto_od[0] / max(cyto_od.sum(), 1e-3))
    f["cytoplasm_fill"] = float(cyto.sum() / max(ring.sum(), 1))
    f["cytoplasm_texture"] = float(total[cyto].std() / max(total[cyto].mean(), 1e-3)) if cyto.sum() > 5 else 0.0
    f["nucleus_texture"] = float(total[keep > 0].std() / max(total[keep > 0].mean(), 1e-3)) if area else 0.0
    cell = int(((keep > 0) | cyto).sum())
    f["cell_area_um2"] = cell * UM * UM
    f["nc_ratio"] = area / max(cell, 1)
    return f


def feature_table(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features N x F, labels, labs) of a split's cells, cut as the analyzer cuts them."""
    c = load_contexts(split)
    rows = [features(x) for x in tqdm(to_crops(c.images), desc=f"{split} features", mininterval=5)]
    return np.array([list(r.values()) for r in rows], np.float64), c.labels, c.labs


def fit_softmax(x: np.ndarray, y: np.ndarray, weights: np.ndarray, lam: float) -> np.ndarray:
    """Weights ((F + 1) x K, the last row the bias) of an L2-penalized multinomial regression."""
    n, d = x.shape
    k = len(PBC_CLASSES)
    onehot = np.eye(k)[y]
    wn = weights / weights.sum()

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef = theta.reshape(d + 1, k)
        z = x @ coef[:-1] + coef[-1]
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        r = (p - onehot) * wn[:, None]
        grad = np.vstack([x.T @ r + 2 * lam * coef[:-1], r.sum(axis=0)])
        return float(-(wn * np.log(p[np.arange(n), y] + 1e-12)).sum() + lam * (coef[:-1] ** 2).sum()), grad.ravel()

    return minimize(loss, np.zeros((d + 1) * k), jac=True, method="L-BFGS-B", options={"maxiter": 500}).x.reshape(d + 1, k)


def _balanced(y: np.ndarray, labs: np.ndarray) -> np.ndarray:
    w = np.ones(len(y))
    for lab in np.unique(labs):
        in_lab = labs == lab
        for c in np.unique(y[in_lab]):
            sel = in_lab & (y == c)
            w[sel] = 1.0 / np.sqrt(sel.sum())
        w[in_lab] /= w[in_lab].sum()
    return w


def _scores(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    f1 = [2 * ((pred == c) & (y == c)).sum() / max(((pred == c) | (y == c)).sum() + ((pred == c) & (y == c)).sum(), 1)
          for c in np.unique(y)]
    return float((pred == y).mean()), float(np.mean(f1))


def _design(x: np.ndarray, mu: np.ndarray, sd: np.ndarray, quadratic: bool) -> np.ndarray:
    """Standardized features, with their pairwise products when `quadratic`."""
    z = (x - mu) / sd
    if not quadratic:
        return z
    i, j = np.triu_indices(z.shape[1])
    return np.hstack([z, z[:, i] * z[:, j]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lam", type=float, default=1e-3, help="L2 penalty")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (xtr, ytr, ltr), (xte, yte, lte) = feature_table("train"), feature_table("test")
    print(f"\ntest accuracy / macro-F1 by lab (rows: the lab left out of training; L2 {args.lam:g})")
    print(f"{'left out':<10}{'features':<11}" + "".join(f"{lab:>14}" for lab in WBC_LABS))
    for held in ("none", *WBC_LABS):
        train = ltr != held
        mu, sd = xtr[train].mean(0), xtr[train].std(0) + 1e-6
        for name in ("linear", "quadratic"):
            design = functools.partial(_design, mu=mu, sd=sd, quadratic=name == "quadratic")
            coef = fit_softmax(design(xtr[train]), ytr[train], _balanced(ytr[train], ltr[train]), args.lam)
            pred = (design(xte) @ coef[:-1] + coef[-1]).argmax(1)
            cells = [_scores(pred[lte == lab], yte[lte == lab]) for lab in WBC_LABS]
            print(f"{held:<10}{name:<11}" + "".join(f"{a:>8.3f} / {f:.3f}"[-14:].rjust(14) for a, f in cells), flush=True)


if __name__ == "__main__":
    main()
