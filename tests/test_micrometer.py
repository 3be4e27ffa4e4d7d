"""The stage-micrometer calibration (`smearscope calibrate-scale`): the scale a station's sizes rest
on, so a wrong number must never come out with a clean exit. Rendered rulings as technicians
photograph them: short ticks with longer ones every 5th and 10th division along one edge of the
field, an uneven lamp, defocus, lines a few pixels apart, few divisions in view, a grid; and
fields that are no ruling at all (cells, lamp flicker bands)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from reticles import render_micrometer

from smearscope.service.analysis.micrometer import MicrometerError, measure_micrometer


@pytest.mark.parametrize(("mpp", "angle", "size"), [(0.1, 0.0, (1280, 960)), (0.135, 17.0, (1008, 630)),
                                                    (0.3, -35.0, (800, 600)), (0.05, 3.0, (1920, 1080))])
def test_micrometer_calibration_on_rendered_rulings(mpp, angle, size):
    img = render_micrometer(size[0], size[1], mpp, angle_deg=angle, seed=int(mpp * 1000))
    r = measure_micrometer(img, 10.0)
    assert r.microns_per_pixel == pytest.approx(mpp, rel=0.005)
    # rendered across u = x cos(angle) + y sin(angle) (y down): the lines run at angle + 90 degrees
    off = (r.angle_deg - (angle + 90.0)) % 180.0
    assert min(off, 180.0 - off) < 0.5, r.angle_deg


def test_micrometer_refuses_what_is_not_a_ruling():
    with pytest.raises(MicrometerError):
        measure_micrometer(np.full((200, 200, 3), 180, np.uint8))
    noise = (np.random.default_rng(0).random((300, 300, 3)) * 255).astype(np.uint8)
    with pytest.raises(MicrometerError):
        measure_micrometer(noise)
    # under 32 pixels across: too few to measure, though the strip shows a ruling
    strip = render_micrometer(400, 300, 0.25, ticks_um=None)[:24]
    with pytest.raises(MicrometerError, match=r"image too small \(400x24\)"):
        measure_micrometer(strip)


def test_calibrate_scale_command(tmp_path):
    path = tmp_path / "micrometer.png"
    cv2.imwrite(str(path), render_micrometer(1024, 768, 0.12, angle_deg=8.0))
    proc = subprocess.run([sys.executable, "-m", "smearscope", "calibrate-scale", str(path), "--json"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["microns_per_pixel"] == pytest.approx(0.12, rel=0.005)
    assert out["warnings"] == [] and out["config_key"] == "source.microns_per_pixel"
    blank = tmp_path / "noise.png"
    cv2.imwrite(str(blank), (np.random.default_rng(1).random((300, 300, 3)) * 255).astype(np.uint8))
    proc = subprocess.run([sys.executable, "-m", "smearscope", "calibrate-scale", str(blank)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "no_ruling"
    # a ruling measured, but the division given is wrong for it: 0.12 x 100 = 12 um/px is no station's scale
    proc = subprocess.run([sys.executable, "-m", "smearscope", "calibrate-scale", str(path), "--division-um", "1000"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "implausible_scale", proc.stdout
    # an image that cannot be read: the reader's code, and its message as analyze gives it
    proc = subprocess.run([sys.executable, "-m", "smearscope", "calibrate-scale", str(tmp_path / "nothere.png")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"] == {
        "code": "not_found", "message": f"{tmp_path / 'nothere.png'}: no such file"}, proc.stdout


@pytest.mark.parametrize(("case", "mpp", "kwargs"), [
    # short ticks, longer every 5th and 10th, along the bottom edge: the division, not the 5th tick's
    ("ticks_at_edge", 0.2, {"ticks_um": (3.0, 8.0, 14.0), "ticks_at": 0.8, "angle_deg": 3.0}),
    ("short_ticks", 0.25, {"ticks_um": (2.0, 20.0, 40.0), "angle_deg": -2.0}),
    # the lamp falling by 60 % across the field (a plateau in the autocorrelation, unless detrended)
    ("uneven_lamp", 0.3333, {"lamp": 0.6, "ticks_um": None}),
    # ... with ticks: their ends repeat across the lines too, which is no grid
    ("ticks_and_lamp", 0.3333, {"lamp": 0.5, "angle_deg": 5.0}),
    ("defocused", 0.5, {"blur_px": 3.0, "ticks_um": None, "angle_deg": 3.0}),
    ("lines_4px_apart", 1.19, {"ticks_um": None, "line_um": 1.5, "blur_px": 0.4}),
])
def test_micrometer_measures_real_reticles_to_a_fraction_of_a_percent(case, mpp, kwargs):
    img = render_micrometer(1280, 960, mpp, 10.0 if case != "lines_4px_apart" else 5.0, **kwargs)
    r = measure_micrometer(img, 10.0 if case != "lines_4px_apart" else 5.0)
    assert r.microns_per_pixel == pytest.approx(mpp, rel=0.003), case
    assert not r.warnings


@pytest.mark.parametrize("spacing_px", [200, 300])
def test_a_few_wide_divisions_are_measured_not_taken_for_two_rulings(spacing_px):
    """Six or four divisions across the field, ticks every other one: what the division's shape
    leaves unexplained repeats a few times at most by chance, which is no second ruling."""
    r = measure_micrometer(render_micrometer(1280, 960, 10.0 / spacing_px), 10.0)
    assert r.period_px == pytest.approx(spacing_px, rel=0.003) and r.periods_seen >= 4


@pytest.mark.parametrize("bold", [4.0, 6.0, 10.0])
def test_bolder_lines_every_fifth_division_do_not_make_the_division(bold):
    """The 5th lines drawn wider (as many reticles have) dominate the autocorrelation, the thin
    lines' own peak falling below zero; the division is still the spacing every line repeats at,
    not five of them."""
    base = render_micrometer(1280, 960, 0.3333, ticks_um=None, line_um=0.7, blur_px=2.0, seed=3).astype(np.float32)
    wide = render_micrometer(1280, 960, 0.3333, 50.0, ticks_um=None, line_um=0.7 * bold, blur_px=2.0, seed=4)
    img = np.minimum(base, wide.astype(np.float32)).astype(np.uint8)  # lines every 10 um, every 5th wider
    r = measure_micrometer(img, 10.0)
    assert r.microns_per_pixel == pytest.approx(0.3333, rel=0.003)


def test_every_second_line_bolder_is_said_with_the_other_reading():
    """A half-division reticle whose half lines are thinner: the spacing of neighbouring lines is
    measured, and the warning gives the scale if --division-um named every second line's."""
    thin = render_micrometer(1280, 960, 0.25, 5.0, ticks_um=None, line_um=0.6, seed=5).astype(np.float32)
    bold = render_micrometer(1280, 960, 0.25, 10.0, ticks_um=None, line_um=2.4, seed=6)
    r = measure_micrometer(np.minimum(thin, bold.astype(np.float32)).astype(np.uint8), 10.0)
    assert r.period_px == pytest.approx(20.0, rel=0.003)  # 5 um at 0.25 um/px
    warning = next(w for w in r.warnings if "every second line" in w)
    other = float(warning.split("the scale is ")[1].split(" um/px")[0])
    assert other == pytest.approx(10.0 / 40.0, rel=0.003)  # 10 um over two lines' 40 px


def test_a_grid_is_measured_with_a_warning_and_few_divisions_are_said():
    grid = measure_micrometer(render_micrometer(1024, 768, 0.25, ticks_um=None, grid=True, angle_deg=4.0))
    assert grid.microns_per_pixel == pytest.approx(0.25, rel=0.003)
    assert any("two directions" in w for w in grid.warnings)
    few = measure_micrometer(render_micrometer(1000, 480, 0.05, ticks_um=None, line_um=2.0))  # 200 px apart
    assert few.microns_per_pixel == pytest.approx(0.05, rel=0.003)
    assert few.periods_seen < 5 and any("divisions in view" in w for w in few.warnings)


def _cells(seed=0):
    """A blood-smear-like field: pale-centred discs, 70 % of the field covered."""
    rng = np.random.default_rng(seed)
    img = np.full((960, 1280), 215, np.float32)
    for _ in range(189):
        x, y, r = int(rng.integers(0, 1280)), int(rng.integers(0, 960)), int(38 * rng.uniform(0.85, 1.15))
        cv2.circle(img, (x, y), r, 150, -1, cv2.LINE_AA)
        cv2.circle(img, (x, y), r // 2, 185, -1, cv2.LINE_AA)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 1.5) + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def _flicker(period: float, amp: float, seed: int):
    """A lit field without a micrometer, with a PWM lamp's faint rolling-shutter bands."""
    yy, xx = np.mgrid[0:720, 0:960].astype(np.float32)
    g = 200 * (1 - 0.3 * ((xx - 480) ** 2 + (yy - 360) ** 2) / (480 ** 2 + 360 ** 2))
    g = g + amp * np.sin(2 * np.pi * yy / period) + np.random.default_rng(seed).normal(0, 3, g.shape)
    return np.clip(g, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_fields_that_are_no_ruling_are_refused_not_measured(seed):
    """Cells make patterns a few hundred pixels across that chance makes look regular over two or
    three of them; a lamp's flicker is regular but shallow."""
    with pytest.raises(MicrometerError):
        measure_micrometer(_cells(seed))
    with pytest.raises(MicrometerError, match="no clear ruling"):
        measure_micrometer(_flicker(period=45.0 + 5 * seed, amp=6.0, seed=seed))


def test_calibrate_scale_text_gives_the_config_line_and_the_warnings(tmp_path):
    """Without --json: the `microns_per_pixel = ...` line for [source] (valid TOML), and each
    warning as a `warning:` line (a grid: lines both ways); --json lists the same warnings."""
    import tomllib

    def calibrate(path, *extra):
        return subprocess.run([sys.executable, "-m", "smearscope", "calibrate-scale", str(path), *extra],
                              check=False, capture_output=True, text=True, timeout=120)

    plain = tmp_path / "micrometer.png"
    cv2.imwrite(str(plain), render_micrometer(1024, 768, 0.12, angle_deg=8.0))
    proc = calibrate(plain)
    assert proc.returncode == 0, proc.stderr
    last = "\n".join(proc.stdout.strip().splitlines()[-2:])
    assert tomllib.loads(last)["microns_per_pixel"] == pytest.approx(0.12, rel=0.005), proc.stdout
    assert "warning:" not in proc.stdout
    grid = tmp_path / "grid.png"
    cv2.imwrite(str(grid), render_micrometer(1024, 768, 0.25, ticks_um=None, grid=True, angle_deg=4.0))
    proc = calibrate(grid)
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stdout.splitlines() if ln.startswith("warning: ")]
    assert any("two directions" in w for w in warnings), proc.stdout
    assert tomllib.loads(proc.stdout.strip().splitlines()[-2])["microns_per_pixel"] == pytest.approx(0.25, rel=0.003)
    as_json = json.loads(calibrate(grid, "--json").stdout)
    assert [f"warning: {w}" for w in as_json["warnings"]] == warnings


def test_a_scale_just_past_a_bound_is_never_shown_as_the_bound():
    from smearscope.cli.calibrate import outside_shown

    assert outside_shown(2.0000004, 0.01, 2.0) == "just over 2"  # it read "2 um/px ... is outside 0.01..2.0"
    assert outside_shown(0.00999999, 0.01, 2.0) == "just under 0.01"
    assert outside_shown(2.31, 0.01, 2.0) == "2.31" and outside_shown(0.006, 0.01, 2.0) == "0.006"


def test_a_scale_under_the_analyzers_range_is_implausible(tmp_path):
    """A ruling at 0.12 um/px read with --division-um 0.5 gives 0.006 um/px, under 0.01: refused,
    not printed as a calibration."""
    path = tmp_path / "micrometer.png"
    cv2.imwrite(str(path), render_micrometer(1024, 768, 0.12, angle_deg=8.0))
    proc = subprocess.run([sys.executable, "-m", "smearscope", "calibrate-scale", str(path), "--division-um", "0.5",
                           "--json"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "implausible_scale", proc.stdout


def _field_stop(img: np.ndarray, radius: float, soft: int) -> np.ndarray:
    """`img` seen through a round field stop of `radius` px: black outside (a hard edge, or one
    falling off as (r / radius) ** soft)."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h / 2, xx - w / 2) / radius
    m = np.clip(1.0 - r ** soft, 0.0, 1.0) if soft else (r < 1.0).astype(np.float64)
    return (img * (m[..., None] if img.ndim == 3 else m)).astype(np.uint8)


@pytest.mark.parametrize(("angle", "radius", "soft"), [(0.0, 0.48, 0), (20.0, 0.48, 6), (0.0, 0.4, 6), (45.0, 0.4, 0)])
def test_a_round_field_of_view_is_measured_not_refused(angle, radius, soft):
    """Many microscope cameras see the field stop: a lit disc inside black corners and sides. The
    black is no part of the ruling (it made rows through the disc's edge the busiest and columns
    half black, and the ruling was refused as "no clear ruling")."""
    img = _field_stop(render_micrometer(800, 600, 0.25, angle_deg=angle, seed=3), radius * 600, soft)
    r = measure_micrometer(img, 10.0)
    assert r.microns_per_pixel == pytest.approx(0.25, rel=0.005)


def test_calibrate_scale_says_what_the_calibration_record_keeps_and_the_config_takes_its_lines(tmp_path):
    """A lab records each calibration: when, from which image, the ruling and what was measured.
    The text output names them (the image by its sha256), and its config lines, pasted into a
    station's [source], load; the station's start and doctor then read the calibration's age."""
    import datetime
    import hashlib
    import logging

    from smearscope.service.config import load_config
    from smearscope.service.station.scale_record import scale_calibration_note

    path = tmp_path / "micrometer.png"
    cv2.imwrite(str(path), render_micrometer(1024, 768, 0.12, angle_deg=8.0))
    proc = subprocess.run([sys.executable, "-m", "smearscope", "calibrate-scale", str(path)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    record = next(ln for ln in lines if ln.startswith("record: "))
    assert hashlib.sha256(path.read_bytes()).hexdigest() in record and "10 um divisions" in record
    assert re.search(r"measured \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 ", record) and " px per division over " in record
    today = datetime.date.today()
    assert lines[-1] == f"microns_per_pixel_calibrated_on = {today.isoformat()}"
    config = tmp_path / "station.toml"
    config.write_text('station_id = "s1"\n[source]\nkind = "folder"\n'
                      f'path = "{tmp_path / "inbox"}"\n' + "\n".join(lines[-2:]) + "\n")
    loaded = load_config(config)
    assert loaded.source.microns_per_pixel == pytest.approx(0.12, rel=0.005)
    assert loaded.source.microns_per_pixel_calibrated_on == today
    level, text = scale_calibration_note(loaded, today)
    assert level == logging.INFO and f"calibrated on {today} (0 days ago; due again in 365 days)" in text
    as_json = json.loads(subprocess.run([sys.executable, "-m", "smearscope", "calibrate-scale", str(path), "--json"],
                                        check=False, capture_output=True, text=True, timeout=120).stdout)
    assert as_json["calibrated_on"] == today.isoformat() and as_json["image_sha256"] in record
    assert as_json["measured_at"].endswith("+00:00") and as_json["division_um"] == 10.0


@pytest.mark.parametrize("spacing_px", [1.9, 2.1])
def test_lines_finer_than_three_pixels_are_refused_not_measured_as_their_moire(spacing_px):
    """Lines 2 px apart (a 10 um micrometer through a low-power objective) sampled by the camera
    beat into a coarser pattern (every 9.5 or 10.5 px here) that repeats as a ruling would: it was
    reported as the division, the scale 80 % off. The profile's strongest frequency is then the
    fine lines', under 3 px, not the measured division's: refused, saying so."""
    img = render_micrometer(640, 480, 10.0 / spacing_px, line_um=10.0 / spacing_px, blur_px=0.3)
    with pytest.raises(MicrometerError, match="closer than 3 px"):
        measure_micrometer(img, 10.0)


def test_lines_just_under_three_pixels_apart_are_still_measured():
    """Lines 2.8 px apart are resolved: their own frequency is the strongest, and they are measured."""
    img = render_micrometer(640, 480, 10.0 / 2.8, line_um=10.0 / 2.8, blur_px=0.3)
    assert measure_micrometer(img, 10.0).period_px == pytest.approx(2.8, rel=0.003)
