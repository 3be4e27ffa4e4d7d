"""Export the trained YOLO-seg weights to ONNX + manifest (models/seg.onnx, models/seg.json).

    python -m training.export_seg --weights build/runs/seg/weights/best.pt [--metrics eval.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from smearscope.service.analysis.records import SEG_CLASSES
from training.env import offline_ultralytics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("build/runs/seg/weights/best.pt"))
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--metrics", type=Path, default=None, help="JSON of measured metrics to store")
    ap.add_argument("--seg-data", type=Path, default=Path("build/seg/meta.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    offline_ultralytics(Path("build"))
    from smearscope.export.onnx_export import export_yolo_seg

    meta = json.loads(args.seg_data.read_text()) if args.seg_data.exists() else {}
    metrics = json.loads(args.metrics.read_text()) if args.metrics else {}
    training_data = {
        "bccd": "BCCD VOC train split (205) for training, val (87) for model selection; test (72) held out",
        "synthetic": "fine-tuned on BCCD train + rendered fields with exact masks (device/synthetic.py, "
                     "seeds 10000+) when built with prep_seg --synthetic",
        "pseudo_masks": "colour threshold inside each box bounded by the inscribed ellipse; ellipse when the "
                        "threshold does not reproduce the box; BCCD WBC pixel masks where present",
        "bccd_microns_per_pixel": meta.get("bccd_microns_per_pixel"),
    }
    pbc = meta.get("splits", {}).get("pbc_train_pseudo")
    if pbc:
        training_data["pbc_pseudo"] = (
            f"{pbc['n']} PBC train-split images (another lab; val and test held out) pseudo-labelled by "
            f"training.pbc_pseudo from {pbc.get('models', 'models')}: confident detections, violet blobs as "
            "platelets, the folder's centre cell required")
    export_yolo_seg(
        args.weights, name="seg", imgsz=args.imgsz, classes=[k.value for k in SEG_CLASSES], metrics=metrics,
        training_data=training_data,
        split_hashes={k: v.get("hash") or (f"seeds {v['seeds'][0]}..{v['seeds'][1]}" if "seeds" in v else f"n={v.get('n')}")
                      for k, v in meta.get("splits", {}).items()},
        out_dir=args.out,
    )


if __name__ == "__main__":
    main()
