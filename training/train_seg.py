"""Train the YOLO instance-segmentation model from scratch (yaml, no pretrained weights).

    python -m training.prep_seg --out build/seg
    python -m training.train_seg --data build/seg/data.yaml --hours 1.0 [--resume]
    python -m training.train_seg --data build/seg/data.yaml --epochs 1 --batch 4   # a trial run

The budget is `--hours` of wall clock (ultralytics re-estimates the epochs after the first) or,
given alone, `--epochs`; neither: one hour.

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


DEFAULT_EPOCHS = 300
DEFAULT_HOURS = 1.0


def budget(epochs: int | None, hours: float | None) -> tuple[int, float | None]:
    """(epochs, hours) for ultralytics: `--hours` when given (it overrides the epochs there), else
    `--epochs` when given, else one hour. Without this, ultralytics' `time` overrode an explicit
    `--epochs 1` with the default hour."""
    if hours is not None:
        return (epochs or DEFAULT_EPOCHS), hours
    if epochs is not None:
        return epochs, None
    return DEFAULT_EPOCHS, DEFAULT_HOURS


def install_look(data_dir: Path, p_look: float = 1.0) -> None:
    """Patch ultralytics' image loading: look randomization (train) and illumination correction.

    Tiles smaller than the tile size were padded by the preparation; `valid_sizes.json` says
    which part is the field, so the pad never enters the background estimate. Each call draws
    a new look (the dataloader's worker processes inherit the patch when they fork).
    """
    import json

    import numpy as np
    from ultralytics.data import base

    from smearscope.service.analysis.illumination import correct_illumination
    from training.look import randomize_look

    sizes_file = data_dir / "valid_sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
    original = base.BaseDataset.load_image

    def load_image(self, i, rect_mode=True, resize_short=False):
        im, hw0, hw = original(self, i, rect_mode, resize_short)
        vh, vw = sizes.get(Path(self.im_files[i]).name, im.shape[:2])
        region = im[:vh, :vw]
        rng = np.random.default_rng()
        if self.augment and rng.random() < p_look:
            region = randomize_look(region, rng)
        out = im.copy()
        out[:vh, :vw] = correct_illumination(np.ascontiguousarray(region)).pixels
        return out, hw0, hw

    base.BaseDataset.load_image = load_image
    logger.info("look randomization + illumination correction installed (%d padded tiles)", len(sizes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("build/seg/data.yaml"))
    ap.add_argument("--model", default="yolo11n-seg.yaml",
                    help="architecture yaml (from scratch) or this project's own .pt to fine-tune; never a hub name")
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"epochs, when --hours is not given (with it, ultralytics sets the epochs from the time; default {DEFAULT_EPOCHS})")
    ap.add_argument("--hours", type=float, default=None,
                    help=f"wall-clock budget (overrides --epochs; default {DEFAULT_HOURS} when neither is given)")
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
    ap.add_argument("--look", action="store_true",
                    help="each loaded tile: a random lab's look (training.look), then the analyzer's "
                         "illumination correction (val tiles: the correction only); for prep_labs data")
    ap.add_argument("--look-p", type=float, default=1.0,
                    help="with --look: the share of loaded training tiles given a random look (the rest keep theirs)")
    ap.add_argument("--optimizer", default="auto",
                    help="ultralytics optimizer; 'auto' ignores --lr0 (SGD, AdamW: --lr0 is used)")
    ap.add_argument("--hsv", type=float, nargs=3, default=(0.03, 0.5, 0.3), metavar=("H", "S", "V"),
                    help="ultralytics' own HSV jitter after mosaic")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    offline_ultralytics()
    from ultralytics import YOLO

    if args.look:
        install_look(args.data.resolve().parent, args.look_p)
    last = args.project / args.name / "weights" / "last.pt"
    if args.resume and last.exists():
        YOLO(str(last)).train(resume=True, workers=args.workers)
        return
    if not (args.model.endswith(".yaml") or Path(args.model).exists()):
        raise SystemExit(f"{args.model}: give a yaml or an existing local .pt (hub names would download)")
    epochs, hours = budget(args.epochs, args.hours)
    model = YOLO(args.model)
    model.train(
        data=str(args.data.resolve()),
        imgsz=args.imgsz,
        epochs=epochs,
        time=hours,
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
        hsv_h=args.hsv[0],
        hsv_s=args.hsv[1],
        hsv_v=args.hsv[2],
        patience=1000,
        lr0=args.lr0,
        optimizer=args.optimizer,
        # ultralytics lowers the bias warm-up rate for Adam only when it picks the optimizer itself
        warmup_bias_lr=0.0 if args.optimizer in ("Adam", "AdamW") else 0.1,
        warmup_epochs=args.warmup_epochs,
        verbose=True,
    )


if __name__ == "__main__":
    main()
