"""Stage 5: find cells in tiles. A `Segmenter` turns tiles into detections in FRAME coordinates.

`YoloSegmenter` (service.analysis.yolo_decode) runs the YOLO instance-segmentation model through an
engine; tests use an oracle segmenter that returns ground truth through the same interface. Both flag detections that touch an
interior tile edge (`cut_by_tile_edge`) so the merge step can prefer whole views of a cell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np

from smearscope.service.analysis.records import Box, CellDetection, Tile

#: A box within this many pixels of a tile edge counts as touching it.
EDGE_MARGIN_PX = 2.0


class Segmenter(Protocol):
    """Finds cells in tiles. The pipeline runs `detect(..., calibrate=False)` on the tiles of each
    of `views` (service.analysis.tta), merges and fuses the raw detections, and calls `finish`
    (calibrate and threshold) last."""

    #: Test-time views of the frame the pipeline runs and fuses; ("identity",) for one pass.
    views: tuple[str, ...]

    def detect(self, tiles: Iterable[Tile], frame_width: int, frame_height: int, calibrate: bool = True,
               wanted: Callable[[Tile, np.ndarray], np.ndarray] | None = None) -> list[CellDetection]:
        """All detections of all `tiles` in frame coordinates; raw scores with `calibrate=False`.
        `tiles` may be lazy (service.analysis.tiling.iter_tiles): iterate it once. `wanted(tile,
        boxes)`: which of a tile's detections (boxes in frame coordinates, rows x0, y0, x1, y1)
        the caller will use; the others may be left out (their masks unmade)."""
        ...

    def finish(self, detections: Sequence[CellDetection]) -> list[CellDetection]:
        """Merged and fused raw detections -> final scores, those below the threshold dropped."""
        ...

    def calibrated(self, kind_name: str, raw: np.ndarray) -> np.ndarray:
        """The final scores `finish` would give raw (fused) scores of that kind (float64, each
        computed as `finish` computes it)."""
        ...


def touches_interior_tile_edge(box_in_frame: Box, tile: Tile, frame_width: int, frame_height: int) -> bool:
    """True when the box touches a tile edge that is not also the frame's edge (a cut cell)."""
    b = box_in_frame
    return bool(cut_by_interior_tile_edges(np.array([[b.x0, b.y0, b.x1, b.y1]]), tile, frame_width, frame_height)[0])


def cut_by_interior_tile_edges(boxes_in_frame: np.ndarray, tile: Tile, frame_width: int,
                               frame_height: int) -> np.ndarray:
    """`touches_interior_tile_edge` of each (x0, y0, x1, y1) row, at once."""
    b = np.asarray(boxes_in_frame, np.float64).reshape(-1, 4)
    size = tile.pixels.shape[0]
    m = EDGE_MARGIN_PX
    left = (b[:, 0] <= tile.x + m) & (tile.x > 0)
    top = (b[:, 1] <= tile.y + m) & (tile.y > 0)
    right = (b[:, 2] >= tile.x + size - m) & (tile.x + size < frame_width)
    bottom = (b[:, 3] >= tile.y + size - m) & (tile.y + size < frame_height)
    return left | top | right | bottom
