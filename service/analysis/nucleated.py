"""Stage 7b: red-cell detections with a nucleus get a second opinion from the WBC head.

A small lymphocyte is the size and shape of a red cell. On a pale, low-resolution camera (the
Raspberry Pi station `chula_wbc_rpi`) the detector called most of them red cells: on its
validation fields at the given scale 13 of 16 lymphocytes were counted as red cells, so the white
count and the differential lost them. A red cell has no nucleus. What tells them apart, whatever
the stain and the lamp, is how much red light the cell's interior absorbs compared with the
field's other red cells: a Romanowsky-stained nucleus absorbs red light strongly, haemoglobin
hardly at all. So:

1. per red-cell detection, the median red-channel optical density inside its mask
   (`interior_density`), over the median of the field's red-cell detections (at least
   `MIN_REFERENCE_RBC` of them);
2. a detection at `DENSE_INTERIOR` or more times that is cropped as a white cell and typed by the
   WBC head together with the field's white cells;
3. it is re-counted only when the head types it, at the head's own confidence and within its
   open-set tests, as a cell its size allows (`accepts`): a nucleated cell of red-cell size
   (`RBC_SIZED_NUCLEATED`: a lymphocyte, or an erythroblast, counted as a nucleated red cell) no
   wider than the largest lymphocyte (`size_gate.MAX_LYMPHOCYTE_DIAMETER_UM`), or a granulocyte or
   monocyte at least `MIN_LARGER_NUCLEATED_UM` wide, larger than a red cell can be; otherwise it
   stays a red cell. The frame must be lamp-corrected (densities are read against its white).

Chosen on validation (given scale, 40 fields per lab, the committed models of 2026-12-03): at
1.8 x the field's median, 9 of the 12 rpi white cells the detector had called red cells were
re-counted as lymphocytes, and none of the 5 881 red-cell detections of BCCD, the three TXL-PBC
sources and Chula RBC-12 (the other candidates there were typed unidentified, eosinophil or
neutrophil, which are not of red-cell size, and stayed red cells). At 1.5 x, 2 rpi red cells
became lymphocytes, and 7 of BCCD, TXL-PBC 360 and Chula.

Granulocytes and monocytes: at an estimated scale the station's scale reads about 13 % low, its
white cells shrink with it, and 4 of its validation neutrophils and eosinophils were counted as
red cells (8.9 to 10.1 um wide); the WBC head typed them right. The 5 red-cell detections of the
other labs (and 1 of rpi) it typed eosinophil or neutrophil were 3.3 to 8.4 um wide: a red cell's
size (6 to 9 um), not a granulocyte's (10 to 15 um). So those types are taken from 8.8 um up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from smearscope.service.analysis.classify import HeadResult
from smearscope.service.analysis.records import CellCrop, CellDetection
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX

#: A detection whose interior absorbs this many times the field's median red cell is re-checked.
DENSE_INTERIOR = 1.8
#: The field's median needs at least this many red-cell detections with masks to be a reference.
MIN_REFERENCE_RBC = 10
#: WBC-head labels of nucleated cells the size of a red cell: the ones a detector mistakes for red cells.
RBC_SIZED_NUCLEATED = frozenset({"lymphocyte", "erythroblast"})
#: WBC-head labels of white cells larger than a red cell, taken only from this width (um) up.
LARGER_NUCLEATED = frozenset({"neutrophil", "eosinophil", "basophil", "monocyte", "ig"})
MIN_LARGER_NUCLEATED_UM = 8.8
#: The white point the lamp correction brings glass to (illumination.TARGET_WHITE) + 1.
_WHITE = 236.0


def interior_density(frame_bgr: np.ndarray, crop: CellCrop) -> float | None:
    """Median red-channel optical density inside the detection's mask (None without a mask)."""
    return interior_densities(frame_bgr, [crop])[0]


def _inside_red(frame_bgr: np.ndarray, det: CellDetection) -> np.ndarray | None:
    """The red channel's 8-bit values under the detection's mask (None without a mask)."""
    m = det.mask
    if m is None:
        return None
    x0, y0 = math.floor(det.box.x0), math.floor(det.box.y0)  # the mask's origin (merge.mask_window)
    mx, my = max(0, -x0), max(0, -y0)  # a box reaching past the frame's top or left
    x0, y0 = max(0, x0), max(0, y0)
    red = frame_bgr[y0:y0 + m.shape[0] - my, x0:x0 + m.shape[1] - mx, 2]
    return red[m[my:my + red.shape[0], mx:mx + red.shape[1]].astype(bool, copy=False)]


def interior_densities(frame_bgr: np.ndarray, crops: Sequence[CellCrop]) -> list[float | None]:
    """`interior_density` of each crop, the medians of all of them from one 2-D histogram.

    The median of the optical density is the optical density of the median intensity, so it is
    taken on the 8-bit red channel as stored, from the values' histogram (np.median sorts: 5x
    slower per cell); one histogram row per cell (np.bincount of cell * 256 + value) serves the
    whole field at once."""
    values = [_inside_red(frame_bgr, c.detection) for c in crops]
    measured = [k for k, v in enumerate(values) if v is not None and v.size]
    out: list[float | None] = [None] * len(crops)
    if not measured:
        return out
    sizes = np.array([values[k].size for k in measured])
    cell = np.repeat(np.arange(len(measured)), sizes)
    flat = np.concatenate([values[k] for k in measured]).astype(np.int64)
    cum = np.bincount(cell * 256 + flat, minlength=len(measured) * 256).reshape(-1, 256).cumsum(axis=1)
    n = cum[:, -1]
    # searchsorted(cum, k, side="right") per row: the first value whose cumulative count exceeds k
    lo = np.argmax(cum > ((n - 1) // 2)[:, None], axis=1)
    hi = np.argmax(cum > (n // 2)[:, None], axis=1)
    r = (lo + hi) / 2.0
    dens = -np.log(np.minimum(r + 1.0, _WHITE) / _WHITE)
    for k, d in zip(measured, dens.tolist()):
        out[k] = d
    return out


def dense_interiors(frame_bgr: np.ndarray, rbc: Sequence[CellCrop], ratio: float = DENSE_INTERIOR,
                    min_reference: int = MIN_REFERENCE_RBC) -> list[int]:
    """Indices into `rbc` of the detections whose interior is `ratio` times as dense as the field's
    median red cell; none when fewer than `min_reference` detections can be measured."""
    dens = interior_densities(frame_bgr, rbc)
    known = [v for v in dens if v is not None]
    if len(known) < min_reference:
        return []
    ref = float(np.median(known))
    if ref <= 0.0:
        return []
    return [i for i, v in enumerate(dens) if v is not None and v >= ratio * ref]


def diameter_um(det: CellDetection) -> float:
    """Equivalent-area diameter of the detection's outline at the canonical scale."""
    return det.diameter_px * CANONICAL_UM_PER_PX


def accepts(result: HeadResult, det: CellDetection, max_rbc_sized_um: float | None = None) -> bool:
    """The WBC head's result turns the red-cell detection `det` into a white (or nucleated red)
    cell: a type whose size the detection's size allows (module doc). `label` is already
    `unidentified` below the head's confidence or beyond its open-set tests."""
    if result.atypical:
        return False
    if result.label in RBC_SIZED_NUCLEATED:
        return max_rbc_sized_um is None or diameter_um(det) <= max_rbc_sized_um
    return result.label in LARGER_NUCLEATED and diameter_um(det) >= MIN_LARGER_NUCLEATED_UM
