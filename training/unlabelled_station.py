"""A WBC head trained without a lab, adapted on that lab's white cells with no label at all.

    python -m training.unlabelled_station build/wbc/wbc_no_rpi_init [--pool-cells 2000] [--json out.json]

Leave-one-lab-out asks how a head types a lab it never saw; a station could gather its own white
cells for a while before anyone types one. This measures what unlabelled cells buy in the head's
own feature space (penultimate features, the run's shared precision and class means from
open_set.npz, which never saw the lab), on the lab's test cells (closed set):

- `head`: the head as trained;
- `centred`: every feature shifted by (training mean - the station's mean), the station's cells
  moved back to where the head's training cells sat (a feature-level AdaBN), then typed by the
  head's last layer or by the nearest trained class mean;
- `em`: class means re-estimated on the station's unlabelled cells: each cell assigned to its
  nearest mean, each mean pulled toward its cells' average with a prior weight of `--prior`
  cells on the trained mean, repeated; started from the trained means or from the centred ones.

The unlabelled pool is the lab's train split (the run never saw it), the test cells its test split.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from smearscope.export.feature_space import mahalanobis
from training.adapt_bn import load_run
from training.train_wbc import features
from training.wbc_data import load_contexts, to_crops

logger = logging.getLogger(__name__)


def em_means(feats: np.ndarray, means: np.ndarray, precision: np.ndarray, prior: float, rounds: int = 10) -> np.ndarray:
    """Means after `rounds` of hard assignment and MAP updates (prior weight `prior` on `means`)."""
    m = means.copy()
    for _ in range(rounds):
        assign = mahalanobis(feats, m, precision).argmin(1)
        for k in range(len(m)):
            n = int((assign == k).sum())
            if n:
                m[k] = (feats[assign == k].sum(0) + prior * means[k]) / (n + prior)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--lab", default=None)
    ap.add_argument("--pool-cells", type=int, default=2000, help="unlabelled cells at most (seeded sample)")
    ap.add_argument("--prior", default="5,20,100", help="EM: prior weight(s) in cells on the trained mean")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, _, lab = load_run(args.run, args.lab, args.threads)
    z = np.load(args.run / "open_set.npz")
    means, precision = z["means"].astype(np.float64), z["precision"].astype(np.float64)
    present = np.abs(means).sum(1) > 0
    pool, test = load_contexts("train"), load_contexts("test")
    idx = np.flatnonzero(pool.labs == lab)
    idx = np.random.default_rng(0).permutation(idx)[: args.pool_cells]
    pool_f, _ = features(model, to_crops(pool.images[idx]))
    test_mask = test.labs == lab
    test_f, test_logits = features(model, to_crops(test.images[test_mask]))
    test_y = test.labels[test_mask]
    pool_f, test_f = pool_f.astype(np.float64), test_f.astype(np.float64)
    clf = model.net.get_classifier()
    w, b = clf.weight.detach().numpy().astype(np.float64), clf.bias.detach().numpy().astype(np.float64)

    def acc(pred: np.ndarray) -> float:
        return round(float((pred == test_y).mean()), 3)

    def ncm(f: np.ndarray, m: np.ndarray) -> np.ndarray:
        d = mahalanobis(f, m, precision)
        d[:, ~present] = np.inf
        return d.argmin(1)

    # training features' mean: the trained class means weighted as the training mix (equal here)
    train_centre = means[present].mean(0)
    shift = train_centre - pool_f.mean(0)
    rows = {"head": acc(test_logits.argmax(1)), "nearest trained mean": acc(ncm(test_f, means)),
            "centred, head": acc(((test_f + shift) @ w.T + b).argmax(1)),
            "centred, nearest trained mean": acc(ncm(test_f + shift, means))}
    for prior in (float(p) for p in args.prior.split(",")):
        rows[f"em (prior {prior:g})"] = acc(ncm(test_f, em_means(pool_f, means, precision, prior)))
        rows[f"centred, em (prior {prior:g})"] = acc(ncm(test_f + shift, em_means(pool_f + shift, means, precision, prior)))
    print(f"{args.run.name} (without {lab}): {len(idx)} unlabelled {lab} cells, {len(test_y)} test cells")
    for k, v in rows.items():
        print(f"  {k}: {v}")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "lab": lab, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
