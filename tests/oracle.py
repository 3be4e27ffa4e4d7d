"""An oracle `Segmenter` for tests: returns the ground truth of a synthetic field, tile by tile.

Each tile sees exactly what a perfect detector would see through that window: every true cell
that reaches into the tile, clipped to the tile (a cell cut by a tile edge comes back as its
visible part), in frame coordinates, with `cut_by_tile_edge` from the real
`service.analysis.segment.touches_interior_tile_edge` and the truth mask cropped to the clipped box.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from smearscope.device.synthetic import SyntheticField
from smearscope.service.analysis.records import Box, CellDetection, CellKind, Tile
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX
from smearscope.service.analysis.segment import touches_interior_tile_edge

logger = logging.getLogger(__name__)


class OracleSegmenter:
    """Ground truth as detections. The field must be rendered at the canonical scale, so that
    its pixels are the canonical frame's pixels. Implements `Segmenter`: one view, and scores
    that are final already (`calibrate` and `finish` change nothing)."""

    views: tuple[str, ...] = ("identity",)

    def __init__(self, field: SyntheticField) -> None:
        mpp = field.frame.microns_per_pixel
        if mpp is None or abs(mpp - CANONICAL_UM_PER_PX) > 1e-9:
            raise ValueError(f"oracle needs a field at {CANONICAL_UM_PER_PX} um/px, got {mpp}")
        self.cells = field.cells
        self._bboxes = np.array([c.bbox for c in field.cells], dtype=np.int64).reshape(-1, 4)

    def finish(self, detections: Sequence[CellDetection]) -> list[CellDetection]:
        return list(detections)

    def calibrated(self, kind_name: str, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw, np.float64)

    def detect(
        self, tiles: Iterable[Tile], frame_width: int, frame_height: int, calibrate: bool = True,
        wanted=None,
    ) -> list[CellDetection]:
        out: list[CellDetection] = []
        for tile in tiles:
            size_y, size_x = tile.pixels.shape[:2]
            wx0, wy0 = tile.x, tile.y
            wx1, wy1 = min(tile.x + size_x, frame_width), min(tile.y + size_y, frame_height)
            b = self._bboxes
            hits = np.flatnonzero(
                (b[:, 0] < wx1) & (b[:, 2] > wx0) & (b[:, 1] < wy1) & (b[:, 3] > wy0)
            )
            for i in hits:
                det = self._clipped(int(i), tile, (wx0, wy0, wx1, wy1), frame_width, frame_height)
                if det is not None:
                    out.append(det)
        return out

    def _clipped(
        self,
        i: int,
        tile: Tile,
        window: tuple[int, int, int, int],
        frame_width: int,
        frame_height: int,
    ) -> CellDetection | None:
        cell = self.cells[i]
        x0, y0, x1, y1 = cell.bbox
        cx0, cy0 = max(x0, window[0]), max(y0, window[1])
        cx1, cy1 = min(x1, window[2]), min(y1, window[3])
        part = cell.mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        rows, cols = np.flatnonzero(part.any(1)), np.flatnonzero(part.any(0))
        if rows.size == 0:
            return None  # the bbox corner reaches in, the cell itself does not
        mask = part[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy()
        box = Box(
            float(cx0 + cols[0]),
            float(cy0 + rows[0]),
            float(cx0 + cols[-1] + 1),
            float(cy0 + rows[-1] + 1),
        )
        visible = float(mask.sum()) / float(cell.mask.sum())
        return CellDetection(
            kind=CellKind(cell.kind),
            box=box,
            score=0.5 + 0.5 * visible,  # a detector is less sure of a partial cell
            mask=mask,
            tile_index=tile.index,
            cut_by_tile_edge=touches_interior_tile_edge(box, tile, frame_width, frame_height),
        )


class AlteredOracle:
    """The oracle detector with its detections of a field changed by `alter` (a subclass's): the
    stand-in for a real detector's known mistakes, every other method the oracle's."""

    def __init__(self, field: SyntheticField) -> None:
        self._oracle = OracleSegmenter(field)
        self.views = self._oracle.views

    def __getattr__(self, name: str):
        return getattr(self._oracle, name)

    def alter(self, found: list[CellDetection]) -> list[CellDetection]:
        raise NotImplementedError

    def detect(self, tiles, frame_width, frame_height, calibrate=True, wanted=None):
        return self.alter(self._oracle.detect(tiles, frame_width, frame_height, calibrate))
