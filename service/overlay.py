"""Draw each counted cell's outline and label on the input image, for a human to check."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from service.records import CellKind, ClassifiedCell

COLOURS = {CellKind.RBC: (40, 40, 220), CellKind.WBC: (220, 80, 20), CellKind.PLATELET: (30, 170, 30)}


def draw_overlay(image_bgr: np.ndarray, cells: Sequence[ClassifiedCell], input_to_canonical: float) -> np.ndarray:
    out = image_bgr.copy()
    inv = 1.0 / input_to_canonical
    thick = max(1, int(round(min(out.shape[:2]) / 400)))
    for c in cells:
        d = c.detection
        colour = COLOURS[d.kind]
        if d.mask is not None and d.mask.any():
            contours, _ = cv2.findContours(d.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            pts = [((cnt.astype(np.float64) + [int(d.box.x0), int(d.box.y0)]) * inv).astype(np.int32) for cnt in contours]
            cv2.polylines(out, pts, True, colour, thick, cv2.LINE_AA)
        else:
            b = d.box.scaled(inv)
            cv2.rectangle(out, (int(b.x0), int(b.y0)), (int(b.x1), int(b.y1)), colour, thick)
        if d.kind is not CellKind.RBC or (c.label and c.label != "normal"):
            text = c.label or d.kind.value
            b = d.box.scaled(inv)
            cv2.putText(out, text, (int(b.x0), max(10, int(b.y0) - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.35 * thick + 0.05, colour, thick, cv2.LINE_AA)
    return out
