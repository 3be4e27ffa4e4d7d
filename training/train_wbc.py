"""Train the multi-lab white-cell head with an open-set score, chosen by its worst lab.

    python -m training.train_wbc --minutes 40                       # the head that ships
    python -m training.train_wbc --exclude-lab rpi --minutes 25     # leave-one-lab-out
    python -m training.train_wbc --exclude-class basophil --minutes 25   # leave-one-class-out
    python -m training.train_wbc --init models/wbc_head.onnx --lr 3e-4 --defocus 0.35   # out of focus too
    python -m training.train_wbc --init models/wbc_head.onnx --lr 3e-4 --defocus 0.35 --red-negatives 0.5

Data: `training.wbc_data` (PBC, BCCD, rpi contexts; every crop drawn through a random lab's
look, then the analyzer's illumination correction and crop). Batches are balanced across labs
(`--lab-share`) and, within a lab, by the square root of class frequency. The checkpoint kept
is the one with the best **worst-lab** validation macro-F1 (labs in training only). With
`--defocus P`, P of the training crops are also drawn out of focus (`training.look.fresnel_defocus`:
the rings a slightly defocused station shows around a nucleus) and the validation crops of every
lab out of focus count as one more figure in the worst (the labs' mean macro-F1 out of focus).
With `--red-negatives W`, each step also draws a quarter batch of annotated red cells
(`training.wbc_negatives`: what the nucleated-cell recheck sends the head) through the same looks,
trained toward the uniform distribution with weight W; one minus the share of val red cells typed
lymphocyte or erythroblast at 0.5 or more joins the worst figure.

Open set (`unidentified` for review): a cell is typed only when the calibrated softmax is
confident AND its penultimate features lie near a trained class. The second test is the
Mahalanobis distance to the nearest class mean under one shared covariance (Lee et al. 2018),
fitted on the training crops after training and computed inside the ONNX graph (output `ood`),
so every backend (ONNX Runtime, TensorRT) gives it. Its threshold is the `--ood-quantile` of the
validation cells' distances (per lab, the strictest lab's), written into the manifest. Softmax
confidence alone sends a blast to the nearest class with high confidence; distance in feature
space is what catches a cell unlike every class (a blast, a smudge cell), and the
leave-one-class-out runs measure how often it does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.head_data import PBC_CLASSES
from training.look import LookConfig
from training.metrics import fit_temperature, per_lab_report, softmax
from training.train_head import (
    ARCHS,
    Deployable,
    augment,
    build_net,
    cpu_state,
    predict_logits,
    to_tensor,
    training_device,
)
from training.wbc_data import WBC_LABS, ContextSet, defocus_crops, load_contexts, to_crops
from training.wbc_negatives import red_as_nucleated, red_cell_contexts

logger = logging.getLogger(__name__)

DEFAULT_LAB_SHARE = {"pbc": 0.5, "bccd": 0.2, "rpi": 0.3}


class OpenSetHead(nn.Module):
    """Deployable head with two outputs: logits and the Mahalanobis distance to the nearest class."""

    def __init__(self, deployable: Deployable, means: np.ndarray, precision: np.ndarray) -> None:
        super().__init__()
        self.inner = deployable
        self.register_buffer("means", torch.from_numpy(means.astype(np.float32)))
        self.register_buffer("precision", torch.from_numpy(precision.astype(np.float32)))
        self.register_buffer("mpm", torch.from_numpy(np.einsum("kd,de,ke->k", means, precision, means).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.inner.net
        f = net.forward_head(net.forward_features((x - self.inner.mean) / self.inner.std), pre_logits=True)
        logits = net.get_classifier()(f)
        pf = f @ self.precision
        d = (pf * f).sum(1, keepdim=True) - 2.0 * pf @ self.means.T + self.mpm[None, :]
        return logits, d.min(dim=1).values


def features(model: Deployable, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    device = next(model.parameters()).device
    feats, logits = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = to_tensor(images[i:i + batch]).to(device).contiguous(memory_format=torch.channels_last)
            net = model.net
            f = net.forward_head(net.forward_features((x - model.mean) / model.std), pre_logits=True)
            feats.append(f.float().cpu().numpy())
            logits.append(net.get_classifier()(f).float().cpu().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def fit_mahalanobis(feats: np.ndarray, labels: np.ndarray, n_classes: int, shrink: float = 0.05):
    """Class means and the shared precision matrix (covariance shrunk toward its diagonal)."""
    d = feats.shape[1]
    means = np.zeros((n_classes, d))
    centred = []
    for c in range(n_classes):
        fc = feats[labels == c]
        if len(fc):
            means[c] = fc.mean(0)
            centred.append(fc - means[c])
    x = np.concatenate(centred)
    cov = x.T @ x / len(x)
    cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov)) + 1e-6 * np.eye(d)
    return means, np.linalg.inv(cov)


def mahalanobis_min(feats: np.ndarray, means: np.ndarray, precision: np.ndarray, present: np.ndarray) -> np.ndarray:
    pf = feats @ precision
    d = (pf * feats).sum(1, keepdims=True) - 2 * pf @ means.T + np.einsum("kd,de,ke->k", means, precision, means)[None]
    d[:, ~present] = np.inf
    return d.min(1)


def centre_swapped(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, share: float = 0.3) -> torch.Tensor | None:
    """Near outliers for outlier exposure: up to half a batch of crops, each with its central square
    (`share` of the side: where the cell's nucleus lies) taken from a crop of another class in the
    batch. None when the batch holds one class only."""
    perm = torch.randperm(len(y), generator=g).to(y.device)
    other = y[perm] != y
    if not bool(other.any()):
        return None
    keep = other.nonzero().flatten()[: max(1, len(y) // 2)]  # half a batch more: 1.5x the step's cost
    src, dst = x[perm][keep], x[keep].clone()
    s = x.shape[-1]
    a = round(s * (1 - share) / 2)
    dst[..., a:s - a, a:s - a] = src[..., a:s - a, a:s - a]
    return dst.contiguous(memory_format=torch.channels_last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--max-epochs", type=int, default=80)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps-per-epoch", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet18-half")
    ap.add_argument("--exclude-lab", choices=WBC_LABS, default=None)
    ap.add_argument("--exclude-class", choices=PBC_CLASSES, action="append", default=[])
    ap.add_argument("--lab-share", type=json.loads, default=None, help='JSON, e.g. {"pbc": 0.5, "bccd": 0.2, "rpi": 0.3}')
    ap.add_argument("--ood-quantile", type=float, default=0.95)
    ap.add_argument("--out", type=Path, default=Path("build/wbc"))
    ap.add_argument("--name", default=None)
    ap.add_argument("--outlier-mix", type=float, default=0.0,
                    help="outlier exposure (Hendrycks et al. 2019) with near outliers: this weight on a "
                         "uniform-target loss for crops whose centre (a nucleus) is pasted from a cell of "
                         "another class; 0 (default): off")
    ap.add_argument("--defocus", type=float, default=0.0,
                    help="share of training crops drawn out of focus as well (training.look.fresnel_defocus); "
                         "the validation labs out of focus then join the worst figure; 0 (default): off")
    ap.add_argument("--red-negatives", type=float, default=0.0,
                    help="this weight on a uniform-target loss for red cells (training.wbc_negatives: what the "
                         "nucleated-cell recheck sends the head that is no white cell), a quarter batch more "
                         "per step; val red cells typed lymphocyte or erythroblast then join the worst "
                         "figure; 0 (default): off")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", type=Path, default=None,
                    help="warm start from a committed head ONNX (training.recover_head); only where that head "
                         "never saw what the run holds out")
    args = ap.parse_args()
    if args.outlier_mix > 0 and args.red_negatives > 0:
        ap.error("--outlier-mix and --red-negatives: one kind of negatives per run")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = training_device(args.device)
    name = args.name or ("wbc" + (f"_no_{args.exclude_lab}" if args.exclude_lab else "")
                         + "".join(f"_no_{c}" for c in args.exclude_class))
    run_dir = args.out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    classes = PBC_CLASSES
    excluded = [classes.index(c) for c in args.exclude_class]

    def keep(s: ContextSet) -> ContextSet:
        m = ~np.isin(s.labels, excluded)
        if args.exclude_lab:
            m &= s.labs != args.exclude_lab
        return s.subset(np.nonzero(m)[0])

    full = {k: load_contexts(k) for k in ("train", "val", "test")}
    train, val = keep(full["train"]), keep(full["val"])
    labs = sorted(set(train.labs.tolist()))
    share = args.lab_share or {k: v for k, v in DEFAULT_LAB_SHARE.items() if k in labs}
    total = sum(share.values())
    p = np.zeros(len(train.labels))
    for lab in labs:
        m = train.labs == lab
        counts = np.bincount(train.labels[m], minlength=len(classes)).astype(float)
        w = np.where(counts > 0, counts, 1.0) ** -0.5
        pl = w[train.labels[m]]
        p[m] = share.get(lab, 0.0) / total * pl / pl.sum()
    p /= p.sum()
    logger.info("%s: train %d crops (%s), val %d; lab shares %s", name, len(train.labels),
                {lab: int((train.labs == lab).sum()) for lab in labs}, len(val.labels), share)
    val_crops = to_crops(val.images)
    look = LookConfig(p_defocus=args.defocus)  # the default look where 0
    val_defocus = defocus_crops(val.images) if args.defocus > 0 else None
    red_train = red_cell_contexts("train")[0] if args.red_negatives > 0 else None
    val_red = to_crops(red_cell_contexts("val")[0]) if args.red_negatives > 0 else None

    if args.init is not None:
        from training.recover_head import recover_head

        calib = to_crops(train.images[np.random.default_rng(0).choice(len(train.labels), 512, replace=False)])
        model = recover_head(args.init, args.arch, calib).to(device).to(memory_format=torch.channels_last)
    else:
        model = Deployable(build_net(args.arch, len(classes))).to(device).to(memory_format=torch.channels_last)
    logger.info("training on %s", device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    ckpt = run_dir / "last.pt"
    epoch, elapsed, history, best = 0, 0.0, [], (-1.0, None)
    planned = args.max_epochs
    if args.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False, map_location=device)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        epoch, elapsed, history, planned, best = st["epoch"], st["elapsed"], st["history"], st["planned"], st["best"]
    g = torch.Generator().manual_seed(1)
    while epoch < planned:
        t0 = time.time()
        rng = np.random.default_rng(1000 + epoch)
        model.train()
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * epoch / max(1, planned)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = rng.choice(len(train.labels), size=args.steps_per_epoch * args.batch, p=p)
        losses = []
        for s in tqdm(range(args.steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{planned}", mininterval=20):
            b = idx[s * args.batch:(s + 1) * args.batch]
            crops = to_crops(train.images[b], rng=rng, jitter_um=1.0, look=look)
            x = augment(to_tensor(crops), g, 0.1).to(device).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(train.labels[b]).to(device)
            negatives, weight = None, 0.0  # crops trained toward the uniform target: unlike every class
            if args.outlier_mix > 0:
                negatives, weight = centre_swapped(x, y, g), args.outlier_mix
            elif red_train is not None:
                rb = rng.integers(0, len(red_train), max(1, args.batch // 4))
                xr = augment(to_tensor(to_crops(red_train[rb], rng=rng, jitter_um=1.0, look=look)), g, 0.1)
                negatives, weight = xr.to(device).contiguous(memory_format=torch.channels_last), args.red_negatives
            if negatives is not None:
                logits = model(torch.cat([x, negatives]))
                loss = (F.cross_entropy(logits[: len(y)], y, label_smoothing=0.1)
                        - weight * F.log_softmax(logits[len(y):], 1).mean())
            else:
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        elapsed += time.time() - t0
        preds = predict_logits(model, val_crops).argmax(1)
        rep = per_lab_report(val.labels, preds, val.labs, len(classes))
        worst = min(r["macro_f1"] for r in rep.values())
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val": rep, "lr": lr}
        if val_defocus is not None:
            entry["val_defocus"] = per_lab_report(val.labels, predict_logits(model, val_defocus).argmax(1), val.labs,
                                                  len(classes))
            entry["defocus_macro_f1"] = round(float(np.mean([r["macro_f1"] for r in entry["val_defocus"].values()])), 4)
            worst = min(worst, entry["defocus_macro_f1"])
        if val_red is not None:  # red cells the recheck would re-count: typed red-cell-sized nucleated, confidently
            entry["val_red_as_nucleated"] = red_as_nucleated(predict_logits(model, val_red), classes)
            worst = min(worst, 1.0 - entry["val_red_as_nucleated"])
        history.append({**entry, "worst_macro_f1": worst})
        logger.info("epoch %d loss %.3f val %s%s worst %.4f (%.0f s)", epoch + 1, np.mean(losses),
                    {k: (v["accuracy"], v["macro_f1"]) for k, v in rep.items()},
                    (f" out of focus {entry['defocus_macro_f1']}" if val_defocus is not None else "")
                    + (f" red as nucleated {entry['val_red_as_nucleated']}" if val_red is not None else ""), worst, elapsed)
        if worst > best[0]:
            best = (worst, cpu_state(model))
        epoch += 1
        if len(history) == 1 and not args.resume:
            planned = int(min(args.max_epochs, max(2, args.minutes * 60 // max(elapsed, 1))))
            logger.info("%.0f s per epoch: planning %d epochs", elapsed, planned)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "elapsed": elapsed,
                    "history": history, "planned": planned, "best": best}, ckpt)
    model.load_state_dict(best[1])
    torch.save({"model": cpu_state(model), "arch": args.arch, "classes": classes, "history": history}, run_dir / "best.pt")
    evaluate_run(model, full, train, val, val_crops, classes, excluded, args, run_dir, name)


def evaluate_run(model, full, train, val, val_crops, classes, excluded, args, run_dir: Path, name: str) -> dict:
    """Temperature, Mahalanobis fit and threshold on train/val; figures on every test lab."""
    present = np.ones(len(classes), bool)
    present[excluded] = False
    _, val_logits = features(model, val_crops)
    temperature = fit_temperature(val_logits, val.labels)
    train_crops = to_crops(train.images)
    tf, _ = features(model, train_crops)
    means, precision = fit_mahalanobis(tf, train.labels, len(classes))
    vf, _ = features(model, val_crops)
    vd = mahalanobis_min(vf, means, precision, present)
    # The strictest lab sets the threshold: at most (1 - q) of any training lab's normal cells to review.
    threshold = float(max(np.quantile(vd[val.labs == lab], args.ood_quantile) for lab in set(val.labs.tolist())))
    test = full["test"]
    test_crops = to_crops(test.images)
    tf2, tl = features(model, test_crops)
    probs = softmax(tl / temperature)
    probs[:, ~present] = 0.0
    pred = probs.argmax(1)
    conf = probs.max(1)
    dist = mahalanobis_min(tf2, means, precision, present)
    min_conf = 0.5
    review = (conf < min_conf) | (dist > threshold)
    final = np.where(review, -1, pred)
    known = np.isin(test.labels, np.nonzero(present)[0])
    result = {"name": name, "exclude_lab": args.exclude_lab, "exclude_class": args.exclude_class, "defocus": args.defocus,
              "red_negatives": args.red_negatives,
              "temperature": temperature, "ood_threshold": threshold, "min_confidence": min_conf,
              "test_closed_set": per_lab_report(test.labels[known], pred[known], test.labs[known], len(classes)),
              "test_with_review": per_lab_report(test.labels[known], final[known], test.labs[known], len(classes)),
              "test_review_rate_known": {lab: round(float(review[known & (test.labs == lab)].mean()), 4)
                                         for lab in sorted(set(test.labs.tolist()))}}
    for c in excluded:
        m = test.labels == c
        result.setdefault("held_out_class", {})[classes[c]] = {
            "n": int(m.sum()),
            "typed_as_known": round(float((final[m] >= 0).mean()), 4) if m.any() else None,
            "typed_as_known_softmax_only": round(float((conf[m] >= min_conf).mean()), 4) if m.any() else None,
            "per_lab": {lab: round(float((final[m & (test.labs == lab)] >= 0).mean()), 4)
                        for lab in sorted(set(test.labs[m].tolist()))}}
    if args.red_negatives > 0:  # through the open set as the analyzer applies it
        red = to_crops(red_cell_contexts("test")[0])
        rf, rl = features(model, red)
        result["test_red_as_nucleated"] = red_as_nucleated(
            rl, classes, temperature, min_conf, mahalanobis_min(rf, means, precision, present) <= threshold)
    if args.defocus > 0:
        result["test_defocus_closed_set"] = per_lab_report(
            test.labels[known], predict_logits(model, defocus_crops(test.images))[known].argmax(1),
            test.labs[known], len(classes))
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    logger.info("result %s", json.dumps(result))
    np.savez(run_dir / "open_set.npz", means=means, precision=precision, threshold=threshold, temperature=temperature)
    return result


if __name__ == "__main__":
    main()
