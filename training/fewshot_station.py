"""A WBC head trained without a lab, given a few of that lab's cells typed by its technician.

    python -m training.fewshot_station build/wbc/wbc_no_rpi_init [--shots 3,5,10,20] [--draws 10]
                                       [--adapt-bn none,early,all] [--json out.json]

Leave-one-lab-out asks how a head types a lab it never saw. A station in a new lab could do
better than that at little cost: its technician confirms the type of a few white cells per class
on the station's first specimens. This measures what that would buy, before anything is built
around it. The run was trained without lab X (`training.train_wbc --exclude-lab X`); its
penultimate features of k labelled cells per class, drawn (seeded, `--draws` times) from X's
train split, which the run never saw, give per-class station means, and X's test cells are
typed by:

- `ncm`: the nearest station class mean under the head's own shared precision matrix (the
  Mahalanobis fit in the run's open_set.npz), over the classes the station labelled;
- `probe`: the head's last layer refitted on the k-shot cells (L-BFGS, cross-entropy plus an L2
  pull towards the trained weights);
- `ncm` where it beats the head: what a station could decide on its own typed cells, station
  means (leave one out) against the head as trained, the better one typing the test cells;
- either after the head's BatchNorm statistics were re-estimated on every crop of X's train split,
  unlabelled (`training.adapt_bn`; `early`: the stem and first stage only).

Accuracy is over X's test cells (closed set), the mean and the spread over the draws.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from smearscope.export.feature_space import mahalanobis
from training.adapt_bn import adapted, load_run
from training.train_wbc import features
from training.wbc_data import load_contexts, to_crops

logger = logging.getLogger(__name__)


def ncm_predict(query: np.ndarray, feats: np.ndarray, labels: np.ndarray, precision: np.ndarray,
                model_means: np.ndarray) -> np.ndarray:
    """Each query's nearest station class mean (the typed cells' `feats` averaged per class in
    `labels`), only among the classes typed at all."""
    means = model_means.copy()
    present = np.zeros(len(means), bool)
    for c in np.unique(labels):
        means[c] = feats[labels == c].mean(0)
        present[c] = True
    d = mahalanobis(query, means, precision)
    d[:, ~present] = np.inf
    return d.argmin(1)


def loo_ncm_accuracy(feats: np.ndarray, labels: np.ndarray, precision: np.ndarray, model_means: np.ndarray) -> float:
    """Leave-one-out accuracy of the nearest station class mean on the station's own typed cells
    (a class whose only typed cell is left out drops out of that vote)."""
    correct = 0
    for i in range(len(labels)):
        others = np.arange(len(labels)) != i
        guess = ncm_predict(feats[i : i + 1], feats[others], labels[others], precision, model_means)
        correct += int(guess[0] == labels[i])
    return correct / len(labels)


def refit_last_layer(weight: np.ndarray, bias: np.ndarray, feats: np.ndarray, labels: np.ndarray,
                     pull: float) -> tuple[np.ndarray, np.ndarray]:
    """The last layer fitted to the labelled cells, pulled towards its trained weights."""
    w = torch.tensor(weight, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    x, y = torch.tensor(feats), torch.tensor(labels)
    opt = torch.optim.LBFGS([w, b], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(x @ w.T + b, y)
                + pull * (((w - w0) ** 2).sum() + ((b - b0) ** 2).sum()))
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--lab", default=None, help="the held-out lab (default: the run's --exclude-lab)")
    ap.add_argument("--shots", default="3,5,10,20", help="labelled cells per class")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--adapt-bn", default="none,early", help="BatchNorm statistics first: none, early, all")
    ap.add_argument("--pull", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    unknown = set(args.adapt_bn.split(",")) - {"none", "early", "all"}
    if unknown:
        ap.error(f"--adapt-bn takes none, early, all; not {sorted(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base, classes, lab = load_run(args.run, args.lab, args.threads)
    open_set = dict(np.load(args.run / "open_set.npz"))
    pool, test = load_contexts("train"), load_contexts("test")
    pool_x, pool_y = to_crops(pool.images[pool.labs == lab]), pool.labels[pool.labs == lab]
    test_x, test_y = to_crops(test.images[test.labs == lab]), test.labels[test.labs == lab]
    print(f"{lab}: {len(pool_y)} train cells to draw from, {len(test_y)} test cells; per class "
          + ", ".join(f"{c} {int((pool_y == i).sum())}/{int((test_y == i).sum())}"
                      for i, c in enumerate(classes) if (pool_y == i).any() or (test_y == i).any()))
    rows: dict[str, dict[str, list[float]]] = {}
    for bn in args.adapt_bn.split(","):
        model = base if bn == "none" else adapted(base, pool_x, bn)
        pool_f, pool_logits = features(model, pool_x)
        test_f, test_logits = features(model, test_x)
        clf = model.net.get_classifier()
        weight, bias = clf.weight.detach().numpy().copy(), clf.bias.detach().numpy().copy()
        head_test = float((test_logits.argmax(1) == test_y).mean())
        rows[f"BN {bn}, head as trained"] = {"0": [head_test]}
        rng = np.random.default_rng(0)
        for k in (int(v) for v in args.shots.split(",")):
            for _ in range(args.draws):
                idx = np.concatenate([rng.choice(np.flatnonzero(pool_y == c), min(k, int((pool_y == c).sum())),
                                                 replace=False) for c in np.unique(pool_y)])
                present = np.zeros(len(classes), bool)
                present[np.unique(pool_y[idx])] = True
                guess = ncm_predict(test_f, pool_f[idx], pool_y[idx], open_set["precision"], open_set["means"])
                ncm_acc = float((guess == test_y).mean())
                rows.setdefault(f"BN {bn}, ncm", {}).setdefault(str(k), []).append(ncm_acc)
                # what a station can check on its own typed cells: station means (leave one out)
                # against the head as trained; the better one types the test cells
                own = loo_ncm_accuracy(pool_f[idx], pool_y[idx], open_set["precision"], open_set["means"])
                head_own = float((pool_logits[idx].argmax(1) == pool_y[idx]).mean())
                rows.setdefault(f"BN {bn}, ncm where it beats the head on the typed cells (leave one out)", {}) \
                    .setdefault(str(k), []).append(ncm_acc if own > head_own else head_test)
                w, b = refit_last_layer(weight, bias, pool_f[idx], pool_y[idx], args.pull)
                s = test_f @ w.T + b
                s[:, ~present] = -np.inf
                rows.setdefault(f"BN {bn}, probe", {}).setdefault(str(k), []).append(
                    float((s.argmax(1) == test_y).mean()))
    shots = ["0", *args.shots.split(",")]
    print(f"\nWBC head {args.run.name} (trained without {lab}); {lab} test accuracy (closed set), mean ± sd "
          f"over {args.draws} draws, by labelled station cells per class:")
    print("| method | " + " | ".join(shots) + " |")
    print("|---|" + "---|" * len(shots))
    for name, by_k in rows.items():
        print(f"| {name} | " + " | ".join(
            (f"{np.mean(by_k[k]):.3f} ± {np.std(by_k[k]):.3f}" if len(by_k[k]) > 1 else f"{by_k[k][0]:.3f}")
            if k in by_k else "" for k in shots) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps({"run": str(args.run), "lab": lab, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
