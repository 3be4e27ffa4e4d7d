"""Train the YOLO instance-segmentation model from scratch (yaml, no pretrained weights).

    python -m training.prep_seg --out build/seg
    python -m training.train_seg --data build/seg/data.yaml --hours 1.0 [--resume]

Seeded, resumable (ultralytics `last.pt`), CPU-friendly defaults; `--device 0` uses a GPU.
Scale augmentation is kept small (+-15%) around the canonical scale; hue/saturation/value
augmentation stands in for stain variation.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from training.env import offline_ultralytics

logger = logging.getLogger(__name__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("build/seg/data.yaml"))
    ap.add_argument("--model", default="yolo11n-seg.yaml")
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--hours", type=float, default=1.0, help="wall-clock budget (overrides epochs)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--project", type=Path, default=Path("build/runs"))
    ap.add_argument("--name", default="seg")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    offline_ultralytics(Path("build"))
    from ultralytics import YOLO

    last = args.project / args.name / "weights" / "last.pt"
    if args.resume and last.exists():
        YOLO(str(last)).train(resume=True)
        return
    model = YOLO(args.model)
    model.train(
        data=str(args.data.resolve()),
        imgsz=args.imgsz,
        epochs=args.epochs,
        time=args.hours,
        batch=args.batch,
        device=args.device,
        workers=2,
        seed=0,
        deterministic=False,
        project=str(args.project.resolve()),
        name=args.name,
        exist_ok=True,
        plots=False,
        amp=False,
        scale=0.15,
        degrees=90.0,
        flipud=0.5,
        fliplr=0.5,
        hsv_h=0.03,
        hsv_s=0.5,
        hsv_v=0.3,
        patience=1000,
        verbose=True,
    )


if __name__ == "__main__":
    main()
