"""Draw each counted cell's outline and label on the input image, for a human to check.

Candidates (plausible cells the detector saw below the counting threshold; `FieldResult.candidates`)
are drawn as corner brackets in their kind's colour, without a label: where the analyzer
hesitated, for the technician to look at; they are not in the counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from smearscope.service.analysis.records import CellDetection, CellKind, ClassifiedCell

COLOURS = {CellKind.RBC: (40, 40, 220), CellKind.WBC: (220, 80, 20), CellKind.PLATELET: (30, 170, 30),
           CellKind.NRBC: (200, 40, 200), CellKind.ARTEFACT: (128, 128, 128)}
#: Length of a candidate's corner brackets, as a fraction of its box side.
BRACKET = 0.3


def draw_overlay(image_bgr: np.ndarray, cells: Sequence[ClassifiedCell], input_to_canonical: float,
                 candidates: Sequence[CellDetection] = ()) -> np.ndarray:
    out = image_bgr.copy()
    inv = 1.0 / input_to_canonical
    thick = max(1, round(min(out.shape[:2]) / 400))
    for d in candidates:
        b = d.box.scaled(inv)
        x0, y0, x1, y1 = int(b.x0), int(b.y0), int(b.x1), int(b.y1)
        dx, dy = max(2, int((x1 - x0) * BRACKET)), max(2, int((y1 - y0) * BRACKET))
        for cx, cy, sx, sy in ((x0, y0, 1, 1), (x1, y0, -1, 1), (x0, y1, 1, -1), (x1, y1, -1, -1)):
            cv2.line(out, (cx, cy), (cx + sx * dx, cy), COLOURS[d.kind], 1, cv2.LINE_AA)
            cv2.line(out, (cx, cy), (cx, cy + sy * dy), COLOURS[d.kind], 1, cv2.LINE_AA)
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
            scale = 0.35 * thick + 0.05
            at = label_origin(text, scale, thick, (int(b.x0), int(b.y0) - 3), out.shape)
            cv2.putText(out, text, at, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)
    return out


def label_origin(text: str, scale: float, thick: int, at: tuple[int, int], shape: tuple[int, ...]) -> tuple[int, int]:
    """Where to put a label's baseline so the whole label lies in the image: `at` (above its cell's
    box), moved left at the right edge and down at the top; a cell at the frame's edge kept its label
    cut to `hypo` or `neutrophi` otherwise."""
    (width, height), descent = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x = max(0, min(at[0], shape[1] - width))
    y = max(height, min(at[1], shape[0] - descent - 1))
    return x, y


def draw_numbered(image_bgr: np.ndarray, cells: Sequence[ClassifiedCell], input_to_canonical: float) -> np.ndarray:
    """Each cell's box and its number (1, 2, ... in the given order) on the input image: the rows
    of `smearscope adapt-wbc --template`, for a technician to type."""
    out = image_bgr.copy()
    inv = 1.0 / input_to_canonical
    thick = max(1, round(min(out.shape[:2]) / 400))
    for n, c in enumerate(cells, start=1):
        b = c.detection.box.scaled(inv)
        colour = COLOURS[c.detection.kind]
        cv2.rectangle(out, (int(b.x0), int(b.y0)), (int(b.x1), int(b.y1)), colour, thick)
        scale = 0.5 * thick + 0.1
        at = label_origin(str(n), scale, thick + 1, (int(b.x0) + 2, int(b.y0) - 4), out.shape)
        cv2.putText(out, str(n), at, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick + 1, cv2.LINE_AA)
    return out
