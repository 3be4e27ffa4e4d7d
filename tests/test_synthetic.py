"""The synthetic smear renderer (device.synthetic): truth that matches the picture."""

from __future__ import annotations

import numpy as np
import pytest

from smearscope.device.frame import Frame
from smearscope.device.synthetic import (
    RBC_MORPHOLOGIES,
    WBC_SUBTYPES,
    StainParams,
    SyntheticField,
    TruthCell,
    render_field,
)

W, H = 400, 300


@pytest.fixture(scope="module")
def field() -> SyntheticField:
    return render_field(7, width=W, height=H, n_wbc=3, n_platelets=8)


def _elongation(mask: np.ndarray) -> float:
    """Ratio of the principal axes of a mask (1 for a disc)."""
    yy, xx = np.nonzero(mask)
    cov = np.cov(np.stack([xx, yy]).astype(float))
    ev = np.linalg.eigvalsh(cov)
    return float(np.sqrt(ev[1] / max(ev[0], 1e-9)))


def test_same_seed_same_field_other_seed_other_field() -> None:
    a = render_field(3, width=W, height=H)
    b = render_field(3, width=W, height=H)
    c = render_field(4, width=W, height=H)
    np.testing.assert_array_equal(a.frame.pixels, b.frame.pixels)
    assert len(a.cells) == len(b.cells)
    for x, y in zip(a.cells, b.cells):
        assert (x.kind, x.bbox, x.center, x.subtype, x.morphology) == (
            y.kind,
            y.bbox,
            y.center,
            y.subtype,
            y.morphology,
        )
        np.testing.assert_array_equal(x.mask, y.mask)
    assert not np.array_equal(a.frame.pixels, c.frame.pixels)
    assert [x.bbox for x in a.cells] != [x.bbox for x in c.cells]


def test_frame_record(field: SyntheticField) -> None:
    f = field.frame
    assert isinstance(f, Frame)
    assert f.pixels.shape == (H, W, 3) and f.pixels.dtype == np.uint8
    assert f.microns_per_pixel == 0.2 and f.frame_id == "synthetic-7"
    assert not f.pixels.flags.writeable


def test_truth_boxes_are_tight_to_bbox_local_masks(field: SyntheticField) -> None:
    assert len(field.cells) > 30
    for c in field.cells:
        x0, y0, x1, y1 = c.bbox
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert c.mask.dtype == bool and c.mask.shape == (y1 - y0, x1 - x0)
        assert c.mask[0].any() and c.mask[-1].any() and c.mask[:, 0].any() and c.mask[:, -1].any()
        assert c.full_mask(H, W).sum() == c.mask.sum()


def test_labels_are_from_the_documented_sets(field: SyntheticField) -> None:
    kinds = {c.kind for c in field.cells}
    assert kinds == {"rbc", "wbc", "platelet"}
    for c in field.cells:
        if c.kind == "rbc":
            assert c.morphology in RBC_MORPHOLOGIES and c.subtype is None
        elif c.kind == "wbc":
            assert c.subtype in WBC_SUBTYPES and c.morphology is None
        else:
            assert c.subtype is None and c.morphology is None


def test_the_picture_matches_the_truth(field: SyntheticField) -> None:
    """Red cells are pink (red > green in BGR), white-cell nuclei purple and dark, the rest of
    the slide light and unstained."""
    px = field.frame.pixels.astype(float)
    anything = np.zeros((H, W), bool)
    for c in field.cells:
        anything |= c.full_mask(H, W)
    background = px[~anything]
    assert background.mean() > 200 and np.abs(background[:, 2] - background[:, 1]).mean() < 12
    for c in field.cells:
        inside = px[c.full_mask(H, W)]
        b, g, r = inside.mean(0)
        if c.kind == "rbc":
            assert r - g > 30, (c.morphology, b, g, r)
        elif c.kind == "wbc" and not c.cut_by_frame_edge:  # the nucleus may lie outside
            darkest = np.percentile(inside.sum(1), 10) / 3
            assert darkest < 150, c.subtype
        elif c.kind == "platelet":
            assert b > g and r > g  # purple


@pytest.mark.parametrize("mpp", [0.05, 0.1, 0.4, 0.5])
def test_scale_changes_pixel_size_not_physical_size(mpp: float) -> None:
    base = render_field(11, width=800, height=600, microns_per_pixel=0.2)
    other = render_field(11, width=800, height=600, microns_per_pixel=mpp)

    def normal_rbc_px(f: SyntheticField) -> float:
        sizes = [
            np.sqrt(c.mask.sum())
            for c in f.cells
            if c.kind == "rbc" and c.morphology == "normal" and not c.cut_by_frame_edge
        ]
        assert len(sizes) >= 5
        return float(np.median(sizes))

    ratio = normal_rbc_px(other) / normal_rbc_px(base)
    assert ratio == pytest.approx(0.2 / mpp, rel=0.08)
    for f in (base, other):
        d = np.median(
            [c.diameter_um for c in f.cells if c.kind == "rbc" and c.morphology == "normal"]
        )
        assert 7.0 < d < 8.2
        assert f.frame.microns_per_pixel == (0.2 if f is base else mpp)


@pytest.mark.parametrize(("mpp", "factor"), [(0.1, 2), (0.05, 4)])
def test_same_seed_same_smear_at_any_scale(mpp: float, factor: int) -> None:
    """The same physical field drawn at a finer scale: same cells, boxes `factor` times larger."""
    coarse = render_field(11, width=300, height=200, microns_per_pixel=0.2)
    fine = render_field(11, width=300 * factor, height=200 * factor, microns_per_pixel=mpp)
    assert len(coarse.cells) == len(fine.cells) > 20
    for a, b in zip(coarse.cells, fine.cells):
        assert (a.kind, a.subtype, a.morphology) == (b.kind, b.subtype, b.morphology)
        assert b.diameter_um == pytest.approx(a.diameter_um, rel=0.05)
        if a.mask.sum() >= 20:  # slivers at the frame edge rasterise differently
            # within 0.4 um: coarse pixels miss sub-pixel details such as crenation spikes
            assert np.allclose(np.array(b.bbox), factor * np.array(a.bbox), atol=0.4 / mpp)


@pytest.mark.parametrize("mpp", [0.01, 0.6])
def test_scale_outside_the_supported_range_is_refused(mpp: float) -> None:
    with pytest.raises(ValueError):
        render_field(0, width=64, height=64, microns_per_pixel=mpp)


def test_cut_by_frame_edge_flags(field: SyntheticField) -> None:
    flagged = [c for c in field.cells if c.cut_by_frame_edge]
    assert len(flagged) >= 5
    for c in field.cells:
        x0, y0, x1, y1 = c.bbox
        at_edge = x0 == 0 or y0 == 0 or x1 == W or y1 == H
        if c.cut_by_frame_edge:
            assert at_edge
            # the diameter is that of the whole cell, larger than the visible part implies
            visible_d = 2 * np.sqrt(c.mask.sum() * 0.04 / np.pi)
            assert c.diameter_um > visible_d
        elif not at_edge:
            assert not c.cut_by_frame_edge


def test_touching_fraction_controls_overlap() -> None:
    def overlapping_pairs(cells: tuple[TruthCell, ...]) -> int:
        n = 0
        for i, a in enumerate(cells):
            for b in cells[i + 1 :]:
                if (
                    a.bbox[0] < b.bbox[2]
                    and b.bbox[0] < a.bbox[2]
                    and a.bbox[1] < b.bbox[3]
                    and b.bbox[1] < a.bbox[3]
                ):
                    n += int((a.full_mask(H, W) & b.full_mask(H, W)).any())
        return n

    apart = render_field(5, width=W, height=H, touching_fraction=0.0)
    together = render_field(5, width=W, height=H, touching_fraction=0.6)
    assert overlapping_pairs(apart.cells) == 0
    assert overlapping_pairs(together.cells) >= 10


def test_red_cell_shapes_are_drawn_distinctly() -> None:
    f = render_field(2, width=1280, height=960, rbc_mix={m: 1.0 for m in RBC_MORPHOLOGIES}, n_wbc=0)
    whole = [c for c in f.cells if c.kind == "rbc" and not c.cut_by_frame_edge]
    by = {m: [c for c in whole if c.morphology == m] for m in RBC_MORPHOLOGIES}
    assert all(len(v) >= 10 for v in by.values()), {m: len(v) for m, v in by.items()}
    elong = {m: np.median([_elongation(c.mask) for c in v]) for m, v in by.items()}
    diam = {m: np.median([c.diameter_um for c in v]) for m, v in by.items()}
    assert elong["normal"] < 1.15 and elong["ovalocyte"] > 1.5 and elong["sickle"] > 2.0
    assert diam["spherocyte"] < diam["normal"] - 0.8
    assert diam["sickle"] < diam["normal"]  # a thin crescent covers less than a disc

    px = f.frame.pixels.astype(float)

    def centre_vs_ring(c: TruthCell) -> float:
        """Green level at the centre minus on the ring halfway out (pallor > 0, dark spot < 0)."""
        x0, y0 = c.bbox[:2]
        cx, cy = c.center
        r = c.diameter_um / 2 / 0.2
        yy, xx = np.mgrid[y0 : c.bbox[3], x0 : c.bbox[2]]
        d = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy) / r
        g = px[y0 : c.bbox[3], x0 : c.bbox[2], 1]
        return float(g[d < 0.15].mean() - g[(d > 0.6) & (d < 0.8)].mean())

    pallor = {
        m: np.median([centre_vs_ring(c) for c in by[m]]) for m in ("normal", "target", "spherocyte")
    }
    assert pallor["normal"] > 15  # pale centre
    assert pallor["spherocyte"] < 5  # no central pallor
    assert pallor["target"] < pallor["normal"] - 10  # dark central spot in the pale zone


def test_white_cell_subtypes_have_their_nuclei() -> None:
    """Lymphocyte: one big round nucleus; neutrophil: several lobes."""
    import cv2

    lobes: dict[str, list[int]] = {"neutrophil": [], "lymphocyte": []}
    fill: dict[str, list[float]] = {"neutrophil": [], "lymphocyte": []}
    for seed in range(6):
        for subtype, lobe_counts in lobes.items():
            f = render_field(
                100 + seed,
                width=300,
                height=300,
                n_wbc=2,
                wbc_mix={subtype: 1.0},
                rbc_density=0.1,
                n_platelets=0,
                stain=StainParams(noise_dn=0.5),
            )
            for c in f.cells:
                if c.kind != "wbc" or c.cut_by_frame_edge:
                    continue
                x0, y0, x1, y1 = c.bbox
                grey = f.frame.pixels[y0:y1, x0:x1].astype(float).mean(2)
                nucleus = (grey < 150) & c.mask
                core = cv2.erode(
                    nucleus.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
                )
                n, _ = cv2.connectedComponents(core)  # thin strands between lobes erode away
                lobe_counts.append(n - 1)
                fill[subtype].append(nucleus.sum() / c.mask.sum())
    assert len(lobes["neutrophil"]) >= 4 and len(lobes["lymphocyte"]) >= 4
    assert np.median(lobes["neutrophil"]) >= 2 and np.median(lobes["lymphocyte"]) == 1
    assert np.median(fill["lymphocyte"]) > 0.5 > np.median(fill["neutrophil"])


def test_stain_variation_changes_colour_not_truth() -> None:
    ref = render_field(9, width=W, height=H)
    varied = render_field(9, width=W, height=H, stain=StainParams.sample(np.random.default_rng(1)))
    assert [c.bbox for c in ref.cells] == [c.bbox for c in varied.cells]
    assert np.abs(ref.frame.pixels.astype(int) - varied.frame.pixels.astype(int)).mean() > 2


def test_a_frame_is_bgr_uint8_with_three_channels() -> None:
    Frame(np.zeros((4, 5, 3), np.uint8), "f", "t")
    for bad in (np.zeros((4, 5, 4), np.uint8), np.zeros((4, 5), np.uint8), np.zeros((4, 5, 3), np.uint16)):
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            Frame(bad, "f", "t")


def test_the_truth_centre_is_where_the_cell_is_drawn(field: SyntheticField) -> None:
    """Pixel (r, c) covers [c, c+1) x [r, r+1): a whole round red cell's mask centroid, at pixel
    centres, is its `center` (a half-pixel shift would put every truth box off its cell)."""
    offsets = []
    for c in field.cells:
        if c.kind == "rbc" and c.morphology == "normal" and not c.cut_by_frame_edge:
            rows, cols = np.nonzero(c.mask)
            offsets.append((cols.mean() + 0.5 + c.bbox[0] - c.center[0], rows.mean() + 0.5 + c.bbox[1] - c.center[1]))
    assert len(offsets) >= 10
    assert np.abs(np.mean(offsets, axis=0)).max() < 0.15, np.mean(offsets, axis=0)


def test_an_empty_slide_is_the_lamp_with_its_vignetting_and_sensor_noise() -> None:
    """No cells: each pixel is background * (1 - vignetting * r^2) (r = 1 at the corners), rounded
    to the nearest level, plus read noise (1.5) and shot noise (variance 0.02 per level)."""
    stain = StainParams()
    f = render_field(1, width=W, height=H, rbc_density=0.0, n_wbc=0, n_platelets=0)
    assert f.cells == ()
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    r2 = ((xx - W / 2) ** 2 + (yy - H / 2) ** 2) / ((W / 2) ** 2 + (H / 2) ** 2)
    light = (1.0 - stain.vignetting * r2)[..., None] * np.array(stain.background_rgb[::-1])  # BGR
    residual = f.frame.pixels.astype(float) - light
    assert abs(residual.mean()) < 0.05  # unbiased: rounded, not truncated
    corners = r2 > 0.8
    assert abs(residual[corners].mean()) < 0.1  # darker towards the corners as documented
    expected_sd = np.sqrt(stain.noise_dn**2 + 0.02 * light.mean() + 1 / 12)  # + quantisation
    assert residual.std() == pytest.approx(expected_sd, rel=0.05)


def test_white_cells_come_about_three_per_256_by_192_um() -> None:
    """Eight fields of 512 x 384 um (four times the reference area): about 8 * 12 = 96 white cells
    (Poisson, sd about 10)."""
    n = sum(c.kind == "wbc" for seed in range(8)
            for c in render_field(seed, width=1024, height=768, microns_per_pixel=0.5,
                                  rbc_density=0.02, n_platelets=0).cells)
    assert 70 <= n <= 125, n


def test_cells_are_drawn_at_their_documented_sizes() -> None:
    """Equivalent diameters of whole cells: neutrophil 10.5-12.5 um, lymphocyte 8.5-11, monocyte
    13-16, eosinophil 11.5-14, basophil 10-12.5, platelets 2-3.2 (a few % for the wobbly outline
    and the pixel grid); a lymphocyte's cytoplasm is sky blue (blue over red)."""
    ranges = {"neutrophil": (10.5, 12.5), "lymphocyte": (8.5, 11.0), "monocyte": (13.0, 16.0),
              "eosinophil": (11.5, 14.0), "basophil": (10.0, 12.5)}
    platelets = []
    for subtype, (lo, hi) in ranges.items():
        f = render_field(21, width=400, height=400, microns_per_pixel=0.25, n_wbc=4, n_platelets=6,
                         wbc_mix={subtype: 1.0}, rbc_density=0.05, touching_fraction=0.0)
        whole = [c for c in f.cells if not c.cut_by_frame_edge]
        wbc = [c.diameter_um for c in whole if c.kind == "wbc"]
        assert wbc and all(lo * 0.95 <= d <= hi * 1.05 for d in wbc), (subtype, wbc)
        platelets += [c.diameter_um for c in whole if c.kind == "platelet"]
        if subtype == "lymphocyte":
            for c in (c for c in whole if c.kind == "wbc"):
                x0, y0, x1, y1 = c.bbox
                px = f.frame.pixels[y0:y1, x0:x1].astype(float)
                cytoplasm = c.mask & (px.mean(2) > 150)  # the dark nucleus left out
                assert np.median(px[..., 0][cytoplasm] - px[..., 2][cytoplasm]) > 20
    assert len(platelets) >= 10 and all(1.8 <= d <= 3.2 * 1.1 for d in platelets), platelets


def test_eosin_hue_and_strength_tilt_red_cells_as_documented() -> None:
    """eosin_hue > 0 is more orange (red over blue), < 0 more magenta; a stronger eosin makes red
    cells darker in green (their main absorption)."""
    def rbc_bgr(stain: StainParams) -> np.ndarray:
        f = render_field(9, width=W, height=H, stain=stain)
        inside = np.zeros((H, W), bool)
        for c in f.cells:
            if c.kind == "rbc":
                inside |= c.full_mask(H, W)
        return f.frame.pixels[inside].astype(float).mean(0)

    orange, magenta = rbc_bgr(StainParams(eosin_hue=0.8)), rbc_bgr(StainParams(eosin_hue=-0.8))
    assert orange[2] - orange[0] > magenta[2] - magenta[0] + 10
    assert rbc_bgr(StainParams(eosin_strength=1.4))[1] < rbc_bgr(StainParams(eosin_strength=0.7))[1] - 15


def test_a_red_cell_stains_no_further_than_its_mask_and_the_optical_blur() -> None:
    """A cell's edge is anti-aliased over one pixel and blurred by 0.18 um (0.9 px): 2 to 3 px
    outside every mask the slide is background (green within 2 levels of the field's far
    background), not a stained halo."""
    import cv2

    f = render_field(12, width=640, height=480, rbc_density=0.15, n_wbc=0, n_platelets=0, touching_fraction=0.0)
    cells = np.zeros((480, 640), np.uint8)
    for c in f.cells:
        cells |= c.full_mask(480, 640)

    def grown(r: int) -> np.ndarray:
        return cv2.dilate(cells, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))).astype(bool)

    green = f.frame.pixels[..., 1].astype(float)
    ring, far = grown(3) & ~grown(2), ~grown(8)
    assert ring.sum() > 1000 and far.sum() > 10_000
    assert green[far].mean() - green[ring].mean() < 2.0
