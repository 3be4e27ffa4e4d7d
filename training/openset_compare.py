"""Open-set scores compared on leave-one-class-out WBC heads (`training.train_wbc --exclude-class`).

    python -m training.openset_compare build/wbc/wbc_no_basophil build/wbc/wbc_no_monocyte [--quantile 0.95]

For each run: the head's features (global-average-pooled output of each ResNet stage) and
logits on every train, val and test crop, cut as in training without a look (evaluation), then
candidate scores of "unlike every trained class", each fitted on the run's training crops of the
classes it kept:

- `md_lN`: Mahalanobis distance to the nearest class mean, one shared covariance (Lee et al.
  2018), on stage N's features (`md_l4` is the committed head's `ood` output);
- `rmd_l4`: the relative Mahalanobis distance (Ren et al. 2021): minus the distance to one
  Gaussian of all training features;
- `knn_lN`: cosine distance to the 10th nearest training feature (Sun et al. 2022);
- `energy`, `msp`: from the logits (Liu et al. 2020; the calibrated top probability);
- `md_l34`, `md_l234`, `md_l34+msp`: sums of those scores, each standardized by its validation
  median and interquartile range;
- `md_l4 or energy`: either test beyond its own threshold (the analyzer's rule when the manifest
  lists both tests; the energy's quantile may differ, `--energy-quantile`).

Each score's threshold is set as the analyzer's is: the `--quantile` of every training lab's
validation scores, the largest of them (at most 1 - q of any lab's normal cells to review). A
crop goes to review when its calibrated top probability is under 0.5 or its score is beyond the
threshold. Printed per score: the share of the held-out class's test cells still typed as a
known class (issue bar: <= 0.20), the share of each lab's known-class test cells sent to review
(bar: <= 0.10), and the held-out class's AUROC against the known cells (threshold-free).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from smearscope.service.analysis.classify import energy
from smearscope.service.analysis.open_set_fit import fit_station_thresholds
from training.head_data import PBC_CLASSES
from training.metrics import auroc, fit_temperature, softmax
from training.train_head import Deployable, build_net, to_tensor
from training.train_wbc import fit_mahalanobis, mahalanobis_min
from training.wbc_data import load_contexts, to_crops

logger = logging.getLogger(__name__)
LAYERS = ("l1", "l2", "l3", "l4")
Scores = tuple[np.ndarray, np.ndarray]  # (val, test)


def stage_features(model: Deployable, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Pooled features of each ResNet stage and the logits."""
    net = model.net
    out: dict[str, list[np.ndarray]] = {k: [] for k in (*LAYERS, "logits")}
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = (to_tensor(images[i:i + batch]) - model.mean) / model.std
            x = net.maxpool(net.act1(net.bn1(net.conv1(x))))
            for k, layer in zip(LAYERS, (net.layer1, net.layer2, net.layer3, net.layer4)):
                x = layer(x)
                out[k].append(x.mean((2, 3)).numpy())
            out["logits"].append(net.fc(x.mean((2, 3))).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def run_features(run: Path) -> tuple[dict[str, dict[str, np.ndarray]], list[int]]:
    """Features of train / val / test (cached in the run folder) and the held-out class indices."""
    state = torch.load(run / "best.pt", weights_only=False, map_location="cpu")
    classes = list(state["classes"])
    held = [classes.index(c) for c in PBC_CLASSES if f"_no_{c}" in run.name]
    cache = run / "stage_features.npz"
    sets: dict[str, dict[str, np.ndarray]] = {}
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        for s in ("train", "val", "test"):
            sets[s] = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(f"{s}/")}
        return sets, held
    model = Deployable(build_net(state["arch"], len(classes)))
    model.load_state_dict(state["model"])
    for s in ("train", "val", "test"):
        cs = load_contexts(s)
        sets[s] = {**stage_features(model, to_crops(cs.images)), "labels": cs.labels, "labs": cs.labs.astype(str)}
    np.savez(cache, **{f"{s}/{k}": v for s, d in sets.items() for k, v in d.items()})
    return sets, held


def candidate_scores(tr: dict, va: dict, te: dict, present: np.ndarray, temperature: float) -> dict[str, Scores]:
    n = len(present)

    def md(layer: str, relative: bool = False) -> Scores:
        means, prec = fit_mahalanobis(tr[layer], tr["labels"], n)
        if relative:  # one Gaussian of all training features, shrunk as fit_mahalanobis shrinks
            mu = tr[layer].mean(0)
            cov = np.cov(tr[layer].T)
            p0 = np.linalg.inv(0.95 * cov + 0.05 * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(mu)))

        def s(f: np.ndarray) -> np.ndarray:
            d = mahalanobis_min(f, means, prec, present)
            if relative:
                x = f - mu
                d = d - np.einsum("nd,de,ne->n", x, p0, x)
            return d
        return s(va[layer]), s(te[layer])

    def knn(layer: str, k: int = 10) -> Scores:
        bank = tr[layer] / np.linalg.norm(tr[layer], axis=1, keepdims=True)

        def s(f: np.ndarray) -> np.ndarray:
            sim = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ bank.T
            return -np.sort(sim, axis=1)[:, -k]
        return s(va[layer]), s(te[layer])

    def from_logits(fn: Callable[[np.ndarray], np.ndarray]) -> Scores:
        def s(logits: np.ndarray) -> np.ndarray:
            masked = np.where(present[None], logits, -1e9)
            return fn(masked)
        return s(va["logits"]), s(te["logits"])

    out: dict[str, Scores] = {"md_l4": md("l4"), "rmd_l4": md("l4", True), "md_l3": md("l3"), "md_l2": md("l2"),
                              "knn_l4": knn("l4"), "knn_l3": knn("l3"), "energy": from_logits(energy),
                              "msp": from_logits(lambda lg: -softmax(lg / temperature).max(1))}

    def standardized(*names: str) -> Scores:
        v = t = 0.0
        for name in names:
            pv, pt = out[name]
            mid, spread = np.median(pv), max(float(np.subtract(*np.percentile(pv, [75, 25]))), 1e-9)
            v, t = v + (pv - mid) / spread, t + (pt - mid) / spread
        return np.asarray(v), np.asarray(t)

    out["md_l234"] = standardized("md_l2", "md_l3", "md_l4")
    out["md_l34"] = standardized("md_l3", "md_l4")
    out["md_l34+msp"] = standardized("md_l3", "md_l4", "msp")
    return out


def centre_diameters(split: str, models: Path = Path("models"), cache_dir: Path = Path("build/wbc_contexts")) -> np.ndarray:
    """The analyzer's diameter (um) of the cell at the centre of each context of `split`: the
    committed models run on the context window at the canonical scale (given), the counted cell
    whose box centre lies nearest the window's centre (NaN when none is counted). Cached."""
    import math

    from smearscope.device.frame import Frame
    from smearscope.service.analysis.pipeline import Analyzer
    from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX

    contexts = load_contexts(split)
    f = cache_dir / f"{split}_{contexts.images.shape[1]}_centre_diameter.npy"
    if f.exists():
        return np.load(f)
    out = np.full(len(contexts.images), np.nan)
    analyzer = Analyzer.from_models_dir(models)
    try:
        for i, ctx in enumerate(tqdm(contexts.images, desc=f"{split} centre cells", mininterval=10)):
            res = analyzer.analyze(Frame(np.ascontiguousarray(ctx), f"{split}-{i}", "context",
                                         microns_per_pixel=CANONICAL_UM_PER_PX))
            c = ctx.shape[1] / 2.0
            cells = [(math.dist(cell.detection.box.center, (c, c)), cell.diameter_um) for cell in res.cells]
            if cells:
                out[i] = min(cells)[1]
    finally:
        analyzer.close()
    np.save(f, out)
    return out


def compare(run: Path, quantile: float, energy_quantile: float | None = None,
            max_lymphocyte_um: float | None = None) -> list[dict]:
    sets, held = run_features(run)
    n = sets["train"]["logits"].shape[1]
    present = np.ones(n, bool)
    present[held] = False

    def known(d: dict) -> dict:
        m = np.isin(d["labels"], np.nonzero(present)[0])
        return {k: v[m] for k, v in d.items()}
    tr, va, te = known(sets["train"]), known(sets["val"]), sets["test"]
    temperature = fit_temperature(va["logits"], va["labels"])
    conf = softmax(np.where(present[None], te["logits"], -1e9) / temperature).max(1)
    is_known = np.isin(te["labels"], np.nonzero(present)[0])
    is_held = np.isin(te["labels"], held)
    labs = sorted(set(va["labs"].tolist()))
    scores = candidate_scores(tr, va, te, present, temperature)

    def beyond(name: str, q: float = quantile) -> np.ndarray:
        vs, ts = scores[name]
        return ts > max(np.quantile(vs[va["labs"] == lab], q) for lab in labs)

    def row(name: str, review: np.ndarray, auc: float) -> dict:
        return {"run": run.name, "score": name, "typed_as_known": float((~review[is_held]).mean()),
                "review": {lab: float(review[is_known & (te["labs"] == lab)].mean()) for lab in labs},
                "auroc": auc}
    unsure = conf < 0.5
    rows = [row(name, unsure | beyond(name), auroc(ts[is_held], ts[is_known])) for name, (_, ts) in scores.items()]
    both = beyond("md_l4") | beyond("energy", energy_quantile or quantile)
    rows.append(row("md_l4 or energy", unsure | both, float("nan")))
    if max_lymphocyte_um is not None:
        # the analyzer's size gate (service.analysis.size_gate): typed lymphocyte, wider than the bound
        pred = np.where(present[None], te["logits"], -1e9).argmax(1)
        wide = centre_diameters("test") > max_lymphocyte_um  # NaN (no cell counted): not gated
        gate = (pred == PBC_CLASSES.index("lymphocyte")) & wide
        rows.append(row(f"md_l4 or energy, size gate {max_lymphocyte_um:g} um", unsure | both | gate, float("nan")))
    return rows


def station_rows(run: Path, budget: float, quantile: float, energy_quantile: float | None = None) -> list[dict]:
    """Each lab as a station that fits its own open-set thresholds on its own normal cells.

    The analyzer's rule (`compare`) takes, per test, the largest of the labs' validation
    quantiles: a station that looks like the best-matched lab inherits the threshold the worst
    lab needed. Here each lab is a station calibrated on its validation cells (its first normal
    specimens, `smearscope calibrate-openset`): its thresholds are the Mahalanobis distance's and
    the energy's quantile q of its own validation cells, q the lowest on a grid for which at most
    `budget` of them go to review (the low-confidence ones included), each capped at the analyzer's
    rule's threshold (a station may tighten, never loosen). Rows per lab: the held-out
    class's test cells of that lab still typed as a known class, and that lab's normal test cells
    sent to review, next to the same figures under the analyzer's rule."""
    sets, held = run_features(run)
    n = sets["train"]["logits"].shape[1]
    present = np.ones(n, bool)
    present[held] = False
    known_tr = np.isin(sets["train"]["labels"], np.nonzero(present)[0])
    known_va = np.isin(sets["val"]["labels"], np.nonzero(present)[0])
    tr = {k: v[known_tr] for k, v in sets["train"].items()}
    va = {k: v[known_va] for k, v in sets["val"].items()}
    te = sets["test"]
    temperature = fit_temperature(va["logits"], va["labels"])
    scores = candidate_scores(tr, va, te, present, temperature)
    (md_v, md_t), (en_v, en_t) = scores["md_l4"], scores["energy"]

    def unsure(logits: np.ndarray) -> np.ndarray:
        return softmax(np.where(present[None], logits, -1e9) / temperature).max(1) < 0.5
    un_v, un_t = unsure(va["logits"]), unsure(te["logits"])
    labs = sorted(set(va["labs"].tolist()))
    g_md = max(np.quantile(md_v[va["labs"] == lab], quantile) for lab in labs)
    g_en = max(np.quantile(en_v[va["labs"] == lab], energy_quantile or quantile) for lab in labs)
    is_known = np.isin(te["labels"], np.nonzero(present)[0])
    is_held = np.isin(te["labels"], held)
    rows = []
    for lab in labs:
        lv, lt = va["labs"] == lab, te["labs"] == lab
        # the station's own fit, as `smearscope calibrate-atypical` makes it (capped at the analyzer's rule);
        # over budget even there: the station keeps the analyzer's thresholds
        fit = fit_station_thresholds(np.stack([md_v[lv], en_v[lv]], axis=1), un_v[lv], ("mahalanobis", "energy"),
                                     (g_md, g_en), budget, min_cells=0)
        t_md, t_en = (fit.thresholds["mahalanobis"], fit.thresholds["energy"]) if fit.thresholds else (g_md, g_en)
        q = fit.quantile if fit.quantile is not None else 1.0
        station = un_t | (md_t > t_md) | (en_t > t_en)
        analyzer = un_t | (md_t > g_md) | (en_t > g_en)
        held_here = is_held & lt
        rows.append({"run": run.name, "lab": lab, "q": q, "md": t_md, "energy": t_en, "global_md": float(g_md),
                     "global_energy": float(g_en), "n_held": int(held_here.sum()),
                     "typed_as_known": float((~station[held_here]).mean()) if held_here.any() else float("nan"),
                     "typed_as_known_global": float((~analyzer[held_here]).mean()) if held_here.any() else float("nan"),
                     "review": float(station[is_known & lt].mean()),
                     "review_global": float(analyzer[is_known & lt].mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--quantile", type=float, default=0.95)
    ap.add_argument("--energy-quantile", type=float, default=None,
                    help="the energy test's quantile in the 'md_l4 or energy' row (default: --quantile)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size-gate", type=float, default=None, metavar="UM",
                    help="also a row with the analyzer's lymphocyte size gate at UM (the cells' diameters measured by "
                         "the committed models on each test context, cached)")
    ap.add_argument("--station-budget", type=float, default=None, metavar="SHARE",
                    help="instead: each lab as a station with its own thresholds, the lowest quantile of its "
                    "validation cells that sends at most SHARE of them to review (station_rows)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.station_budget is not None:
        print("| run | station | its quantile (distance / energy threshold) | held-out class typed as known: station / "
              "analyzer's rule (n) | its normal test cells to review: station / analyzer's rule |")
        print("|---|---|---|---|---|")
        for run in args.runs:
            for r in station_rows(run, args.station_budget, args.quantile, args.energy_quantile):
                print(f"| {r['run']} | {r['lab']} | {r['q']:.4f} ({r['md']:.0f} / {r['energy']:.2f}; analyzer "
                      f"{r['global_md']:.0f} / {r['global_energy']:.2f}) | {r['typed_as_known']:.3f} / "
                      f"{r['typed_as_known_global']:.3f} ({r['n_held']}) | {r['review']:.3f} / {r['review_global']:.3f} |")
        return
    print("| run | score | held-out class typed as known (bar <= 0.20) | known cells to review per lab (bar <= 0.10) | AUROC |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        for r in compare(run, args.quantile, args.energy_quantile, args.size_gate):
            review = ", ".join(f"{k} {v:.3f}" for k, v in r["review"].items())
            print(f"| {r['run']} | {r['score']} | {r['typed_as_known']:.3f} | {review} | {r['auroc']:.3f} |")


if __name__ == "__main__":
    main()
