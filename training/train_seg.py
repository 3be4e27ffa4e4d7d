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
    ap.add_argument("--model", default="yolo11n-seg.yaml",
                    help="architecture yaml (from scratch) or this project's own .pt to fine-tune; never a hub name")
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--hours", type=float, default=1.0, help="wall-clock budget (overrides epochs)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--project", type=Path, default=Path("build/runs"))
    ap.add_argument("--name", default="seg")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lr0", type=float, default=0.01, help="initial learning rate (lower to fine-tune)")
    ap.add_argument("--warmup-epochs", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=2, help="data-loader processes")
    ap.add_argument("--cache", choices=("none", "ram", "disk"), default="none",
                    help="decode the (small, canonical-scale) training images once")
    ap.add_argument("--copy-paste", type=float, default=0.0,
                    help="probability of pasting segmented instances between images")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    offline_ultralytics(Path("build"))
    from ultralytics import YOLO

    last = args.project / args.name / "weights" / "last.pt"
    if args.resume and last.exists():
        YOLO(str(last)).train(resume=True)
        return
    if not (args.model.endswith(".yaml") or Path(args.model).exists()):
        raise SystemExit(f"{args.model}: give a yaml or an existing local .pt (hub names would download)")
    model = YOLO(args.model)
    model.train(
        data=str(args.data.resolve()),
        imgsz=args.imgsz,
        epochs=args.epochs,
        time=args.hours,
        batch=args.batch,
        device=args.device,
        workers=args.workers,
        cache=False if args.cache == "none" else args.cache,
        copy_paste=args.copy_paste,
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
        lr0=args.lr0,
        warmup_epochs=args.warmup_epochs,
        verbose=True,
    )


if __name__ == "__main__":
    main()
