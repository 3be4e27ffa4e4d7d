"""Train the red-cell morphology head with every lab's look, chosen by the worst of three figures.

    python -m training.train_rbc --minutes 40 --init models/rbc_head.onnx

Data: Chula RBC-12 centres (split by image), erythrocytesIDB1 (sickle / round / other
deformed; train 85/15, test held out) and rendered fields, each cell stored as a raw-look
context window (CONTEXT_UM) at the canonical scale. Every training crop is drawn through a random
lab's look (`training.look`), the analyzer's illumination correction and its crop function.

Selection (on validation): the worst of Chula macro-F1, IDB1 sickle-vs-not accuracy, and one
minus the share of BCCD's annotated (mostly normal) red cells typed spherocyte: a head that
over-calls spherocytes in another lab loses however well it does on Chula.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from smearscope.service.analysis.crops import CropSpec, crop_cell
from smearscope.service.analysis.scale import resample_factor, resample_to_canonical
from training import head_data as hd
from training.data import bccd_boxes, bccd_image_path, bccd_microns_per_pixel, bccd_split, data_root
from training.metrics import fit_temperature, softmax
from training.train_head import ARCHS, Deployable, augment, build_net, predict_logits, to_tensor
from training.wbc_data import to_crops

logger = logging.getLogger(__name__)
CLASSES = hd.RBC_CLASSES
CROP = CropSpec(extent_um=11.2, input_size=56)
CONTEXT_UM = 22.4
LAB_SHARE = {"chula": 0.7, "idb1": 0.15, "synthetic": 0.15}


def _ctx(canon: np.ndarray, xy: tuple[float, float]) -> np.ndarray:
    return crop_cell(canon, xy, CropSpec(CONTEXT_UM, round(CONTEXT_UM / 0.2)))


def build_sets(cache: Path = Path("build/rbc_contexts.npz")) -> dict:
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    out: dict[str, list] = {}

    def add(split: str, lab: str, ctx: np.ndarray, label: int) -> None:
        out.setdefault(f"{split}_images", []).append(ctx)
        out.setdefault(f"{split}_labels", []).append(label)
        out.setdefault(f"{split}_labs", []).append(lab)

    root = data_root() / "chula_rbc12" / "Dataset"
    f = resample_factor(hd.CHULA_MICRONS_PER_PIXEL)
    for split, ids in hd.chula_splits().items():
        for image_id in tqdm(ids, desc=f"chula {split}", mininterval=5):
            img = cv2.imread(str(root / f"{image_id}.jpg"))
            if img is None:
                continue
            canon = resample_to_canonical(img, hd.CHULA_MICRONS_PER_PIXEL)
            for x, y, name in hd.chula_points(image_id):
                if name in CLASSES:
                    add(split, "chula", _ctx(canon, (x * f, y * f)), CLASSES.index(name))
    mpp = hd.idb1_microns_per_pixel()
    for src, splits in (("train", ("train", "val")), ("test", ("test",))):
        items = []
        for folder, label in hd.IDB1_LABEL.items():
            for p in sorted((data_root() / "erythrocytesidb1" / src / folder).glob("*.jpg")):
                img = cv2.imread(str(p))
                if img is not None:
                    canon = resample_to_canonical(img, mpp)
                    items.append((_ctx(canon, (canon.shape[1] / 2, canon.shape[0] / 2)), CLASSES.index(label)))
        if src == "train":
            tr, va = hd.idb1_train_val_split(len(items))
            for split, idx in (("train", tr), ("val", va)):
                for i in idx:
                    add(split, "idb1", *items[i])
        else:
            for it in items:
                add("test", "idb1", *it)
    from smearscope.device.synthetic import StainParams, render_field

    for split, n, base in (("train", 40, 30_000), ("val", 6, 40_000)):
        for i in range(n):
            rng = np.random.default_rng(base + i)
            field = render_field(base + i, width=512, height=384, microns_per_pixel=0.2, stain=StainParams.sample(rng),
                                 rbc_mix={"normal": 0.4, "target": 0.12, "spherocyte": 0.12, "ovalocyte": 0.12,
                                          "sickle": 0.12, "echinocyte": 0.12})
            img = np.asarray(field.frame.pixels)
            for c in field.cells:
                if c.kind == "rbc" and not c.cut_by_frame_edge and c.morphology in hd.SYNTHETIC_RBC_LABEL:
                    add(split, "synthetic", _ctx(img, c.center), CLASSES.index(hd.SYNTHETIC_RBC_LABEL[c.morphology]))
    bmpp = bccd_microns_per_pixel()
    bf = resample_factor(bmpp)
    for split in ("val", "test"):
        for image_id in bccd_split(split):
            img = cv2.imread(str(bccd_image_path(image_id)))
            canon = resample_to_canonical(img, bmpp)
            for b in bccd_boxes(image_id):
                if b.kind == "rbc" and b.x0 > 2 and b.y0 > 2 and b.x1 < img.shape[1] - 2 and b.y1 < img.shape[0] - 2:
                    add(f"bccd_{split}", "bccd", _ctx(canon, ((b.x0 + b.x1) / 2 * bf, (b.y0 + b.y1) / 2 * bf)), -1)
    arrays = {k: np.stack(v) if k.endswith("images") else np.array(v) for k, v in out.items()}
    np.savez(cache, **arrays)
    return arrays


def figures(probs: np.ndarray, sets: dict, split: str, bccd_probs: np.ndarray) -> dict:
    y, labs = sets[f"{split}_labels"], sets[f"{split}_labs"]
    pred = probs.argmax(1)
    m = labs == "chula"
    f1s = []
    for c in sorted(set(y[m].tolist())):
        tp = int(((pred[m] == c) & (y[m] == c)).sum())
        pr, rc = tp / max(int((pred[m] == c).sum()), 1), tp / max(int((y[m] == c).sum()), 1)
        f1s.append(2 * pr * rc / (pr + rc) if pr + rc else 0.0)
    mi = labs == "idb1"
    sickle = CLASSES.index("sickle")
    idb = float(((pred[mi] == sickle) == (y[mi] == sickle)).mean()) if mi.any() else 1.0
    sph = float((bccd_probs.argmax(1) == CLASSES.index("spherocyte")).mean()) if len(bccd_probs) else 0.0
    out = {"chula_macro_f1": round(float(np.mean(f1s)), 4), "chula_accuracy": round(float((pred[m] == y[m]).mean()), 4),
           "idb1_sickle_vs_not": round(idb, 4), "bccd_spherocyte_share": round(sph, 4),
           "bccd_label_shares": {CLASSES[k]: round(float(v), 4) for k, v in
                                 zip(*np.unique(bccd_probs.argmax(1), return_counts=True)) if v} if len(bccd_probs) else {}}
    if out["bccd_label_shares"]:
        n = len(bccd_probs)
        out["bccd_label_shares"] = {k: round(v / n, 4) for k, v in out["bccd_label_shares"].items()}
    out["worst"] = round(min(out["chula_macro_f1"], idb, 1.0 - sph), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--max-epochs", type=int, default=80)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps-per-epoch", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet10t-half")
    ap.add_argument("--init", type=Path, default=None, help="warm start from a committed head ONNX")
    ap.add_argument("--p-look", type=float, default=0.8)
    ap.add_argument("--out", type=Path, default=Path("build/rbc"))
    ap.add_argument("--name", default="rbc")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run_dir = args.out / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = build_sets()
    tr_x, tr_y, tr_lab = sets["train_images"], sets["train_labels"], sets["train_labs"]
    p = np.zeros(len(tr_y))
    for lab, share in LAB_SHARE.items():
        m = tr_lab == lab
        counts = np.bincount(tr_y[m], minlength=len(CLASSES)).astype(float)
        w = np.where(counts > 0, counts, 1.0) ** -0.5
        pl = w[tr_y[m]]
        p[m] = share * pl / pl.sum()
    p /= p.sum()
    val_crops = to_crops(sets["val_images"], CROP)
    bccd_val = to_crops(sets["bccd_val_images"], CROP)
    logger.info("train %d, val %d, BCCD val red cells %d", len(tr_y), len(val_crops), len(bccd_val))
    if args.init is not None:
        from training.recover_head import recover_head

        calib = to_crops(tr_x[np.random.default_rng(0).choice(len(tr_y), 1024, replace=False)], CROP)
        model = recover_head(args.init, args.arch, calib)
    else:
        model = Deployable(build_net(args.arch, len(CLASSES)))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    epoch, elapsed, planned, history, best = 0, 0.0, args.max_epochs, [], (-1.0, None)
    start = figures(softmax(predict_logits(model, val_crops)), sets, "val", softmax(predict_logits(model, bccd_val)))
    logger.info("start: %s", start)
    while epoch < planned:
        t0 = time.time()
        rng = np.random.default_rng(2000 + epoch)
        model.train()
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * epoch / max(1, planned)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = rng.choice(len(tr_y), size=args.steps_per_epoch * args.batch, p=p)
        losses = []
        for s in tqdm(range(args.steps_per_epoch), desc=f"rbc epoch {epoch + 1}/{planned}", mininterval=20):
            b = idx[s * args.batch:(s + 1) * args.batch]
            x = augment(to_tensor(to_crops(tr_x[b], CROP, rng=rng, p_look=args.p_look, jitter_um=0.4)), g, 0.0)
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), torch.from_numpy(tr_y[b]),
                                   label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        elapsed += time.time() - t0
        fig = figures(softmax(predict_logits(model, val_crops)), sets, "val", softmax(predict_logits(model, bccd_val)))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **fig})
        logger.info("epoch %d loss %.3f %s (%.0f s)", epoch + 1, np.mean(losses), fig, elapsed)
        if fig["worst"] > best[0]:
            best = (fig["worst"], {k: v.clone() for k, v in model.state_dict().items()})
        epoch += 1
        if epoch == 1:
            planned = int(min(args.max_epochs, max(2, args.minutes * 60 // max(elapsed, 1))))
            logger.info("%.0f s per epoch: planning %d epochs", elapsed, planned)
        torch.save({"model": model.state_dict(), "epoch": epoch, "history": history}, run_dir / "last.pt")
    model.load_state_dict(best[1])
    val_logits = predict_logits(model, val_crops)
    temperature = fit_temperature(val_logits, sets["val_labels"])
    test = figures(softmax(predict_logits(model, to_crops(sets["test_images"], CROP)) / temperature), sets, "test",
                   softmax(predict_logits(model, to_crops(sets["bccd_test_images"], CROP))))
    result = {"val_best_worst": best[0], "temperature": temperature, "test": test, "history": history,
              "start_val": start}
    torch.save({"model": model.state_dict(), "arch": args.arch, "classes": CLASSES}, run_dir / "best.pt")
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    logger.info("test %s", test)


if __name__ == "__main__":
    main()
