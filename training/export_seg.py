"""Export the trained YOLO-seg weights to ONNX + manifest (models/seg.onnx, models/seg.json).

    python -m training.export_seg --weights build/runs/seg/weights/best.pt [--metrics eval.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from smearscope.service.analysis.records import SEG_CLASSES
from training.data import split_record, splits_record
from training.env import offline_ultralytics


def describe(meta: dict, multilab: bool) -> tuple[dict, dict[str, str]]:
    """The manifest's `training_data` and `split_hashes` from the prepared data's meta.json
    (training.prep_seg, or training.prep_labs with `multilab`): counts and hashes as prepared, and
    the split seed (training.data.splits_record)."""
    splits = meta.get("splits", {})
    if multilab:
        training_data = {
            "labs": splits,
            "recipe": "training.prep_labs (every lab tiled at 0.2 um/px; BCCD/TXL boxes with pseudo-masks, Chula "
                      "centres + classical segmentation, PBC pseudo-labels, rpi typed WBC boxes + confident "
                      "detections of a model that never saw rpi, rendered fields), training.train_seg --look (a "
                      "random lab's look then the lamp correction on every loaded tile), warm start from the "
                      "previous detector (training.recover_seg)",
            "held_out": "BCCD test, TXL-PBC test, Chula/PBC/rpi seeded val and test splits never trained on",
        }
    else:
        def n(key: str) -> object:
            return splits.get(key, {}).get("n", "?")

        training_data = {
            "bccd": f"BCCD VOC train split ({n('bccd_train')}) for training, val ({n('bccd_val')}) for model "
                    f"selection; test ({n('bccd_test_heldout')}) held out",
            "synthetic": "fine-tuned on BCCD train + rendered fields with exact masks (device/synthetic.py, "
                         "seeds 10000+) when built with prep_seg --synthetic",
            "pseudo_masks": "colour threshold inside each box bounded by the inscribed ellipse; ellipse when the "
                            "threshold does not reproduce the box; BCCD WBC pixel masks where present",
            "bccd_microns_per_pixel": meta.get("bccd_microns_per_pixel"),
        }
        pbc = splits.get("pbc_train_pseudo")
        if pbc:
            training_data["pbc_pseudo"] = (
                f"{pbc['n']} PBC train-split images (another lab; val and test held out) pseudo-labelled by "
                f"training.pbc_pseudo from {pbc.get('models', 'models')}: confident detections, violet blobs as "
                "platelets, the folder's centre cell required")
    training_data["splits"] = splits_record()
    return training_data, {k: split_record(v) for k, v in splits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("build/runs/seg/weights/best.pt"))
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--metrics", type=Path, default=None, help="JSON of measured metrics to store")
    ap.add_argument("--seg-data", type=Path, default=Path("build/seg/meta.json"))
    ap.add_argument("--illumination", choices=("none", "flatfield"), default="none",
                    help="flatfield: the model was trained on lamp-corrected tiles (prep_labs + train_seg --look)")
    ap.add_argument("--multilab", action="store_true", help="describe the training data of training.prep_labs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    offline_ultralytics()
    from smearscope.export.onnx_export import export_yolo_seg

    meta = json.loads(args.seg_data.read_text()) if args.seg_data.exists() else {}
    metrics = json.loads(args.metrics.read_text()) if args.metrics else {}
    training_data, split_hashes = describe(meta, args.multilab)
    from smearscope.engines.manifest import Preprocessing

    export_yolo_seg(
        args.weights, name="seg", imgsz=args.imgsz, classes=[k.value for k in SEG_CLASSES], metrics=metrics,
        training_data=training_data, split_hashes=split_hashes,
        out_dir=args.out, preprocessing=Preprocessing(illumination=args.illumination),
        architecture="ultralytics yolo11n-seg (yaml), trained from scratch here, fine-tuned on every lab"
        if args.multilab else None,
    )


if __name__ == "__main__":
    main()
