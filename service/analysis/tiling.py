"""Stage 4: overlapping tiles over the canonical frame (pure functions on coordinates).

Border tiles are moved inward so every tile keeps its full size (as SAHI does); a frame smaller
than a tile is padded with PAD_VALUE (the letterbox grey the detector was trained with).
Background-only tiles are skipped by a cheap saturation threshold.

Tiles are made lazily and are windows of the frame, never copies of it (`iter_tiles`), also for a
mirrored frame: the detector's batches are the only copies, so memory does not grow with the frame
beyond the frame itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

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


#: A tile with fewer stained pixels than this share is background: no cell can be there.
MIN_STAINED_FRACTION = 0.002
#: A pixel is stained above this HSV saturation (OpenCV's 8-bit scale).
STAINED_SATURATION = 40
#: ...or when it absorbs light whatever its colour: darker than this grey level on the
#: lamp-corrected frame (glass at 235, an optical density above 0.06). A greyscale camera, a
#: faded or weak stain shows its cells only so; by saturation alone every tile was background.
STAINED_BELOW_GREY = 205


def stained_mask(pixels: np.ndarray, sat_threshold: int = STAINED_SATURATION) -> np.ndarray:
    """Pixels that are stained (saturated) or absorb light (dark), as a bool array."""
    sat = cv2.cvtColor(pixels, cv2.COLOR_BGR2HSV)[:, :, 1] > sat_threshold
    return sat | (cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY) < STAINED_BELOW_GREY)


def is_background(tile_pixels: np.ndarray, min_stained_fraction: float = MIN_STAINED_FRACTION,
                  sat_threshold: int = STAINED_SATURATION, content_hw: tuple[int, int] | None = None) -> bool:
    """True when (almost) nothing in the tile is stained or dark: no cell can be there. Only the
    top-left `content_hw` (rows, columns) holds the frame where a tile was padded: padding is
    never a cell, so the share is of the whole tile, counted in its content."""
    h, w = content_hw if content_hw is not None else tile_pixels.shape[:2]
    stained = stained_mask(np.ascontiguousarray(tile_pixels[:h, :w]), sat_threshold).sum() if h and w else 0
    return float(stained) / (tile_pixels.shape[0] * tile_pixels.shape[1]) < min_stained_fraction


class StainedArea:
    """Stained (or dark) pixels of a whole frame, countable in any window at once (an integral image).

    One saturation map per frame serves every tile of every view: tiles overlap, and a mirrored
    view's tiles are other windows of the same pixels. `background(...)` answers what
    `is_background` answers for the tile cut at that window (padding is grey: never stained)."""

    def __init__(self, image: np.ndarray, sat_threshold: int = STAINED_SATURATION) -> None:
        stained = stained_mask(image, sat_threshold).view(np.uint8)
        self._sums = cv2.integral(stained, sdepth=cv2.CV_32S)  # (h + 1, w + 1)

    def count(self, r0: int, r1: int, c0: int, c1: int) -> int:
        s = self._sums
        return int(s[r1, c1]) - int(s[r0, c1]) - int(s[r1, c0]) + int(s[r0, c0])

    def background(self, r0: int, r1: int, c0: int, c1: int, tile: int,
                   min_stained_fraction: float = MIN_STAINED_FRACTION) -> bool:
        return self.count(r0, r1, c0, c1) / float(tile * tile) < min_stained_fraction


def iter_tiles(image: np.ndarray, tile: int, overlap: float, skip_background: bool = True,
               flip_x: bool = False, flip_y: bool = False, stained: StainedArea | None = None) -> Iterator[Tile]:
    """The tiles of `image`, or of its mirror image (`flip_x` left-right, `flip_y` top-bottom),
    one at a time. Each tile's pixels are a window of `image` (mirrored by strides), padded
    bottom/right only where the (mirrored) image is smaller than a tile, exactly as
    `make_tiles(mirrored image)` would cut them; `x`, `y` are offsets in the mirrored image.
    Background tiles (`is_background`) are skipped, measured on `stained` (the image's
    `StainedArea`, made here when not given: pass one to share it between views)."""
    h, w = image.shape[:2]
    if skip_background and stained is None:
        stained = StainedArea(image)
    for i, (x, y) in enumerate(tile_grid(max(w, tile), max(h, tile), tile, overlap)):
        # The stained fraction does not depend on mirroring: measured on the unmirrored window.
        if skip_background and stained.background(*_window(h, w, x, y, tile, flip_x, flip_y), tile):
            continue
        yield Tile(index=i, x=x, y=y, pixels=_tile_pixels(image, x, y, tile, flip_x, flip_y))


def tile_at(image: np.ndarray, index: int, x: int, y: int, tile: int, flip_x: bool = False,
            flip_y: bool = False) -> Tile:
    """The tile at offset (x, y) of `image` or of its mirror image, anywhere (not only on the
    grid), cut and padded as `iter_tiles` cuts its tiles."""
    return Tile(index=index, x=x, y=y, pixels=_tile_pixels(image, x, y, tile, flip_x, flip_y))


def _tile_pixels(image: np.ndarray, x: int, y: int, tile: int, flip_x: bool, flip_y: bool) -> np.ndarray:
    """The tile's pixels at offset (x, y) of the (mirrored) image: a window of `image`, padded
    bottom/right where the (mirrored) image is smaller than a tile."""
    r0, r1, c0, c1 = _window(*image.shape[:2], x, y, tile, flip_x, flip_y)
    px = image[r0:r1, c0:c1][:: -1 if flip_y else 1, :: -1 if flip_x else 1]
    if px.shape[:2] != (tile, tile):
        px = pad_to_tile(np.ascontiguousarray(px), tile)
    return px


def _window(h: int, w: int, x: int, y: int, tile: int, flip_x: bool, flip_y: bool) -> tuple[int, int, int, int]:
    """Rows r0:r1 and columns c0:c1 of the image that the (mirrored) image's tile at (x, y) shows."""
    r0, r1, c0, c1 = y, min(y + tile, h), x, min(x + tile, w)
    if flip_y:
        r0, r1 = h - r1, h - r0
    if flip_x:
        c0, c1 = w - c1, w - c0
    return r0, r1, c0, c1


def make_tiles(canonical_image: np.ndarray, tile: int, overlap: float, skip_background: bool = True) -> list[Tile]:
    return list(iter_tiles(canonical_image, tile, overlap, skip_background))


def copy_pixels(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src for H x W x C images, where src may be a mirrored view of an image (a
    negative column stride): NumPy copies such a view element by element, about 30 times slower
    than OpenCV's flip into dst (measured 196 against 8 us for 150 x 150 x 3); the values are
    the same. OpenCV writes only into a uint8 dst of src's shape whose rows each lie in one run of
    memory (a contiguous image, or part of a larger one); it refuses other layouts (every other
    column, column-major) and empty images, so those, other dtypes and images of more than 4
    channels are NumPy's."""
    if (src.ndim == 3 and src.shape[1] > 1 and src.strides[1] < 0 and src.dtype == np.uint8 and src.size
            and src.shape[2] <= 4 and dst.dtype == np.uint8 and dst.shape == src.shape
            and dst.strides[1:] == (src.shape[2], 1) and dst.strides[0] > 0):
        out = cv2.flip(src[::-1, ::-1], -1, dst=dst) if src.strides[0] < 0 else cv2.flip(src[:, ::-1], 1, dst=dst)
        if out.__array_interface__["data"][0] != dst.__array_interface__["data"][0]:
            dst[...] = out  # not met with the checks above: an OpenCV that copied instead
    else:
        dst[...] = src


def stack_tiles(pixels: Sequence[np.ndarray]) -> np.ndarray:
    """np.stack of equal-shaped images (tiles, windows of a mirrored frame among them), each
    copied by `copy_pixels`."""
    out = np.empty((len(pixels),) + pixels[0].shape, pixels[0].dtype)
    for dst, src in zip(out, pixels):
        copy_pixels(dst, src)
    return out

