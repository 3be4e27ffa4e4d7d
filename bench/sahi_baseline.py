"""The usual libraries' way, for bench.bench_pipeline: SAHI sliced prediction with Ultralytics and
the committed detector, then the two heads in a per-crop loop.

    .venv-bench/bin/python -m bench.sahi_baseline --models models   # a worker: JSON lines on stdin

Runs in the `bench` extra's interpreter (sahi, ultralytics, torch, onnxruntime), never in the
analyzer's: it imports nothing from smearscope (training.env, its offline set-up of ultralytics,
imports only the standard library). The comparison is made generous to the usual
libraries in one respect: the frame is resampled to the analyzer's 0.2 um/px first (the detector
only knows that scale), and SAHI slices as the analyzer tiles (256 px, 15 % overlap). Two
variants: `defaults` is `get_sliced_prediction` as its documentation shows it (one slice per
inference, plus SAHI's standard full-frame pass), `tuned` slices in batches of 16 without the
full-frame pass (a 256 px model sees little in a whole frame shrunk to 256 px). Both merge with
SAHI's default (greedy NMM on IoS 0.5); each red or white cell found is then cut with the heads'
own crop geometry and classified one crop at a time in one view.

    .venv-bench/bin/python -m bench.sahi_baseline --variant defaults|tuned

Protocol: one JSON object per line on stdin, {"path": frame .npy (BGR uint8), "mpp": um/px};
one per line on stdout, {"ms": wall time, "cells": cells found, "classified": crops classified}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from training.env import CONFIG_DIR, offline_ultralytics

logger = logging.getLogger(__name__)

CANONICAL_UM_PER_PX = 0.2
TILE, OVERLAP = 256, 0.15


class Head:
    """One classifier head run the plain way: one crop, one session call."""

    def __init__(self, manifest_path: Path) -> None:
        import onnxruntime as ort

        m = json.loads(manifest_path.read_text())
        self.session = ort.InferenceSession(str(manifest_path.parent / m["file"]), providers=["CPUExecutionProvider"])
        self.input = m["inputs"][0]["name"]
        self.extent_px = round(m["crop"]["extent_um"] / CANONICAL_UM_PER_PX)
        self.size = m["crop"]["input_size"]
        self.scale = m["preprocessing"]["scale"]

    def classify(self, image_bgr: np.ndarray, cx: float, cy: float) -> int:
        side = self.extent_px
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        h, w = image_bgr.shape[:2]
        crop = image_bgr[max(0, y0) : min(h, y0 + side), max(0, x0) : min(w, x0 + side)]
        crop = cv2.copyMakeBorder(crop, max(0, -y0), max(0, y0 + side - h), max(0, -x0), max(0, x0 + side - w),
                                  cv2.BORDER_REPLICATE)
        crop = cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_AREA)
        x = (crop[..., ::-1].astype(np.float32) * self.scale).transpose(2, 0, 1)[None]
        logits = self.session.run(None, {self.input: np.ascontiguousarray(x)})[0]
        return int(logits.argmax())


class SahiPipeline:
    def __init__(self, models: Path, variant: str) -> None:
        from sahi import AutoDetectionModel

        self.variant = variant
        self.detector = AutoDetectionModel.from_pretrained(
            model_type="ultralytics", model_path=str(models / "seg.onnx"), task="segment",
            confidence_threshold=0.25, device="cpu", image_size=TILE)
        self.heads = {"rbc": Head(models / "rbc_head.json"), "wbc": Head(models / "wbc_head.json")}

    def run(self, frame_bgr: np.ndarray, mpp: float) -> tuple[int, int]:
        from sahi.predict import get_sliced_prediction

        factor = mpp / CANONICAL_UM_PER_PX
        h, w = frame_bgr.shape[:2]
        canonical = cv2.resize(frame_bgr, (max(1, round(w * factor)), max(1, round(h * factor))),
                               interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        result = get_sliced_prediction(
            np.ascontiguousarray(canonical[..., ::-1]), self.detector, slice_height=TILE, slice_width=TILE,
            overlap_height_ratio=OVERLAP, overlap_width_ratio=OVERLAP,
            perform_standard_pred=self.variant == "defaults", batch_size=1 if self.variant == "defaults" else 16,
            verbose=0)
        classified = 0
        for pred in result.object_prediction_list:
            head = self.heads.get(pred.category.name)
            if head is not None:
                b = pred.bbox
                head.classify(canonical, (b.minx + b.maxx) / 2, (b.miny + b.maxy) / 2)
                classified += 1
        return len(result.object_prediction_list), classified


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help="ultralytics' settings folder")
    ap.add_argument("--variant", choices=("defaults", "tuned"), default="tuned")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # The libraries print progress to stdout; the protocol keeps stdout to itself.
    protocol, sys.stdout = sys.stdout, sys.stderr
    offline_ultralytics(args.config_dir)
    pipeline = SahiPipeline(args.models, args.variant)
    print(json.dumps({"ready": True}), file=protocol, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        frame = np.load(job["path"])
        t = time.perf_counter()
        cells, classified = pipeline.run(frame, float(job["mpp"]))
        ms = (time.perf_counter() - t) * 1000
        print(json.dumps({"ms": ms, "cells": cells, "classified": classified}), file=protocol, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
