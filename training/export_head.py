"""Export a multi-lab head (training.train_wbc / train_rbc run) with its calibration, and measure it.

    python -m training.export_head --head wbc --run build/wbc/wbc --out models
    python -m training.export_head --head rbc --run build/rbc/rbc --out models

Everything is fitted on validation for the test-time views the manifest names (logits and, for the
WBC head, open-set distances averaged over the views, as the analyzer averages them): the
temperature, and the open-set threshold (the strictest training lab's `--ood-quantile`). The
Mahalanobis class means and shared covariance come from the training crops. The exported ONNX
is then measured through the analyzer's own classifier (`CropClassifier` on ONNX Runtime) on
every lab's test crops, and the figures go into the manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from smearscope.engines.manifest import OpenSet, Preprocessing
from smearscope.service.analysis.tta import view_crops
from training.data import splits_record
from training.metrics import fit_temperature, per_lab_report
from training.train_head import Deployable, build_net
from training.train_wbc import OpenSetHead, features, fit_mahalanobis, mahalanobis_min

logger = logging.getLogger(__name__)


def _views_features(model: Deployable, crops: np.ndarray, views: list[str]) -> tuple[np.ndarray, np.ndarray]:
    feats, logits = zip(*(features(model, view_crops(crops, v)) for v in views))
    return np.stack(feats), np.mean(logits, axis=0)


def export_wbc(run: Path, out: Path, views: list[str], quantile: float, run_open_set: bool = False) -> Path:
    from smearscope.engines.registry import create_engine
    from smearscope.export.onnx_export import export_classifier
    from smearscope.service.analysis.classify import CropClassifier
    from smearscope.service.analysis.crops import WBC_CROP
    from training import head_data as hd
    from training.head_data import PBC_CLASSES
    from training.wbc_data import load_contexts, to_crops

    state = torch.load(run / "best.pt", weights_only=False, map_location="cpu")
    model = Deployable(build_net(state["arch"], len(PBC_CLASSES)))
    model.load_state_dict(state["model"])
    model.eval()
    train, val, test = (load_contexts(s) for s in ("train", "val", "test"))
    val_crops, test_crops = to_crops(val.images), to_crops(test.images)
    vfeats, vlogits = _views_features(model, val_crops, views)
    if run_open_set:
        # the run's own fit (train_wbc: only the labs and classes it trained on), e.g. for a head
        # held out of a lab, whose means must not have seen that lab
        z = np.load(run / "open_set.npz")
        means, precision = z["means"], z["precision"]
        temperature, threshold = float(z["temperature"]), float(z["threshold"])
        per_lab_q = {}
    else:
        tf, _ = features(model, to_crops(train.images))
        means, precision = fit_mahalanobis(tf, train.labels, len(PBC_CLASSES))
        present = np.ones(len(PBC_CLASSES), bool)
        temperature = fit_temperature(vlogits, val.labels)
        vd = np.mean([mahalanobis_min(f, means, precision, present) for f in vfeats], axis=0)
        per_lab_q = {lab: float(np.quantile(vd[val.labs == lab], quantile)) for lab in sorted(set(val.labs.tolist()))}
        threshold = max(per_lab_q.values())
    head = OpenSetHead(model, means, precision).eval()
    open_set = OpenSet(method="mahalanobis", output="ood", threshold=threshold,
                       calibration=(f"largest per-lab {quantile:.2f} quantile of validation distances (views "
                                    f"{'+'.join(views)} averaged): {json.dumps({k: round(v, 1) for k, v in per_lab_q.items()})}"
                                    if per_lab_q else f"the run's own (train_wbc, {run.name}/open_set.npz)"))
    run_result = json.loads((run / "result.json").read_text()) if (run / "result.json").exists() else {}
    defocused = bool(run_result.get("defocus"))  # train_wbc --defocus
    # train_wbc --red-negatives (runs before the key was written carry only its test figure)
    red_negatives = bool(run_result.get("red_negatives") or "test_red_as_nucleated" in run_result)
    path = export_classifier(
        head, name="wbc_head", classes=list(PBC_CLASSES), crop=WBC_CROP, arch=state["arch"], temperature=temperature,
        metrics={}, out_dir=out, open_set=open_set, preprocessing=Preprocessing(illumination="flatfield"), tta=views,
        architecture=f"timm {state['arch']} with an in-graph Mahalanobis open-set score; trained from scratch here "
                     "(PBC + BCCD), fine-tuned on three labs with look randomization"
                     + (", then with out-of-focus looks" if defocused else "")
                     + (" and red cells as negatives" if red_negatives else ""),
        training_data={"labs": "PBC (CellaVision, 8 classes, seeded 80/10/10), BCCD (typed single-WBC images, VOC "
                               "split), chula_wbc_rpi (Raspberry Pi station, typed boxes, seeded 70/15/15 by blocks of "
                               "frames)", "recipe": "training.train_wbc (lab-balanced batches, random lab looks, lamp "
                                                    "correction, the analyzer's crops; kept: best worst-lab val macro-F1)"
                                                    + ("; --defocus: crops also out of focus, the labs' val out of "
                                                       "focus joining the worst" if defocused else "")
                                                    + ("; --red-negatives: annotated BCCD and TXL-PBC red cells "
                                                       "(training.wbc_negatives) trained toward the uniform "
                                                       "distribution, val red cells typed lymphocyte or erythroblast "
                                                       "joining the worst" if red_negatives else ""),
                       "run": str(run), "run_result": run_result, "splits": splits_record()},
        split_hashes=hd.split_manifest())
    # Measure the exported file the way the analyzer runs it.
    eng = create_engine("onnxruntime", path).load()
    clf = CropClassifier(eng, 0.5)
    logits, dist = clf.outputs(test_crops)
    val_logits, _ = clf.outputs(val_crops)
    eng.close()
    from smearscope.service.analysis.classify import softmax

    probs = softmax(logits / temperature)
    pred = probs.argmax(1)
    review = (probs.max(1) < 0.5) | (dist[:, 0] > threshold)  # the Mahalanobis test (the first)
    final = np.where(review, -1, pred)
    metrics = {"val_closed_set": per_lab_report(val.labels, val_logits.argmax(1), val.labs, len(PBC_CLASSES)),
               "test_closed_set": per_lab_report(test.labels, pred, test.labs, len(PBC_CLASSES)),
               "test_with_review": per_lab_report(test.labels, final, test.labs, len(PBC_CLASSES)),
               "test_review_rate": {lab: round(float(review[test.labs == lab].mean()), 4)
                                    for lab in sorted(set(test.labs.tolist()))},
               "temperature_views": views}
    m = json.loads(path.read_text())
    m["metrics"].update(metrics)
    path.write_text(json.dumps(m, indent=2) + "\n")
    logger.info("wbc_head test: %s", json.dumps(metrics))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", choices=("wbc", "rbc"), required=True)
    ap.add_argument("--run", type=Path, nargs="+", required=True,
                    help="RBC: several runs export the mean of their logits as one head (training.ensemble_rbc)")
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--views", default="identity,hflip")
    ap.add_argument("--ood-quantile", type=float, default=0.95)
    ap.add_argument("--run-open-set", action="store_true",
                    help="WBC: class means, precision, temperature and threshold from the run's open_set.npz (fitted "
                         "only on the labs it trained on) instead of refitting them on every lab's train split")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    if args.head == "wbc":
        if len(args.run) > 1:
            ap.error("--run: one WBC run")
        export_wbc(args.run[0], args.out, args.views.split(","), args.ood_quantile, args.run_open_set)
    else:
        from training.train_rbc import export_rbc

        export_rbc(args.run, args.out, args.views.split(","))


if __name__ == "__main__":
    main()
