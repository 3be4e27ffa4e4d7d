"""Frame sources against real files, real OpenCV decoding and real video capture."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from smearscope.device import folder_source
from smearscope.device.folder_source import FolderSource, ProcessedLog, file_key
from smearscope.device.source_config import (
    CameraSourceConfig,
    FolderSourceConfig,
    ReplaySourceConfig,
    SimulatedSourceConfig,
    SourceConfig,
)
from smearscope.device.sources import (
    SOURCE_REGISTRY,
    CameraSource,
    FrameSource,
    ReplaySource,
    SampleDepth,
    SourceConfigurationError,
    as_bgr8,
    backoff_delay,
    capture_target,
    open_source,
    source_class,
    within_limits,
)

REPO = Path(__file__).resolve().parents[1]


def _image(seed: int, h: int = 64, w: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(seed: int) -> bytes:
    ok, buf = cv2.imencode(".png", _image(seed))
    assert ok
    return buf.tobytes()


def _folder(tmp_path: Path, **kw: object) -> FolderSource:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    cfg = FolderSourceConfig.model_validate(
        {"path": inbox, "settle_s": 0.0, "poll_interval_s": 0.01, **kw}
    )
    return FolderSource(cfg)


# --- registry and configs --------------------------------------------------------------------


def test_registry_resolves_every_kind_lazily() -> None:
    assert set(SOURCE_REGISTRY) == {"camera", "folder", "replay", "simulated"}
    for kind in SOURCE_REGISTRY:
        assert issubclass(source_class(kind), FrameSource)
    with pytest.raises(SourceConfigurationError, match="unknown source kind 'webcam'"):
        source_class("webcam")


def test_renderer_is_imported_only_for_the_simulated_source(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from smearscope.device.source_config import FolderSourceConfig\n"
        "from smearscope.device.sources import open_source\n"
        f"open_source(FolderSourceConfig(path={str(tmp_path)!r})).close()\n"
        "assert 'smearscope.device.synthetic' not in sys.modules, 'renderer imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_discriminated_union_picks_the_kind_and_rejects_unknown_keys(tmp_path: Path) -> None:
    adapter: TypeAdapter[SourceConfig] = TypeAdapter(SourceConfig)
    cfg = adapter.validate_python({"kind": "folder", "path": str(tmp_path)})
    assert isinstance(cfg, FolderSourceConfig)
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        adapter.validate_python({"kind": "webcam"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        adapter.validate_python({"kind": "camera", "fps": 5})
    with pytest.raises(ValidationError, match="reconnect_max_s"):
        CameraSourceConfig(reconnect_initial_s=10, reconnect_max_s=1)
    assert CameraSourceConfig(reconnect_initial_s=5, reconnect_max_s=5).reconnect_max_s == 5  # a flat backoff
    with pytest.raises(ValidationError, match="must differ"):
        FolderSourceConfig(path=tmp_path, done_dir="out", rejected_dir="out")
    with pytest.raises(ValidationError, match="lower-case"):
        FolderSourceConfig(path=tmp_path, extensions=(".PNG",))
    with pytest.raises(ValidationError, match="microns_per_pixel"):  # at load, not at the first render
        SimulatedSourceConfig(microns_per_pixel=0.02)


def test_folder_done_and_rejected_dirs_must_be_subfolders(tmp_path: Path) -> None:
    """`done_dir = "."` passed validate-config and the station moved each analysed file into the
    watched folder itself under a new name, where it was picked up and analysed again (then refused
    as same_field or duplicate_content); `".."` moved the lab's files out of the folder. Both are
    refused, and validate-config says so."""
    for field in ("done_dir", "rejected_dir"):
        for name in (".", ".."):
            with pytest.raises(ValidationError, match="subfolder"):
                FolderSourceConfig(path=tmp_path, **{field: name})
    assert FolderSourceConfig(path=tmp_path, done_dir=".done", rejected_dir="rej.d").done_dir == ".done"
    config = tmp_path / "station.toml"
    config.write_text(f'station_id = "s1"\n[source]\nkind = "folder"\npath = "{tmp_path}"\ndone_dir = "."\n',
                      encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "smearscope", "validate-config", str(config)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert "done_dir" in proc.stdout + proc.stderr


# --- folder ----------------------------------------------------------------------------------


def test_folder_hands_out_each_image_once_and_moves_it_to_done(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    path = src._root / "field_001.png"
    path.write_bytes(_png(1))
    st = path.stat()
    frame = next(src)
    key = file_key("field_001.png", st.st_size, st.st_mtime_ns)
    assert frame.frame_id == f"scope:field_001.png@{key[:12]}"
    assert frame.input_key is not None and frame.input_key.startswith("scope:sha256:")
    np.testing.assert_array_equal(frame.pixels, _image(1))
    # Kept until the station has stored its result, and not handed out twice meanwhile.
    assert path.exists() and src.scan_once() is None
    src.done(frame)
    assert (src._root / "done" / "field_001.png").exists() and not path.exists()
    assert src.scan_once() is None
    src.close()

    # A restart finds nothing new: the file was moved and recorded.
    again = _folder(tmp_path)
    assert again.scan_once() is None
    again.close()


def test_folder_state_prevents_reprocessing_after_a_crash_before_the_move(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "a.png"
    path.write_bytes(_png(2))
    st = path.stat()
    # The previous run recorded the file, then died before moving it.
    ProcessedLog(inbox / ".smearscope-processed", 100).record(
        file_key("a.png", st.st_size, st.st_mtime_ns), "done", "a.png"
    )
    src = _folder(tmp_path)
    assert src.scan_once() is None
    assert (inbox / "done" / "a.png").exists() and not path.exists()
    src.close()


def test_a_state_file_named_in_the_watched_folder_is_not_taken_for_an_input(tmp_path: Path) -> None:
    """`state_file = "<path>/processed.log"` passed validate-config; the station then took its own log
    for a scanner's file: rejected as not_an_image and moved into rejected/ (each new record made
    a new one there), so the record of what it had processed was gone at the next start."""
    state = tmp_path / "inbox" / "processed.log"
    src = _folder(tmp_path, state_file=state)
    (src._root / "a.png").write_bytes(_png(6))
    frame = next(src)
    src.done(frame)
    for _ in range(3):
        assert src.scan_once() is None
    assert src.rejected_count == 0 and not any((src._root / "rejected").iterdir())
    assert (src._root / "done" / "a.png").exists()
    assert "a.png" in state.read_text(encoding="utf-8")
    src.close()
    again = _folder(tmp_path, state_file=state)
    assert again.scan_once() is None and not any((again._root / "rejected").iterdir())
    again.close()


def test_a_rejected_file_an_operator_puts_back_is_judged_again(tmp_path: Path) -> None:
    """A file rejected under a config since fixed (here `max_file_mb` too small), moved back from
    rejected/ by the operator (`mv` keeps its size and mtime), went straight back to rejected/
    unread, said only at INFO as "already processed": it could never be analysed. It is judged
    again (said in the log), under the config the station runs now."""
    data = _png(7)
    assert len(data) > 1000
    src = _folder(tmp_path, max_file_mb=0.001)
    (src._root / "big.png").write_bytes(data)
    assert src.scan_once() is None and src.rejected_reasons["file_too_large"] == 1
    src.close()
    rejected = src._root / "rejected" / "big.png"
    os.replace(rejected, src._root / "big.png")  # the operator's mv, after raising max_file_mb
    again = _folder(tmp_path)
    frame = again.scan_once()
    assert frame is not None and frame.frame_id.startswith("scope:big.png@")
    again.done(frame)
    assert (again._root / "done" / "big.png").exists() and not (again._root / "big.png").exists()
    again.close()


def test_the_processed_files_log_stays_bounded_while_the_station_runs(tmp_path: Path) -> None:
    """A station up for months records every file it handles: the log (file and memory) is
    compacted to its last `state_max_entries` while it runs, not only at the next start."""
    path = tmp_path / ".smearscope-processed"
    log = ProcessedLog(path, 100)
    for i in range(1000):
        log.record(file_key(f"f{i}.png", i, i), "done", f"f{i}.png")
        assert len(path.read_text().splitlines()) < 200 and len(log._keys) < 200
    assert file_key("f999.png", 999, 999) in log and file_key("f0.png", 0, 0) not in log
    again = ProcessedLog(path, 100)
    assert file_key("f999.png", 999, 999) in again and file_key("f900.png", 900, 900) in again


def test_a_file_handed_out_but_not_done_is_handed_out_again_after_a_crash(tmp_path: Path) -> None:
    """At least once (issue 18, item 2): the crash came between hand-out and stored report."""
    src = _folder(tmp_path)
    (src._root / "b.png").write_bytes(_png(5))
    first = next(src)
    src.close()  # the process dies here: done() never comes
    again = _folder(tmp_path)
    second = again.scan_once()
    assert second is not None and second.frame_id == first.frame_id
    assert second.input_key == first.input_key
    again.done(second)
    assert (again._root / "done" / "b.png").exists()
    again.close()


def test_folder_waits_for_a_half_written_file(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    src = FolderSource(src._config.model_copy(update={"settle_s": 0.15, "decode_grace_s": 30.0}))
    data = _png(3)
    path = src._root / "slow.png"
    path.write_bytes(data[: len(data) // 2])

    def finish() -> None:
        time.sleep(0.4)  # longer than the settle period: the half file looks stable for a while
        with open(path, "ab") as fh:
            fh.write(data[len(data) // 2 :])

    writer = threading.Thread(target=finish)
    writer.start()
    frame = next(src)
    writer.join()
    np.testing.assert_array_equal(frame.pixels, _image(3))
    assert src.rejected_count == 0
    assert not list((src._root / "rejected").iterdir())
    src.close()


def test_folder_rejects_non_images_and_undecodable_files_with_a_reason(tmp_path: Path) -> None:
    src = _folder(tmp_path, decode_grace_s=0.0)
    (src._root / "notes.txt").write_text("not a field")
    (src._root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100 + b"IEND")
    (src._root / "empty.jpg").write_bytes(b"")
    (src._root / "upload.png.part").write_bytes(b"half")  # a temporary name: left alone
    assert src.scan_once() is None
    assert (src._root / "upload.png.part").exists()
    rejected = src._root / "rejected"
    reasons = {p.name: p.read_text().strip() for p in rejected.glob("*.reason.txt")}
    assert reasons["notes.txt.reason.txt"].startswith("not_an_image: extension '.txt' is not one of")
    assert reasons["broken.png.reason.txt"].startswith("corrupt: ")
    assert reasons["empty.jpg.reason.txt"].startswith("empty_file: ")
    assert {p.name for p in rejected.iterdir()} >= {"notes.txt", "broken.png", "empty.jpg"}
    assert src.rejected_count == 3
    src.close()


def test_what_is_not_a_regular_file_goes_to_rejected_with_its_reason(tmp_path: Path) -> None:
    """A FIFO named like an image, a dangling symlink, a symlink loop, one through a file (its target
    renamed to a file) and a symlink to a device are never images: each goes to rejected/ with its
    reason, counted (they stayed in the folder, unsaid; the one through a file too, until now). A
    symlink to an image is the image."""
    src = _folder(tmp_path, decode_grace_s=0.0)
    root = src._root
    os.mkfifo(root / "camera.png")
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "real.png").write_bytes(_png(5))
    (root / "linked.png").symlink_to(tmp_path / "real.png")
    (root / "through.png").symlink_to(tmp_path / "real.png" / "field.png")  # ENOTDIR, not ENOENT
    frame = src.scan_once()
    assert frame is not None and "linked.png" in frame.frame_id
    reasons = {p.name: p.read_text().strip() for p in (root / "rejected").glob("*.reason.txt")}
    assert reasons == {"camera.png.reason.txt": "not_a_file: not a regular file",
                       "gone.png.reason.txt": "not_a_file: a symbolic link to nothing readable",
                       "loop.png.reason.txt": "not_a_file: a symbolic link to nothing readable",
                       "zero.png.reason.txt": "not_a_file: a symbolic link to a FIFO, device or socket",
                       "through.png.reason.txt": "not_a_file: a symbolic link to nothing readable"}, reasons
    assert {p.name for p in root.iterdir() if not p.name.startswith(".")} == {"linked.png", "rejected", "done"}
    assert src.rejected_count == 5 and src.rejected_reasons["not_a_file"] == 5
    src.close()


def test_an_entry_that_cannot_be_moved_is_rejected_once_not_at_every_poll_nor_restart(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """A FIFO the station cannot move away is rejected once: later polls, and a restart that reads
    its record, leave it, neither a second reason in the log nor a second count."""
    src = _folder(tmp_path, decode_grace_s=0.0)
    os.mkfifo(src._root / "pipe.png")  # e.g. another user's, in a sticky-bit folder
    real = os.replace

    def refuse(a, b, *args, **kwargs):
        if str(a).endswith("pipe.png"):
            raise PermissionError(1, "Operation not permitted")
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse)
    for _ in range(3):
        assert src.scan_once() is None
    assert src.rejected_count == 1 and (src._root / "pipe.png").exists()
    src.close()
    for _ in range(2):  # two restarts
        again = FolderSource(src._config)
        assert again.scan_once() is None and again.scan_once() is None
        assert again.rejected_count == 0 and not again.rejected_reasons
        again.close()
    lines = src._log.path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("\trejected\tpipe.png")
    assert (src._root / "pipe.png").exists()


def test_a_file_swapped_for_a_fifo_after_it_was_listed_does_not_block_the_scan(tmp_path: Path) -> None:
    """Whoever writes the folder can replace a listed file before it is read: a FIFO in its place is
    not waited on (the scan blocked for ever in its open: no file analysed again, nothing in the
    log; a link to /dev/zero would have been read until the memory ran out). The scan passes it
    by, and the next one rejects it as `not_a_file`."""
    src = _folder(tmp_path)
    path = src._root / "a.png"
    path.write_bytes(_png(1))
    real_status = src._log.status

    def status_then_swap(key: str) -> str | None:  # asked after the listing, before the read
        if not path.is_fifo():
            path.unlink()
            os.mkfifo(path)
        return real_status(key)

    src._log.status = status_then_swap  # type: ignore[method-assign]
    found: list[object] = []
    scan = threading.Thread(target=lambda: found.append(src.scan_once()), daemon=True)
    scan.start()
    scan.join(30)
    blocked = scan.is_alive()
    if blocked:  # let the reader waiting for a writer go, so that the test ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        scan.join(30)
    assert not blocked, "the scan waited on the FIFO put in the file's place"
    assert found == [None]
    src._log.status = real_status  # type: ignore[method-assign]
    assert src.scan_once() is None
    assert (src._root / "rejected" / "a.png").is_fifo()
    assert (src._root / "rejected" / "a.png.reason.txt").read_text().startswith("not_a_file")
    src.close()


def test_links_planted_in_place_of_the_stations_own_files_are_never_written_through(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whoever may write the watched folder can put a symbolic link where the station writes: its
    log of processed files, that log's compaction file, a reason file in a `rejected/` of their own
    making. Each was written through, overwriting the file the link names (here a stand-in for the
    outbox); now none is: the write fails and is logged, the file it would have named is intact."""
    victim = tmp_path / "outbox.sqlite3"
    victim.write_bytes(b"SQLite format 3\x00 precious")
    src = _folder(tmp_path, decode_grace_s=0.0)
    log = src._root / ".smearscope-processed"
    log.symlink_to(victim)
    (src._root / "a.png").write_text("not an image")
    with caplog.at_level(logging.ERROR, logger="smearscope.device"):
        assert src.scan_once() is None
    assert (src._root / "rejected" / "a.png").exists()
    assert any("cannot record its rejection" in r.getMessage() for r in caplog.records), caplog.text
    assert victim.read_bytes() == b"SQLite format 3\x00 precious"
    log.unlink()
    (src._root / "rejected").rename(src._root / "rejected.theirs")  # the folder's writer may rename it
    (src._root / "rejected").mkdir()
    (src._root / "rejected" / "b.png.reason.txt").symlink_to(victim)
    (src._root / "b.png").write_text("not an image")
    with caplog.at_level(logging.ERROR, logger="smearscope.device"):
        assert src.scan_once() is None
    assert any("cannot write" in r.getMessage() and "b.png.reason.txt" in r.getMessage() for r in caplog.records)
    assert victim.read_bytes() == b"SQLite format 3\x00 precious"
    src.close()
    log.write_text("".join(f"{k:016x}\tdone\tf{k}.png\n" for k in range(150)))  # over state_max_entries
    (src._root / ".smearscope-processed.tmp").symlink_to(victim)
    ProcessedLog(log, 100)  # compacted at open, through its .tmp file
    assert len(log.read_text().splitlines()) == 100 and not log.is_symlink()
    assert victim.read_bytes() == b"SQLite format 3\x00 precious"


def test_a_done_or_rejected_folder_replaced_by_a_link_elsewhere_receives_no_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whoever may write the watched folder can rename rejected/ (or done/) away and put a link to
    another folder in its place, the station's state folder say: the station then moved files of
    any name there (an outbox.sqlite3-wal beside the outbox, say). Now it moves
    nothing into a folder that leads elsewhere than at start: the move fails, is logged, and the
    file stays in the watched folder."""
    src = _folder(tmp_path, decode_grace_s=0.0)
    state = tmp_path / "state"
    state.mkdir()
    for sub in ("rejected", "done"):
        (src._root / sub).rename(src._root / f"{sub}.theirs")
        (src._root / sub).symlink_to(state)
    (src._root / "outbox.sqlite3-wal").write_bytes(b"crafted WAL frames")
    (src._root / "a.png").write_bytes(_png(1))
    os.utime(src._root / "a.png", ns=(time.time_ns() + 10**9,) * 2)  # after the other: read second
    with caplog.at_level(logging.ERROR, logger="smearscope.device"):
        frame = src.scan_once()
        assert frame is not None
        src.done(frame)
    assert list(state.iterdir()) == []
    assert (src._root / "outbox.sqlite3-wal").exists() and (src._root / "a.png").exists()
    said = [r.getMessage() for r in caplog.records if "cannot move" in r.getMessage()]
    assert len(said) == 2 and all("replaced by a link" in m for m in said), said
    src.close()


def test_a_folder_swapped_for_a_link_between_the_check_and_the_move_receives_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check that done/ and rejected/ lead where they did at start, then a rename by path, left
    a window: whoever swaps the folder for a link in between (a loop doing it over and over wins
    it now and then) had the file, and its .reason.txt, land in the linked folder. The move and the
    reason file now go through the folder opened at the check, so they land in the folder that was
    there (here renamed aside by the swap), never in the link's."""
    src = _folder(tmp_path, decode_grace_s=0.0)
    state = tmp_path / "state"
    state.mkdir()
    real_replace = os.replace

    def swap_then_replace(source: object, target: object, **kw: object) -> None:
        name = Path(os.fsdecode(source)).name  # type: ignore[arg-type]
        if name in ("junk.png", "a.png"):  # the station's move: the swap comes first
            sub = "rejected" if name == "junk.png" else "done"
            (src._root / sub).rename(src._root / f"{sub}.theirs")
            (src._root / sub).symlink_to(state)
        real_replace(source, target, **kw)  # type: ignore[arg-type]

    (src._root / "junk.png").write_bytes(b"not an image at all")
    (src._root / "a.png").write_bytes(_png(1))
    os.utime(src._root / "a.png", ns=(time.time_ns() + 10**9,) * 2)  # after the other: read second
    monkeypatch.setattr(os, "replace", swap_then_replace)
    frame = src.scan_once()
    assert frame is not None
    src.done(frame)
    monkeypatch.undo()
    assert list(state.iterdir()) == []
    assert sorted(p.name for p in (src._root / "rejected.theirs").iterdir()) == ["junk.png", "junk.png.reason.txt"]
    assert [p.name for p in (src._root / "done.theirs").iterdir()] == ["a.png"]
    src.close()


def test_a_rejected_folder_replaced_by_a_link_gives_back_no_file_of_its_target(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file rejected as maybe incomplete is watched in rejected/ and moved back when it changes.
    With rejected/ renamed away and a link to another folder in its place, a file of that name
    there (changed, being another file) was taken out of that folder into the watched one; now
    nothing is moved out of a rejected/ that leads elsewhere than at start (said in the log)."""
    src = _folder(tmp_path, decode_grace_s=0.0)
    (src._root / "junk.png").write_bytes(b"not an image at all")
    assert src.scan_once() is None and (src._root / "rejected" / "junk.png").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "junk.png").write_bytes(b"someone else's file, longer than the rejected one")
    (src._root / "rejected").rename(src._root / "rejected.theirs")
    (src._root / "rejected").symlink_to(elsewhere)
    with caplog.at_level(logging.ERROR, logger="smearscope.device"):
        assert src.scan_once() is None
    assert (elsewhere / "junk.png").exists() and not (src._root / "junk.png").exists()
    assert [r for r in caplog.records if "replaced by a link" in r.getMessage()], caplog.text
    src.close()


def test_a_processed_log_far_larger_than_its_entries_make_is_read_from_its_end_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A log of 60 MB in the place of the station's (whoever may write the watched folder can put
    one there; at 100 entries its own lines make at most 315 kB): opening it reads its last lines
    only, said once, and knows the versions they name (it was read whole: 126 MB at the peak for
    these 60 MB, so a file of gigabytes took the memory at every start)."""
    import tracemalloc

    log = tmp_path / "log"
    junk = b"0123456789abcdef\tdone\t" + b"x" * 1000 + b"\n"
    with open(log, "wb") as fh:
        fh.writelines(junk * 1000 for _ in range(60))
        fh.write(b"".join(f"{k:016x}\tdone\tf{k}.png\n".encode() for k in range(50)))
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="smearscope.device"):
            plog = ProcessedLog(log, 100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    assert all(f"{k:016x}" in plog for k in range(50))
    assert [r.getMessage() for r in caplog.records if "only its last" in r.getMessage()], caplog.text
    assert len(log.read_text().splitlines()) <= 100  # compacted as any log over its entries


def test_a_log_that_cannot_be_compacted_at_start_is_used_as_it_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A log over its entries is compacted at open, through a file beside it. When that file cannot
    be made (a folder put in its place by whoever may write the watched folder, or a full disk),
    the station did not start (IsADirectoryError out of the folder source); now the log is used as
    read, every version in it known, and compacting is said to have failed, as it is while running."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / ".smearscope-processed").write_text("".join(f"{k:016x}\tdone\tf{k}.png\n" for k in range(130)))
    (inbox / ".smearscope-processed.tmp").mkdir()
    with caplog.at_level(logging.WARNING, logger="smearscope.device"):
        src = _folder(tmp_path, state_max_entries=100)
    assert all(src._log.status(f"{k:016x}") == "done" for k in range(130))
    assert [r for r in caplog.records if "cannot compact" in r.getMessage()], caplog.text
    (inbox / "f5.png").write_bytes(b"a new file of an old name")
    src._log.record(file_key("f5.png", 25, 1), "done", "f5.png")  # records are still written
    assert (inbox / ".smearscope-processed").read_text().count("\n") == 131
    src.close()


def test_a_file_name_too_long_for_its_reason_file_is_cut_to_fit(tmp_path: Path) -> None:
    src = _folder(tmp_path, decode_grace_s=0.0)
    long = "x" * 242 + ".png"  # 246 bytes: its .reason.txt would be 257
    for k in range(2):  # the second one's name taken in rejected/ too
        (src._root / long).write_text("not an image")
        os.utime(src._root / long, ns=(10**18 + k, 10**18 + k))  # another version: another key
        assert src.scan_once() is None
    rejected = src._root / "rejected"
    names = sorted(p.name for p in rejected.iterdir())
    assert len(names) == 4 and all(len(n.encode()) <= 255 for n in names), names
    assert all((rejected / (n + ".reason.txt")).read_text().startswith("not_an_image") for n in names
               if not n.endswith(".reason.txt"))
    assert not (src._root / long).exists() and src.rejected_count == 2
    src.close()


def test_a_file_name_holding_a_line_break_forges_no_line_in_the_journal_or_the_processed_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file named "x.png<LF>KEY<TAB>done<TAB>victim.png", KEY the key of a file not there yet: it
    is rejected (not an image), and that neither adds a line to the journal (the name shown with
    \\x0a) nor a `done` for the victim to the processed-files log, which the next start would have
    read as "already processed" and moved the victim to done/ unanalysed."""
    src = _folder(tmp_path, decode_grace_s=0.0)
    victim, image = src._root / "victim.png", _png(1)
    key = file_key(victim.name, len(image), 10**18)
    hostile = f"x.png\n{key}\tdone\tvictim.png"
    (src._root / hostile).write_text("not an image")
    with caplog.at_level(logging.INFO, logger="smearscope.device"):
        assert src.scan_once() is None
    said = [r.getMessage() for r in caplog.records if "x.png" in r.getMessage()]
    assert said and all("\n" not in m and f"x.png\\x0a{key}\\x09done" in m for m in said), said
    assert (src._root / "rejected" / hostile).exists() and src.rejected_count == 1
    lines = src._log.path.read_text().splitlines()  # its attempt and its rejection
    assert len(lines) == 2 and all(ln.count("\t") == 2 for ln in lines), lines
    src.close()
    victim.write_bytes(image)
    os.utime(victim, ns=(10**18, 10**18))
    again = FolderSource(src._config)  # the next start reads the log back
    frame = again.scan_once()
    assert frame is not None and frame.frame_id == f"scope:victim.png@{key[:12]}", frame
    assert victim.exists() and not (src._root / "done" / "victim.png").exists()
    again.close()


def test_a_file_name_holding_bidi_controls_is_analysed_and_moved_and_shown_escaped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file named with U+202E (right-to-left override) and U+2066 (an isolate): the frame id and
    the log lines show them as \\u202e and \\u2066 (a reader would otherwise see the words after
    them reversed), and the file is found, analysed and moved under its own name."""
    src = _folder(tmp_path, decode_grace_s=0.0)
    name = "scan\u202egnp.exe\u2066.png"
    (src._root / name).write_bytes(_png(1))
    bad = "bad\u202etxt.png"
    (src._root / bad).write_text("not an image")
    os.utime(src._root / bad, ns=(10**18, 10**18))  # the newer: tried second
    with caplog.at_level(logging.INFO, logger="smearscope.device"):
        frame = src.scan_once()
        assert src.scan_once() is None  # the other one: rejected
    assert frame is not None and frame.frame_id.startswith("scope:scan\\u202egnp.exe\\u2066.png@"), frame.frame_id
    said = [r.getMessage() for r in caplog.records if "bad" in r.getMessage()]
    assert said and all("\u202e" not in m and "bad\\u202etxt.png" in m for m in said), said
    src.done(frame)
    assert (src._root / "done" / name).exists() and not (src._root / name).exists()
    assert (src._root / "rejected" / bad).exists() and src.rejected_count == 1
    src.close()


def test_a_file_name_that_is_not_utf8_is_analysed_and_moved_not_fatal(tmp_path: Path) -> None:
    """An SMB share can hand over Latin-1 names: the file is analysed and moved like any other;
    logs, the frame id and the processed log carry the name (not UTF-8 bytes as \\xNN)."""
    src = _folder(tmp_path)
    raw = os.fsdecode(b"caf\xe9.png")  # a lone surrogate in the str: not encodable as UTF-8
    (src._root / raw).write_bytes(_png(1))
    frame = src.scan_once()
    assert frame is not None and "caf\\xe9.png" in frame.frame_id
    frame.frame_id.encode("utf-8")  # travels in reports as it is
    src.done(frame)
    assert (src._root / "done" / raw).exists() and not (src._root / raw).exists()
    again = FolderSource(src._config)  # the processed log reads the name back after a restart
    assert file_key(raw, 1, 2) == hashlib.sha1(b"caf\xe9.png|1|2").hexdigest()[:16] and len(again._log._keys) == 1
    # a file that breaks in a way no code foresaw is left alone, the others still go through
    (src._root / "a.png").write_bytes(_png(3))  # the older: tried first
    (src._root / "b.png").write_bytes(_png(2))
    os.utime(src._root / "b.png", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    import smearscope.device.folder_source as fs

    real = fs.load_image
    def boom(data, **kw):
        if kw.get("source_name") == "a.png":
            raise RuntimeError("unforeseen")
        return real(data, **kw)
    fs.load_image = boom
    try:
        frame = src.scan_once()
    finally:
        fs.load_image = real
    assert frame is not None and "b.png" in frame.frame_id and (src._root / "a.png").exists()
    src.close()


def test_a_refused_frame_goes_to_rejected_with_its_reason_and_a_changed_file_is_not_moved(tmp_path: Path) -> None:
    """The quality gate or the analysis refused it: rejected/, the station's code in its reason
    (counted by the station, not twice). A file whose writer went on after it was read (same name,
    new size or time) stays and is handed out again as its new version."""
    src = _folder(tmp_path)
    (src._root / "blurred.png").write_bytes(_png(1))
    frame = src.scan_once()
    src.done(frame, "out_of_focus")
    reason = (src._root / "rejected" / "blurred.png.reason.txt").read_text()
    assert reason.startswith("out_of_focus: ") and src.rejected_count == 0
    assert not (src._root / "done" / "blurred.png").exists()
    path = src._root / "late.png"
    path.write_bytes(_png(2))
    first = src.scan_once()
    path.write_bytes(_png(3))  # the writer was not done
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    src.done(first)
    assert path.exists() and not (src._root / "done" / "late.png").exists()
    second = src.scan_once()
    assert second is not None and second.frame_id != first.frame_id and second.input_key != first.input_key
    src.done(second)
    assert (src._root / "done" / "late.png").exists()
    src.close()


def test_a_refused_file_that_changed_after_it_was_read_stays_and_done_never_raises(tmp_path: Path, caplog) -> None:
    """A half-filled file the gate refused (its zeros look underexposed) is not lost to rejected/:
    its finished version is analysed. A state file that cannot be written leaves the file, said."""
    src = _folder(tmp_path)
    path = src._root / "filling.png"
    path.write_bytes(_png(1))
    first = src.scan_once()
    path.write_bytes(_png(2))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    src.done(first, "underexposed")
    assert path.exists() and not (src._root / "rejected" / "filling.png").exists()
    second = src.scan_once()
    assert second is not None and second.input_key != first.input_key
    src._log.path = tmp_path / "gone" / "state"  # its folder is gone: the record cannot be written
    with caplog.at_level("ERROR"):
        src.done(second)
    assert path.exists() and any("cannot record or move" in r.getMessage() for r in caplog.records)
    assert src.scan_once() is None  # left alone, not handed out again every poll
    src.close()


def test_a_file_whose_last_rows_are_still_zeros_is_waited_for_then_analysed(tmp_path: Path) -> None:
    """A writer that set the full size first (uncompressed TIFF) leaves zeros at the end, which
    decode: a black last row in brightfield is waited for within the grace; the finished file is
    what is analysed, and one that stays so is analysed after the grace."""
    src = _folder(tmp_path, decode_grace_s=5.0)
    full = _image(1)
    part = full.copy()
    part[full.shape[0] // 2:] = 0
    path = src._root / "filling.tif"
    assert cv2.imwrite(str(path), part)
    t0 = time.monotonic()
    assert src.scan_once(now=t0) is None and path.exists()
    assert cv2.imwrite(str(path), full)
    frame = src.scan_once(now=t0 + 1.0)
    assert frame is not None and frame.pixels[-1].any()
    src.done(frame)
    assert cv2.imwrite(str(src._root / "dark.tif"), part)
    assert src.scan_once(now=t0 + 2.0) is None
    late = src.scan_once(now=t0 + 8.0)
    assert late is not None and "dark.tif" in late.frame_id
    src.close()


def test_a_file_waited_for_is_decoded_once_per_version_not_at_every_poll(tmp_path: Path, monkeypatch) -> None:
    """A 7 KB PNG that decodes to a blank 2000 x 2000 frame, and a TIFF whose last rows are zeros,
    polled every second through the default 30 s grace: each version is decoded once (the dark one
    again when it is handed out), not 30 times; a change to the file is decoded anew."""
    decodes: list[str] = []
    real = folder_source.load_image

    def counting(data, **kw):
        decodes.append(kw["source_name"])
        return real(data, **kw)

    monkeypatch.setattr(folder_source, "load_image", counting)
    src = _folder(tmp_path, decode_grace_s=30.0)
    ok, blank = cv2.imencode(".png", np.zeros((2000, 2000), np.uint8))
    assert ok and len(blank) < 20_000
    (src._root / "blank.png").write_bytes(blank.tobytes())
    part = _image(3)
    part[part.shape[0] // 2:] = 0
    assert cv2.imwrite(str(src._root / "dark.tif"), part)
    os.utime(src._root / "dark.tif", ns=(1, 1))  # oldest first: both are waited for at each poll
    t0 = time.monotonic()
    for second in range(30):
        assert src.scan_once(now=t0 + second) is None
    assert sorted(decodes) == ["blank.png", "dark.tif"]
    frame = src.scan_once(now=t0 + 31)
    assert frame is not None and "dark.tif" in frame.frame_id and decodes.count("dark.tif") == 2
    src.done(frame)
    assert src.scan_once(now=t0 + 31) is None and decodes.count("blank.png") == 1
    reason = (src._root / "rejected" / "blank.png.reason.txt").read_text()
    assert reason.startswith("blank_image")
    (src._root / "rejected" / "blank.png.reason.txt").unlink()
    os.replace(src._root / "rejected" / "blank.png", src._root / "again.png")
    for second in range(32, 40):
        src.scan_once(now=t0 + second)
    assert decodes.count("again.png") == 1  # another name (a version): decoded anew, once
    (src._root / "again.png").write_bytes(_png(4))
    frame = src.scan_once(now=t0 + 40)
    assert frame is not None and decodes.count("again.png") == 2
    src.close()


def test_a_move_a_crash_cut_short_is_finished_to_the_folder_its_record_names(tmp_path: Path) -> None:
    """Recorded, then the process died before the move: the next start moves a processed file to
    done/. A rejection is recorded only after its move, so a version recorded as rejected that is
    in the folder was put back: it is judged again (and refused again where it still fails), so
    done/ never holds a file that was refused."""
    src = _folder(tmp_path)
    for name, status in (("refused.png", "rejected"), ("stored.png", "done")):
        path = src._root / name
        path.write_bytes(_png(len(name)))
        st = path.stat()
        src._log.record(file_key(name, st.st_size, st.st_mtime_ns), status, name)
    again = FolderSource(src._config)  # the next start reads the record
    frame = again.scan_once()
    assert frame is not None and frame.frame_id.startswith("scope:refused.png@")
    again.done(frame, refused="out_of_focus")
    assert again.scan_once() is None
    assert (src._root / "done" / "stored.png").exists()
    assert (src._root / "rejected" / "refused.png").exists() and not (src._root / "refused.png").exists()
    src.close()
    again.close()


def test_a_folder_that_goes_and_comes_back_is_said_once_and_its_subfolders_come_back(tmp_path: Path, caplog) -> None:
    import shutil

    src = _folder(tmp_path)
    shutil.rmtree(src._root)
    with caplog.at_level("ERROR"):
        for _ in range(5):
            assert src.scan_once() is None
    assert sum("cannot list" in r.getMessage() for r in caplog.records) == 1
    src._root.mkdir()
    (src._root / "slide_0042").mkdir()  # a subfolder: said once, not analysed
    (src._root / "f.png").write_bytes(_png(1))
    caplog.clear()
    with caplog.at_level("WARNING"):
        frame = src.scan_once()
        src.scan_once()
    assert sum("slide_0042 is a folder" in r.getMessage() for r in caplog.records) == 1
    src.done(frame)
    assert (src._root / "done" / "f.png").exists()  # done/ made again
    src.close()


def test_a_file_that_cannot_be_read_is_rejected_after_the_grace_said_once(tmp_path: Path, caplog, monkeypatch) -> None:
    src = _folder(tmp_path, decode_grace_s=0.5)
    (src._root / "secret.png").write_bytes(_png(1))
    real = folder_source.read_regular
    monkeypatch.setattr(folder_source, "read_regular", lambda p, most: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if Path(p).name == "secret.png" else real(p, most))
    with caplog.at_level("WARNING"):
        t0 = time.monotonic()
        assert src.scan_once(now=t0) is None and src.scan_once(now=t0 + 0.2) is None
        assert (src._root / "secret.png").exists()  # within the grace: waited for, quietly
        assert src.scan_once(now=t0 + 1.0) is None
    assert (src._root / "rejected" / "secret.png.reason.txt").read_text().startswith("unreadable: ")
    assert sum("secret.png" in r.getMessage() for r in caplog.records) == 1
    src.close()


def test_a_passing_io_error_on_a_symlink_is_tried_again_not_rejected(tmp_path: Path, monkeypatch) -> None:
    """A share's passing EIO while the station looks at a symlink to an image (not a symlink
    loop): the file is left for the next scan, which hands it out, not moved to rejected/."""
    import errno

    src = _folder(tmp_path, decode_grace_s=0.0)
    (tmp_path / "real.png").write_bytes(_png(4))
    (src._root / "linked.png").symlink_to(tmp_path / "real.png")
    real_scandir = os.scandir
    failures = [OSError(errno.EIO, "Input/output error")]

    class Flaky:
        def __init__(self, entry: os.DirEntry) -> None:
            self._entry = entry

        def __getattr__(self, name: str):
            return getattr(self._entry, name)

        def is_file(self, *args, **kwargs) -> bool:
            if self._entry.name == "linked.png" and failures:
                raise failures.pop()
            return self._entry.is_file(*args, **kwargs)

    def scandir(path):
        return [Flaky(e) for e in real_scandir(path)]

    monkeypatch.setattr(os, "scandir", scandir)
    assert src.scan_once() is None and not failures  # the error came
    assert (src._root / "linked.png").is_symlink() and src.rejected_count == 0
    assert not list((src._root / "rejected").iterdir())
    frame = src.scan_once()
    assert frame is not None and "linked.png" in frame.frame_id
    np.testing.assert_array_equal(frame.pixels, _image(4))
    src.close()


def test_a_file_rewritten_at_the_same_size_while_read_is_not_analysed_torn(tmp_path: Path, monkeypatch) -> None:
    """A writer replaces an uncompressed TIFF by another of the same size while the station reads
    it: what was read (its first half old, its second new) is never handed out; the new version is."""
    import tifffile

    src = _folder(tmp_path)
    path = src._root / "field.tif"
    tifffile.imwrite(path, _image(1)[:, :, ::-1], photometric="rgb")
    old = path.read_bytes()
    tifffile.imwrite(tmp_path / "new.tif", _image(2)[:, :, ::-1], photometric="rgb")
    new = (tmp_path / "new.tif").read_bytes()
    assert len(new) == len(old)
    real = folder_source.read_regular
    rewrites = []

    def read_during_a_rewrite(p: Path, most: int) -> bytes | None:
        if Path(p).name != "field.tif" or rewrites:
            return real(p, most)
        half = len(old) // 2
        p.write_bytes(new)  # the writer, halfway through the read
        mtime = p.stat().st_mtime_ns + 10**9  # a later time, whatever the clock's resolution
        os.utime(p, ns=(mtime, mtime))
        rewrites.append(mtime)
        return old[:half] + new[half:]

    monkeypatch.setattr(folder_source, "read_regular", read_during_a_rewrite)
    assert src.scan_once() is None and rewrites  # the torn read was made and dropped
    assert path.exists() and src.rejected_count == 0
    frame = src.scan_once()
    assert frame is not None
    np.testing.assert_array_equal(frame.pixels, _image(2))
    st = path.stat()
    assert frame.frame_id.endswith(file_key("field.tif", st.st_size, st.st_mtime_ns)[:12])
    src.done(frame)
    assert (src._root / "done" / "field.tif").exists()
    src.close()


def test_a_rejected_file_that_keeps_changing_comes_back_at_most_max_rechecks_times(tmp_path: Path, caplog) -> None:
    """A file rejected as truncated that changes in rejected/ comes back for another try, but a
    file that keeps changing and never decodes (a log some program appends to, named .png) comes
    back MAX_RECHECKS times and then stays in rejected/ with its reason."""
    from smearscope.device.folder_source import MAX_RECHECKS

    src = _folder(tmp_path, decode_grace_s=0.0)
    data = _png(9)
    (src._root / "growing.png").write_bytes(data[: len(data) // 2])
    parked = src._root / "rejected" / "growing.png"
    with caplog.at_level("WARNING"):
        assert src.scan_once() is None and parked.exists() and src.rejected_count == 1
        for _ in range(MAX_RECHECKS + 3):
            with open(parked, "ab") as fh:  # its writer adds a little more, never a whole PNG
                fh.write(b"\0" * 16)
            assert src.scan_once() is None  # back, tried and rejected again; or left there
            assert parked.exists() and not (src._root / "growing.png").exists()
    assert src.rejected_count == 1 + MAX_RECHECKS
    came_back = [r for r in caplog.records if "changed after it was rejected" in r.getMessage()]
    assert len(came_back) == MAX_RECHECKS
    assert (src._root / "rejected" / "growing.png.reason.txt").read_text().startswith("truncated: ")
    src.close()


def test_folder_close_from_another_thread_ends_iteration(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    threading.Timer(0.2, src.close).start()
    t0 = time.monotonic()
    assert list(src) == []
    assert time.monotonic() - t0 < 5.0


def test_an_empty_file_filled_later_is_analysed_not_rejected(tmp_path: Path) -> None:
    """Issue 18, item 5: a scanner creates the file, then fills it seconds later."""
    src = _folder(tmp_path, settle_s=0.1, decode_grace_s=5.0)
    path = src._root / "late.png"
    path.write_bytes(b"")
    threading.Timer(1.0, lambda: path.write_bytes(_png(6))).start()
    deadline = time.monotonic() + 5.0
    frame = None
    while frame is None and time.monotonic() < deadline:
        frame = src.scan_once()
        time.sleep(0.05)
    assert frame is not None and src.rejected_count == 0
    np.testing.assert_array_equal(frame.pixels, _image(6))
    src.close()


def test_a_slow_writer_finishing_after_the_grace_gets_its_file_analysed(tmp_path: Path) -> None:
    """Rejected as truncated after the grace, the file is finished by its writer (through its
    open handle, in rejected/): the change is noticed and the file tried again."""
    src = _folder(tmp_path, settle_s=0.05, decode_grace_s=0.3)
    data = _png(7)
    path = src._root / "slow.png"
    with open(path, "wb") as writer:
        writer.write(data[: len(data) // 2])
        writer.flush()
        deadline = time.monotonic() + 3.0
        while src.rejected_count == 0 and time.monotonic() < deadline:
            assert src.scan_once() is None
            time.sleep(0.02)
        assert src.rejected_count == 1 and (src._root / "rejected" / "slow.png").exists()
        writer.write(data[len(data) // 2 :])
    frame = None
    deadline = time.monotonic() + 3.0
    while frame is None and time.monotonic() < deadline:
        frame = src.scan_once()
        time.sleep(0.02)
    assert frame is not None
    np.testing.assert_array_equal(frame.pixels, _image(7))
    assert not (src._root / "rejected" / "slow.png.reason.txt").exists()
    src.close()


def test_sources_decode_with_the_hardened_decoder(tmp_path: Path) -> None:
    """Issue 18, item 6: a 12-bit image keeps its brightness and a PNG declaring 20000x20000 px
    is refused from its header, in the folder source and in replay."""
    import hostile

    twelve = (np.arange(64 * 80 * 3, dtype=np.uint16).reshape(64, 80, 3) % 4096).astype(np.uint16)
    ok, buf = cv2.imencode(".png", twelve)
    assert ok
    bomb = hostile.png_set_ihdr_size(_png(8), 20_000, 20_000)
    src = _folder(tmp_path, decode_grace_s=0.0)
    (src._root / "a-twelve.png").write_bytes(buf.tobytes())
    (src._root / "b-bomb.png").write_bytes(bomb)
    frame = src.scan_once()
    assert frame is not None and int(frame.pixels.max()) == 255  # scaled from 12 bits, not >> 8
    assert src.scan_once() is None
    reasons = [p.read_text() for p in (src._root / "rejected").glob("*.reason.txt")]
    assert len(reasons) == 1 and reasons[0].startswith("too_large_pixels")
    src.close()
    replay_dir = tmp_path / "rec"
    replay_dir.mkdir()
    (replay_dir / "a.png").write_bytes(buf.tobytes())
    (replay_dir / "b.png").write_bytes(bomb)
    frames = list(ReplaySource(ReplaySourceConfig(path=replay_dir, fps=0)))
    assert len(frames) == 1 and int(frames[0].pixels.max()) == 255


# --- replay ----------------------------------------------------------------------------------


def test_replay_folder_plays_in_name_order_and_loops_with_new_ids(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"f{i}.png").write_bytes(_png(10 + i))
    (tmp_path / "readme.txt").write_text("ignored")
    once = list(ReplaySource(ReplaySourceConfig(path=tmp_path, fps=0)))
    assert [f.frame_id for f in once] == ["scope:p0:f0.png", "scope:p0:f1.png", "scope:p0:f2.png"]
    np.testing.assert_array_equal(once[2].pixels, _image(12))

    with ReplaySource(ReplaySourceConfig(path=tmp_path, fps=0, loop=True)) as looping:
        ids = [next(looping).frame_id for _ in range(7)]
    assert len(set(ids)) == 7 and ids[3] == "scope:p1:f0.png"


def _video(path: Path, greys: list[int], codec: str = "MJPG", size: tuple[int, int] = (80, 64)) -> Path:
    """A video of `size` (width, height) frames, each one grey level (codecs this OpenCV writes:
    MJPG and XVID in AVI, mp4v in MP4, FFV1 in Matroska)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 5, size)
    assert writer.isOpened()
    for grey in greys:
        writer.write(np.full((size[1], size[0], 3), grey, np.uint8))
    writer.release()
    return path


def test_replay_video_file_at_fps(tmp_path: Path) -> None:
    video = _video(tmp_path / "run.avi", [40 * i for i in range(4)])
    t0 = time.monotonic()
    frames = list(open_source(ReplaySourceConfig(path=video, fps=20, name="rec")))
    elapsed = time.monotonic() - t0
    assert [f.frame_id for f in frames] == [f"rec:p0:run#{i:06d}" for i in range(1, 5)]
    assert elapsed >= 3 / 20 - 0.01  # four frames are three periods apart
    with pytest.raises(SourceConfigurationError):
        ReplaySource(ReplaySourceConfig(path=tmp_path / "missing.avi"))


def test_a_replayed_video_is_held_to_the_limits_of_an_image_file(tmp_path: Path) -> None:
    """Videos are decoded by FFmpeg, outside the image decoder: a recording is opened only as an AVI,
    MP4 or Matroska file (not a script FFmpeg would follow to other files), and its frame size is
    judged before any frame is read, as an image header's is; each refusal stops the start with its
    reason code."""
    for codec, name in (("MJPG", "a.avi"), ("XVID", "b.avi"), ("mp4v", "c.mp4"), ("FFV1", "d.mkv")):
        frames = list(ReplaySource(ReplaySourceConfig(path=_video(tmp_path / name, [40, 120, 200], codec), fps=0)))
        assert [round(f.pixels.mean() / 40) for f in frames] == [1, 3, 5], codec
    mp4 = (tmp_path / "c.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])  # its index (moov) comes last
    (tmp_path / "script.avi").write_text("ffconcat version 1.0\nfile a.avi\nfile c.mp4\n")
    (tmp_path / "notes.avi").write_text("white cells: 7\n" * 40)
    _video(tmp_path / "huge.avi", [128], size=(9000, 8000))  # 72 MP, over the 64 MP of an image
    _video(tmp_path / "strip.mkv", [128], "FFV1", size=(1000, 64))
    _video(tmp_path / "small.avi", [128], size=(64, 48))
    expected = {"cut.mp4": "corrupt", "script.avi": "unsupported_format", "notes.avi": "unsupported_format",
                "huge.avi": "too_large_pixels", "strip.mkv": "absurd_aspect", "small.avi": "too_small"}
    for name, code in expected.items():
        with pytest.raises(SourceConfigurationError, match=f"^recording refused: {code}: .*{name}"):
            ReplaySource(ReplaySourceConfig(path=tmp_path / name, fps=0))


def test_a_video_cut_short_plays_what_it_holds_and_says_so(tmp_path: Path, caplog) -> None:
    """An AVI cut in its second frame (a copy that stopped): the frames before the cut are played,
    and the log says the recording ended before the frames it declares."""
    writer = cv2.VideoWriter(str(tmp_path / "run.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (80, 64))
    for i in range(4):
        writer.write(_image(50 + i))
    writer.release()
    avi = (tmp_path / "run.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(avi[: len(avi) // 2])
    with caplog.at_level(logging.WARNING):
        frames = list(ReplaySource(ReplaySourceConfig(path=tmp_path / "cut.avi", fps=0)))
    assert 1 <= len(frames) < 4
    assert f"cut.avi ended after {len(frames)} of the 4 frames it declares (damaged or cut short)" in caplog.text


def test_replay_picks_every_decodable_extension_in_any_case_and_carries_the_scale(tmp_path: Path) -> None:
    names = ["a.jpeg", "b.JPG", "c.tif", "d.TIFF", "e.Png"]
    for i, name in enumerate(names):
        ok, buf = cv2.imencode(Path(name).suffix.lower(), _image(20 + i))
        assert ok
        (tmp_path / name).write_bytes(buf.tobytes())
    ok, buf = cv2.imencode(".bmp", _image(30))
    (tmp_path / "f.bmp").write_bytes(buf.tobytes())  # the decoder refuses BMP: not picked up
    frames = list(ReplaySource(ReplaySourceConfig(path=tmp_path, fps=0, microns_per_pixel=0.25)))
    assert [f.frame_id for f in frames] == [f"scope:p0:{n}" for n in names]
    assert all(f.microns_per_pixel == 0.25 for f in frames)


def test_a_looping_recording_with_nothing_decodable_ends_instead_of_spinning(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg").write_bytes(b"")
    result: list[list] = []
    worker = threading.Thread(target=lambda: result.append(
        list(ReplaySource(ReplaySourceConfig(path=tmp_path, fps=0, loop=True)))), daemon=True)
    worker.start()
    worker.join(10)
    assert result == [[]], "a loop over undecodable files never ended"


def test_a_looping_video_starts_again_with_new_ids(tmp_path: Path) -> None:
    video = _video(tmp_path / "run.avi", [60 * i for i in range(3)])
    with ReplaySource(ReplaySourceConfig(path=video, fps=0, loop=True)) as looping:
        frames = [next(looping) for _ in range(7)]
    assert [f.frame_id for f in frames] == [f"scope:p{k // 3}:run#{k % 3 + 1:06d}" for k in range(7)]
    assert [int(f.pixels.mean() + 30) // 60 for f in frames] == [0, 1, 2, 0, 1, 2, 0]


def test_a_slow_consumer_does_not_get_a_burst_of_frames_afterwards(tmp_path: Path) -> None:
    """Frames are spaced 1/fps apart from the one before, not from when they would have been
    due: after a 0.4 s stall at 10 fps the next frames still come 0.1 s apart."""
    for i in range(4):
        (tmp_path / f"f{i}.png").write_bytes(_png(40 + i))
    with ReplaySource(ReplaySourceConfig(path=tmp_path, fps=10)) as src:
        next(src)
        time.sleep(0.4)
        next(src)
        t0 = time.monotonic()
        next(src)
        next(src)
        assert time.monotonic() - t0 >= 2 * 0.1 - 0.02


def test_camera_frames_of_any_depth_and_layout_become_bgr8() -> None:
    """16-bit samples scaled from their depth (tests/test_camera_depth.py); gray (2-D or one channel)
    and BGRA (8 or 16 bit: a camera's alpha is no transparency) become BGR."""
    full = SampleDepth("t", 16)
    deep = np.full((4, 5, 3), 0x12F0, np.uint16)
    assert as_bgr8(deep, full).dtype == np.uint8 and (as_bgr8(deep, full) == 19).all()  # 4848 * 255 / 65535
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    for g in (gray, gray[..., None]):
        out = as_bgr8(g, full)
        assert out.shape == (4, 5, 3) and (out == gray[..., None]).all()
    bgra = np.dstack([np.full((4, 5), v, np.uint8) for v in (10, 20, 30, 0)])
    assert as_bgr8(bgra, full).shape == (4, 5, 3) and as_bgr8(bgra, full)[0, 0].tolist() == [10, 20, 30]
    assert as_bgr8(bgra.astype(np.uint16) * 257, full)[0, 0].tolist() == [10, 20, 30]
    assert as_bgr8(np.zeros((4, 5, 2), np.uint8), full) is None
    assert as_bgr8(np.zeros((4, 5, 3), np.float32), full) is None


def test_a_camera_frame_over_the_pixel_limit_is_dropped() -> None:
    from smearscope.device.ingest import IngestLimits

    limits = IngestLimits(max_pixels=100)
    assert within_limits(np.zeros((10, 10, 3), np.uint8), limits) is not None
    assert within_limits(np.zeros((10, 11, 3), np.uint8), limits) is None


# --- camera ----------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_delay(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_capture_target_picks_the_opencv_api() -> None:
    assert capture_target(CameraSourceConfig(device=0)) == (0, cv2.CAP_V4L2)
    assert capture_target(CameraSourceConfig(device="2")) == (2, cv2.CAP_V4L2)
    assert capture_target(CameraSourceConfig(device="/dev/video1"))[1] == cv2.CAP_V4L2
    csi = "nvarguscamerasrc ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! appsink"
    assert capture_target(CameraSourceConfig(device=csi)) == (csi, cv2.CAP_GSTREAMER)
    assert capture_target(CameraSourceConfig(device="rtsp://cam/1"))[1] == cv2.CAP_FFMPEG


def test_camera_reconnects_when_the_stream_ends(tmp_path: Path) -> None:
    """A video file stands in for a camera: its end is a vanished camera, reopening reconnects."""
    video = tmp_path / "cam.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 60 * i, np.uint8))
    writer.release()
    cfg = CameraSourceConfig(device=str(video), reconnect_initial_s=0.01, reconnect_max_s=0.02,
                             microns_per_pixel=0.1)
    with CameraSource(cfg) as cam:
        frames = [next(cam) for _ in range(7)]  # crosses the end of the stream twice
        assert cam.failures == 2  # three frames an open never counted as back: see the flapping camera below
    assert len({f.frame_id for f in frames}) == 7
    assert all(f.microns_per_pixel == 0.1 for f in frames)


def _camera_video(path: Path, size: tuple[int, int], frames: int) -> None:
    tmp = path.with_suffix(".tmp.avi")  # written aside, then renamed over: the camera's next open sees it whole
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), 5, size)
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), (40 + 50 * i) % 250, np.uint8))
    writer.release()
    tmp.replace(path)


def test_a_camera_that_comes_back_at_another_resolution_drops_its_calibrated_scale_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A video file stands in for the camera (a real cv2.VideoCapture): its end is an unplug, and the
    file replaced before the reopen is the camera back at another size. Its frames must not carry the
    um/px calibrated at the first size (binning triples it, a crop keeps it: the station cannot
    tell), and the change is said once; back at the first size, the scale applies again."""
    video = tmp_path / "cam.avi"
    _camera_video(video, (160, 120), 2)
    cfg = CameraSourceConfig(device=str(video), reconnect_initial_s=0.01, reconnect_max_s=0.02,
                             microns_per_pixel=0.1)
    with caplog.at_level("INFO", logger="smearscope.device.sources"), CameraSource(cfg) as cam:
        first = [next(cam) for _ in range(2)]
        _camera_video(video, (64, 48), 3)
        smaller = [next(cam) for _ in range(3)]
        _camera_video(video, (160, 120), 1)
        back = next(cam)
    assert [f.pixels.shape[:2] for f in first + smaller + [back]] == [(120, 160)] * 2 + [(48, 64)] * 3 + [(120, 160)]
    assert [f.microns_per_pixel for f in first] == [0.1, 0.1]
    assert [f.microns_per_pixel for f in smaller] == [None, None, None]
    assert back.microns_per_pixel == 0.1
    said = [r.getMessage() for r in caplog.records if "64x48" in r.getMessage()]
    assert len(said) == 1 and "160x120" in said[0], said
    assert [r.levelname for r in caplog.records if "64x48" in r.getMessage()] == ["WARNING"]


def test_a_camera_that_drops_out_after_every_frame_backs_off_and_is_not_said_back_until_it_stays(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A video file of one frame stands in for a flapping camera (a real cv2.VideoCapture: each
    open gives one frame, then the read fails): one good frame must not reset the backoff, or the
    camera is reopened at the first delay forever, said twice a cycle. Then a file as long as
    STABLE_FRAMES: the camera stayed, said back once, its backoff from the start again."""
    from smearscope.device.sources import STABLE_FRAMES

    video = tmp_path / "cam.avi"
    _camera_video(video, (64, 48), 1)
    cfg = CameraSourceConfig(device=str(video), reconnect_initial_s=0.001, reconnect_max_s=0.002)
    with caplog.at_level("INFO", logger="smearscope.device"), CameraSource(cfg) as cam:
        flapping = [next(cam) for _ in range(10)]  # nine drop-outs
        assert cam.failures == 9
        retries = [r.getMessage() for r in caplog.records if "returned no frame" in r.getMessage()]
        assert [int(m.split("retry ")[1].split()[0]) for m in retries] == [1, 2, 4, 8], retries
        assert not [r for r in caplog.records if "camera back" in r.getMessage()]
        _camera_video(video, (64, 48), STABLE_FRAMES)
        stayed = [next(cam) for _ in range(STABLE_FRAMES)]
        assert cam.failures == 0
    back = [r.getMessage() for r in caplog.records if "camera back" in r.getMessage()]
    assert back == ["scope: camera back after 10 failures"], back
    assert len({f.frame_id for f in flapping + stayed}) == 10 + STABLE_FRAMES


def test_a_frozen_camera_repeating_one_frame_bit_for_bit_is_said_once_and_its_recovery_too(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A video file of one frame written 30 times stands in for a camera whose stream froze (a live
    sensor's noise never repeats bit for bit); then a file of frames that change, for it moving again."""
    from smearscope.device.camera_frames import FROZEN_REPEATS

    video = tmp_path / "cam.avi"
    _camera_video(video, (64, 48), 1)
    one = cv2.VideoCapture(str(video)).read()[1]
    writer = cv2.VideoWriter(str(tmp_path / "frozen.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for _ in range(2 * FROZEN_REPEATS + 5):
        writer.write(one)
    writer.release()
    (tmp_path / "frozen.avi").replace(video)
    cfg = CameraSourceConfig(device=str(video), reconnect_initial_s=0.01, reconnect_max_s=0.02)
    with caplog.at_level("INFO", logger="smearscope.device"), CameraSource(cfg) as cam:
        frozen = [next(cam) for _ in range(2 * FROZEN_REPEATS + 5)]
        said = [r for r in caplog.records if "same frame" in r.getMessage()]
        assert [r.levelname for r in said] == ["WARNING"], [r.getMessage() for r in said]
        assert f"{FROZEN_REPEATS} times in a row" in said[0].getMessage()
        _camera_video(video, (64, 48), 3)
        moving = [next(cam) for _ in range(3)]
    assert len({f.frame_id for f in frozen + moving}) == len(frozen) + 3  # every frame still handed on
    assert any("moves again" in r.getMessage() for r in caplog.records if r.levelname == "INFO")


_FIRST_CAMERA_FRAME = """
import sys
from smearscope.device.source_config import CameraSourceConfig
from smearscope.device.sources import CameraSource
with CameraSource(CameraSourceConfig(name="scope", device=sys.argv[1])) as cam:
    print(next(cam).frame_id)
"""


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime")
def test_camera_frame_ids_differ_between_starts_on_the_same_restored_clock(tmp_path: Path) -> None:
    """A Jetson without a clock battery boots on the time fake-hwclock saved: two starts, each a
    real process on a clock frozen at the same instant (faketime), open the camera (a video file
    stands in) and must not name their frames alike."""
    video = tmp_path / "cam.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    writer.write(np.full((48, 64, 3), 80, np.uint8))
    writer.release()
    ids = [subprocess.run(["faketime", "-f", "2026-03-01 08:00:00", sys.executable, "-c", _FIRST_CAMERA_FRAME,
                           str(video)], capture_output=True, text=True, check=True, timeout=120).stdout.strip()
           for _ in range(2)]
    assert all(i.startswith("scope:") and i.endswith("-00000001") for i in ids), ids
    assert ids[0].split(":")[1].split(".")[0] == ids[1].split(":")[1].split(".")[0]  # the same clock reading
    assert ids[0] != ids[1], ids


def test_camera_that_never_opens_retries_until_closed(tmp_path: Path) -> None:
    cfg = CameraSourceConfig(device=str(tmp_path / "absent.avi"), reconnect_initial_s=0.01,
                             reconnect_max_s=0.05)
    cam = CameraSource(cfg)
    threading.Timer(0.3, cam.close).start()
    assert list(cam) == []
    assert cam.failures >= 3


def test_a_camera_whose_node_is_missing_says_so_in_its_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An unplugged camera's journal said only "camera '/dev/video0' did not open" at each retry;
    it says why now, as doctor does: the node does not exist, with the command that lists the
    cameras there are (a V4L2 path here: a folder of the test's stands for /dev)."""
    node = tmp_path / "video7"
    cfg = CameraSourceConfig(device=str(node), reconnect_initial_s=0.01, reconnect_max_s=0.05)
    cam = CameraSource(cfg)
    threading.Timer(0.3, cam.close).start()
    with caplog.at_level("WARNING", logger="smearscope.device.sources"):
        assert list(cam) == []
    said = [r.getMessage() for r in caplog.records if "did not open" in r.getMessage()]
    assert said and said[0] == (f"scope: camera '{node}' did not open: {node} does not exist: camera unplugged, "
                                "or another index (v4l2-ctl --list-devices); retry 1 in 0.0 s"), said


@pytest.mark.skipif(not (REPO / "models" / "seg.json").exists(), reason="models/seg.json not present")
@pytest.mark.parametrize("as_index", [False, True], ids=["path", "index"])
def test_a_station_waiting_for_a_missing_camera_says_why_without_opencvs_own_warnings(
        tmp_path: Path, as_index: bool) -> None:
    """`smearscope run` with its camera unplugged: OpenCV's own lines ("[ WARN:0@9.1] global
    cap_v4l.cpp:915 open VIDEOIO(V4L2:/dev/video97): can't open camera by index" and two more) came
    on stderr at every retry, beside the station's line that says why at the 1st, 2nd, 4th, 8th.
    A node the station knows will not open is not handed to OpenCV (a real station process, its
    output read until the 8th retry is said, then stopped)."""
    from broker import free_port, wait_until

    number = 97
    while Path(f"/dev/video{number}").exists():
        number += 1
    node = f"/dev/video{number}"
    config = tmp_path / "station.toml"
    config.write_text(
        f'station_id = "cam"\n[source]\nkind = "camera"\ndevice = {number if as_index else repr(node)}\n'
        "reconnect_initial_s = 0.05\nreconnect_max_s = 0.05\n"
        f"[analysis]\nmodels_dir = {str(REPO / 'models')!r}\n"
        f"[mqtt]\nhost = '127.0.0.1'\nport = {free_port()}\n"
        f"[mqtt.outbox]\npath = {str(tmp_path / 'outbox.sqlite3')!r}\n")
    cli = shutil.which("smearscope") or str(Path(sys.executable).with_name("smearscope"))
    log = tmp_path / "station.log"
    with log.open("w") as out:
        proc = subprocess.Popen([cli, "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "STATE_DIRECTORY": str(tmp_path / "state")}, cwd=tmp_path)
    try:
        said = wait_until(lambda: "retry 8 in" in log.read_text() or proc.poll() is not None, 120)
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    assert said and proc.returncode == 0, text[-3000:]
    assert (f"camera {number if as_index else repr(node)} did not open: {node} does not exist: camera unplugged"
            in text), text[-3000:]
    opencv = [line for line in text.splitlines() if "VIDEOIO" in line or "[ WARN" in line]
    assert not opencv, opencv[:6]


def test_a_camera_path_that_is_no_camera_is_not_said_to_need_the_video_group(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """[source] device naming a socket (not a camera node): its open fails ENXIO, and the log said
    "cannot be opened for reading by this user ...: the station's user needs the video group", a
    fix that changes nothing. It says what doctor's camera check says: a socket, no camera."""
    import socket

    node = tmp_path / "video0"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(node))
        cfg = CameraSourceConfig(device=str(node), reconnect_initial_s=0.01, reconnect_max_s=0.05)
        cam = CameraSource(cfg)
        threading.Timer(0.3, cam.close).start()
        with caplog.at_level("WARNING", logger="smearscope.device.sources"):
            assert list(cam) == []
    said = [r.getMessage() for r in caplog.records if "did not open" in r.getMessage()]
    assert said and said[0] == (f"scope: camera '{node}' did not open: {node} is a socket, no camera: set [source] "
                                "device to a camera's capture node: v4l2-ctl --list-devices lists each camera's "
                                "nodes; retry 1 in 0.0 s"), said


def test_a_camera_gone_for_long_logs_at_1_2_4_8_failures_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    """The capture factory is OpenCV's seam: here a camera absent for 9 opens, then a stream."""
    from smearscope.device.sources import STABLE_FRAMES

    opens, reads = [], []

    class _Stream:
        def read(self) -> tuple[bool, np.ndarray]:
            reads.append(1)
            return True, np.full((48, 64, 3), 90 + len(reads) % 100, np.uint8)

        def release(self) -> None:
            pass

    def factory(cfg: CameraSourceConfig) -> _Stream | None:
        opens.append(cfg.device)
        return _Stream() if len(opens) > 9 else None

    cfg = CameraSourceConfig(device=3, reconnect_initial_s=0.001, reconnect_max_s=0.001)
    with caplog.at_level("INFO", logger="smearscope.device.sources"), CameraSource(cfg, factory) as cam:
        frames = [next(cam) for _ in range(STABLE_FRAMES)]  # the frames it takes to count as back
        assert cam.failures == 0 and frames[0].pixels.shape == (48, 64, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [int(m.split("retry ")[1].split()[0]) for m in warnings] == [1, 2, 4, 8], warnings
    assert any("camera back after 9 failures" in r.getMessage() for r in caplog.records)


def test_a_camera_giving_frames_the_station_cannot_use_says_what_they_are_not_that_none_came(
        caplog: pytest.LogCaptureFixture) -> None:
    """The capture factory is OpenCV's seam (a file read through cv2.VideoCapture never gives these):
    a stream of float32 frames, then 2-channel (YUYV-like) ones, then BGR. Each unusable frame is a
    failed read (reopened with backoff), said as what it is, not as a camera that gave nothing."""
    frames = [np.zeros((48, 64, 3), np.float32), np.zeros((48, 64, 2), np.uint8), np.full((48, 64, 3), 90, np.uint8)]

    class _Stream:
        def read(self) -> tuple[bool, np.ndarray]:
            return True, frames[min(len(reads), 3) - 1]

        def release(self) -> None:
            pass

    reads: list[int] = []

    def factory(cfg: CameraSourceConfig) -> _Stream:
        reads.append(1)
        return _Stream()

    cfg = CameraSourceConfig(device=3, reconnect_initial_s=0.001, reconnect_max_s=0.001)
    with caplog.at_level("WARNING", logger="smearscope.device.sources"), CameraSource(cfg, factory) as cam:
        frame = next(cam)
    assert frame.pixels.shape == (48, 64, 3) and len(reads) == 3
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and not any("returned no frame" in m for m in said), said
    assert "64x48" in said[0] and "3 channels of float32" in said[0], said
    assert "2 channels of uint8" in said[1], said


# --- simulated -------------------------------------------------------------------------------


def test_simulated_source_is_seeded_and_bounded() -> None:
    cfg = SimulatedSourceConfig(seed=5, fields=2, fps=0, width=160, height=120, name="sim")
    frames = list(open_source(cfg))
    assert [f.frame_id for f in frames] == ["sim:seed5", "sim:seed6"]
    assert frames[0].pixels.shape == (120, 160, 3) and frames[0].microns_per_pixel == 0.2
    again = next(open_source(cfg))
    np.testing.assert_array_equal(again.pixels, frames[0].pixels)
    unscaled = next(open_source(cfg.model_copy(update={"report_scale": False})))
    assert unscaled.microns_per_pixel is None


# --- telemetry (device/telemetry.py) ---------------------------------------------------------


def test_thermal_zones_are_read_from_sysfs(tmp_path: Path) -> None:
    from smearscope.device.telemetry import read_thermal_zones

    zones = [("CPU-therm", "45500"), ("GPU-therm", "41000"), ("bad", "x")]
    for i, (kind, milli) in enumerate(zones):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    assert read_thermal_zones(tmp_path) == {"CPU-therm": 45.5, "GPU-therm": 41.0}


def test_missing_jtop_service_is_one_log_line_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import types

    from smearscope.device import telemetry

    class _NoService:
        def start(self) -> None:
            raise ConnectionRefusedError("/run/jtop.sock")

    monkeypatch.setitem(sys.modules, "jtop", types.SimpleNamespace(jtop=_NoService))
    monkeypatch.setattr(telemetry, "JTOP_RETRY_S", 0.0)  # ask jtop again on every read
    reader = telemetry.TelemetryReader(thermal_root=tmp_path)
    with caplog.at_level("DEBUG", logger="smearscope.device.telemetry"):
        snapshots = []
        for _ in range(3):
            snapshots.append(reader.read())
            time.sleep(0.05)  # let /proc/stat tick between samples
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "jtop service not available" in warnings[0].getMessage()
    assert all(s["source"] in ("psutil", "proc") for s in snapshots)
    assert snapshots[-1]["memory_percent"] is not None
    assert snapshots[-1]["cpu_percent"] is not None  # the second /proc/stat sample gives a rate


def test_jtop_stats_are_summarized() -> None:
    import datetime as dt

    from smearscope.device.telemetry import summarize_jtop_stats

    stats = {"time": dt.datetime(2025, 1, 1), "uptime": dt.timedelta(hours=2), "CPU1": 20,
             "CPU2": 40, "CPU3": "OFF", "GPU": 55.0, "RAM": 0.25, "Temp cpu": 47.5,
             "Temp tj": -256, "Power TOT": 7200, "nvp model": "MAXN"}
    out = summarize_jtop_stats(stats)
    assert out["cpu_percent"] == 30.0 and out["gpu_percent"] == 55.0
    assert out["memory_percent"] == 25.0 and out["power_mw"] == 7200
    assert out["temperatures_c"] == {"cpu": 47.5}  # -256 marks an offline sensor
    assert out["jtop"]["uptime"] == 7200.0


def test_read_telemetry_on_this_machine() -> None:
    from smearscope.device.telemetry import read_telemetry

    snapshot = read_telemetry()
    assert snapshot["source"] in ("jtop", "psutil", "proc")
    assert isinstance(snapshot["temperatures_c"], dict) and snapshot["read_at"] > 0


def test_thermal_zones_of_one_type_are_all_kept_and_an_unnamed_zone_goes_by_its_folder(tmp_path: Path) -> None:
    from smearscope.device.telemetry import read_thermal_zones

    for i, (kind, milli) in enumerate([("CPU-therm", "50000"), ("CPU-therm", "52500"), ("", "30000")]):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    assert read_thermal_zones(tmp_path) == {"CPU-therm": 50.0, "CPU-therm.thermal_zone1": 52.5,
                                            "thermal_zone2": 30.0}


def test_proc_memory_and_cpu_figures_without_psutil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/meminfo in kB: used is total - available; /proc/stat: idle and iowait are not busy,
    and the CPU percentage is the busy share of the ticks since the previous read."""
    from smearscope.device import telemetry

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8192000 kB\nMemFree:          100000 kB\n"
                       "MemAvailable:    2048000 kB\nHugePages_Total:       0\n")
    assert telemetry._proc_meminfo(meminfo) == {
        "memory_total_mb": 8000.0, "memory_used_mb": 6000.0, "memory_percent": 75.0}
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: busy 100 + 20 + 30 + 0 + 0 + 0, idle 800 + 50
    stat.write_text("cpu  100 20 30 800 50 0 0 0 0 0\ncpu0 100 20 30 800 50 0 0 0 0 0\n")
    assert telemetry._proc_cpu_times(stat) == (150, 1000)
    monkeypatch.setattr(telemetry._proc_cpu_times, "__defaults__", (stat,))  # the reader's /proc/stat
    reader = telemetry.TelemetryReader(thermal_root=tmp_path)
    assert reader._proc_cpu_percent() is None  # the first sample gives no rate
    assert reader._proc_cpu_percent() is None  # no tick since: no rate (not a division by zero)
    stat.write_text("cpu  130 20 30 850 70 0 0 0 0 0\n")  # 100 ticks later, 30 of them busy
    assert reader._proc_cpu_percent() == pytest.approx(30.0)


def test_a_done_or_rejected_folder_on_another_file_system_is_refused_at_start(tmp_path: Path) -> None:
    """`done/` made a symbolic link to a bigger disk passed validate-config and doctor; then every
    file was analysed, its report stored, and the move failed ("Invalid cross-device link"): the
    files stayed in the folder for good, handed out again at every start. Files are moved by
    rename, which stays on one file system: refused at start (validate-config, doctor)."""
    import shutil
    import tempfile

    from smearscope.device.folder_source import folder_problem

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        for sub in ("done", "rejected"):
            inbox = tmp_path / sub / "inbox"
            inbox.mkdir(parents=True)
            (inbox / sub).symlink_to(other)
            config = FolderSourceConfig(path=inbox)
            problem = folder_problem(config)
            assert problem is not None and "file system" in problem and sub in problem
            with pytest.raises(SourceConfigurationError, match="file system"):
                FolderSource(config)
        (tmp_path / "ok").mkdir()
        (tmp_path / "ok" / "done").symlink_to(tmp_path / "done")  # a link on the same disk is fine
        assert folder_problem(FolderSourceConfig(path=tmp_path / "ok")) is None
    finally:
        shutil.rmtree(other)
