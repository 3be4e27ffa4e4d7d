"""Tiling geometry (service.analysis.tiling): coverage, full-size tiles, overlap, padding, skipping."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from smearscope.engines.manifest import load_manifest
from smearscope.service.analysis.tiling import (
    PAD_VALUE,
    StainedArea,
    copy_pixels,
    is_background,
    iter_tiles,
    make_tiles,
    stack_tiles,
    tile_grid,
    tile_starts,
)

REPO = Path(__file__).resolve().parents[1]
TILE = 256
SIZES = [(256, 256), (257, 300), (600, 500), (1280, 960), (513, 1000), (4000, 300)]


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.15, 0.2, 0.5])
@pytest.mark.parametrize("length", [1, 100, 256, 257, 300, 511, 600, 1280, 4001])
def test_starts_cover_the_axis_with_full_tiles_and_bounded_overlap(
    length: int, overlap: float
) -> None:
    starts = tile_starts(length, TILE, overlap)
    assert starts == sorted(set(starts)) and starts[0] == 0
    if length <= TILE:
        assert starts == [0]  # one tile, padded by make_tiles
        return
    # Full-size tiles inside the axis; the last one moved inward to end flush with it.
    assert all(0 <= s and s + TILE <= length for s in starts)
    assert starts[-1] == length - TILE
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + TILE] += 1
    assert covered.min() >= 1
    # Neighbours overlap by at least the requested fraction, and never by a whole tile.
    shared = [a + TILE - b for a, b in itertools.pairwise(starts)]
    assert all(TILE * overlap <= s < TILE for s in shared)
    # Only the inward-moved last tile may overlap more than the stride implies.
    assert len(set(shared[:-1])) <= 1
    assert max(shared[:-1], default=0) <= TILE - int(TILE * (1 - overlap))


@pytest.mark.parametrize(("width", "height"), SIZES)
@pytest.mark.parametrize("overlap", [0.1, 0.2])
def test_grid_covers_every_pixel(width: int, height: int, overlap: float) -> None:
    covered = np.zeros((height, width), int)
    grid = tile_grid(width, height, TILE, overlap)
    assert len(grid) == len(set(grid))
    for x, y in grid:
        assert 0 <= x <= max(0, width - TILE) and 0 <= y <= max(0, height - TILE)
        covered[y : y + TILE, x : x + TILE] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_overlap_outside_unit_interval_is_refused(overlap: float) -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(1000, TILE, overlap)


def test_zero_tile_size_is_refused() -> None:
    with pytest.raises(ValueError, match="tile size"):
        tile_starts(1000, 0, 0.1)


def _stained(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Saturated random pixels everywhere: no tile is background."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = rng.integers(120, 200, (height, width))
    img[..., 1] = rng.integers(20, 80, (height, width))
    img[..., 2] = rng.integers(150, 255, (height, width))
    return img


def test_tiles_are_views_at_their_offsets() -> None:
    img = _stained(500, 600)
    tiles = make_tiles(img, TILE, 0.15)
    assert [(t.x, t.y) for t in tiles] == tile_grid(600, 500, TILE, 0.15)
    assert [t.index for t in tiles] == list(range(len(tiles)))
    for t in tiles:
        assert t.pixels.shape == (TILE, TILE, 3)
        np.testing.assert_array_equal(t.pixels, img[t.y : t.y + TILE, t.x : t.x + TILE])


def test_frame_smaller_than_tile_is_padded_bottom_right() -> None:
    img = _stained(100, 180)
    (tile,) = make_tiles(img, TILE, 0.2)
    assert (tile.x, tile.y) == (0, 0) and tile.pixels.shape == (TILE, TILE, 3)
    np.testing.assert_array_equal(tile.pixels[:100, :180], img)
    assert (tile.pixels[100:] == PAD_VALUE).all() and (tile.pixels[:, 180:] == PAD_VALUE).all()


def test_frame_narrower_than_tile_is_padded_in_one_direction_only() -> None:
    img = _stained(600, 120)
    tiles = make_tiles(img, TILE, 0.1)
    assert {t.x for t in tiles} == {0} and len(tiles) == len(tile_starts(600, TILE, 0.1))
    for t in tiles:
        assert t.pixels.shape == (TILE, TILE, 3)  # full size: padded across, though tall enough
        np.testing.assert_array_equal(t.pixels[:, :120], img[t.y : t.y + TILE])
        assert (t.pixels[:, 120:] == PAD_VALUE).all()
    # ... and a frame wider than a tile but shorter: padded below only, every tile full size
    for t in make_tiles(np.ascontiguousarray(img.transpose(1, 0, 2)), TILE, 0.1):
        assert t.y == 0 and t.pixels.shape == (TILE, TILE, 3)
        assert (t.pixels[120:] == PAD_VALUE).all()


def test_background_tiles_are_skipped_and_indices_stay_grid_indices() -> None:
    img = np.full((512, 768, 3), (233, 229, 234), np.uint8)  # blank slide background
    img[300:340, 600:640] = (160, 90, 220)  # one stained blob, in the bottom-right tile only
    grid = tile_grid(768, 512, TILE, 0.0)
    tiles = make_tiles(img, TILE, 0.0)
    assert len(grid) == 6 and len(tiles) == 1
    (tile,) = tiles
    assert grid[tile.index] == (tile.x, tile.y) == (512, 256)
    assert len(make_tiles(img, TILE, 0.0, skip_background=False)) == 6


def test_a_grey_or_faint_cell_is_not_background() -> None:
    """Greyscale cameras and weak stains: no saturation, but the cell absorbs light."""
    img = np.full((TILE, TILE, 3), 235, np.uint8)  # lamp-corrected glass
    assert is_background(img)
    img[100:140, 100:140] = 190  # a grey red cell
    assert not is_background(img) and len(make_tiles(img, TILE, 0.0)) == 1
    img[100:140, 100:140] = 215  # fainter than the dark bound, colourless: background
    assert is_background(img)


def test_tiles_are_padded_with_the_grey_the_models_were_trained_with() -> None:
    """The pad is the letterbox grey each shipped model's manifest declares (preprocessing.pad_value)."""
    manifests = sorted((REPO / "models").glob("*.json"))
    assert manifests
    for path in manifests:
        assert load_manifest(path, verify_hash=False).preprocessing.pad_value == PAD_VALUE, path.name
    (tile,) = make_tiles(_stained(100, 180), TILE, 0.2)
    assert (tile.pixels[100:] == PAD_VALUE).all()


def test_a_pale_but_coloured_cell_is_stained_by_its_saturation() -> None:
    """Pale pink BGR (200, 190, 240): lighter than the dark bound (grey 0.114*200 + 0.587*190 +
    0.299*240 = 206), but its saturation (240 - 190) / 240 * 255 = 53 is over 40. A tint of
    saturation (235 - 210) / 235 * 255 = 27, grey 218, is glass."""
    img = np.full((TILE, TILE, 3), 235, np.uint8)
    img[100:140, 100:140] = (200, 190, 240)  # 1600 px, 2.4 % of the tile
    assert not is_background(img) and len(make_tiles(img, TILE, 0.0)) == 1
    img[100:140, 100:140] = (215, 210, 235)
    assert is_background(img) and make_tiles(img, TILE, 0.0) == []


def test_a_tile_with_exactly_the_minimum_stained_share_is_kept() -> None:
    """Background means FEWER stained pixels than 0.2 %: of a 250 px tile that is 125 pixels."""
    img = np.full((250, 250, 3), 235, np.uint8)
    img[10:15, 20:45] = (160, 90, 220)  # 5 x 25 = 125 stained pixels
    assert not is_background(img) and len(make_tiles(img, 250, 0.0)) == 1
    img[14, 44] = 235  # 124
    assert is_background(img) and make_tiles(img, 250, 0.0) == []


def test_padding_alone_is_background() -> None:
    padded = np.full((TILE, TILE, 3), PAD_VALUE, np.uint8)  # grey 114: dark, but no frame pixel
    padded[:100, :80] = 235  # the frame's glass
    assert is_background(padded, content_hw=(100, 80)) and not is_background(padded)
    assert not is_background(_stained(TILE, TILE))


@pytest.mark.parametrize("flip_x,flip_y", [(False, False), (True, False), (False, True), (True, True)])
def test_tiles_skipped_on_the_frames_stained_area_are_those_is_background_skips(flip_x: bool, flip_y: bool) -> None:
    """Background is measured once per frame (an integral image of stained pixels): the tiles
    kept must be exactly those whose own pixels `is_background` keeps, in every mirrored view and
    for frames smaller than a tile (padding counts as unstained), near the threshold too."""
    rng = np.random.default_rng(3)
    for h, w in [(600, 900), (200, 700), (180, 150), (513, 260)]:
        img = np.full((h, w, 3), (233, 229, 234), np.uint8)
        for _ in range(int(rng.integers(0, 6))):  # a few stained specks, some tiny (near 0.2 % of a tile)
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            s = int(rng.choice([3, 8, 11, 12, 40]))
            img[y : y + s, x : x + s] = (160, 90, 220) if rng.random() < 0.5 else (150, 150, 150)  # or grey, dark
        got = list(iter_tiles(img, TILE, 0.15, flip_x=flip_x, flip_y=flip_y))
        every = list(iter_tiles(img, TILE, 0.15, skip_background=False, flip_x=flip_x, flip_y=flip_y))
        content = (min(TILE, h), min(TILE, w))  # a tile shows the frame there, padding beyond
        assert [t.index for t in got] == [t.index for t in every if not is_background(t.pixels, content_hw=content)]
        shared = StainedArea(img)  # one area serves every view
        assert [t.index for t in iter_tiles(img, TILE, 0.15, flip_x=flip_x, flip_y=flip_y, stained=shared)] == \
            [t.index for t in got]
    # A frame smaller than a tile: 81 stained pixels are under 0.2 % of the padded tile (131 px)
    # though over 0.2 % of the frame itself: background, as is_background says of the padded tile.
    img = np.full((180, 150, 3), (233, 229, 234), np.uint8)
    img[50:59, 60:69] = (160, 90, 220)
    (padded,) = iter_tiles(img, TILE, 0.15, skip_background=False)
    assert is_background(padded.pixels, content_hw=(180, 150)) and list(iter_tiles(img, TILE, 0.15)) == []
    img[50:62, 60:72] = (160, 90, 220)  # 144 px: stained
    assert len(list(iter_tiles(img, TILE, 0.15))) == 1


@pytest.mark.parametrize("flip_x, flip_y", [(False, False), (True, False), (False, True), (True, True)])
def test_mirrored_tiles_and_windows_are_copied_with_their_own_pixels(flip_x, flip_y):
    """A rendered field's tiles in every mirror view, stacked as the detector takes them, hold
    exactly the mirrored frame's pixels (OpenCV's flip where the view runs right to left), and a
    mirrored window copied into part of a larger canvas fills that part and nothing else."""
    from smearscope.device.synthetic import render_field

    frame = render_field(3, width=700, height=300, microns_per_pixel=0.2).frame.pixels
    mirrored = frame[:: -1 if flip_y else 1, :: -1 if flip_x else 1]
    tiles = list(iter_tiles(frame, TILE, 0.1, skip_background=False, flip_x=flip_x, flip_y=flip_y))
    stacked = stack_tiles([t.pixels for t in tiles])
    for t, got in zip(tiles, stacked):
        np.testing.assert_array_equal(got, mirrored[t.y:t.y + TILE, t.x:t.x + TILE])
    canvas = np.full((TILE, TILE, 3), PAD_VALUE, np.uint8)
    copy_pixels(canvas[20:120, 30:230], mirrored[50:150, 400:600])
    expected = np.full_like(canvas, PAD_VALUE)
    expected[20:120, 30:230] = mirrored[50:150, 400:600]
    np.testing.assert_array_equal(canvas, expected)



@pytest.mark.parametrize("channels", [1, 3, 4])
def test_copy_pixels_copies_a_mirrored_window_into_any_destination_numpy_can(channels: int) -> None:
    """copy_pixels is `dst[...] = src`: for a mirrored window of a rendered field (one, three or
    four channels, odd and even widths, read right to left or both ways) it leaves in dst what
    NumPy's assignment leaves, whatever dst is: a contiguous image, part of a canvas, every other
    column of an image, an image stored column-major, an image of another dtype, or no rows at
    all (OpenCV's flip refuses a destination whose columns are not adjacent and an empty image:
    such copies go through NumPy)."""
    from smearscope.device.synthetic import render_field

    rgb = render_field(4, width=180, height=120, microns_per_pixel=0.2).frame.pixels
    frame = np.ascontiguousarray(np.concatenate([rgb, rgb[..., :1]], axis=2)[..., :channels])
    for width in (2, 7, 64, 65):
        for flip_y in (False, True):
            src = frame[10:50, 30:30 + width][:: -1 if flip_y else 1, ::-1]
            h = src.shape[0]
            destinations = {
                "contiguous": np.zeros(src.shape, np.uint8),
                "part of a canvas": np.zeros((h + 9, width + 13, channels), np.uint8)[4 : 4 + h, 5 : 5 + width],
                "every other column": np.zeros((h, 2 * width, channels), np.uint8)[:, ::2],
                "column-major": np.zeros(src.shape, np.uint8, order="F"),
                "float": np.zeros(src.shape, np.float32),
            }
            for name, dst in destinations.items():
                want = dst.copy()
                want[...] = src
                copy_pixels(dst, src)
                np.testing.assert_array_equal(dst, want, err_msg=f"{name}, width {width}, flip_y {flip_y}")
            empty = np.zeros((0, width, channels), np.uint8)
            copy_pixels(empty, src[:0])
