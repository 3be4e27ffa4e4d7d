"""The `smearscope analyze` contract end to end, in a subprocess, as users and evaluators call it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import hostile
import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.morphology import SIZE_BASED

ROOT = Path(__file__).resolve().parents[1]
needs_models = pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")


def smearscope(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smearscope", *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)


def test_every_hostile_input_gives_its_code_and_no_traceback(tmp_path):
    """All hostile cases with default limits, through the CLI: JSON error, exit 2, no traceback."""
    # a directory is a folder of images to the CLI (an empty one: `no_images`, tested below);
    # load_image's `not_a_file` for it is checked in test_ingest
    cases = [(c, p) for c, p in hostile.generate_all(tmp_path)
             if not getattr(c, "limits", None) and not p.is_dir()]
    assert len(cases) >= 15
    # one process per case would take minutes; the CLI's error path is the same for every code,
    # so check a spread of codes through the CLI and all of them through load_image in test_ingest
    seen = set()
    for case, path in cases:
        if case.expected in seen:
            continue
        seen.add(case.expected)
        proc = smearscope("analyze", str(path), "--json")
        assert proc.returncode == 2, (case.name, proc.stdout, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr, case.name
        err = json.loads(proc.stdout.strip().splitlines()[-1])
        assert err["error"]["code"] == case.expected, case.name
    assert len(seen) >= 10


def test_bad_scale_argument_is_rejected(tmp_path):
    p = tmp_path / "f.png"
    cv2.imwrite(str(p), hostile.smear_like(200, 200))
    proc = smearscope("analyze", str(p), "--json", "--microns-per-pixel", "-1")
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "bad_scale"


@needs_models
def test_analyze_rendered_field_json_and_overlay(tmp_path):
    field = render_field(7, width=800, height=600, microns_per_pixel=0.1)
    img = tmp_path / "field.png"
    cv2.imwrite(str(img), np.asarray(field.frame.pixels))
    overlay = tmp_path / "overlay.png"
    proc = smearscope("analyze", str(img), "--json", "--microns-per-pixel", "0.1", "--overlay", str(overlay))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    rep = json.loads(lines[0])
    own = rep["scale"].pop("field_estimate_microns_per_pixel")  # the calibration checked against the red cells
    assert rep["scale"] == {"microns_per_pixel": 0.1, "method": "given", "canonical_microns_per_pixel": 0.2,
                            "uncertain": False, "rbc_count": 0}
    assert own == pytest.approx(0.1, rel=0.15) and "calibration_suspect" not in {f["code"] for f in rep["flags"]}
    assert rep["counts"]["rbc"] > 0 and len(rep["cells"]) == sum(rep["counts"].values())
    for c in rep["cells"]:
        x0, y0, x1, y1 = c["bbox"]
        assert 0 <= x0 < x1 <= 800 and 0 <= y0 < y1 <= 600
    drawn = cv2.imread(str(overlay))
    assert drawn.shape == (600, 800, 3) and np.abs(drawn.astype(int) - np.asarray(field.frame.pixels)).sum() > 0


def _render(path: Path, seed: int) -> None:
    field = render_field(seed, width=640, height=480, microns_per_pixel=0.1)
    cv2.imwrite(str(path), np.asarray(field.frame.pixels))


@needs_models
def test_analyze_a_batch_one_line_per_image_and_a_bad_one_does_not_stop_it(tmp_path):
    """A directory and an @list in one call: models load once, each image gives one line in order,
    the rejected image its error line (with its path), and the exit status says one was rejected."""
    folder = tmp_path / "fields"
    folder.mkdir()
    _render(folder / "a.png", 11)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nxxxx")  # ends before IEND: truncated
    (folder / "notes.txt").write_text("not an image: a directory contributes image files only")
    _render(tmp_path / "c.png", 12)
    listing = tmp_path / "more.txt"
    listing.write_text(f"{tmp_path / 'c.png'}\n")
    overlays = tmp_path / "overlays"
    dets = tmp_path / "dets.jsonl"
    proc = smearscope("analyze", str(folder), f"@{listing}", "--json", "--microns-per-pixel", "0.1",
                      "--overlay", str(overlays), "--detections", str(dets), "--detections-floor", "0.05")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert [ln.get("image") or ln["source"]["source"] for ln in lines] == \
        [str(folder / "a.png"), str(folder / "b.png"), str(tmp_path / "c.png")]
    assert lines[1]["error"]["code"] == "truncated"
    assert lines[0]["counts"]["rbc"] > 0 and lines[2]["counts"]["rbc"] > 0
    assert sorted(p.name for p in overlays.iterdir()) == ["a.overlay.png", "c.overlay.png"]
    for name, src in (("a", folder / "a.png"), ("c", tmp_path / "c.png")):  # each overlay is drawn on its image
        drawn, own = cv2.imread(str(overlays / f"{name}.overlay.png")).astype(int), cv2.imread(str(src)).astype(int)
        other = cv2.imread(str(tmp_path / "c.png" if name == "a" else folder / "a.png")).astype(int)
        assert np.abs(drawn - own).mean() < np.abs(drawn - other).mean() / 2
    records = [json.loads(ln) for ln in dets.read_text().splitlines()]
    assert len(records) == 3 and records[1]["error"]["code"] == "truncated"
    for rep, rec in ((lines[0], records[0]), (lines[2], records[2])):
        assert rec["report_id"] == rep["report_id"] and (rec["width"], rec["height"]) == (640, 480)
        counted = [d for d in rec["detections"] if d["counted"]]
        assert sorted((d["kind"], d["bbox"], d["label"]) for d in counted) == \
            sorted((c["kind"], c["bbox"], c["label"]) for c in rep["cells"])
        assert all(0.05 <= d["score"] < 0.5 for d in rec["detections"] if not d["counted"])


@needs_models
def test_analyze_without_detections_counts_the_same_cells(tmp_path):
    """--detections lowers the detector's threshold for candidates only: the report is unchanged."""
    img = tmp_path / "f.png"
    _render(img, 13)
    plain = smearscope("analyze", str(img), "--json", "--microns-per-pixel", "0.1")
    with_dets = smearscope("analyze", str(img), "--json", "--microns-per-pixel", "0.1",
                           "--detections", str(tmp_path / "d.jsonl"))
    assert plain.returncode == with_dets.returncode == 0, with_dets.stderr[-2000:]
    a, b = json.loads(plain.stdout), json.loads(with_dets.stdout)
    assert a["cells"] == b["cells"] and a["counts"] == b["counts"]
    rec = json.loads((tmp_path / "d.jsonl").read_text())
    assert any(not d["counted"] for d in rec["detections"]), "a rendered field has detections under 0.5"
    assert min(d["score"] for d in rec["detections"]) < 0.25
    # a floor above the detector's own threshold (0.25) still holds
    high = smearscope("analyze", str(img), "--json", "--microns-per-pixel", "0.1",
                      "--detections", str(tmp_path / "h.jsonl"), "--detections-floor", "0.3")
    assert high.returncode == 0 and json.loads(high.stdout)["cells"] == a["cells"]
    dets = json.loads((tmp_path / "h.jsonl").read_text())["detections"]
    assert dets and min(d["score"] for d in dets) >= 0.3
    assert [d for d in rec["detections"] if d["score"] >= 0.3] == dets


def test_analyze_refuses_a_bad_floor_and_an_empty_folder(tmp_path):
    p = tmp_path / "f.png"
    cv2.imwrite(str(p), hostile.smear_like(200, 200))
    proc = smearscope("analyze", str(p), "--json", "--detections", str(tmp_path / "d.jsonl"), "--detections-floor", "0.7")
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "bad_floor"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = smearscope("analyze", str(empty), "--json")
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "no_images"


def test_a_folder_gives_a_line_for_every_entry_named_as_an_image(tmp_path):
    """A broken link or a FIFO named .jpg is an input that cannot be read, not silently left out;
    a directory named .png and a file of another suffix are no inputs."""
    folder = tmp_path / "fields"
    folder.mkdir()
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(folder / "pipe.png")
    (folder / "sub.png").mkdir()
    (folder / "notes.txt").write_text("not an input")
    proc = smearscope("analyze", str(folder), "--json")
    lines = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert [(Path(ln["image"]).name, ln["error"]["code"]) for ln in lines] == [("dangling.jpg", "not_found"),
                                                                             ("pipe.png", "not_a_file")]


def test_analyze_lists_and_output_paths_are_checked_before_any_work(tmp_path):
    """@LIST lines are paths, not quoted or globbed (spaces around a line and a Windows line end
    trimmed, blank lines and # comment lines skipped, ./#name a file, a line starting with - is a
    file, not an option); an unreadable list or an unusable output path is refused up front."""
    img = tmp_path / "f.png"
    cv2.imwrite(str(img), hostile.smear_like(200, 200))
    listing = tmp_path / "list.txt"
    listing.write_bytes(f"# the slide's fields\n{tmp_path / 'missing.png'}\n\n  # {img}\n--microns-per-pixel\n"
                        f" \t{tmp_path}/ spaced*.png \r\n./#hash.png\n".encode())
    proc = smearscope("analyze", f"@{listing}", "--json")
    lines = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert proc.returncode == 2 and [ln["image"] for ln in lines] == [str(tmp_path / "missing.png"), "--microns-per-pixel",
                                                                      f"{tmp_path}/ spaced*.png", "#hash.png"]
    assert all("error" in ln for ln in lines)
    for args, code, says in (([f"@{tmp_path / 'nope.txt'}"], "bad_list", "cannot read image list"),
                             ([str(img), "--detections", str(tmp_path / "no" / "such" / "d.jsonl")], "bad_output",
                              "cannot be written (its folder does not exist)"),
                             ([str(img), "--overlay", str(tmp_path / "overlay_without_suffix")], "bad_output",
                              "an existing directory, or a file name with an image suffix"),
                             ([str(img), "--detections-floor", "0.05"], "bad_arguments", "give --detections too"),
                             ([str(img), "--overlay", str(tmp_path / ("a" * 300 + ".png"))], "bad_output", "--overlay"),
                             ([str(img), "--fhir", str(tmp_path / ("a" * 300 + ".json"))], "bad_output", "--fhir"),
                             ([str(img), "--specimen", "--microns-per-pixel", "0.1"], "bad_arguments", "give one")):
        proc = smearscope("analyze", *args, "--json")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1000:]
        error = json.loads(proc.stdout)["error"]
        assert error["code"] == code and says in error["message"], (args, error)


@needs_models
def test_analyze_specimen_gives_a_far_off_field_the_scale_the_earlier_fields_agree_on(tmp_path):
    """Five fields of one slide, then an empty one whose scale falls back to a guess: with
    --specimen it is analysed at the scale the five agree on and says so; without, it keeps the
    guess; with --microns-per-pixel nothing is pooled."""
    folder = tmp_path / "slide"
    folder.mkdir()
    for k in range(5):
        field = render_field(40 + k, width=640, height=480, microns_per_pixel=0.15)
        cv2.imwrite(str(folder / f"f{k}.png"), np.asarray(field.frame.pixels))
    glass = np.clip(np.random.default_rng(0).normal(225, 3, (480, 640, 3)), 0, 255).astype(np.uint8)
    cv2.imwrite(str(folder / "f5.png"), glass)

    def scales(*extra):
        proc = smearscope("analyze", str(folder), "--json", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
        return [r["scale"] for r in reports], [{f["code"] for f in r["flags"]} for r in reports]

    alone, alone_flags = scales()
    # the glass field measured nothing: its scale is a default, and it says so
    assert alone[5]["method"] == "default" and "scale_unknown" in alone_flags[5]
    own = [s["microns_per_pixel"] for s in alone[:5]]
    assert all(abs(m / 0.15 - 1) < 0.15 for m in own) and abs(alone[5]["microns_per_pixel"] / 0.15 - 1) > 0.2
    pooled, flags = scales("--specimen")
    assert pooled[:5] == alone[:5]
    assert pooled[5]["method"] == "specimen" and "scale_from_specimen" in flags[5]
    assert pooled[5]["microns_per_pixel"] == pytest.approx(float(np.median(own)), rel=1e-3)
    assert pooled[5]["field_estimate_microns_per_pixel"] is None  # it had no estimate of its own


@needs_models
def test_analyze_checks_the_first_images_calibration(tmp_path):
    """Fields at 0.1 um/px analysed as 0.25 (a calibration made for another objective): the first
    --check-calibration images say calibration_suspect with their own estimate, the later ones
    run no check; 0 runs none."""
    folder = tmp_path / "slide"
    folder.mkdir()
    # 960 x 720: at 2.5 times their size some red cells are still whole (a cut one gets no size-based type)
    for k in range(3):
        cv2.imwrite(str(folder / f"f{k}.png"), np.asarray(render_field(60 + k, width=960, height=720,
                                                                       microns_per_pixel=0.1).frame.pixels))

    doubted_rows: list[list[dict]] = []

    def checked(n: str) -> list[tuple[bool, float | None]]:
        proc = smearscope("analyze", str(folder), "--json", "--microns-per-pixel", "0.25", "--check-calibration", n)
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
        doubted_rows.extend([s for s in r["rbc_morphology"] if s["label"] in SIZE_BASED] for r in reports
                            if "calibration_suspect" in {f["code"] for f in r["flags"]})
        return [("calibration_suspect" in {f["code"] for f in r["flags"]}, r["scale"]["field_estimate_microns_per_pixel"])
                for r in reports]

    two = checked("2")
    assert [flagged for flagged, _ in two] == [True, True, False]
    assert all(own == pytest.approx(0.1, rel=0.15) for _, own in two[:2]) and two[2][1] is None
    # the JSON itself says the flagged fields' size-based calls are not to be read (as FHIR, the
    # dashboard and the summary do): no grade, the count kept for audit; every size-based class is
    # listed, one no cell was given with a count of 0 (no row would read as "none seen")
    assert len(doubted_rows) == 2
    for rows in doubted_rows:
        assert sorted(s["label"] for s in rows) == sorted(SIZE_BASED), rows
        assert all(not s["assessable"] and s["grade"] is None for s in rows), rows
    counts = [s["count"] for rows in doubted_rows for s in rows]
    assert 0 in counts and max(counts) > 0, counts  # classes seen and not seen, treated alike
    assert checked("0") == [(False, None)] * 3
    proc = smearscope("analyze", str(folder), "--check-calibration", "-1")
    assert proc.returncode != 0 and "--check-calibration: -1 is outside 0..inf" in proc.stderr


@needs_models
def test_analyze_prints_its_summary_at_an_estimated_scale_and_at_a_given_one(tmp_path):
    """The human-readable lines (no --json): the red-cell diameter only where it was measured."""
    path = tmp_path / "field.png"
    _render(path, 3)
    estimated = smearscope("analyze", str(path))
    assert estimated.returncode == 0 and "Traceback" not in estimated.stderr, estimated.stderr[-800:]
    assert "RBC " in estimated.stdout and "RBC diameter" not in estimated.stdout
    # size-based classes are not assessable there: never printed as a share (0.0% reads "none seen");
    # each named with the cells the head gave it, counted by their shape
    report = json.loads(smearscope("analyze", str(path), "--json").stdout)
    given_them = {s["label"]: s["count"] for s in report["rbc_morphology"] if s["label"] in SIZE_BASED}
    assert (f"  RBC macrocyte {given_them['macrocyte']}, microcyte {given_them['microcyte']}, spherocyte "
            f"{given_them['spherocyte']}: not assessable at an estimated scale (those cells are counted by "
            "their shape)") in estimated.stdout.splitlines(), estimated.stdout
    shares = next(line for line in estimated.stdout.splitlines() if line.startswith("  RBC: "))
    assert not any(label in shares for label in ("macrocyte", "microcyte", "spherocyte")), shares
    given = smearscope("analyze", str(path), "--microns-per-pixel", "0.1")
    assert given.returncode == 0 and "RBC diameter" in given.stdout, given.stdout
    assert "not assessable" not in given.stdout, given.stdout
    # where the scale came from, in words beside its method's code (the code alone did not say
    # estimated or calibrated); the mean diameter to 0.1 um, as the dashboard shows it (0.01 um is
    # finer than any calibration: 1 % of the scale is 0.07 um)
    assert re.search(r"\(scale 0\.\d{4} um/px, estimated from the red cells: rbc_size_\w+; \d+ ms\)",
                     estimated.stdout.splitlines()[0]), estimated.stdout
    assert "(scale 0.1000 um/px, calibrated: given; " in given.stdout.splitlines()[0], given.stdout
    assert re.search(r"^  RBC diameter \d+\.\d um \(CV \d+\.\d%, n=\d+\)$", given.stdout, re.MULTILINE), given.stdout


def test_scale_and_floor_limits_are_the_documented_ones(tmp_path):
    """--microns-per-pixel 0.01 to 2 and a --detections-floor above 0 and under the counting
    threshold are taken (here the missing models are the next thing said); outside, bad_scale or
    bad_floor before any work."""
    p = tmp_path / "f.png"
    cv2.imwrite(str(p), hostile.smear_like(200, 200))
    none = str(tmp_path / "no-models")
    for extra, code in ((["--microns-per-pixel", "2.5"], "bad_scale"), (["--microns-per-pixel", "0.005"], "bad_scale"),
                        (["--microns-per-pixel", "2"], "engine_unavailable"),
                        (["--microns-per-pixel", "0.01"], "engine_unavailable"),
                        (["--detections", str(tmp_path / "d.jsonl"), "--detections-floor", "0"], "bad_floor"),
                        (["--detections", str(tmp_path / "d.jsonl"), "--detections-floor", "-0.1"], "bad_floor"),
                        (["--detections", str(tmp_path / "d.jsonl"), "--detections-floor", "0.3"], "engine_unavailable")):
        proc = smearscope("analyze", str(p), "--json", "--models", none, *extra)
        assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == code, (extra, proc.stdout)


@needs_models
def test_an_overlay_or_bundle_that_cannot_be_written_makes_the_exit_status_2_and_the_report_stands(tmp_path):
    """OUT/STEM.overlay.png or OUT/STEM.fhir.json a link into a folder that does not exist: the
    path passes the checks before work, the write fails; it is logged, the report is printed, and
    the exit status says something failed."""
    folder = tmp_path / "fields"
    folder.mkdir()
    _render(folder / "f.png", 21)
    for option, name in (("--overlay", "f.overlay.png"), ("--fhir", "f.fhir.json")):
        out = tmp_path / option.strip("-")
        out.mkdir()
        (out / name).symlink_to(tmp_path / "gone" / name)
        proc = smearscope("analyze", str(folder), "--json", "--microns-per-pixel", "0.1", option, str(out))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (option, proc.stderr[-1000:])
        (report,) = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
        assert report["counts"]["rbc"] > 0 and "error" not in report, option
        assert not (tmp_path / "gone").exists()


@needs_models
def test_two_inputs_of_one_name_get_an_overlay_and_a_bundle_each(tmp_path):
    """x/f.png and y/f.png: neither image's overlay or FHIR bundle replaces the other's."""
    for sub, seed in (("x", 22), ("y", 23)):
        (tmp_path / sub).mkdir()
        _render(tmp_path / sub / "f.png", seed)
    overlays, bundles = tmp_path / "overlays", tmp_path / "fhir"
    proc = smearscope("analyze", str(tmp_path / "x" / "f.png"), str(tmp_path / "y" / "f.png"), "--json",
                      "--microns-per-pixel", "0.1", "--overlay", str(overlays), "--fhir", str(bundles))
    assert proc.returncode == 0, proc.stderr[-1000:]
    reports = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(reports) == 2
    drawn = sorted(overlays.iterdir())
    assert [p.name for p in drawn] == ["f-2.overlay.png", "f.overlay.png"]  # the second of a stem: STEM-2
    images = {s: cv2.imread(str(tmp_path / s / "f.png")).astype(int) for s in ("x", "y")}
    nearest = set()
    for p in drawn:  # each overlay is drawn on its own image
        diff = {s: np.abs(cv2.imread(str(p)).astype(int) - own).mean() for s, own in images.items()}
        nearest.add(min(diff, key=diff.get))
        assert min(diff.values()) < max(diff.values()) / 2
    assert nearest == {"x", "y"}
    written = sorted(bundles.iterdir())
    assert [p.name for p in written] == ["f-2.fhir.json", "f.fhir.json"]
    texts = [p.read_text() for p in written]
    assert all(sum(r["report_id"] in t for t in texts) == 1 for r in reports)  # one bundle per report


@needs_models
def test_a_broken_tiff_is_told_once_with_its_code_and_opencvs_own_lines_only_at_debug(tmp_path):
    path = tmp_path / "cut.tif"
    # a JPEG strip holding only a JPEG's first markers: OpenCV's libtiff says why (a strip of no bytes
    # at all is refused before OpenCV sees it)
    path.write_bytes(hostile.one_strip_tiff(b"\xff\xd8\xff\xdb" + bytes(60), 7, 64, 64))
    for extra, opencv_said in (((), False), (("--log-level", "DEBUG"), True)):
        proc = smearscope(*extra, "analyze", str(path), "--json")
        assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "corrupt"
        assert ("grfmt_tiff" in proc.stderr) == opencv_said, proc.stderr[-1000:]


@needs_models
def test_one_image_writes_into_an_output_directory_that_exists(tmp_path):
    """--overlay DIR and --fhir DIR with one image: DIR/STEM.overlay.png and DIR/STEM.fhir.json
    (the overlay was refused as needing an image suffix, the bundle as needing a file name)."""
    img = tmp_path / "f.png"
    _render(img, 25)
    overlays, bundles = tmp_path / "overlays", tmp_path / "fhir"
    overlays.mkdir()
    bundles.mkdir()
    proc = smearscope("analyze", str(img), "--json", "--microns-per-pixel", "0.1", "--overlay", str(overlays),
                      "--fhir", str(bundles))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-1000:]
    report = json.loads(proc.stdout)
    assert [p.name for p in overlays.iterdir()] == ["f.overlay.png"] and cv2.imread(str(overlays / "f.overlay.png")) is not None
    assert [p.name for p in bundles.iterdir()] == ["f.fhir.json"] and report["report_id"] in (bundles / "f.fhir.json").read_text()


@needs_models
def test_detections_are_ranked_by_score_down_to_the_floor_inclusive(tmp_path):
    """--detections lists every detection sorted by score, highest first (as mAP ranks them), down
    to and including --detections-floor."""
    img = tmp_path / "f.png"
    _render(img, 24)
    dets = tmp_path / "d.jsonl"
    proc = smearscope("analyze", str(img), "--json", "--microns-per-pixel", "0.1", "--detections", str(dets))
    assert proc.returncode == 0, proc.stderr[-1000:]
    scores = [d["score"] for d in json.loads(dets.read_text())["detections"]]
    assert len(scores) > 10 and scores == sorted(scores, reverse=True)
    below = sorted(d["score"] for d in json.loads(dets.read_text())["detections"] if not d["counted"])
    floor = below[len(below) // 2]  # a score written: a floor at it keeps it
    proc = smearscope("analyze", str(img), "--json", "--microns-per-pixel", "0.1", "--detections", str(dets),
                      "--detections-floor", str(floor))
    assert proc.returncode == 0, proc.stderr[-1000:]
    again = [d["score"] for d in json.loads(dets.read_text())["detections"] if not d["counted"]]
    assert min(again) == floor and sorted(again) == [s for s in below if s >= floor]


@needs_models
def test_the_summary_lists_the_flags_and_reads_no_sizes_under_a_calibration_in_doubt(tmp_path):
    """The text lines: every flag as `[severity] code: message`; a field at 0.1 um/px given as 0.25
    (calibration_suspect) prints no red-cell diameter and no size-based share, and says why for
    each size-based class, seen in the field or not (as at an estimated scale)."""
    path = tmp_path / "field.png"
    _render(path, 3)
    proc = smearscope("analyze", str(path), "--microns-per-pixel", "0.25")
    assert proc.returncode == 0, proc.stderr[-1000:]
    out = proc.stdout
    assert "  [warning] calibration_suspect: " in out, out
    assert "RBC diameter" not in out, out
    doubted = next(ln for ln in out.splitlines() if ": not assessable with a calibration in doubt" in ln)
    shares = next((ln for ln in out.splitlines() if ln.startswith("  RBC: ")), "")
    for label in ("macrocyte", "microcyte", "spherocyte"):  # size-based: said not assessable, never given a share
        assert label in doubted and label not in shares, out
    # the shares printed sum to less than 100 %: the line says which rows, their counts, and how many
    # red cells are not in the shares (the same field's report and FHIR bundle)
    proc = smearscope("analyze", str(path), "--microns-per-pixel", "0.25", "--json", "--fhir", str(tmp_path / "f.json"))
    report = json.loads(proc.stdout)
    rows = {s["label"]: s for s in report["rbc_morphology"]}
    assert set(SIZE_BASED) <= set(rows) and 0 in {rows[k]["count"] for k in SIZE_BASED}, rows  # one not seen
    left = sum(rows[k]["count"] for k in SIZE_BASED)
    assert left > 0
    named = ", ".join(f"{s['label']} {s['count']}" for s in report["rbc_morphology"] if s["label"] in SIZE_BASED)
    assert doubted == (f"  RBC {named}: not assessable with a calibration in doubt ({left} of "
                       f"{report['counts']['rbc']} red cells, left out of the shares above)"), doubted
    printed = [float(x) for x in re.findall(r" (\d+\.\d)%", shares)]
    # every other row some cell was given is printed (those of 0, every graded class of the head's, are
    # in --json only)
    assert len([k for k, s in rows.items() if k not in SIZE_BASED and s["count"]]) == len(printed) <= 6
    assert sum(printed) + 100 * left / report["counts"]["rbc"] == pytest.approx(100, abs=0.1 * len(printed) + 0.05)
    bundle = json.loads((tmp_path / "f.json").read_text())
    for label in SIZE_BASED:  # each size-based class not assessable, whatever its count
        (seen,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
                   and e["resource"]["code"]["coding"][0]["display"].lower().startswith(label[:-1])]
        assert seen["dataAbsentReason"]["coding"][0]["code"] == "size-not-assessable", (label, seen)


@needs_models
@pytest.mark.realdata
def test_the_summary_shows_every_graded_red_cell_finding_with_its_grade():
    """Chula RBC-12 field 119 (scale estimated): schistocytes graded (1 or 2 of 91 red cells with the
    heads committed, ICSH 2+ to 3+), too few for the schistocyte flag and the 7th row by count. The summary printed the 6 most frequent rows
    without grades, so a technician reading it never saw them; now every finding graded 1+ or more
    is listed, each with its grade."""
    from realdata import DATA

    image = DATA / "chula_rbc12" / "Dataset" / "119.jpg"
    if not image.is_file():
        pytest.skip(f"Chula RBC-12 not found under {DATA} (set SMEARSCOPE_DATA)")
    text = smearscope("analyze", str(image))
    report = json.loads(smearscope("analyze", str(image), "--json").stdout)
    assert text.returncode == 0, text.stderr[-800:]
    shares = next(line for line in text.stdout.splitlines() if line.startswith("  RBC: "))
    graded = [s for s in report["rbc_morphology"] if s["grade"] not in (None, "none")]
    assert "schistocyte" in {s["label"] for s in graded} and "schistocytes_present" not in str(report["flags"])
    assert [s["label"] for s in report["rbc_morphology"]].index("schistocyte") >= 6
    for s in graded:
        assert f"{s['label']} {s['percent']:.1f}% ({s['grade']}" in shares, shares
    # the six most frequent rows and the graded one after them; rows not printed (with the head before
    # this one, unidentified 1.1 %) are counted, so the printed shares add up with them
    assessable = [s for s in report["rbc_morphology"] if s["assessable"] and s["count"]]  # rows of 0: --json only
    printed = re.findall(r"(?:^  RBC: |, )([a-z_]+) (\d+\.\d)%", shares)
    hidden = [s for s in assessable if s["label"] not in {label for label, _ in printed}]
    assert len(printed) == 7, shares
    together = 0.0
    if hidden:  # (rows not shown, counted: also test_the_summary_says_rows_not_shown_under_a_tenth_of_a_percent...)
        n, together = re.search(r"; (\d+) more rows? not shown \((\d+\.\d)% together", shares).groups()
        assert int(n) == len(hidden) and float(together) == pytest.approx(sum(s["percent"] for s in hidden), abs=0.05)
    else:
        assert "not shown" not in shares, shares
    assert sum(float(p) for _, p in printed) + float(together) == pytest.approx(100, abs=0.05 * (len(printed) + 1))


def test_the_summary_gives_a_grade_resting_on_few_cells_with_its_intervals_grades():
    """2 schistocytes of 91 red cells grade 3+, but their 95 % interval reaches down to 1+: the
    summary says so, as the dashboard does, instead of a bare '3+' (a flag tells the technician
    to read the grades with their intervals); a grade whose interval stays within it is bare."""
    from test_fhir import graded_report
    from test_open_set_flags import _cell

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.aggregate import aggregate
    from smearscope.service.analysis.records import CellKind

    def summary_rbc(normal: int, schistocytes: int) -> str:
        cells = [_cell(CellKind.RBC, "normal")] * normal + [_cell(CellKind.RBC, "schistocyte")] * schistocytes
        report = graded_report().model_copy(update={"rbc_morphology": aggregate(cells).rbc_morphology})
        return next(ln for ln in summarize(report).splitlines() if ln.startswith("  RBC: "))

    assert "schistocyte 2.2% (3+, 95% interval 1+ to 3+)" in summary_rbc(89, 2)
    assert "schistocyte 30.0% (3+)" in summary_rbc(700, 300)  # 3+ at both ends: nothing to add


def test_the_summary_says_when_a_grade_rests_on_fewer_calls_than_its_share():
    """A normal-looking lab's red cells draw unsure schistocyte calls: 12 of 300 (4.0 %), 2 of them
    at the flag's confidence, grade 1+ (under 1 %). '4.0% (1+)' would read as a grade below its own
    share; the summary says the grade rests on the 2 sure calls, and that none were where none are."""
    import dataclasses

    from test_fhir import graded_report
    from test_open_set_flags import _cell

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.aggregate import aggregate
    from smearscope.service.analysis.records import CellKind

    def summary_rbc(sure: int, unsure: int) -> str:
        called = _cell(CellKind.RBC, "schistocyte")
        cells = ([_cell(CellKind.RBC, "normal")] * (300 - sure - unsure) + [called] * sure
                 + [dataclasses.replace(called, label_score=0.55)] * unsure)
        report = graded_report().model_copy(update={"rbc_morphology": aggregate(cells).rbc_morphology})
        return next(ln for ln in summarize(report).splitlines() if ln.startswith("  RBC: "))

    assert "schistocyte 4.0% (1+ on the 2 of 12 calls at its flag's confidence" in summary_rbc(2, 10)
    assert "schistocyte 3.3% (below 1+ on the 0 of 10 calls at its flag's confidence" in summary_rbc(0, 10)
    assert "schistocyte 4.0% (3+" in summary_rbc(12, 0)  # every call sure: the grade rests on them all


def test_the_summary_reads_sickle_cells_present_or_none_never_graded():
    """ICSH reports sickle cells present, not 1+ to 3+: 4 sure calls of 114 red cells (3.5 %, 3+ on
    the schistocyte scale) read "present" beside the review flag, 5 beside the critical one; unsure
    calls alone read "none" (not "below 1+": sickle cells have no 1+). An older report's sickle
    "3+" reads present too, without its interval's grades."""
    import re

    from test_fhir import graded_report
    from test_open_set_flags import _cell

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.aggregate import aggregate
    from smearscope.service.analysis.records import CellKind
    from smearscope.service.analysis.report import ClassShare

    def summary(sure: int, unsure: int = 0, n_rbc: int = 114) -> list[str]:
        cells = ([_cell(CellKind.RBC, "normal")] * (n_rbc - sure - unsure)
                 + [_cell(CellKind.RBC, "sickle", 0.95)] * sure + [_cell(CellKind.RBC, "sickle", 0.5)] * unsure)
        a = aggregate(cells)
        return summarize(graded_report().model_copy(update={"rbc_morphology": a.rbc_morphology, "flags": a.flags}))\
            .splitlines()

    def rbc(lines: list[str]) -> str:
        return next(ln for ln in lines if ln.startswith("  RBC: "))

    four = summary(4)
    assert "sickle 3.5% (present)" in rbc(four) and not re.search(r"sickle [\d.]+% \([123]\+", rbc(four))
    assert any(ln.startswith("  [warning] sickle_cells_review:") for ln in four)
    assert not any("sickle_cells_present" in ln for ln in four)
    five = summary(5)
    assert "sickle 4.4% (present)" in rbc(five) and any(ln.startswith("  [critical] sickle_cells_present:") for ln in five)
    unsure = summary(0, unsure=3)
    assert "sickle 2.6% (none on the 0 of 3 calls at its flag's confidence)" in rbc(unsure)
    old = graded_report()
    graded = ClassShare(label="sickle", count=4, percent=3.51, ci95_low=1.37, ci95_high=8.68, grade="3+",
                        grade_ci_low="2+", grade_ci_high="3+")
    assert "sickle 3.5% (present)" in rbc(summarize(old.model_copy(
        update={"rbc_morphology": [*old.rbc_morphology, graded]})).splitlines())


def test_a_folder_run_again_with_its_overlays_in_it_analyses_the_fields_only(tmp_path):
    """`analyze fields --overlay fields` writes fields/NAME.overlay.png; run again (a technician
    re-running the slide), the folder's overlays were analysed as fields of their own (a report
    for "f.overlay.png", outlines and labels drawn on it) and each field's overlay could not be
    written (exit 2). A folder's *.overlay.png are the analyzer's own drawings, not fields; named
    on their own they are still read."""
    folder = tmp_path / "fields"
    folder.mkdir()
    cv2.imwrite(str(folder / "f.png"), hostile.smear_like(200, 200))
    first = smearscope("analyze", str(folder), "--json", "--overlay", str(folder))
    assert first.returncode == 0, first.stdout + first.stderr[-800:]
    assert (folder / "f.overlay.png").is_file()
    again = smearscope("analyze", str(folder), "--json", "--overlay", str(folder))
    lines = [json.loads(ln) for ln in again.stdout.splitlines()]
    assert [ln.get("source", {}).get("frame_id") for ln in lines] == ["f.png"]
    assert again.returncode == 0, again.stderr[-800:]
    alone = smearscope("analyze", str(folder / "f.overlay.png"), "--json")
    assert alone.returncode == 0 and json.loads(alone.stdout)["source"]["frame_id"] == "f.overlay.png"


@needs_models
def test_one_image_analysed_twice_gives_the_same_report_naming_the_software_and_models(tmp_path):
    """Reproducibility and traceability, as a lab's quality manager checks them: the same image
    analysed twice gives the same counts, differential, grades, flags and cells (only the ids, the
    times and the timings differ), and the report and its FHIR Device name the smearscope version
    that made it (as `smearscope --version` prints it) beside each model's sha256."""
    img = tmp_path / "field.png"
    _render(img, 11)
    runs = []
    for n in (1, 2):
        proc = smearscope("analyze", str(img), "--json", "--microns-per-pixel", "0.1", "--fhir", str(tmp_path / f"{n}.json"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append((json.loads(proc.stdout), json.loads((tmp_path / f"{n}.json").read_text())))
    (first, first_bundle), (second, second_bundle) = runs
    assert first["report_id"] != second["report_id"]
    for rep in (first, second):
        for key in ("report_id", "created_at", "timing_ms"):
            rep.pop(key)
        rep["source"].pop("captured_at")  # when the file was read: an image file carries no capture time
    assert first["counts"]["rbc"] > 0 and first["cells"]
    assert first == second
    installed = smearscope("--version").stdout.split()[-1]
    assert first["software_version"] == installed and first["schema_version"] == "1.5"
    for bundle in (first_bundle, second_bundle):
        device = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
        assert device["version"][0] == {"type": {"text": "software"}, "value": installed}
        assert {v["type"]["text"] for v in device["version"][1:]} == set(first["models"])


def test_the_summary_gives_each_wbc_share_to_one_decimal_as_the_red_cells():
    """One basophil among 250 white cells is 0.4 %: the summary printed the differential's shares
    rounded to whole percents, '(0%)', which reads as no basophil at all beside its count of 1; and
    1 of 3 read '33%' where the red-cell shares beside it carry one decimal. Now '0.4%' and '33.3%'."""
    from test_fhir import graded_report
    from test_open_set_flags import _cell

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.aggregate import aggregate
    from smearscope.service.analysis.records import CellKind

    def summary_wbc(**counts: int) -> str:
        cells = [_cell(CellKind.WBC, label) for label, n in counts.items() for _ in range(n)]
        report = graded_report().model_copy(update={"wbc_differential": aggregate(cells).wbc_differential})
        return next(ln for ln in summarize(report).splitlines() if ln.startswith("  WBC: "))

    line = summary_wbc(neutrophil=249, basophil=1)  # each with its 95 % interval, rounded outward
    assert "basophil 1 (0.4%, 95% CI " in line and "neutrophil 249 (99.6%, 95% CI " in line, line
    line = summary_wbc(neutrophil=2, lymphocyte=1)
    assert "lymphocyte 1 (33.3%, 95% CI " in line and "neutrophil 2 (66.7%, 95% CI " in line, line


def test_the_summary_counts_nucleated_red_cells_per_100_white_cells():
    """A field's nucleated red cells are counted apart from its white cells (counts.nrbc,
    nrbc_per_100_wbc) and flagged, but the summary's counts line named only RBC, WBC and platelets.
    It now says them as the dashboard does: 'NRBC 3 (1.5 per 100 WBC)', 'NRBC 0 (0.0 per 100 WBC)'."""
    from test_fhir import graded_report

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.report import Counts, ScaleInfo

    def first_line(nrbc: int, per_100: float | None) -> str:
        report = graded_report().model_copy(update={
            "counts": Counts(rbc=400, wbc=200, platelet=30, nrbc=nrbc), "nrbc_per_100_wbc": per_100,
            "scale": ScaleInfo(microns_per_pixel=0.1, method="given", canonical_microns_per_pixel=0.2)})
        return summarize(report).splitlines()[0]

    assert ": RBC 400, WBC 200, NRBC 3 (1.5 per 100 WBC), platelets 30  (" in first_line(3, 1.5), first_line(3, 1.5)
    assert ": RBC 400, WBC 200, NRBC 0 (0.0 per 100 WBC), platelets 30  (" in first_line(0, 0.0), first_line(0, 0.0)
    assert ": RBC 400, WBC 200, platelets 30  (" in first_line(0, None)  # a report from before they were counted


def test_analyze_on_tensorrt_without_it_says_where_a_jetson_gets_it(tmp_path):
    """`--backend tensorrt` where TensorRT is not importable: engine_unavailable, naming JetPack's
    apt package and the venv that sees it, not the `jetson` extra that pip cannot install there."""
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT present")
    except ImportError:
        pass
    img = tmp_path / "f.png"
    _render(img, seed=3)
    r = smearscope("analyze", str(img), "--backend", "tensorrt", "--json")
    assert r.returncode == 2, r.stderr
    error = json.loads(r.stdout.splitlines()[0])["error"]
    assert error["code"] == "engine_unavailable"
    assert "sudo apt install python3-libnvinfer" in error["message"] and "--system-site-packages" in error["message"]
    assert "jetson extra" not in error["message"]


def test_a_folder_of_subfolders_says_they_are_not_searched(tmp_path):
    """A dataset laid out as class subfolders (PBC's basophil/, eosinophil/, ...) given as one
    folder: analyze and calibrate-atypical said only "no image files in DIR", and adapt-wbc
    --template wrote a CSV of 0 white cells to type. Each says now that the subfolders are not
    searched, naming one, and writes nothing."""
    for name in ("basophil", "eosinophil"):
        (tmp_path / "cells" / name).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "cells" / name / "1.png"), hostile.smear_like(200, 200))
    folder = tmp_path / "cells"
    template = tmp_path / "typed.csv"
    for args in (["analyze", str(folder), "--json"], ["calibrate-atypical", str(folder)],
                 ["adapt-wbc", str(folder), "--template", str(template)]):
        r = smearscope(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        error = json.loads(r.stdout.splitlines()[0])["error"]
        assert error == {"code": "no_images", "message": (
            f"no image files in {folder}: a folder's subfolders are not searched, and {folder} has 2 "
            f"({folder / 'basophil'} holding 1 image file, ...): name them, or list the files in an @LIST")}, args
    assert not template.exists()


@pytest.mark.realdata
def test_a_datasets_folder_names_the_subfolder_that_holds_its_images():
    """BCCD given as its root folder: the hint named Annotations/, the first subfolder by name, which
    holds XML; it now names the subfolder holding the images, with their number."""
    from realdata import DATA

    bccd = DATA / "bccd" / "BCCD"
    if not (bccd / "JPEGImages").is_dir():
        pytest.skip(f"BCCD not under {DATA}")
    r = smearscope("analyze", str(bccd), "--json")
    images = len([p for p in (bccd / "JPEGImages").iterdir() if p.suffix.lower() == ".jpg"])
    subfolders = len([p for p in bccd.iterdir() if p.is_dir()])
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["message"] == (
        f"no image files in {bccd}: a folder's subfolders are not searched, and {bccd} has {subfolders} "
        f"({bccd / 'JPEGImages'} holding {images} image files, ...): name them, or list the files in an @LIST")
    assert min(p.name for p in bccd.iterdir() if p.is_dir()) != "JPEGImages"  # not merely the first


@pytest.mark.realdata
def test_a_yolo_datasets_split_names_its_images_folder_as_the_one_to_name(tmp_path: Path):
    """A YOLO split (chula_wbc_rpi/train: images/ beside labels/ of text) given as one folder: the hint
    named images/ and said 'name them', sending the user to labels/ too, which holds no field; images/
    is the only subfolder holding images, and is said so."""
    from realdata import DATA

    split = DATA / "chula_wbc_rpi" / "train"
    if not (split / "images").is_dir():
        pytest.skip(f"chula_wbc_rpi not under {DATA}")
    images = len([p for p in (split / "images").iterdir() if p.suffix.lower() in (".jpg", ".png")])
    assert sorted(p.name for p in split.iterdir() if p.is_dir()) == ["images", "labels"]
    template = tmp_path / "typed.csv"
    for args in (["analyze", str(split), "--json"], ["adapt-wbc", str(split), "--template", str(template)]):
        r = smearscope(*args)
        assert r.returncode == 2 and json.loads(r.stdout.splitlines()[0])["error"]["message"] == (
            f"no image files in {split}: a folder's subfolders are not searched, and {split} has 2 (only "
            f"{split / 'images'} holding images, {images} image files): name it, or list the files in an @LIST"), args
    r = smearscope("analyze", str(split / "labels"), "--json")  # what 'name them' also pointed at
    assert r.returncode == 2 and json.loads(r.stdout.splitlines()[0])["error"]["code"] == "no_images"


def test_the_summary_names_nucleated_red_cells_in_a_field_of_no_white_cell():
    """A field with nucleated red cells but no white cell has no NRBC per 100 WBC (the report's
    nrbc_per_100_wbc is null: service.analysis.aggregate divides by no white cell); the summary
    then left the NRBC out of its counts line altogether ('RBC 400, WBC 0, platelets 30'), where
    the dashboard reads 'NRBC 2'. It now names them, and why no per 100 WBC is given."""
    from test_fhir import graded_report

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.report import Counts, ScaleInfo

    report = graded_report().model_copy(update={
        "counts": Counts(rbc=400, wbc=0, platelet=30, nrbc=2), "nrbc_per_100_wbc": None,
        "scale": ScaleInfo(microns_per_pixel=0.1, method="given", canonical_microns_per_pixel=0.2)})
    first = summarize(report).splitlines()[0]
    assert ": RBC 400, WBC 0, NRBC 2 (no white cell to count them per 100), platelets 30  (" in first, first


def test_the_summary_says_a_red_cell_finding_too_few_for_a_tenth_of_a_percent_as_such():
    """The RBC line lists the findings some cell was given, each as a share to one decimal and no
    count: 2 schistocytes of 8000 red cells (0.03 %) read 'schistocyte 0.0%', a finding listed as
    seen at a share of none. Such a share now reads '<0.1% (2 cells)'; a share of 0.1 % or more as before."""
    from test_fhir import graded_report

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.report import ClassShare, Counts

    report = graded_report().model_copy(update={
        "counts": Counts(rbc=8000, wbc=110, platelet=80),
        "rbc_morphology": [ClassShare(label="normal", count=7990, percent=99.88),
                           ClassShare(label="target", count=8, percent=0.1),
                           ClassShare(label="schistocyte", count=2, percent=0.03, grade="none")]})
    line = next(x for x in summarize(report).splitlines() if x.startswith("  RBC: "))
    assert "schistocyte <0.1% (2 cells)" in line and "target 0.1%," in line, line
    assert "0.0%" not in line, line


def test_the_summary_says_a_share_of_all_but_some_cells_as_more_than_99_9_and_nrbc_under_a_tenth_as_such():
    """9999 normal red cells of 10 000 printed 'normal 100.0%' beside 'target <0.1% (1 cell)', 19 999 lymphocytes
    of 20 000 white cells 'lymphocyte 19999 (100.0%' and 1 NRBC among them '(0.0 per 100 WBC)'. They now read
    '>99.9%', as FHIR and HL7 send them ('> 99.9'), and '<0.1 per 100 WBC'; every cell of a type reads 100.0%."""
    from collections import Counter

    from test_fhir import graded_report

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.aggregate import share_rows
    from smearscope.service.analysis.report import Counts, ScaleInfo

    report = graded_report().model_copy(update={
        "counts": Counts(rbc=10000, wbc=20000, platelet=80, nrbc=1), "nrbc_per_100_wbc": 0.01,
        "scale": ScaleInfo(microns_per_pixel=0.1, method="given", canonical_microns_per_pixel=0.1),
        "wbc_differential": share_rows(Counter(lymphocyte=19999, neutrophil=1)),
        "rbc_morphology": share_rows(Counter(normal=9999, target=1))})
    text = summarize(report)
    assert "NRBC 1 (<0.1 per 100 WBC)" in text and "lymphocyte 19999 (>99.9%, 95% CI" in text, text
    assert "RBC: normal >99.9%, target <0.1% (1 cell)" in text and "100.0%" not in text, text
    every = report.model_copy(update={"rbc_morphology": share_rows(Counter(normal=10000, target=0))})
    assert "RBC: normal 100.0%" in summarize(every)


def test_the_summary_says_rows_not_shown_under_a_tenth_of_a_percent_together_as_such():
    """Past six findings the RBC line counts the rows it leaves out with their share together: two
    of 1 and 2 cells in 8000 red cells read '2 more rows not shown (0.0% together ...)', rows some
    cell was given at a share of none. It now reads '<0.1% together, 3 cells'."""
    from test_fhir import graded_report

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.report import ClassShare, Counts

    seen = [("normal", 7800), ("target", 60), ("stomatocyte", 50), ("ovalocyte", 40), ("burr", 30), ("teardrop", 17)]
    report = graded_report().model_copy(update={
        "counts": Counts(rbc=8000, wbc=110, platelet=80),
        "rbc_morphology": [ClassShare(label=label, count=n, percent=round(100 * n / 8000, 2)) for label, n in seen]
        + [ClassShare(label="elliptocyte", count=2, percent=0.03), ClassShare(label="other_poikilocyte", count=1,
                                                                             percent=0.01)]})
    line = next(x for x in summarize(report).splitlines() if x.startswith("  RBC: "))
    assert "; 2 more rows not shown (<0.1% together, 3 cells, --json lists every row)" in line, line


@needs_models
def test_a_folder_copied_from_a_mac_analyzes_its_fields_not_their_hidden_resource_files(tmp_path):
    """macOS leaves `._NAME.png` (AppleDouble resource data, no image) beside each file it copies to
    a FAT or exFAT stick: a folder's hidden files are skipped, as the station's watched folder skips
    them, so such a folder gives its fields' reports and exit 0; a hidden file named on the command
    line is still tried, and rejected for what it is."""
    folder = tmp_path / "stick"
    folder.mkdir()
    _render(folder / "field.png", 3)
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02" + bytes(4000)
    (folder / "._field.png").write_bytes(apple_double)
    (folder / ".thumb.jpg").write_bytes(apple_double)
    out = tmp_path / "overlays"
    out.mkdir()
    proc = smearscope("analyze", str(folder), "--json", "--overlay", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-800:]
    (report,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert report["source"]["frame_id"] == "field.png" and report["counts"]["rbc"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["field.overlay.png"]
    proc = smearscope("analyze", str(folder / "._field.png"), "--json")
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "not_an_image", proc.stdout


@needs_models
def test_analyze_help_says_what_stdout_holds_without_and_with_json(tmp_path):
    """`analyze --help` said each image gives one line on stdout; without --json a report is a few
    lines to read. What it says now is what a batch of a field and a broken file prints."""
    _render(tmp_path / "a.png", 5)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    text = smearscope("analyze", str(tmp_path))
    as_json = smearscope("analyze", str(tmp_path), "--json")
    assert text.returncode == as_json.returncode == 2
    report, error = text.stdout.split("\n{")
    assert report.startswith("field a.png: RBC ") and len(report.splitlines()) > 2, text.stdout
    assert json.loads("{" + error)["error"]["code"] and text.stderr.startswith(f"rejected: {tmp_path}/b.png: ")
    assert [sorted(json.loads(line)) for line in as_json.stdout.splitlines()][1] == ["error", "image"]
    assert "report_id" in json.loads(as_json.stdout.splitlines()[0]) and len(as_json.stdout.splitlines()) == 2
    described = " ".join(smearscope("analyze", "--help").stdout.split())
    assert ("Each image gives its report on stdout, a few lines to read (with --json one JSON line), or its "
            "error as one JSON line (also said on stderr without --json)") in described, described


def test_a_scale_in_the_wrong_unit_is_refused_with_the_reading_meant(tmp_path):
    """72 (nanometres per pixel for 0.072) or 13.9 (pixels per micrometre for 0.072) given to
    --microns-per-pixel: bad_scale says the unit and, where one reading of the number is a
    microscope's scale, that reading; and that reading is then taken (here the missing models are
    the next thing said)."""
    p = tmp_path / "f.png"
    cv2.imwrite(str(p), hostile.smear_like(200, 200))
    none = str(tmp_path / "no-models")
    unit = "is outside 0.01..2.0: the scale is in micrometres per pixel, about 0.05 to 0.2 through a 100x oil objective"
    for given, reading in (("72", " (0.072 if that is nanometres per pixel)"),
                           ("13.9", " (0.07194 if that is pixels per micrometre)"), ("-1", ""), ("5000", "")):
        proc = smearscope("analyze", str(p), "--json", "--models", none, "--microns-per-pixel", given)
        error = json.loads(proc.stdout)["error"]
        assert proc.returncode == 2 and error["code"] == "bad_scale", proc.stdout
        assert error["message"] == (f"--microns-per-pixel {given} {unit}{reading}; smearscope calibrate-scale "
                                    "measures it from a stage micrometer"), error
        if reading:
            meant = reading.split()[0].lstrip("(")
            proc = smearscope("analyze", str(p), "--json", "--models", none, "--microns-per-pixel", meant)
            assert json.loads(proc.stdout)["error"]["code"] == "engine_unavailable", proc.stdout


@needs_models
def test_adapt_wbc_template_counts_one_white_cell_in_one_field_in_the_singular(tmp_path):
    """`adapt-wbc FIELD --template` on one field of one white cell said "1 white cells in 1 fields";
    the count it prints is the CSV's rows, in the number they take."""
    field = render_field(11, width=640, height=480, microns_per_pixel=0.1, n_wbc=1)
    cv2.imwrite(str(tmp_path / "f.png"), np.asarray(field.frame.pixels))
    template = tmp_path / "typed.csv"
    run = smearscope("adapt-wbc", str(tmp_path / "f.png"), "--template", str(template), "--microns-per-pixel", "0.1")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = template.read_text().splitlines()[1:]
    assert len(rows) == 1, rows
    assert run.stdout.splitlines()[0] == f"1 white cell in 1 field written to {template}"
