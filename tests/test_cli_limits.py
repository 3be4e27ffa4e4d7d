"""`smearscope analyze` against hostile arguments, paths and devices (issue 18, items 8-10): every
case ends with its error line and exit status, never a traceback, a hang, a crash or an input
overwritten; memory stays bounded. Each call is a real subprocess."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import cv2
import hostile
import pytest
from test_cli import ROOT, needs_models

from smearscope.service.analysis.scale import MAX_CANONICAL_PIXELS

#: Runs the CLI in-process and reports its peak RSS (kB) on the last stderr line.
#: VmHWM, not getrusage's ru_maxrss, which Linux carries over fork and exec from the parent (pytest).
_MEASURED = (
    "import sys\n"
    "from smearscope.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
    "print(f'maxrss_kb={hwm}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run(*args: str | bytes, timeout: float = 300, stdout: int | None = subprocess.PIPE,
        memory_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run([sys.executable, "-c", _MEASURED, *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT, check=False,
                          preexec_fn=limit, errors="backslashreplace")


def lines(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]


def peak_mb(proc: subprocess.CompletedProcess[str]) -> float:
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("maxrss_kb=")][-1]
    return int(last.split("=")[1]) / 1024


@pytest.fixture
def field(tmp_path: Path) -> Path:
    path = tmp_path / "field.png"
    cv2.imwrite(str(path), hostile.smear_like(300, 400, seed=2))
    return path


# --- item 8: memory and blocking inputs -------------------------------------------------------


def test_a_list_file_that_never_ends_is_refused_in_bounded_memory() -> None:
    proc = run("analyze", "@/dev/zero", "--json", timeout=60, memory_limit=1 << 30)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-500:]
    assert lines(proc)[0]["error"]["code"] == "bad_list"


def test_a_list_that_is_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "list.fifo"
    os.mkfifo(fifo)
    proc = run("analyze", f"@{fifo}", "--json", timeout=30)
    assert proc.returncode == 2 and lines(proc)[0]["error"]["code"] == "bad_list"


@needs_models
@pytest.mark.slow
def test_a_frame_too_large_at_its_scale_is_refused_before_the_detector(tmp_path: Path) -> None:
    """A 64 MP field at 0.2 um/px would be 64 MP canonical: refused with its own code."""
    path = tmp_path / "big.jpg"
    big = cv2.resize(hostile.smear_like(600, 800, seed=4), (8000, 8000))
    cv2.imwrite(str(path), big, [cv2.IMWRITE_JPEG_QUALITY, 80])
    del big
    proc = run("analyze", str(path), "--json", "--microns-per-pixel", "0.2", timeout=300)
    assert proc.returncode == 2, proc.stderr[-800:]
    assert lines(proc)[0]["error"]["code"] == "too_large_at_scale"
    assert peak_mb(proc) <= 2048, peak_mb(proc)


@needs_models
@pytest.mark.slow
def test_the_largest_accepted_frame_stays_under_2_gb(tmp_path: Path) -> None:
    """4760x3570 at 0.2 um/px, the cap (17 MP canonical), and dense: a rendered field repeated
    (about 6 500 cells; memory grows with the cells, so a sparse frame would prove little)."""
    import numpy as np

    from smearscope.device.synthetic import render_field

    tile = np.asarray(render_field(3, width=1280, height=960, microns_per_pixel=0.2).frame.pixels)
    path = tmp_path / "dense.png"
    assert 0.99 * MAX_CANONICAL_PIXELS <= 4760 * 3570 <= MAX_CANONICAL_PIXELS  # at the cap
    cv2.imwrite(str(path), np.tile(tile, (4, 4, 1))[:3570, :4760])
    proc = run("analyze", str(path), "--json", "--microns-per-pixel", "0.2", timeout=900)
    assert proc.returncode == 0, proc.stderr[-800:]
    report = lines(proc)[0]
    assert report["source"]["image"] == {"width": 4760, "height": 3570}
    assert report["counts"]["rbc"] > 4000
    print(f"\npeak RSS of the largest accepted frame: {peak_mb(proc):.0f} MB")
    assert peak_mb(proc) <= 2048


# --- item 9: no crash, no traceback ------------------------------------------------------------


@needs_models
def test_names_that_are_not_utf8_work_for_inputs_and_overlays(tmp_path: Path, field: Path) -> None:
    odd = os.fsencode(tmp_path) + b"/f\xff\xfe.png"
    os.rename(field, odd)
    overlay = os.fsencode(tmp_path) + b"/o\xff.png"
    proc = run("analyze", os.fsdecode(odd), "--json", "--overlay", os.fsdecode(overlay))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-800:])
    report = lines(proc)[0]
    assert report["source"]["frame_id"] == "f\\xff\\xfe.png"
    assert os.path.getsize(overlay) > 0
    # a refused one: its message names it as the report does, valid UTF-8 (no lone surrogate)
    junk = os.fsencode(tmp_path) + b"/bad\xff.png"
    Path(os.fsdecode(junk)).write_bytes(b"not an image")
    proc = run("analyze", os.fsdecode(junk), "--json")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-800:])
    error = lines(proc)[0]
    assert error["error"]["code"] == "not_an_image" and "bad\\xff.png" in error["error"]["message"], error
    assert "\\udc" not in proc.stdout and "\\udc" not in proc.stderr, (proc.stdout, proc.stderr)
    proc.stderr.encode("utf-8")  # strict: what a journal or a log shipper reads


@needs_models
def test_unusable_paths_and_full_devices_end_cleanly(tmp_path: Path, field: Path) -> None:
    long = str(tmp_path / ("d" * 300))  # ENAMETOOLONG when listed as a directory
    proc = run("analyze", long, str(field), "--json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    first, second = lines(proc)
    assert first["error"]["code"] == "unreadable" and "report_id" in second

    proc = run("analyze", str(field), "--json", "--detections", "/dev/full")
    assert proc.returncode == 74 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert "--detections" in proc.stderr

    with open("/dev/full", "w") as full:
        proc = run("analyze", str(field), "--json", stdout=full.fileno())
    assert proc.returncode == 74 and "Traceback" not in proc.stderr, proc.stderr[-800:]


def test_missing_models_and_bad_arguments_are_json_error_lines(tmp_path: Path, field: Path) -> None:
    proc = run("analyze", str(field), "--json", "--models", str(tmp_path / "none"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert lines(proc)[0]["error"]["code"] == "engine_unavailable"
    proc = run("analyze", str(field), "--json", "--microns-per-pixel", "abc")
    assert proc.returncode == 2 and lines(proc)[0]["error"]["code"] == "bad_arguments"


# --- item 10: outputs never replace inputs, never block ---------------------------------------


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path: Path, field: Path) -> None:
    before = field.read_bytes()
    for option in ("--detections", "--overlay"):
        proc = run("analyze", str(field), "--json", option, str(field))
        assert proc.returncode == 2 and lines(proc)[0]["error"]["code"] == "bad_output", option
        assert field.read_bytes() == before, option
    link = tmp_path / "same.png"
    os.link(field, link)  # another name, the same file
    proc = run("analyze", str(field), "--json", "--detections", str(link))
    assert lines(proc)[0]["error"]["code"] == "bad_output" and field.read_bytes() == before


def test_two_outputs_on_one_file_or_an_output_on_the_list_are_refused_before_any_work(
        tmp_path: Path, field: Path) -> None:
    same = tmp_path / "same.json"
    proc = run("analyze", str(field), "--json", "--detections", str(same), "--fhir", str(same))
    assert proc.returncode == 2 and lines(proc)[0]["error"]["code"] == "bad_output"
    assert "--fhir" in lines(proc)[0]["error"]["message"] and not same.exists()
    det, linked = tmp_path / "det.jsonl", tmp_path / "det-link.jsonl"
    det.write_text("kept\n")
    os.link(det, linked)  # one file under two names
    proc = run("analyze", str(field), "--json", "--detections", str(det), "--fhir", str(linked))
    assert lines(proc)[0]["error"]["code"] == "bad_output" and det.read_text() == "kept\n"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{field}\n")
    proc = run("analyze", f"@{listing}", "--json", "--detections", str(listing))
    assert proc.returncode == 2 and lines(proc)[0]["error"]["code"] == "bad_output"
    assert listing.read_text() == f"{field}\n"


def test_an_output_directory_that_cannot_be_written_is_refused_before_any_work(field: Path) -> None:
    # /proc/sys takes no new files even for root; the analysis must not run first
    for option, target in (("--fhir", "/proc/sys/x.json"), ("--overlay", "/proc/sys/x.png")):
        proc = run("analyze", str(field), "--json", option, target, "--models", "/nonexistent")
        assert proc.returncode == 2 and lines(proc)[0]["error"]["code"] == "bad_output", (option, proc.stdout)


def test_an_output_that_is_a_fifo_is_refused_without_hanging(tmp_path: Path, field: Path) -> None:
    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    for option in ("--detections", "--overlay"):
        proc = run("analyze", str(field), "--json", option, str(fifo), timeout=30)
        assert proc.returncode == 2 and lines(proc)[0]["error"]["code"] == "bad_output", option


def test_a_list_with_a_nul_byte_is_not_a_list_of_paths(tmp_path: Path, field: Path) -> None:
    """A path cannot hold a NUL byte: a list with one is not text (bad_list), not a crash later."""
    listing = tmp_path / "list.bin"
    listing.write_bytes(str(field).encode() + b"\n" + b"x\0y.png\n")
    proc = run("analyze", f"@{listing}", "--json", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-500:]
    assert lines(proc)[0]["error"]["code"] == "bad_list"


def test_a_models_folder_without_the_models_says_so_and_its_fix_works(tmp_path: Path, field: Path) -> None:
    """`--models DIR` naming a folder the models were never installed into (docs/STATION.md's
    control-slide command names /var/lib/smearscope/models): the error names the folder, the
    models it lacks and the command that installs them, not one manifest's errno; each command
    that takes --models says the same; running the command it names makes the analysis work."""
    models = tmp_path / "models"
    expected = (f"{models} has no seg.json, rbc_head.json, wbc_head.json; install the models that come with "
                f"smearscope there (smearscope install-models {models}) or point --models at a folder that "
                "has them; without --models the packaged models run")
    proc = run("analyze", str(field), "--json", "--models", str(models))
    assert proc.returncode == 2 and lines(proc) == [{"error": {"code": "engine_unavailable", "message": expected}}]
    for args in (("calibrate-atypical", str(field)), ("adapt-wbc", "--labels", str(tmp_path / "typed.csv"),
                                                      "--out", str(tmp_path / "means.json"))):
        proc = run(*args, "--models", str(models))
        assert proc.returncode == 2 and lines(proc)[0]["error"] == {"code": "engine_unavailable",
                                                                    "message": expected}, proc.stdout
    proc = run("demo", "--fields", "1", "--models", str(models))
    assert proc.returncode == 2 and proc.stderr.startswith(f"smearscope demo: {expected}\n"), proc.stderr
    assert run("install-models", str(models)).returncode == 0
    proc = run("analyze", str(field), "--json", "--models", str(models))
    assert proc.returncode == 0 and "report_id" in lines(proc)[0], proc.stdout[-800:]
