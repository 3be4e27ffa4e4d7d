"""What the station leaves behind of a specimen: deleted rows overwritten in its SQLite files
(whatever the SQLite build's default), and no file of its own readable by other users.

The identifier used throughout is a watched-folder file name a lab might choose
(`MRN4711_Doe-Jane_0.jpg`): it becomes the field id and travels wherever the field goes.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from broker import free_port
from test_clinic_station import _gallery_of_runs, _image
from test_daemon import oracle_pool, station_document, to_toml
from test_typed_cells import _cell

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR
from smearscope.service.config import ReviewConfig
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.station.gallery_store import FILE_NAME
from smearscope.service.station.review import KEEP_RUNS, ReviewGallery
from smearscope.service.station.typed_cells import TypedCellStore

MARKER = b"MRN4711_Doe-Jane"


@pytest.fixture
def build_without_secure_delete(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite connection starts with secure_delete off, as on a build whose default is off
    (Python's own and most other builds; Debian's and Ubuntu's default is on)."""
    connect = sqlite3.connect

    def without(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)  # type: ignore[arg-type]
        conn.execute("PRAGMA secure_delete=OFF")
        return conn

    monkeypatch.setattr(sqlite3, "connect", without)


def _bytes_on_disk(path: Path) -> bytes:
    """The file and whatever WAL and shared-memory file SQLite left beside it."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def test_an_acknowledged_report_is_overwritten_in_the_outbox_file(
        tmp_path: Path, build_without_secure_delete: None) -> None:
    path = tmp_path / "outbox.sqlite3"
    body = b'{"source": {"frame_id": "scope:' + MARKER + b'_0.jpg@77f175e205c3"}}'
    with Outbox(path) as outbox:
        seq = outbox.put("report", "smearscope/ward3/report", body, report_id="r1", schema_version="1.1")
        kept = outbox.put("report", "smearscope/ward3/report", b'{"other": 1}', report_id="r2", schema_version="1.1")
        assert MARKER in _bytes_on_disk(path)  # stored: on the disk until acknowledged
        assert outbox.ack(seq)
    assert MARKER not in _bytes_on_disk(path)
    with Outbox(path) as outbox:
        assert [m.seq for m in outbox.pending()] == [kept]


def test_a_run_the_gallery_lets_go_is_overwritten_in_its_file(
        tmp_path: Path, build_without_secure_delete: None) -> None:
    review, pool = tmp_path / "review", oracle_pool()
    gallery = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    runs = [MARKER.decode() + "-run"] + [f"run-{k}" for k in range(KEEP_RUNS + 1)]
    gallery.add_field(runs[0], _image(pool[0]), pool[0])
    assert MARKER in _bytes_on_disk(review / FILE_NAME)
    for run_id in runs[1:]:
        gallery.add_field(run_id, _image(pool[0]), pool[0])
    assert runs[0] not in gallery.run_ids()
    gallery._store.close()
    assert MARKER not in _bytes_on_disk(review / FILE_NAME)


def test_a_run_the_gallery_lets_go_takes_its_overlays_with_it(tmp_path: Path) -> None:
    """Overlays (full-size fields, named by the field id) of a run no command can reach any more
    were kept until the review directory reached max_disk_mb (200 MB: thousands of fields)."""
    review = tmp_path / "review"
    gallery, runs = _gallery_of_runs(review, KEEP_RUNS + 3)
    kept = gallery.run_ids()
    assert kept == runs[2:]
    assert sorted(p.name for p in review.iterdir() if p.is_dir()) == kept
    assert all(len(list((review / r).glob("*.jpg"))) == 1 for r in kept)


def test_a_removed_cell_type_is_overwritten_in_the_typed_cells_file(
        tmp_path: Path, build_without_secure_delete: None) -> None:
    path = tmp_path / "typed_cells.sqlite3"
    store = TypedCellStore(path)
    try:
        assert store.put("run-1", "scope:" + MARKER.decode() + "_0.jpg@77f1", 3, "lymphocyte", _cell())
        assert store.put("run-1", "scope:other.jpg@0000", 1, "monocyte", _cell())
        assert store.remove("run-1", "scope:" + MARKER.decode() + "_0.jpg@77f1", 3)
    finally:
        store.close()
    assert MARKER not in _bytes_on_disk(path)


def test_a_station_started_under_umask_022_writes_nothing_other_users_can_read(tmp_path: Path) -> None:
    """`smearscope run` by hand (no systemd UMask=): a watched folder's two files analysed with no
    broker (the messages wait in the outbox), review and typing on. Every file and folder the
    station made (outbox, its reserve, the gallery, overlays, the processed-files log, done/,
    rejected/) grants nothing to other users; the lab's own files keep their modes. Its log at
    INFO does not name the files (a lab's file names may name the patient)."""
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    for seed, name in enumerate(("MRN4711_Doe-Jane_0.png", "MRN4711_Doe-Jane_1.png")):
        pixels = render_field(seed, width=320, height=240).frame.pixels
        (inbox / name).write_bytes(cv2.imencode(".png", pixels)[1].tobytes())
        (inbox / name).chmod(0o644)
    lab_files = {p.name for p in inbox.iterdir()}
    doc = station_document(tmp_path, free_port(), credentials=False,
                           source={"kind": "folder", "path": str(inbox), "settle_s": 0.2},
                           analysis={"models_dir": str(DEFAULT_MODELS_DIR)},
                           review={"enabled": True, "white_cells": "all", "min_free_disk_mb": 0})
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    cli = shutil.which("smearscope") or str(Path(sys.executable).with_name("smearscope"))
    done = subprocess.run([cli, "run", "--config", str(config), "--max-fields", "2"], check=False,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, umask=0o022)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    written = [p for p in (*state.rglob("*"), *inbox.rglob("*")) if p.name not in lab_files]
    names = {p.name for p in written}
    assert {"outbox.sqlite3", "gallery.sqlite", ".smearscope-processed", "done", "rejected"} <= names, names
    assert any(p.suffix == ".jpg" for p in written), names  # an overlay
    shared = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o007}
    assert shared == {}
    assert {p.name: p.stat().st_mode & 0o777 for p in (inbox / "done").iterdir()} == dict.fromkeys(lab_files, 0o644)
    # its log at INFO (the journal, kept apart from the station's bounded stores) names no file
    # (--max-fields also prints a ledger of what it stored, fields named, after the log)
    log = [ln for ln in (done.stdout + done.stderr).splitlines() if re.match(r"\S+ \S+ (INFO|WARNING|ERROR) ", ln)]
    assert sum("INFO smearscope.service.station.workers: stored field message report_id=" in ln for ln in log) == 2, log
    assert [ln for ln in log if MARKER.decode() in ln] == []
