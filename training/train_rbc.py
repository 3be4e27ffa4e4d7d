"""Train the red-cell morphology head with every lab's look, chosen by the worst of three figures.

    python -m training.train_rbc --minutes 40 --init models/rbc_head.onnx

Data: Chula RBC-12 centres (split by image), erythrocytesIDB1 (sickle / round / other
deformed; train 85/15, test held out) and rendered fields, each cell stored as a raw-look
context window (CONTEXT_UM) at the canonical scale. Every training crop is drawn through a random
lab's look (`training.look`), the analyzer's illumination correction and its crop function.

Selection (on validation), `--select looks` (default): the worst of Chula macro-F1, Chula
macro-F1 with every crop drawn through a random lab's look (a fixed seed: a stand-in for another
lab's camera and stain) and IDB1 sickle-vs-not accuracy; the share of BCCD's annotated (mostly
normal) red cells typed spherocyte is logged and left to the prior shift fitted afterwards
(`training.prior_shift`, ceiling 10 %), which is how the analyzer runs the head. `--select
spherocyte`: the worst of Chula macro-F1, IDB1 and one minus that share before any shift, so
a head that over-calls spherocytes in another lab loses however well it does on Chula.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import head_data as hd
from training.data import splits_record
from training.look import DEFAULT_LOOK
from training.metrics import fit_temperature, softmax
from training.rbc_data import (
    CLASSES,
    CROP,
    build_sets,
    defocus_crops,
    defocus_look,
    figures,
    looks_crops,
    with_defocus,
)
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
from training.wbc_data import to_crops

logger = logging.getLogger(__name__)
LAB_SHARE = {"chula": 0.7, "idb1": 0.15, "synthetic": 0.15}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--max-epochs", type=int, default=80)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps-per-epoch", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet10t-half")
    ap.add_argument("--init", type=Path, default=None, help="warm start from a committed head ONNX")
    ap.add_argument("--resume", action="store_true", help="continue this run's last.pt (same arguments)")
    ap.add_argument("--init-pt", type=Path, default=None, help="continue from a run's best.pt (new schedule)")
    ap.add_argument("--p-look", type=float, default=0.8)
    ap.add_argument("--out", type=Path, default=Path("build/rbc"))
    ap.add_argument("--name", default="rbc")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="keep an exponential moving average of the weights with this decay per step "
                    "(e.g. 0.998); validation, selection and the kept checkpoint use the average")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the weights, the sampling and the augmentation (0: the runs before this option)")
    ap.add_argument("--teacher", type=Path, nargs="+", default=None,
                    help="distil: runs whose mean logits (training.ensemble_rbc) the head also learns from, on the "
                    "same augmented crops (one head's cost for an ensemble's decisions)")
    ap.add_argument("--distill-weight", type=float, default=0.7, help="the teacher's share of the loss")
    ap.add_argument("--distill-t", type=float, default=2.0, help="temperature both sides are softened by")
    ap.add_argument("--defocus", type=float, default=0.0,
                    help="share of training crops drawn out of focus as well (training.look.fresnel_defocus, "
                    "with paler films); above 0, Chula val macro-F1 with every crop so drawn (a fixed seed) "
                    "joins the worst figure")
    ap.add_argument("--select", choices=("looks", "spherocyte"), default="looks",
                    help="what the kept checkpoint's worst figure includes (see above)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = training_device(args.device)
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
    looks_val = looks_crops(sets["val_images"]) if args.select == "looks" else None
    look = defocus_look(args.defocus) if args.defocus > 0 else DEFAULT_LOOK
    defocus_val = defocus_crops(sets["val_images"]) if args.defocus > 0 else None

    def val_figures(m) -> dict:
        fig = figures(softmax(predict_logits(m, val_crops)), sets, "val", softmax(predict_logits(m, bccd_val)),
                      None if looks_val is None else softmax(predict_logits(m, looks_val)),
                      spherocyte_in_worst=args.select == "spherocyte")
        if defocus_val is not None:
            fig = with_defocus(fig, predict_logits(m, defocus_val), sets, "val")
        return fig
    logger.info("train %d, val %d, BCCD val red cells %d", len(tr_y), len(val_crops), len(bccd_val))
    if args.init is not None:
        from training.recover_head import recover_head

        calib = to_crops(tr_x[np.random.default_rng(0).choice(len(tr_y), 1024, replace=False)], CROP)
        model = recover_head(args.init, args.arch, calib)
    else:
        model = Deployable(build_net(args.arch, len(CLASSES)))
    if args.init_pt is not None:
        model.load_state_dict(torch.load(args.init_pt, weights_only=False, map_location="cpu")["model"])
    model = model.to(device).to(memory_format=torch.channels_last)
    logger.info("training on %s", device)
    teacher = None
    if args.teacher:
        from training.ensemble_rbc import load_head

        teacher = load_head(args.teacher)[0].to(device).to(memory_format=torch.channels_last)
        logger.info("distilling from %s (weight %.2f, T %.1f)", [str(t) for t in args.teacher],
                    args.distill_weight, args.distill_t)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    # The average of the weights along the low-learning-rate end of a run: a flatter, usually
    # better-generalizing point than the last step (buffers such as BatchNorm statistics copied).
    ema = copy.deepcopy(model).eval() if args.ema > 0 else None
    if args.resume and (run_dir / "last.pt").exists():
        ck = torch.load(run_dir / "last.pt", weights_only=False, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
    g = torch.Generator().manual_seed(1 + args.seed)
    epoch, elapsed, planned, history, best = 0, 0.0, args.max_epochs, [], (-1.0, None)
    start = val_figures(model)
    logger.info("start: %s", start)
    if args.resume and (run_dir / "last.pt").exists():
        epoch, history = ck["epoch"], ck["history"]
        elapsed, planned = ck.get("elapsed", 0.0), ck.get("planned", planned)
        best = (ck.get("best_worst", -1.0), ck.get("best_state"))
        logger.info("resumed after epoch %d of %d", epoch, planned)
    while epoch < planned:
        t0 = time.time()
        rng = np.random.default_rng(2000 + epoch + 100_000 * args.seed)
        model.train()
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * epoch / max(1, planned)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = rng.choice(len(tr_y), size=args.steps_per_epoch * args.batch, p=p)
        losses = []
        for s in tqdm(range(args.steps_per_epoch), desc=f"rbc epoch {epoch + 1}/{planned}", mininterval=20):
            b = idx[s * args.batch:(s + 1) * args.batch]
            x = augment(to_tensor(to_crops(tr_x[b], CROP, rng=rng, p_look=args.p_look, jitter_um=0.4, look=look)), g, 0.0)
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            out = model(x)
            loss = F.cross_entropy(out, torch.from_numpy(tr_y[b]).to(device), label_smoothing=0.1)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / args.distill_t, dim=1)
                kd = F.kl_div(F.log_softmax(out / args.distill_t, dim=1), soft, reduction="batchmean")
                loss = (1 - args.distill_weight) * loss + args.distill_weight * args.distill_t ** 2 * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, v in zip(ema.state_dict().values(), model.state_dict().values()):
                        if e.dtype.is_floating_point:
                            e.mul_(args.ema).add_(v.detach(), alpha=1 - args.ema)
                        else:
                            e.copy_(v)
            losses.append(float(loss.detach()))
        elapsed += time.time() - t0
        kept = ema if ema is not None else model
        fig = val_figures(kept)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **fig})
        logger.info("epoch %d loss %.3f %s (%.0f s)", epoch + 1, np.mean(losses), fig, elapsed)
        if fig["worst"] > best[0]:
            best = (fig["worst"], cpu_state(kept))
        epoch += 1
        if epoch == 1:
            planned = int(min(args.max_epochs, max(2, args.minutes * 60 // max(elapsed, 1))))
            logger.info("%.0f s per epoch: planning %d epochs", elapsed, planned)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "ema": None if ema is None else ema.state_dict(), "epoch": epoch, "history": history,
                    "elapsed": elapsed, "planned": planned, "best_worst": best[0], "best_state": best[1]},
                   run_dir / "last.pt")
    model.load_state_dict(best[1])
    val_logits = predict_logits(model, val_crops)
    temperature = fit_temperature(val_logits, sets["val_labels"])
    test = figures(softmax(predict_logits(model, to_crops(sets["test_images"], CROP)) / temperature), sets, "test",
                   softmax(predict_logits(model, to_crops(sets["bccd_test_images"], CROP))),
                   softmax(predict_logits(model, looks_crops(sets["test_images"])) / temperature),
                   spherocyte_in_worst=args.select == "spherocyte")
    if defocus_val is not None:
        test = with_defocus(test, predict_logits(model, defocus_crops(sets["test_images"])), sets, "test")
    result = {"val_best_worst": best[0], "temperature": temperature, "test": test, "history": history,
              "start_val": start,  # and how it was trained (seed, teacher, distillation, rates)
              "args": {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                       for k, v in vars(args).items()}}
    torch.save({"model": cpu_state(model), "arch": args.arch, "classes": CLASSES}, run_dir / "best.pt")
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    logger.info("test %s", test)


if __name__ == "__main__":
    main()


def export_rbc(runs: list[Path], out: Path, views: list[str]) -> Path:
    """The run's best head (several runs: the mean of their logits in one graph, `ensemble_rbc`) as
    models' rbc_head (lamp-corrected crops), temperature fitted for `views` on validation, measured
    through the analyzer's classifier on the test crops."""
    from smearscope.engines.manifest import Preprocessing
    from smearscope.engines.registry import create_engine
    from smearscope.export.onnx_export import export_classifier
    from smearscope.service.analysis.classify import CropClassifier
    from smearscope.service.analysis.tta import view_crops
    from training.ensemble_rbc import load_head

    model, arch, architecture = load_head(runs)
    sets = build_sets()
    val_crops = to_crops(sets["val_images"], CROP)
    vlogits = np.mean([predict_logits(model, view_crops(val_crops, v)) for v in views], axis=0)
    temperature = fit_temperature(vlogits, sets["val_labels"])
    results = [json.loads((r / "result.json").read_text()) if (r / "result.json").exists() else {} for r in runs]
    best = [r.get("val_best_worst") for r in results]
    how = [r.get("args") for r in results]  # seed, teacher, rates: runs from before these were kept have none
    path = export_classifier(
        model, name="rbc_head", classes=list(CLASSES), crop=CROP, arch=arch, temperature=temperature,
        architecture=architecture,
        metrics={}, out_dir=out, preprocessing=Preprocessing(illumination="flatfield"), tta=views,
        training_data={"labs": f"Chula RBC-12 (centres, split by image 80/10/10, at {hd.CHULA_MICRONS_PER_PIXEL} um/px, "
                               "the analyzer's ruler: training.measure_scale), erythrocytesIDB1 "
                               "(train 85/15, test held out), rendered fields",
                       "recipe": "training.train_rbc (random lab looks, lamp correction, the analyzer's crops; kept: "
                                 "the best worst figure on validation, see train_rbc --select)",
                       "run": str(runs[0]) if len(runs) == 1 else [str(r) for r in runs],
                       "run_val_best_worst": best[0] if len(runs) == 1 else best,
                       "run_args": how[0] if len(runs) == 1 else how, "splits": splits_record()},
        split_hashes=hd.split_manifest())
    eng = create_engine("onnxruntime", path).load()
    clf = CropClassifier(eng, 0.0)
    probs = softmax(clf.logits(to_crops(sets["test_images"], CROP)) / temperature)
    bprobs = softmax(clf.logits(to_crops(sets["bccd_test_images"], CROP)) / temperature)
    eng.close()
    metrics = figures(probs, sets, "test", bprobs)
    m = json.loads(path.read_text())
    m["metrics"].update({"test": metrics, "temperature_views": views})
    path.write_text(json.dumps(m, indent=2) + "\n")
    logger.info("rbc_head test: %s", json.dumps(metrics))
    return path
