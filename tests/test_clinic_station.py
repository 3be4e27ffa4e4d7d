"""What the station gives clinic systems, end to end with a real mosquitto: the FHIR Bundle per
specimen report (from the outbox, after its report), the retained live run state, and the review
gallery (crops on demand within a message budget, overlays on disk under a size cap)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Subscriber, wait_until
from test_daemon import (
    BASE,
    classified_wbc_per_field,
    envelopes,
    oracle_pool,
    pool_factory,
    start_daemon,
    stop_daemon,
    write_station,
)
from test_fhir import as_sent, by_code, validate

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.report import Report
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX
from smearscope.service.config import ReviewConfig, load_config
from smearscope.service.fhir import codes
from smearscope.service.station.daemon import StationDaemon
from smearscope.service.station.review import ReviewGallery


def _image(result: Any) -> np.ndarray:
    """The field the pool's result came from (oracle_pool renders seeds 500.. at 480x360)."""
    i = next(k for k, r in enumerate(oracle_pool()) if r is result)
    return np.asarray(render_field(500 + i, width=480, height=360, microns_per_pixel=CANONICAL_UM_PER_PX,
                                   n_wbc=4).frame.pixels)


def _gallery_of_runs(review: Path, count: int) -> tuple[ReviewGallery, list[str]]:
    """A gallery in review (no free-disk floor) given one field, the oracle pool's first, in each of
    `count` runs run-0, run-1, ... in turn; the gallery and those run ids."""
    pool = oracle_pool()
    gallery = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    runs = [f"run-{k}" for k in range(count)]
    for run_id in runs:
        gallery.add_field(run_id, _image(pool[0]), pool[0])
    return gallery, runs


def test_gallery_pages_fit_the_message_budget_and_cover_every_crop(tmp_path: Path) -> None:
    gallery = ReviewGallery(ReviewConfig(max_message_kb=8, crop_px=192), tmp_path / "review")
    kept = sum(gallery.add_field("run-a", _image(r), r) for r in oracle_pool())
    assert kept >= 3  # a sickle cell and unidentified ones
    seen, offset, pages = [], 0, 0
    while offset is not None:
        page = gallery.page("run-a", offset)
        assert page["ok"] and len(json.dumps(page)) <= 8 * 1024
        seen += [(c["field_id"], c["cell"]) for c in page["cells"]]
        offset, pages = page["next_offset"], pages + 1
    assert len(seen) == len(set(seen)) == kept == page["total"]
    assert pages >= 2
    # 8 KB: no room for a thumbnail beside the first crop (a page always carries a crop: paging moves)
    assert ReviewGallery.page(gallery, "run-a")["overlay"] is None
    roomy = ReviewGallery(ReviewConfig(max_message_kb=48), tmp_path / "review2")
    roomy.add_field("run-b", _image(oracle_pool()[0]), oracle_pool()[0])
    thumbnail = roomy.page("run-b")["overlay"]
    assert thumbnail["width"] == 320 and len(thumbnail["jpeg"]) > 1000
    # a busy 1280x960 field at the default budget: its thumbnail on the first page, the page in budget
    busy = ReviewGallery(ReviewConfig(), tmp_path / "review5")
    big = np.asarray(render_field(7, width=1280, height=960, microns_per_pixel=0.1).frame.pixels)
    busy.add_field("run-e", big, oracle_pool()[0])
    first = busy.page("run-e")
    assert first["overlay"] is not None and len(json.dumps(first)) <= ReviewConfig().max_message_kb * 1024
    labels = {c["label"] for c in gallery.page("run-a")["cells"]}
    assert labels <= {"unidentified", "sickle", "erythroblast", "ig", "atypical"}
    assert [c["label"] for c in gallery.page("run-a")["cells"]][:1] == ["sickle"]  # arrival order: pages stay put
    assert not gallery.page("no-such-run")["ok"]
    tight = ReviewGallery(ReviewConfig(), tmp_path / "review3", max_packet_size=6000)
    tight.add_field("run-c", _image(oracle_pool()[0]), oracle_pool()[0])
    page = tight.page("run-c")
    assert len(json.dumps(page)) <= 6000 - 1024 + 512 and page["cells"]  # under the station's packet limit
    tiny = ReviewGallery(ReviewConfig(crop_px=256), tmp_path / "review4", max_packet_size=1500)
    tiny.add_field("run-d", _image(oracle_pool()[0]), oracle_pool()[0])
    page = tiny.page("run-d")
    assert page["cells"] == [] and page["skipped_too_large"] >= 1 and page["next_offset"] is None


def test_overlays_are_kept_per_run_under_the_disk_cap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    review = tmp_path / "review"
    pool = oracle_pool()
    one = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)  # whatever this disk has free
    one.add_field("run-0", _image(pool[0]), pool[0])
    size = sum(p.stat().st_size for p in review.rglob("*.jpg"))
    dry = ReviewGallery(ReviewConfig(min_free_disk_mb=0), tmp_path / "dry")  # what the gallery's file takes
    for i, result in enumerate([pool[0], *pool]):
        dry.add_field("run-0" if i < 1 else "run-1" if i < 3 else "run-2", _image(result), result)
    crops = sum(p.stat().st_size for p in (tmp_path / "dry").glob("gallery.sqlite*"))
    cap_mb = (crops + 2.5 * size) / 1024 / 1024  # room for the crops and two overlays
    gallery = ReviewGallery(ReviewConfig(max_disk_mb=cap_mb, min_free_disk_mb=0), review)
    caplog.set_level(logging.DEBUG, logger="smearscope.service.station.review")
    for i, result in enumerate(pool):
        gallery.add_field("run-1" if i < 2 else "run-2", _image(result), result)
    files = sorted(review.rglob("*.jpg"))
    assert sum(p.stat().st_size for p in review.rglob("*") if p.is_file()) <= cap_mb * 1024 * 1024
    assert [p.parent.name for p in files] == ["run-2", "run-2"]  # oldest run (and run-0) deleted first
    assert gallery.summary("run-2")["overlays"] == 2 and gallery.summary("run-1")["overlays"] == 0
    # at the cap every further field deletes one: the station's log says so once, not at every field
    caplog.clear()
    for result in [*pool, *pool]:
        gallery.add_field("run-3", _image(result), result)
    pruned = [r for r in caplog.records if "oldest overlays deleted" in r.getMessage()]
    infos = [r.levelno for r in pruned].count(logging.INFO)  # again after a field that fitted (a run let go)
    assert len(pruned) >= 4 and 1 <= infos <= len(pruned) // 2


def test_the_disk_cap_counts_the_gallery_file_and_overlays_give_way_to_it(tmp_path: Path) -> None:
    """`max_disk_mb` is the review directory's cap: overlays and the gallery's file (crops, WAL)
    together stay under it, the oldest overlays deleted to make room for the crops."""
    pool = oracle_pool()
    fields = [(f"run-{k}", result) for k in range(3) for result in pool]

    def feed(gallery: ReviewGallery, directory: Path) -> list[tuple[int, int]]:
        """After each field: what the directory holds, and the gallery's file of that."""
        used = []
        for run_id, result in fields:
            gallery.add_field(run_id, _image(result), result)
            used.append((sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
                         sum(p.stat().st_size for p in directory.glob("gallery.sqlite*"))))
        return used

    dry = tmp_path / "dry"
    crops = max(g for _, g in feed(ReviewGallery(ReviewConfig(min_free_disk_mb=0, white_cells="all"), dry), dry))
    overlay = max(p.stat().st_size for p in dry.rglob("*.jpg"))
    assert crops > 4 * overlay  # the gallery's file is most of what the review keeps
    cap_mb = (crops + 1.5 * overlay) / 2**20
    review = tmp_path / "review"
    gallery = ReviewGallery(ReviewConfig(max_disk_mb=cap_mb, min_free_disk_mb=0, white_cells="all"), review)
    assert max(u for u, _ in feed(gallery, review)) <= cap_mb * 2**20
    assert gallery.summary("run-2")["cells"] > 0 and gallery.summary("run-2")["overlays"] >= 1
    assert gallery.summary("run-0")["overlays"] == 0


def test_the_gallery_wal_is_checkpointed_and_cut_back(tmp_path: Path) -> None:
    """The gallery's WAL counts in the review's disk cap: it is written into the file and cut back
    at WAL_PAGES, not left at SQLite's default 4 MB (several times what a default gallery holds)."""
    from smearscope.service.station.gallery_store import WAL_PAGES

    review = tmp_path / "review"
    gallery = ReviewGallery(ReviewConfig(min_free_disk_mb=0, white_cells="all"), review)
    # runs until the gallery holds well over the WAL's cap (three did, by 6 %, before the overlays' labels moved
    # inside the image; what a run stores depends on its images, not on the WAL rule under test)
    for k in range(6):
        for result in oracle_pool():
            gallery.add_field(f"run-{k}", _image(result), result)
            assert (review / "gallery.sqlite-wal").stat().st_size <= 2 * WAL_PAGES * 4096
    assert (review / "gallery.sqlite").stat().st_size > 1.5 * WAL_PAGES * 4096  # the crops went into the file


def test_a_clock_set_back_does_not_make_the_newest_overlays_the_oldest(tmp_path: Path) -> None:
    """Overlays written after the wall clock moved back (a board without a clock battery after a
    power cut) carry older times than the runs before; the cap still deletes the oldest run's."""
    import os

    review = tmp_path / "review"
    pool = oracle_pool()
    gallery = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    for result in pool[:2]:
        gallery.add_field("run-1", _image(result), result)
    for p in review.rglob("*.jpg"):  # written in what is now the future
        os.utime(p, (p.stat().st_mtime + 86400, p.stat().st_mtime + 86400))
    used = sum(p.stat().st_size for p in review.rglob("*") if p.is_file())
    overlay = max(p.stat().st_size for p in review.rglob("*.jpg"))
    gallery.config = ReviewConfig(max_disk_mb=(used + 1.5 * overlay) / 2**20, min_free_disk_mb=0)
    gallery.add_field("run-2", _image(pool[2]), pool[2])
    assert gallery.summary("run-2")["overlays"] == 1 and gallery.summary("run-1")["overlays"] < 2
    assert [p.parent.name for p in review.rglob("*.jpg")].count("run-2") == 1


def test_a_runs_overlays_are_deleted_in_the_order_written_when_the_clock_went_back_mid_run(tmp_path: Path) -> None:
    """A run's first two fields were written before the wall clock went back a day (network time
    correcting a board that booted ahead, say), the next after it; after a restart the cap
    deletes the run's first fields, never the newest because their file times read older. A field
    analysed again (a crash before its report was stored) leaves one overlay, the newest."""
    import os

    review = tmp_path / "review"
    pool = oracle_pool()
    gallery = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    for result in pool[:3]:
        gallery.add_field("run-1", _image(result), result)
    for field_id in ("synthetic-500", "synthetic-501"):  # written a day ahead of the clock now
        (p,) = review.glob(f"run-1/*{field_id}.jpg")
        os.utime(p, (p.stat().st_mtime + 86400, p.stat().st_mtime + 86400))
    gallery.close()
    used = sum(p.stat().st_size for p in review.rglob("*") if p.is_file())
    overlay = max(p.stat().st_size for p in review.rglob("*.jpg"))
    restarted = ReviewGallery(ReviewConfig(max_disk_mb=(used + 1.5 * overlay) / 2**20, min_free_disk_mb=0), review)
    assert restarted.summary("run-1")["overlays"] == 3
    restarted.add_field("run-1", _image(pool[3]), pool[3])
    written = ["synthetic-500", "synthetic-501", "synthetic-502", "synthetic-503"]
    kept = [w for w in written if list(review.glob(f"run-1/*{w}.jpg"))]
    assert 2 <= len(kept) < 4 and kept == written[-len(kept):], kept  # the first written went first
    assert restarted.summary("run-1")["overlays"] == len(kept)
    restarted.config = ReviewConfig(min_free_disk_mb=0)  # no cap: what a field analysed again leaves
    restarted.add_field("run-1", _image(pool[2]), pool[2])  # synthetic-502 analysed again
    again = sorted(p.name for p in review.glob("run-1/*.jpg"))
    assert sum(n.endswith("synthetic-502.jpg") for n in again) == 1 and again[-1].endswith("synthetic-502.jpg"), again
    assert restarted.summary("run-1")["overlays"] == len(again)
    restarted.close()


def test_overlays_give_way_to_the_outbox_on_a_disk_low_on_space(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Below `min_free_disk_mb` free, the oldest overlays are deleted and none is written (said once):
    the outbox, beside them by default, needs the room more. Here the floor is set above what this
    disk has free, so the disk is low whatever it holds."""
    import shutil

    review = tmp_path / "review"
    pool = oracle_pool()
    ReviewGallery(ReviewConfig(min_free_disk_mb=0), review).add_field("run-0", _image(pool[0]), pool[0])
    assert len(list(review.rglob("*.jpg"))) == 1
    floor_mb = shutil.disk_usage(tmp_path).free / 2**20 + 1024
    gallery = ReviewGallery(ReviewConfig(min_free_disk_mb=floor_mb), review)
    with caplog.at_level(logging.WARNING, logger="smearscope.service.station.review"):
        for result in pool[:3]:
            assert gallery.add_field("run-1", _image(result), result) >= 0  # the crops are still kept
    assert list(review.rglob("*.jpg")) == []  # the old one deleted, none written
    assert gallery.summary("run-1")["overlays"] == 0 and gallery.summary("run-1")["cells"] > 0
    assert sum("min_free_disk_mb" in r.getMessage() for r in caplog.records) == 1
    # nor are its crops written to the gallery's file: in memory only until there is room, then the
    # run is written whole (the file never drifts from memory)
    assert ReviewGallery(ReviewConfig(min_free_disk_mb=0), review).run_ids() == ["run-0"]
    gallery.config = ReviewConfig(min_free_disk_mb=0)
    gallery.add_field("run-2", _image(pool[3]), pool[3])
    again = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    assert again.run_ids() == gallery.run_ids() == ["run-0", "run-1", "run-2"]
    for run_id in ("run-1", "run-2"):
        assert _pages(again, run_id) == _pages(gallery, run_id)


def _pages(gallery: ReviewGallery, run_id: str) -> list[dict[str, Any]]:
    pages, offset = [], 0
    while offset is not None:
        pages.append(gallery.page(run_id, offset))
        offset = pages[-1]["next_offset"]
    return pages


def _start_while_locked(review: Path) -> ReviewGallery:
    """A gallery started while another process holds its file locked (an I/O error or a full disk
    alike: the file cannot be read for the moment)."""
    import sqlite3

    hold = sqlite3.connect(review / "gallery.sqlite", timeout=0.1)
    hold.execute("PRAGMA locking_mode=EXCLUSIVE")
    hold.execute("BEGIN EXCLUSIVE")
    hold.execute("SELECT count(*) FROM runs").fetchone()
    gallery = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    hold.rollback()
    hold.close()
    return gallery


def test_a_gallery_file_not_read_at_start_never_brings_its_old_runs_back_over_new_ones(tmp_path: Path) -> None:
    """A start that cannot read the gallery's file for the moment (here another process holds it
    locked; an I/O error or a full disk alike) starts with an empty gallery; the next start shows
    the runs analysed since as the latest, in their order, and the earlier runs the file still
    held as older ones, as far as its last runs leave room (their crops, which a technician may
    still have to review before signing, are not deleted for the lock)."""
    review = tmp_path / "review"
    pool = oracle_pool()
    before = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    for k in range(5):
        before.add_field(f"old-{k}", _image(pool[0]), pool[0])
    before.close()
    gallery = _start_while_locked(review)
    assert gallery.run_ids() == []
    for k in range(2):
        gallery.add_field(f"new-{k}", _image(pool[1]), pool[1])
    gallery.close()
    again = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    assert again.run_ids() == ["old-2", "old-3", "old-4", "new-0", "new-1"] and again.latest_run() == "new-1"
    assert _pages(again, "new-0") == _pages(gallery, "new-0") and _pages(again, "old-4") == _pages(before, "old-4")


def test_starts_that_cannot_read_the_gallery_file_one_after_another_do_not_grow_it_without_end(
        tmp_path: Path) -> None:
    """Each start that cannot read the file leaves its runs there, before its own: two such starts
    in a row held three galleries' runs, the next start reading back only the last of them and
    every further such start adding one more gallery's crops (the file counts in max_disk_mb: the
    overlays of the runs shown give way to crops no start shows)."""
    import sqlite3

    review = tmp_path / "review"
    pool = oracle_pool()
    first = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    for k in range(5):
        first.add_field(f"a-{k}", _image(pool[0]), pool[0])
    first.close()
    for name in ("b", "c"):
        gallery = _start_while_locked(review)
        assert gallery.run_ids() == []
        for k in range(3):
            gallery.add_field(f"{name}-{k}", _image(pool[1]), pool[1])
        gallery.close()
    with sqlite3.connect(review / "gallery.sqlite") as db:
        held = [r for (r,) in db.execute("SELECT run_id FROM runs ORDER BY touched")]
    assert held == ["b-1", "b-2", "c-0", "c-1", "c-2"], held
    again = ReviewGallery(ReviewConfig(min_free_disk_mb=0), review)
    assert again.run_ids() == held


def test_the_gallery_comes_back_after_a_restart_and_keeps_only_its_last_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A station stopped (or its power cut) between analysing a run and its review: the next
    process serves the same pages (crops, counts, thumbnail, overlays); the runs the gallery let go
    are gone from its file too; an unreadable file is set aside and the station starts anyway."""
    import sqlite3

    from smearscope.service.station.gallery_store import FILE_NAME
    from smearscope.service.station.review import KEEP_RUNS

    review, pool = tmp_path / "review", oracle_pool()
    config = ReviewConfig(min_free_disk_mb=0, max_message_kb=16)
    gallery = ReviewGallery(config, review)
    runs = [f"run-{k}" for k in range(KEEP_RUNS + 2)]
    for k, run_id in enumerate(runs):
        for result in (pool[k % len(pool)], pool[(k + 1) % len(pool)]):
            gallery.add_field(run_id, _image(result), result)
    gallery.add_field(runs[1], _image(pool[0]), pool[0])  # an older run touched again stays
    kept = gallery.run_ids()
    assert runs[0] not in kept and len(kept) == KEEP_RUNS + 1 and kept[-1] == runs[1]
    assert sum(gallery.summary(r)["cells"] for r in kept) >= 3
    again = ReviewGallery(config, review)
    assert again.run_ids() == kept
    gone = again.page(runs[0])  # a run let go: a code to act on, the runs it holds
    assert gone["error"] == "no_review_material" and gone["runs"] == kept
    for run_id in kept:
        assert _pages(again, run_id) == _pages(gallery, run_id)
    with sqlite3.connect(review / FILE_NAME) as db:
        assert {r for (r,) in db.execute("SELECT DISTINCT run_id FROM crops")} <= set(kept)
        assert runs[0] not in {r for (r,) in db.execute("SELECT run_id FROM runs")}

    gallery._store.close()
    again._store.close()
    for name in (FILE_NAME, f"{FILE_NAME}-wal", f"{FILE_NAME}-shm"):
        (review / name).unlink(missing_ok=True)
    (review / FILE_NAME).write_bytes(b"not a gallery " * 512)
    with caplog.at_level(logging.ERROR, logger="smearscope.service.station.gallery_store"):
        fresh = ReviewGallery(config, review)
    assert fresh.run_ids() == [] and len(list(review.glob(f"{FILE_NAME}.unreadable-*"))) == 1
    assert any("set aside" in r.getMessage() for r in caplog.records)
    fresh.add_field("run-new", _image(pool[0]), pool[0])
    assert ReviewGallery(config, review).run_ids() == ["run-new"]


def test_only_the_newest_unreadable_gallery_copy_is_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A gallery file that breaks between starts (a failing card) is set aside at each: the older
    copies are deleted (said in the log), so they do not fill the disk; the newest stays to look at."""
    from smearscope.service.station.gallery_store import FILE_NAME

    review, pool = tmp_path / "review", oracle_pool()
    config = ReviewConfig(min_free_disk_mb=0)
    with caplog.at_level(logging.WARNING, logger="smearscope.service.station.gallery_store"):
        for k in range(4):
            gallery = ReviewGallery(config, review)  # sets the file broken before it aside
            assert gallery.run_ids() == []
            assert len(list(review.glob(f"{FILE_NAME}.unreadable-*"))) == min(k, 1)
            gallery.add_field(f"run-{k}", _image(pool[0]), pool[0])
            gallery._store.close()
            for name in (FILE_NAME, f"{FILE_NAME}-wal", f"{FILE_NAME}-shm"):
                (review / name).unlink(missing_ok=True)
            (review / FILE_NAME).write_bytes(f"broken gallery {k} ".encode() * 512)
        ReviewGallery(config, review)
    copies = list(review.glob(f"{FILE_NAME}.unreadable-*"))
    assert len(copies) == 1 and copies[0].read_bytes().startswith(b"broken gallery 3 ")
    deleted = [r.getMessage() for r in caplog.records if "deleted" in r.getMessage()]
    assert len(deleted) == 3 and f"only the newest ({copies[0].name})" in deleted[-1]


def test_a_confident_call_the_open_set_check_marked_atypical_goes_to_review(tmp_path: Path) -> None:
    """A white cell given a trained type yet outside every trained type by the head's open-set test
    (atypical): a technician sees its crop in the gallery, after the field's unidentified cells,
    and a signed run counts it among the cells left to review until someone types it."""
    from dataclasses import replace

    from smearscope.service.station.clinic import _left_to_review
    from smearscope.service.station.specimen import SpecimenRun

    plain = oracle_pool()[1]  # confident calls only: nothing for review
    k = next(i for i, c in enumerate(plain.report.cells) if c.kind == "wbc" and c.label not in (None, "unidentified"))
    label = plain.report.cells[k].label
    cells = [c.model_copy(update={"atypical": True}) if i == k else c for i, c in enumerate(plain.report.cells)]
    result = replace(plain, report=plain.report.model_copy(update={"cells": cells}),
                     cells=tuple(replace(c, atypical=True) if i == k else c for i, c in enumerate(plain.cells)))
    gallery = ReviewGallery(ReviewConfig(min_free_disk_mb=0), tmp_path / "review")
    assert ReviewGallery(ReviewConfig(min_free_disk_mb=0), tmp_path / "plain").add_field("p", _image(plain), plain) == 0
    assert gallery.add_field("run-a", _image(plain), result) == 1
    (crop,) = gallery.page("run-a")["cells"]
    assert (crop["cell"], crop["label"], crop["atypical"]) == (k, label, True)
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="run-a")
    assert run.add(result, 1.0) and _left_to_review(run, {}) == 1


def test_a_gallery_write_refused_by_a_locked_file_is_made_good_at_the_next_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Another process holds the gallery's file locked while a field arrives (a backup, a sqlite3
    shell): the field's crops stay in memory, and the next write that succeeds writes the run
    whole, so a restart still serves every crop the technician saw."""
    import sqlite3

    from smearscope.service.station.gallery_store import FILE_NAME

    review, pool = tmp_path / "review", oracle_pool()
    config = ReviewConfig(min_free_disk_mb=0)
    gallery = ReviewGallery(config, review)
    gallery.add_field("run-1", _image(pool[2]), pool[2])  # the file exists
    gallery._store._connect().execute("PRAGMA busy_timeout = 50")  # the lock is held throughout: no need to wait
    locker = sqlite3.connect(review / FILE_NAME, isolation_level=None, timeout=0)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with caplog.at_level(logging.WARNING, logger="smearscope.service.station.gallery_store"):
            assert gallery.add_field("run-1", _image(pool[0]), pool[0]) >= 1  # the sickle cell: kept in memory
        assert any("not written" in r.getMessage() for r in caplog.records)
    finally:
        locker.rollback()
        locker.close()
    gallery.add_field("run-1", _image(pool[3]), pool[3])
    again = ReviewGallery(config, review)
    assert _pages(again, "run-1") == _pages(gallery, "run-1")
    assert "sickle" in {c["label"] for p in _pages(again, "run-1") for c in p["cells"]}


def test_only_the_first_page_carries_the_overlay_thumbnail(tmp_path: Path) -> None:
    """The overlay thumbnail comes once, with the first page: a later page (next_offset) is all
    room for crops, and a dashboard paging through a run does not fetch the overlay again."""
    gallery = ReviewGallery(ReviewConfig(min_free_disk_mb=0), tmp_path / "review")
    for result in oracle_pool():
        gallery.add_field("run-a", _image(result), result)
    first = gallery.page("run-a")
    assert first["overlay"] is not None and first["total"] >= 3
    later = gallery.page("run-a", 1)
    assert later["overlay"] is None and later["cells"] == first["cells"][1:]


def test_a_locked_gallery_file_at_start_is_left_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file another process holds locked when the station starts is not read (said), and not set
    aside as unreadable: once the lock goes, the next start reads the runs back."""
    import functools
    import sqlite3

    from smearscope.service.station import gallery_store
    from smearscope.service.station.gallery_store import FILE_NAME

    review, pool = tmp_path / "review", oracle_pool()
    config = ReviewConfig(min_free_disk_mb=0)
    before = ReviewGallery(config, review)
    before.add_field("run-1", _image(pool[0]), pool[0])
    before.close()  # that process ended
    locker = sqlite3.connect(review / FILE_NAME, isolation_level=None, timeout=0)
    try:
        locker.execute("PRAGMA locking_mode = EXCLUSIVE")
        locker.execute("BEGIN EXCLUSIVE")  # no other connection may read it
        # the lock is held throughout: no need to wait the default 5 s for it
        monkeypatch.setattr(gallery_store.sqlite3, "connect", functools.partial(sqlite3.connect, timeout=0.05))
        with caplog.at_level(logging.ERROR, logger="smearscope.service.station.gallery_store"):
            locked = ReviewGallery(config, review)
        assert locked.run_ids() == []
        assert any("not read" in r.getMessage() for r in caplog.records)
        assert not any("set aside" in r.getMessage() for r in caplog.records)
    finally:
        locker.rollback()
        locker.close()
    monkeypatch.undo()
    assert list(review.glob(f"{FILE_NAME}.unreadable-*")) == []
    assert ReviewGallery(config, review).run_ids() == ["run-1"]


def test_a_run_the_gallery_lets_go_leaves_its_file_at_once(tmp_path: Path) -> None:
    """The gallery keeps its last runs: one it lets go is deleted from its file in the same write,
    not left there (its crops on disk) until the next start."""
    import sqlite3

    from smearscope.service.station.gallery_store import FILE_NAME
    from smearscope.service.station.review import KEEP_RUNS

    review = tmp_path / "review"
    gallery, runs = _gallery_of_runs(review, KEEP_RUNS + 2)
    kept = gallery.run_ids()
    assert kept == runs[1:]  # the open run and KEEP_RUNS closed ones
    db = sqlite3.connect(review / FILE_NAME)
    try:
        assert [r for (r,) in db.execute("SELECT run_id FROM runs ORDER BY touched")] == kept
        assert {r for (r,) in db.execute("SELECT DISTINCT run_id FROM crops")} == set(kept)
    finally:
        db.close()


def test_a_run_written_whole_after_a_low_disk_keeps_out_the_crops_it_displaced(tmp_path: Path) -> None:
    """With every white cell shown (for typing) and the run at its cap, a cell to review takes the
    place of the newest white cell while the disk is low (the change held in memory); the run
    written whole once there is room again does not bring that white cell back at the next start."""
    import shutil

    review, pool = tmp_path / "review", oracle_pool()
    wbc = sum(c.kind == "wbc" and c.label is not None for c in pool[1].report.cells)
    config = ReviewConfig(white_cells="all", max_cells_per_run=wbc, min_free_disk_mb=0)
    gallery = ReviewGallery(config, review)
    assert gallery.add_field("run-1", _image(pool[1]), pool[1]) == wbc  # typing only: the cap reached
    gallery.config = config.model_copy(update={"min_free_disk_mb": shutil.disk_usage(tmp_path).free / 2**20 + 1024})
    assert gallery.add_field("run-1", _image(pool[0]), pool[0]) == 1  # the sickle cell, in place of a white cell
    gallery.config = config
    gallery.add_field("run-2", _image(pool[2]), pool[2])  # room again: run-1 written whole
    shown = _pages(gallery, "run-1")
    assert sum(len(p["cells"]) for p in shown) == wbc and "sickle" in {c["label"] for c in shown[0]["cells"]}
    again = ReviewGallery(config, review)
    assert _pages(again, "run-1") == shown


def _two_field_station(tmp_path: Path, broker: Any, auto_start: bool = True,
                       **extra: Any) -> tuple[Subscriber, Path, list[int]]:
    """An observer of the station's topics, and a simulated station whose run reaches its WBC
    target on its second field (`auto_start` False: no run opens by itself); the WBC classified
    per field."""
    observer = Subscriber(broker.port, "observer", "observer-secret", [f"{BASE}/#"])
    observer.wait_ready()
    per_field = classified_wbc_per_field()
    source = {"kind": "simulated", "fields": 500, "fps": 8.0, "width": 480, "height": 360, "seed": 0}
    target = per_field[0] + per_field[1]
    if auto_start:
        config = write_station(tmp_path, broker.port, target_wbc=target, source=source, **extra)
    else:
        config = write_station(tmp_path, broker.port, source=source, specimen={
            "target_wbc_count": target, "idle_timeout_s": 60.0, "auto_start": False}, **extra)
    return observer, config, per_field


@pytest.mark.broker
def test_station_publishes_fhir_live_state_and_review(
    tmp_path: Path, broker: Any, credentials_dir: Path,
) -> None:
    observer, config, per_field = _two_field_station(tmp_path, broker, review={"max_message_kb": 16, "min_free_disk_mb": 0})
    daemon = StationDaemon(load_config(config), analyzer_factory=pool_factory(), config_path=config)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/fhir" for m in ms), 30)
        report = Report.model_validate(envelopes(observer, f"{BASE}/report")[0]["body"])
        observer.client.publish(f"{BASE}/cmd/get_review", json.dumps({"run_id": report.run_id}), qos=1)
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/cmd_response/get_review" for m in ms), 15)
    finally:
        daemon.request_stop("test over")
        runner.join(30)
        observer.close()
    assert not runner.is_alive()

    # FHIR: a bare Bundle after its report, for the same report id, with the report's numbers.
    topics = [m.topic for m in observer.messages]
    assert topics.index(f"{BASE}/report") < topics.index(f"{BASE}/fhir")
    message = observer.on_topic(f"{BASE}/fhir")[0]
    assert message.content_type.startswith("application/fhir+json") and not message.retain
    assert message.user_properties["report_id"] == report.report_id
    bundle = json.loads(message.payload)
    validate(bundle)
    assert bundle["identifier"]["value"] == report.report_id
    for share in report.wbc_differential:
        if share.label in codes.WBC_LOINC:
            obs = by_code(bundle, codes.LOINC, codes.WBC_LOINC[share.label].code)
            assert obs["valueQuantity"]["value"] == as_sent(share.percent)
    sickle = by_code(bundle, codes.LOINC, "801-1")
    assert sickle["valueCodeableConcept"]["coding"][0]["system"] == codes.LOCAL_GRADE

    # Live run state: retained, open while the run grows, closed with the final aggregates.
    states = [json.loads(m.payload) for m in observer.on_topic(f"{BASE}/run")]
    mine = [s for s in states if s["run_id"] == report.run_id]
    assert [s["state"] for s in mine] == ["open", "closed"]
    assert mine[0]["progress"]["classified_wbc"] == per_field[0]
    closed = mine[-1]
    assert closed["report"]["wbc_differential"] == [s.model_dump() for s in report.wbc_differential]
    assert not {"cells", "cell_detail"} & set(closed["report"]) and closed["review"]["cells"] >= 1
    assert all(len(m.payload) <= 16 * 1024 for m in observer.on_topic(f"{BASE}/run"))

    # Review gallery: crops of this run's cells to review, within the message budget.
    answer_msg = observer.on_topic(f"{BASE}/cmd_response/get_review")[0]
    answer = json.loads(answer_msg.payload)
    assert answer["ok"] and answer["run_id"] == report.run_id and answer["total"] >= 1
    assert len(answer_msg.payload) <= 16 * 1024
    review_dir = tmp_path / "state" / "review" / report.run_id
    late = Subscriber(broker.port, "observer", "observer-secret", [f"{BASE}/run"])
    try:  # the last state is retained for a dashboard that opens later
        assert late.wait_for(lambda ms: len(ms) > 0, 5)
        assert late.messages[0].retain and late.messages[0].payload == observer.on_topic(f"{BASE}/run")[-1].payload
    finally:
        late.close()
    assert wait_until(lambda: len(list(review_dir.glob("*.jpg"))) == report.fields_analyzed, 5)


@pytest.mark.broker
def test_a_run_closed_before_a_restart_can_still_be_verified(
    tmp_path: Path, broker: Any, credentials_dir: Path,
) -> None:
    observer, config, _ = _two_field_station(tmp_path, broker)

    def run_daemon(until) -> None:
        daemon, runner = start_daemon(config)
        try:
            assert until()
        finally:
            stop_daemon(daemon, runner)

    try:
        # a first process closes a run (its WBC target reached) and stops
        run_daemon(lambda: observer.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 30))
        first = Report.model_validate(envelopes(observer, f"{BASE}/report")[0]["body"])
        assert first.end_reason == "target_reached"

        # the next process verifies it
        seen_status = len(observer.on_topic(f"{BASE}/status"))

        def verified() -> bool:
            assert observer.wait_for(lambda ms: any(m.payload == b"online" for m in
                                                    [m for m in ms if m.topic == f"{BASE}/status"][seen_status:]), 30)
            # its review material too (the gallery's file)
            observer.client.publish(f"{BASE}/cmd/get_review", json.dumps({"run_id": first.run_id}), qos=1)
            assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/cmd_response/get_review" for m in ms), 30)
            observer.client.publish(f"{BASE}/cmd/verify_run", json.dumps({"run_id": first.run_id,
                                                                           "verified_by": "AB"}), qos=1)
            return observer.wait_for(lambda ms: any(m.topic == f"{BASE}/cmd_response/verify_run" for m in ms), 30)

        run_daemon(verified)
    finally:
        observer.close()
    answer = json.loads(observer.on_topic(f"{BASE}/cmd_response/verify_run")[0].payload)
    assert answer["ok"] and answer["supersedes"] == first.report_id, answer
    assert answer["held"] is False and "message" not in answer, answer  # sent, not held at the station
    review = json.loads(observer.on_topic(f"{BASE}/cmd_response/get_review")[0].payload)
    closed = [json.loads(m.payload) for m in observer.on_topic(f"{BASE}/run")]
    closed = next(c for c in closed if c["run_id"] == first.run_id and c["state"] == "closed")
    # the crops the first process kept, from the second
    assert review["ok"] and review["run_id"] == first.run_id, review
    assert review["total"] == closed["review"]["cells"] >= 1
    assert answer["left_to_review"] >= review["total"]  # nothing typed: every crop to review is left
    again = [Report.model_validate(e["body"]) for e in envelopes(observer, f"{BASE}/report")
             if e["body"]["report_id"] == answer["report_id"]]
    assert again and again[0].verification is not None and again[0].verification.verified_by == "AB"
    assert again[0].run_id == first.run_id and again[0].wbc_differential == first.wbc_differential
    # the fields the first process stored name the version that analysed them, which the signed report keeps
    assert again[0].analysis_software == first.analysis_software == [first.software_version]


@pytest.mark.broker
def test_a_closed_runs_start_and_starter_are_in_its_state_and_in_get_runs_after_a_restart(
    tmp_path: Path, broker: Any, credentials_dir: Path,
) -> None:
    """A closed run's state and `get_runs` say when the run started, who started it and for which
    specimen (start_run's specimen_id), as its open states did: from the process that closed it,
    and from the next one (read back from the outbox file); its specimen report and FHIR bundle
    name the specimen."""
    observer, config, per_field = _two_field_station(tmp_path, broker, auto_start=False)

    def states() -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in observer.on_topic(f"{BASE}/run")]

    def run_daemon(step) -> None:
        seen = sum(m.topic == f"{BASE}/status" and m.payload == b"online" for m in observer.messages)
        daemon, runner = start_daemon(config)
        try:
            assert observer.wait_for(lambda ms: sum(m.topic == f"{BASE}/status" and m.payload == b"online"
                                                    for m in ms) > seen, 30)
            step()
        finally:
            stop_daemon(daemon, runner)

    def first() -> None:
        observer.client.publish(f"{BASE}/cmd/start_run", json.dumps({"specimen_id": "H-2026-0412"}), qos=1)
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/run" and json.loads(m.payload)["state"]
                                                == "closed" for m in ms), 60)

    def second() -> None:
        observer.client.publish(f"{BASE}/cmd/get_runs", "{}", qos=1)
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/cmd_response/get_runs" for m in ms), 30)

    try:
        run_daemon(first)
        closed = next(s for s in states() if s["state"] == "closed")
        opened = [s for s in states() if s["state"] == "open" and s["run_id"] == closed["run_id"]]
        assert opened and {s["progress"]["started_at"] for s in opened} == {opened[0]["progress"]["started_at"]}
        started = {"started_at": opened[0]["progress"]["started_at"], "started_by": "command",
                   "specimen_id": "H-2026-0412", "run_seq": 1}  # the station's first run
        assert all(s["progress"]["specimen_id"] == "H-2026-0412" for s in opened)
        assert isinstance(started["started_at"], float) and opened[0]["progress"]["started_by"] == "command"
        assert closed["progress"] == {"run_id": closed["run_id"], **started, "fields": 2,
                                      "classified_wbc": per_field[0] + per_field[1],
                                      "target_wbc": per_field[0] + per_field[1]}
        (final,) = [e["body"] for e in envelopes(observer, f"{BASE}/report") if e["body"]["run_id"] == closed["run_id"]]
        assert final["specimen_id"] == "H-2026-0412" and closed["report"]["specimen_id"] == "H-2026-0412"
        before = len(states())
        run_daemon(second)
    finally:
        observer.close()
    # the next process: the run's state again at its start, and its get_runs answer
    again = [s for s in states()[before:] if s["run_id"] == closed["run_id"]]
    assert again and again[0]["state"] == "closed" and again[0]["progress"] == closed["progress"]
    answer = json.loads(observer.on_topic(f"{BASE}/cmd_response/get_runs")[0].payload)
    listed = [r for r in answer["runs"] if r["run_id"] == closed["run_id"]]
    assert answer["ok"] and len(listed) == 1 and listed[0]["progress"] == closed["progress"]


@pytest.mark.broker
def test_the_retained_run_state_comes_back_when_the_broker_lost_it(
    tmp_path: Path, broker: Any, credentials_dir: Path,
) -> None:
    """A broker that comes back without its retained messages (no persistence, or a crash before
    its last save) gets the station's run state again: from the station once it reconnects, and
    from a station that starts while the broker holds none."""
    observer, config, _ = _two_field_station(tmp_path, broker, auto_start=False)

    def retained() -> dict[str, Any] | None:
        late = Subscriber(broker.port, "observer", "observer-secret", [f"{BASE}/run"])
        try:
            late.wait_ready()
            return json.loads(late.messages[0].payload) if late.wait_for(lambda ms: len(ms) > 0, 2) else None
        finally:
            late.close()

    def online_again(seen: int) -> bool:
        return observer.wait_for(lambda ms: sum(m.topic == f"{BASE}/status" and m.payload == b"online"
                                                for m in ms) > seen, 30)

    onlines = lambda: sum(m.topic == f"{BASE}/status" and m.payload == b"online" for m in observer.messages)
    try:
        daemon, runner = start_daemon(config)
        try:
            assert online_again(0)
            observer.client.publish(f"{BASE}/cmd/start_run", "{}", qos=1)
            assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/run" and json.loads(m.payload)["state"]
                                                    == "closed" for m in ms), 60)
            closed = json.loads(observer.on_topic(f"{BASE}/run")[-1].payload)
            assert retained() == closed
            seen = onlines()
            broker.kill()
            broker.start()  # without persistence: no retained message left
            assert online_again(seen)
            assert wait_until(lambda: retained() == closed, 20)
        finally:
            stop_daemon(daemon, runner)
        broker.kill()
        broker.start()  # the station away: the broker comes back empty
        assert retained() is None
        seen = onlines()
        daemon, runner = start_daemon(config)
        try:
            assert online_again(seen) and wait_until(lambda: retained() is not None, 20)
            again = retained()
            assert again is not None and again["run_id"] == closed["run_id"] and again["state"] == "closed"
            assert again["report"]["report_id"] == closed["report"]["report_id"]
        finally:
            stop_daemon(daemon, runner)
    finally:
        observer.close()


@pytest.mark.broker
def test_get_runs_asked_as_the_station_comes_online_lists_the_runs_closed_before(
    tmp_path: Path, broker: Any, credentials_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dashboard asks a station for its earlier runs when it comes online. The broker connection,
    which answers commands, used to open before the start had read the closed runs back from the
    outbox file, so get_runs answered there {"ok": true, "runs": []}. Here reading them back takes
    2 s: the station must not come online before it is done."""
    from smearscope.service.station.clinic import ClinicFeed

    observer, config, _ = _two_field_station(tmp_path, broker)
    daemon, runner = start_daemon(config)
    try:
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 60)
    finally:
        stop_daemon(daemon, runner)
    closed_id = envelopes(observer, f"{BASE}/report")[0]["body"]["run_id"]
    original_start = ClinicFeed.start

    def slow_start(self: ClinicFeed, *args: Any, **kwargs: Any) -> None:
        time.sleep(2.0)
        original_start(self, *args, **kwargs)

    monkeypatch.setattr(ClinicFeed, "start", slow_start)
    online = sum(m.topic == f"{BASE}/status" and m.payload == b"online" for m in observer.messages)
    daemon, runner = start_daemon(config)
    try:
        assert observer.wait_for(lambda ms: sum(m.topic == f"{BASE}/status" and m.payload == b"online"
                                                for m in ms) > online, 30)
        observer.client.publish(f"{BASE}/cmd/get_runs", "{}", qos=1)
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/cmd_response/get_runs" for m in ms), 30)
    finally:
        try:
            stop_daemon(daemon, runner)
        finally:
            observer.close()
    answer = json.loads(observer.on_topic(f"{BASE}/cmd_response/get_runs")[0].payload)
    assert answer["ok"] and closed_id in [r["run_id"] for r in answer["runs"]], answer


@pytest.mark.broker
def test_verify_run_before_the_first_broker_connection_settles_answers_held_null_not_false(
    tmp_path: Path, credentials_dir: Path,
) -> None:
    """A station whose broker is not reachable yet (mosquitto not started on its port) closes a run
    (its report stored in the outbox) and is asked to sign it: whether the run's messages are held
    (the broker's retained run state showing it further along) is not decided before the start has
    compared its state with that retained state, so verify_run answers `held`: null with
    `hold_decided`: false and a message saying so, not a false that could turn true. Once the broker
    is up and that first connection settled (it keeps no run state), the same run signed again
    answers `held`: false, `hold_decided`: true, no message."""
    from broker import MQTT_USERS, MosquittoBroker

    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS)  # its ports picked, nothing listening yet
    per_field = classified_wbc_per_field()
    source = {"kind": "simulated", "fields": 500, "fps": 8.0, "width": 480, "height": 360, "seed": 0}
    config = write_station(tmp_path, broker.port, source=source, specimen={  # one run, the one start_run opens
        "target_wbc_count": per_field[0] + per_field[1], "idle_timeout_s": 60.0, "auto_start": False})
    daemon, runner = start_daemon(config)
    try:
        assert wait_until(lambda: daemon.handle_command("start_run", {}).get("ok"), 30)
        assert wait_until(lambda: bool(daemon.handle_command("get_runs", {})["runs"]), 60)
        (closed,) = daemon.handle_command("get_runs", {})["runs"]
        run_id = closed["run_id"]
        assert daemon.publisher is not None and not daemon.publisher.state.connected
        early = dict(daemon.handle_command("verify_run", {"run_id": run_id, "verified_by": "AB"}))
        assert early["ok"] and early["held"] is None and early["hold_decided"] is False, early
        assert early["message"].startswith("the signed report is stored at the station; whether it is held there "
                                           "is not decided yet"), early
        broker.start()
        assert wait_until(daemon.publisher.run_watch.decided.is_set, 30), daemon.publisher.state
        later = dict(daemon.handle_command("verify_run", {"run_id": run_id, "verified_by": "AB"}))
        assert later["ok"] and later["held"] is False and later["hold_decided"] is True, later
        assert "message" not in later and later["supersedes"] == early["report_id"], later
    finally:
        stop_daemon(daemon, runner)
        broker.stop()


@pytest.mark.broker
def test_stop_run_before_the_hold_is_decided_stops_the_run_at_once_and_waits_only_to_answer_held(
    tmp_path: Path, credentials_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stop_run waits for the start's hold decision only to answer `held`: the run itself stops when
    the command comes, not after that wait (fields analysed meanwhile, possibly of the next slide, would
    join the stopped run). The wait is made longer than the test looks here (the broker not started: the
    hold is not decided), so a stop that waited first is seen still open; once the broker is up and the
    hold decided, the answer comes with `held`: false, `hold_decided`: true."""
    from broker import MQTT_USERS, MosquittoBroker

    from smearscope.service.station import commands

    monkeypatch.setattr(commands, "HOLD_DECISION_WAIT_S", 600.0)
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS)  # its ports picked, nothing listening yet
    source = {"kind": "simulated", "fields": 5000, "fps": 4.0, "width": 480, "height": 360, "seed": 0}
    config = write_station(tmp_path, broker.port, source=source, specimen={  # the run open for a minute at least
        "target_wbc_count": 1000, "idle_timeout_s": 600.0, "auto_start": False})
    daemon, runner = start_daemon(config)
    answers: list[dict[str, Any]] = []
    try:
        assert wait_until(lambda: daemon.handle_command("start_run", {}).get("ok"), 30)
        assert wait_until(lambda: (daemon.tracker.progress() or None) is not None
                          and daemon.tracker.progress().fields >= 2, 60)
        assert daemon.publisher is not None and not daemon.publisher.run_watch.decided.is_set()
        stopping = threading.Thread(target=lambda: answers.append(dict(daemon.handle_command("stop_run", {}))))
        stopping.start()
        closed = wait_until(lambda: bool(daemon.handle_command("get_runs", {})["runs"]), 30)
        waiting = stopping.is_alive()
        broker.start()  # the hold decided: the answer goes
        stopping.join(60)
        assert closed and waiting, "the run stayed open while stop_run waited for the hold decision"
        (answer,) = answers
        (run,) = daemon.handle_command("get_runs", {})["runs"]
        assert answer["ok"] and answer["run_id"] == run["run_id"] and answer["fields"] == run["progress"]["fields"]
        assert answer["held"] is False and answer["hold_decided"] is True and "message" not in answer, answer
    finally:
        stop_daemon(daemon, runner)
        broker.stop()
