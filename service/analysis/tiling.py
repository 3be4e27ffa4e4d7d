"""Stage 4: overlapping tiles over the canonical frame (pure functions on coordinates).

Border tiles are moved inward so every tile keeps its full size (as SAHI does); a frame smaller
than a tile is padded with PAD_VALUE (the letterbox grey the detector was trained with).
Background-only tiles are skipped by a cheap saturation threshold.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from smearscope.service.analysis.records import Tile

PAD_VALUE = 114


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one axis: stride tile*(1-overlap), last tile flush with the end."""
    # A negative overlap would leave uncovered gaps between tiles, and overlap >= 1 a stride of
    # one pixel: both are configuration errors, not something to tile through silently.
    if tile < 1:
        raise ValueError(f"tile size must be at least 1 pixel, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be within [0, 1), got {overlap}")
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(n)]
    return sorted(set(starts))


def tile_grid(width: int, height: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """(x, y) offsets of every tile covering a width x height frame."""
    return [(x, y) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def pad_to_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """Pad bottom/right with PAD_VALUE so both sides are at least `tile`."""
    h, w = image.shape[:2]
    if h >= tile and w >= tile:
        return image
    out = np.full((max(h, tile), max(w, tile), 3), PAD_VALUE, np.uint8)
    out[:h, :w] = image
    return out


def is_background(tile_pixels: np.ndarray, min_stained_fraction: float = 0.002, sat_threshold: int = 40) -> bool:
    """True when (almost) nothing in the tile is stained: no cell can be there."""
    sat = cv2.cvtColor(tile_pixels, cv2.COLOR_BGR2HSV)[:, :, 1]
    return float((sat > sat_threshold).mean()) < min_stained_fraction


def make_tiles(canonical_image: np.ndarray, tile: int, overlap: float, skip_background: bool = True) -> list[Tile]:
    padded = pad_to_tile(canonical_image, tile)
    h, w = padded.shape[:2]
    tiles = []
    for i, (x, y) in enumerate(tile_grid(w, h, tile, overlap)):
        px = padded[y : y + tile, x : x + tile]
        if skip_background and is_background(px):
            continue
        tiles.append(Tile(index=i, x=x, y=y, pixels=px))
    return tiles
