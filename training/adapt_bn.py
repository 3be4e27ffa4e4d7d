"""A WBC head trained without a lab, adapted to that lab's look by its BatchNorm statistics alone.

    python -m training.adapt_bn build/wbc/wbc_no_rpi_init [--cells 50,100,200,0] [--json out.json]

Test-time BatchNorm adaptation (AdaBN, Li et al. 2016): every BatchNorm layer's running mean and
variance are re-estimated on a new station's own cells, unlabelled, and nothing else changes. A
station could do this on its first normal specimens. Measured leave-one-lab-out: the run was
trained without lab X (`training.train_wbc --exclude-lab X`); its statistics are re-estimated on
the first N crops of X's validation split (the seeded split; N = 0: all of them), and X's test
cells are typed (closed set: accuracy and macro-F1 over the classes X has) before and after. The
other labs' test figures after adapting to X say what the adapted head would cost them (an
adapted head is the station's, never shipped to another lab). Variants: every BatchNorm layer
(`all`), or only the stem and the first stage (`early`: colour, illumination, texture).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch

from training.metrics import per_lab_report, softmax
from training.train_head import Deployable, build_net, to_tensor
from training.train_wbc import features, mahalanobis_min
from training.wbc_data import load_contexts, to_crops

logger = logging.getLogger(__name__)


def adapted(model: Deployable, crops: np.ndarray, layers: str = "all", batch: int = 128) -> Deployable:
    """A copy of `model` whose BatchNorm statistics (all, or the stem's and first stage's) are those
    of `crops` (cumulative average over batches; weights untouched)."""
    out = copy.deepcopy(model)
    net = out.net
    early = {id(m) for part in (net.conv1, net.bn1, net.layer1) for m in part.modules()}
    chosen = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) and (layers == "all" or id(m) in early)]
    for m in chosen:
        m.reset_running_stats()
        m.momentum = None  # cumulative: every batch counts alike
    out.eval()
    for m in chosen:
        m.train()
    with torch.inference_mode():
        for i in range(0, len(crops), batch):
            x = to_tensor(crops[i:i + batch])
            out(x)
    out.eval()
    return out


def load_run(run: Path, lab: str | None = None, threads: int = 2) -> tuple[Deployable, list[str], str]:
    """A `train_wbc` run's best weights (in eval mode), its classes, and the lab held out of it
    (`lab`, or the run's --exclude-lab); torch on `threads` threads, seeded."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    state = torch.load(run / "best.pt", weights_only=False, map_location="cpu")
    classes = list(state["classes"])
    model = Deployable(build_net(state["arch"], len(classes)))
    model.load_state_dict(state["model"])
    model.eval()
    result_file = run / "result.json"
    lab = lab or (json.loads(result_file.read_text()).get("exclude_lab") if result_file.exists() else None)
    if lab is None:
        raise SystemExit("no --lab and the run names no held-out lab")
    return model, classes, lab


def figures(model: Deployable, crops: np.ndarray, labels: np.ndarray, labs: np.ndarray, n_classes: int,
            open_set: dict | None = None) -> dict:
    """Closed-set accuracy and macro-F1 per lab; with the run's open-set fit (temperature,
    Mahalanobis means, precision and threshold: open_set.npz), also the share of each lab's cells
    sent to review (top probability under 0.5 or distance beyond the threshold)."""
    feats, logits = features(model, crops)
    out = per_lab_report(labels, logits.argmax(1), labs, n_classes)
    if open_set is not None:
        conf = softmax(logits / float(open_set["temperature"])).max(1)
        present = np.ones(n_classes, bool)
        dist = mahalanobis_min(feats, open_set["means"], open_set["precision"], present)
        review = (conf < 0.5) | (dist > float(open_set["threshold"]))
        for lab in out:
            out[lab]["review"] = round(float(review[labs == lab].mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--lab", default=None, help="the held-out lab (default: the run's --exclude-lab)")
    ap.add_argument("--cells", default="20,0", help="how many of the lab's unlabelled crops adapt (0: all)")
    ap.add_argument("--pool", default="val", help="the lab's splits whose crops (unlabelled) adapt: val, or val,train "
                    "(a held-out lab's train split is as unseen by the run as its validation split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, classes, lab = load_run(args.run, args.lab, args.threads)
    pools = [load_contexts(s) for s in args.pool.split(",")]
    val_crops = np.concatenate([to_crops(p.images[p.labs == lab]) for p in pools])
    test = load_contexts("test")
    test_crops = to_crops(test.images)
    osf = args.run / "open_set.npz"
    open_set = dict(np.load(osf)) if osf.exists() else None
    rows = {"before": figures(model, test_crops, test.labels, test.labs, len(classes), open_set)}
    for layers in ("all", "early"):
        for n in (int(v) for v in args.cells.split(",")):
            use = val_crops if n <= 0 else val_crops[:n]
            rows[f"{layers} n={len(use)}"] = figures(adapted(model, use, layers), test_crops, test.labels, test.labs,
                                                     len(classes), open_set)
    print(f"\nWBC head {args.run.name} (trained without {lab}), adapted on {lab}'s {args.pool} crops; test, "
          "accuracy / macro-F1 (/ share to review, with the run's unadapted open-set fit) per lab:")
    labs = sorted(rows["before"])
    print("| BatchNorm statistics | " + " | ".join(labs) + " |")
    print("|---|" + "---|" * len(labs))
    for name, rep in rows.items():
        print(f"| {name} | " + " | ".join(f"{rep[k]['accuracy']:.3f} / {rep[k]['macro_f1']:.3f}"
                                          + (f" / {rep[k]['review']:.3f}" if "review" in rep[k] else "") for k in labs) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps({"run": str(args.run), "lab": lab, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
