"""Stage 5: find cells in tiles. A `Segmenter` turns tiles into detections in FRAME coordinates.

`YoloSegmenter` (service.analysis.yolo_decode) runs the YOLO instance-segmentation model through an
engine; tests use an oracle segmenter that returns ground truth through the same interface. Both flag detections that touch an
interior tile edge (`cut_by_tile_edge`) so the merge step can prefer whole views of a cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from smearscope.service.analysis.records import Box, CellDetection, Tile

#: A box within this many pixels of a tile edge counts as touching it.
EDGE_MARGIN_PX = 2.0


class Segmenter(Protocol):
    """Finds cells in tiles. The pipeline runs `detect(..., calibrate=False)` on the tiles of each
    of `views` (service.analysis.tta), merges and fuses the raw detections, and calls `finish`
    (calibrate and threshold) last."""

    #: Test-time views of the frame the pipeline runs and fuses; ("identity",) for one pass.
    views: tuple[str, ...]

    def detect(self, tiles: Iterable[Tile], frame_width: int, frame_height: int,
               calibrate: bool = True) -> list[CellDetection]:
        """All detections of all `tiles` in frame coordinates; raw scores with `calibrate=False`.
        `tiles` may be lazy (service.analysis.tiling.iter_tiles): iterate it once."""
        ...

    def finish(self, detections: Sequence[CellDetection]) -> list[CellDetection]:
        """Merged and fused raw detections -> final scores, those below the threshold dropped."""
        ...

    def calibrated(self, kind_name: str, raw: float) -> float:
        """The final score `finish` would give a raw (fused) score of that kind."""
        ...


def touches_interior_tile_edge(box_in_frame: Box, tile: Tile, frame_width: int, frame_height: int) -> bool:
    """True when the box touches a tile edge that is not also the frame's edge (a cut cell)."""
    size = tile.pixels.shape[0]
    m = EDGE_MARGIN_PX
    left = box_in_frame.x0 <= tile.x + m and tile.x > 0
    top = box_in_frame.y0 <= tile.y + m and tile.y > 0
    right = box_in_frame.x1 >= tile.x + size - m and tile.x + size < frame_width
    bottom = box_in_frame.y1 >= tile.y + size - m and tile.y + size < frame_height
    return left or top or right or bottom
