"""The frame quality gate's empty-field metrics on every lab's held-out fields.

    PYTHONPATH=. python -m training.quality_gate [--split val|test] [--labs bccd,chula]

Each field goes through a fresh `QualityGate` (no same-field reference) at its lab's known scale
and at an unknown one (a fixed width, as an uncalibrated station measures it). Per lab: the
smallest stained and material fractions, and the fields refused as empty_field by the stain
saturation alone and by the gate (stained or material). Choose thresholds on `val` only.
"""

from __future__ import annotations

import argparse
import logging

import cv2
import numpy as np

from smearscope.device.frame import Frame
from smearscope.device.quality import EMPTY_FIELD, QualityGate
from training.lab_table import lab_images
from training.labs import DETECTOR_LABS

logger = logging.getLogger(__name__)


def lab_rows(lab: str, split: str) -> list[dict[str, object]]:
    """One row per field and scale mode: its metrics and the gate's reason."""
    rows: list[dict[str, object]] = []
    for im in lab_images(lab, split):
        pixels = cv2.imread(str(im.path))
        for mode, mpp in (("given", im.known_mpp), ("unknown", None)):
            verdict = QualityGate().check(Frame(pixels, im.path.name, lab, microns_per_pixel=mpp))
            rows.append({"field": im.path.name, "mode": mode, "reason": verdict.reason, **verdict.metrics})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--labs", default=",".join(DETECTOR_LABS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # not the unknown-scale warning per gate
    gate = QualityGate().config
    print(f"split {args.split}: stain_saturation {gate.stain_saturation}, min_stained_fraction "
          f"{gate.min_stained_fraction}; material_density {gate.material_density} over "
          f"{gate.glass_window_microns} um, min_material_fraction {gate.min_material_fraction}")
    print(f"{'lab':9} {'scale':8} {'fields':>6} {'min stained':>11} {'min material':>12} "
          f"{'p5 material':>11} {'empty (stain only)':>18} {'empty (gate)':>12}")
    for lab in args.labs.split(","):
        rows = lab_rows(lab, args.split)
        for mode in ("given", "unknown"):
            sel = [r for r in rows if r["mode"] == mode]
            stained = np.array([r["stained_fraction"] for r in sel], float)
            material = np.array([r["material_fraction"] for r in sel], float)
            stain_only = int(np.sum(stained < gate.min_stained_fraction))
            empty = sum(r["reason"] == EMPTY_FIELD for r in sel)
            print(f"{lab:9} {mode:8} {len(sel):6d} {stained.min():11.3f} {material.min():12.3f} "
                  f"{np.percentile(material, 5):11.3f} {stain_only:18d} {empty:12d}")
            for r in sel:
                if r["reason"] == EMPTY_FIELD:
                    print(f"    empty_field: {r['field']} stained {r['stained_fraction']:.3f} "
                          f"material {r['material_fraction']:.3f}")


if __name__ == "__main__":
    main()
