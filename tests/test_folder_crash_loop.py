"""A file the station's process does not survive must not stop the station for good.

Files are handed out oldest first, so one whose reading or analysis kills the process (out of
memory, a native crash in a decoder, an analysis the watchdog ends) was handed out first again
at every restart: a crash loop, the files behind it never reached. A crash is simulated by
abandoning a FolderSource without `done()` (its log is all that survives), and for real by a
child process SIGKILLed while it holds a file or while it decodes one; then a new FolderSource
on the same folder and state file is the restarted station.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from smearscope.device import processed_log
from smearscope.device.folder_source import FolderSource, ProcessedLog, file_key
from smearscope.device.source_config import FolderSourceConfig


def _png(seed: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _inbox(tmp_path: Path, names: list[str]) -> Path:
    """The names as PNG files, oldest first in the order given."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i, name in enumerate(names):
        (inbox / name).write_bytes(_png(i))
        os.utime(inbox / name, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    return inbox


def _source(inbox: Path) -> FolderSource:
    """The station (re)started on the folder: same state file, same config."""
    return FolderSource(FolderSourceConfig(path=inbox, settle_s=0.0, poll_interval_s=0.01))


def _name(frame) -> str:
    return frame.frame_id.split(":", 1)[1].split("@")[0]


def test_a_file_out_alone_at_two_crashes_in_a_row_is_rejected_and_never_handed_out_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inbox = _inbox(tmp_path, ["killer.png", "b.png", "c.png"])
    first = _source(inbox)
    assert [_name(first.scan_once()), _name(first.scan_once())] == ["killer.png", "b.png"]
    del first  # crash 1: both out, done() never comes
    second = _source(inbox)
    frame = second.scan_once()
    assert frame is not None and _name(frame) == "killer.png"  # on probation: analysed alone
    assert second.scan_once() is None  # b.png waits, so the next crash is killer.png's alone
    del second  # crash 2
    with caplog.at_level(logging.INFO):
        third = _source(inbox)
        handed = []
        while (frame := third.scan_once()) is not None:
            handed.append(_name(frame))
            third.done(frame)
        assert third.scan_once() is None
    assert handed == ["b.png", "c.png"]
    reason = (inbox / "rejected" / "killer.png.reason.txt").read_text()
    assert reason.startswith("analysis_interrupted: ") and "2 times" in reason
    assert not (inbox / "killer.png").exists() and third.rejected_reasons["analysis_interrupted"] == 1
    said = [r for r in caplog.records if "analysis_interrupted" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["b.png", "c.png"]
    fourth = _source(inbox)
    assert fourth.scan_once() is None and not fourth.rejected_count


def test_files_out_at_a_crash_are_analysed_one_at_a_time_then_done_not_rejected(tmp_path: Path) -> None:
    """The files merely queued when the process died are innocent: after the restart each is
    analysed alone, the next only after done() for the one before, and stored as usual; after a
    second crash (the new files out) the same again. None is rejected."""
    inbox = _inbox(tmp_path, ["a.png", "b.png", "c.png"])
    first = _source(inbox)
    assert [_name(first.scan_once()) for _ in range(3)] == ["a.png", "b.png", "c.png"]
    del first  # crash 1, three files out
    (inbox / "new1.png").write_bytes(_png(10))
    (inbox / "new2.png").write_bytes(_png(11))
    second = _source(inbox)
    for name in ("a.png", "b.png", "c.png"):
        frame = second.scan_once()
        assert frame is not None and _name(frame) == name
        assert second.scan_once() is None and second.scan_once() is None  # alone until done()
        second.done(frame)
    news = [second.scan_once(), second.scan_once()]  # off probation: both out together, as before
    assert sorted(_name(f) for f in news if f is not None) == ["new1.png", "new2.png"]
    del second  # crash 2, the two new files out
    third = _source(inbox)
    frame = third.scan_once()
    assert frame is not None and third.scan_once() is None
    third.done(frame)
    frame = third.scan_once()
    assert frame is not None
    third.done(frame)
    assert third.scan_once() is None and not third.rejected_count
    assert not list((inbox / "rejected").iterdir())
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.png", "b.png", "c.png", "new1.png", "new2.png"]


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import smearscope.device.folder_source as fs
    from smearscope.device.source_config import FolderSourceConfig

    inbox, mode = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:  # the kernel's boot id, as a file the test writes (a reboot: another id)
        import pathlib
        import smearscope.device.processed_log as pl
        pl.BOOT_ID_FILE = pathlib.Path(sys.argv[3])
    signal.alarm(60)  # a child never killed as the test expects ends (-SIGALRM): the test fails, not hangs
    real = fs.load_image

    def load_image(data, **kw):  # a native crash in a decoder: the process dies reading the file
        if kw.get("source_name") == "bomb.png":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, **kw)

    fs.load_image = load_image
    src = fs.FolderSource(FolderSourceConfig(path=inbox, settle_s=0.0, poll_interval_s=0.01))
    for frame in src:
        print(frame.frame_id, flush=True)
        sys.stdin.readline()  # the test says go on (or kills the process here): no file handed out behind its back
        if mode == "done":
            src.done(frame)
        elif mode == "hold":
            time.sleep(600)  # killed here, the file out
        elif mode == "exit":
            break  # a clean end of the process that leaves the file unanalysed
""")


def _child(inbox: Path, mode: str, kill_after: int = 0, boot_id_file: Path | None = None) -> tuple[int, list[str]]:
    """A station process on the folder: its exit code (-9: killed) and the files it handed out;
    `boot_id_file` stands for /proc/sys/kernel/random/boot_id."""
    boot = [str(boot_id_file)] if boot_id_file is not None else []
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(inbox), mode, *boot], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    names = []
    for line in proc.stdout:
        names.append(line.split(":", 1)[1].split("@")[0])
        if kill_after and len(names) == kill_after:  # the child waits on its stdin: it holds these files alone
            proc.send_signal(signal.SIGKILL)
        else:
            try:
                proc.stdin.write("\n")
                proc.stdin.flush()
            except BrokenPipeError:
                pass
    proc.stdin.close()
    return proc.wait(60), names


def test_a_process_killed_by_a_file_in_the_decoder_twice_rejects_that_file_only(tmp_path: Path) -> None:
    """Real processes: the first holds a.png (handed out, not done) when bomb.png kills it in the
    decoder; the second analyses a.png alone, then dies on bomb.png alone. The third start sets
    bomb.png aside and goes on; a.png was stored, c.png too."""
    inbox = _inbox(tmp_path, ["a.png", "bomb.png", "c.png"])
    assert _child(inbox, "keep") == (-signal.SIGKILL, ["a.png"])
    assert _child(inbox, "done") == (-signal.SIGKILL, ["a.png"])
    src = _source(inbox)
    frame = src.scan_once()
    assert frame is not None and _name(frame) == "c.png"
    src.done(frame)
    assert (inbox / "rejected" / "bomb.png.reason.txt").read_text().startswith("analysis_interrupted")
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.png", "c.png"]


def test_a_process_killed_twice_while_it_holds_a_file_rejects_it(tmp_path: Path) -> None:
    """SIGKILL during the analysis (out of memory, the watchdog): the file held at two kills in a
    row, alone at the second, is rejected; the one queued behind it at the first is analysed."""
    inbox = _inbox(tmp_path, ["heavy.png", "b.png"])
    assert _child(inbox, "keep", kill_after=2) == (-signal.SIGKILL, ["heavy.png", "b.png"])
    assert _child(inbox, "hold", kill_after=1) == (-signal.SIGKILL, ["heavy.png"])
    src = _source(inbox)
    frame = src.scan_once()
    assert frame is not None and _name(frame) == "b.png"
    assert (inbox / "rejected" / "heavy.png.reason.txt").read_text().startswith("analysis_interrupted")


def test_after_a_clean_run_nothing_is_on_probation_and_files_go_out_as_before(tmp_path: Path) -> None:
    """Files done, and a process that ends cleanly with a file still out (a stop that drained
    what it could; on a full disk some are left): the next start hands files out as ever, several
    at once, and its log holds no unfinished attempt."""
    inbox = _inbox(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    src = _source(inbox)
    for _ in range(2):
        src.done(src.scan_once())
    src.close()
    assert _child(inbox, "exit") == (0, ["c.png"])
    assert ProcessedLog(inbox / ".smearscope-processed", 10_000).unfinished() == {}
    again = _source(inbox)
    out = [again.scan_once(), again.scan_once()]  # both out before either is done
    assert [_name(f) for f in out if f is not None] == ["c.png", "d.png"]


def test_the_log_stays_bounded_with_attempts_and_keeps_as_many_files(tmp_path: Path) -> None:
    """Each file now writes an attempt and its outcome: the log still holds at most twice
    `state_max_entries` lines, and compaction drops the finished attempts first, so it still
    remembers the last `state_max_entries` files; an unfinished attempt survives a reopen."""
    path = tmp_path / ".smearscope-processed"
    log = ProcessedLog(path, 100)
    for i in range(1000):
        key = file_key(f"f{i}.png", i, i)
        log.record(key, "attempt", f"f{i}.png")
        log.record(key, "done", f"f{i}.png")
        assert len(path.read_text().splitlines()) < 200
    crashed = file_key("x.png", 1, 1)
    log.record(crashed, "attempt", "x.png")
    again = ProcessedLog(path, 100)
    assert all(again.status(file_key(f"f{i}.png", i, i)) == "done" for i in range(901, 1000))
    assert again.unfinished() == {crashed: 1} and again.attempts(crashed) == 1
    log.release_open()  # the first process ends cleanly after all
    assert ProcessedLog(path, 100).unfinished() == {}


def test_a_file_waited_for_at_two_crashes_is_not_rejected_as_interrupted(tmp_path: Path) -> None:
    """A file read and found possibly incomplete (a PNG cut short, waited for within decode_grace_s)
    is not in hand: a crash while another file is analysed is not its doing. Its attempt stayed
    open, so two crashes of another file set it aside as analysis_interrupted although the
    station never analysed it; it is now waited for as before, then judged on its content."""
    inbox = _inbox(tmp_path, ["half.png", "a.png"])
    (inbox / "half.png").write_bytes(_png(7)[:200])  # truncated: within the grace, waited for
    os.utime(inbox / "half.png", ns=(10**18 - 10**9, 10**18 - 10**9))  # the oldest: read first
    config = FolderSourceConfig(path=inbox, settle_s=0.0, poll_interval_s=0.01, decode_grace_s=3600.0)
    first = FolderSource(config)
    frame = first.scan_once()
    assert frame is not None and _name(frame) == "a.png"  # half.png read, waited for
    del first  # crash 1 while a.png is analysed
    second = FolderSource(config)
    frame = second.scan_once()
    assert frame is not None and _name(frame) == "a.png"  # a.png on probation, alone
    del second  # crash 2: a.png's own
    third = FolderSource(config)
    assert third.scan_once() is None
    assert (inbox / "half.png").exists(), "half.png was set aside though never in hand at a crash"
    assert (inbox / "rejected" / "a.png").exists() and third.rejected_reasons == {"analysis_interrupted": 1}


def test_a_file_that_cannot_be_read_at_the_moment_writes_nothing_to_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A share's passing I/O error is retried every poll: no attempt is logged for a file whose
    bytes were never read (nothing of it could have killed the process), so polling it neither
    fsyncs lines into the log at every poll nor counts another file's crash against it."""
    import errno
    import pathlib

    from smearscope.device import folder_source

    inbox = _inbox(tmp_path, ["flaky.png"])
    real = folder_source.read_regular

    def read_regular(path: pathlib.Path, most: int) -> bytes | None:
        if pathlib.Path(path).name == "flaky.png":
            raise OSError(errno.EIO, "Input/output error")
        return real(path, most)

    monkeypatch.setattr(folder_source, "read_regular", read_regular)
    src = _source(inbox)
    assert all(src.scan_once() is None for _ in range(20))
    log = inbox / ".smearscope-processed"
    assert not log.exists() or log.read_text() == "", log.read_text()


BOOT_A, BOOT_B = "5f0c2a9e-8d1b-4c3e-9a7f-2b6d1e0c4a81", "c3e71b04-2f9a-4d58-b1c6-7e0a9d3f5b22"


def _boot(tmp_path: Path, boot_id: str | None) -> Path:
    """The boot id file as the kernel writes it; None: no such file (not Linux)."""
    path = tmp_path / "boot_id"
    path.unlink(missing_ok=True)
    if boot_id is not None:
        path.write_text(boot_id + "\n")
    return path


def test_a_file_in_hand_at_a_power_cut_is_not_set_aside_after_the_reboot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real processes under boot A: killed holding heavy.png and b.png, then holding heavy.png
    alone (the power goes). Restarted under boot B, those two unfinished attempts are not counted
    as crashes against heavy.png: each file is analysed alone (so a file that resets the board
    would be the one in hand at the next reset) and stored, nothing rejected. Counted by boot, two
    such kills in a row set it aside (the test above)."""
    inbox = _inbox(tmp_path, ["heavy.png", "b.png"])
    boot = _boot(tmp_path, BOOT_A)
    assert _child(inbox, "keep", kill_after=2, boot_id_file=boot) == (-signal.SIGKILL, ["heavy.png", "b.png"])
    assert _child(inbox, "hold", kill_after=1, boot_id_file=boot) == (-signal.SIGKILL, ["heavy.png"])
    lines = (inbox / ".smearscope-processed").read_text().splitlines()
    assert [ln.split("\t")[1] for ln in lines] == [f"attempt@{BOOT_A}"] * 2 + [f"attempt@{BOOT_A}@alone"]
    monkeypatch.setattr(processed_log, "BOOT_ID_FILE", _boot(tmp_path, BOOT_B))
    src = _source(inbox)
    for name in ("heavy.png", "b.png"):
        frame = src.scan_once()
        assert frame is not None and _name(frame) == name
        assert src.scan_once() is None  # alone until done()
        src.done(frame)
    assert src.scan_once() is None and not src.rejected_count
    assert not list((inbox / "rejected").iterdir())
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["b.png", "heavy.png"]


def test_after_a_reboot_two_kills_in_that_boot_still_set_a_file_aside(tmp_path: Path) -> None:
    """heavy.png out at a power cut under boot A; under boot B the process dies twice while it
    holds heavy.png (alone: the earlier boot's attempt put it on probation): the third start of
    boot B rejects it as analysis_interrupted by the process and analyses b.png. A reboot forgives
    the earlier boot's attempts only."""
    inbox = _inbox(tmp_path, ["heavy.png", "b.png"])
    boot = _boot(tmp_path, BOOT_A)
    assert _child(inbox, "hold", kill_after=1, boot_id_file=boot) == (-signal.SIGKILL, ["heavy.png"])
    boot = _boot(tmp_path, BOOT_B)
    assert _child(inbox, "hold", kill_after=1, boot_id_file=boot) == (-signal.SIGKILL, ["heavy.png"])
    assert _child(inbox, "hold", kill_after=1, boot_id_file=boot) == (-signal.SIGKILL, ["heavy.png"])
    assert _child(inbox, "done", kill_after=1, boot_id_file=boot)[1] == ["b.png"]
    reason = (inbox / "rejected" / "heavy.png.reason.txt").read_text()
    assert reason.startswith("analysis_interrupted: ") and "process ended 2 times" in reason


def test_a_file_that_resets_the_board_is_set_aside_at_the_third_reboot(tmp_path: Path) -> None:
    """A file whose analysis takes the whole board down (a kernel OOM panic, the hardware
    watchdog's reset) was retried after every reboot for ever, its attempts all of earlier boots.
    Real processes, each under a new boot id: the first is killed holding reset.png and b.png;
    the next three hold reset.png alone (on probation) when killed; the fifth sets it aside as
    analysis_interrupted by the machine's restarts (not the process's crashes) and analyses b.png
    and c.png."""
    inbox = _inbox(tmp_path, ["reset.png", "b.png", "c.png"])
    boots = [f"{BOOT_A[:-2]}{i:02d}" for i in range(5)]
    assert _child(inbox, "keep", kill_after=2, boot_id_file=_boot(tmp_path, boots[0])) == (
        -signal.SIGKILL, ["reset.png", "b.png"])
    for boot in boots[1:4]:  # alone each time; not set aside at 1 or 2 reboots
        assert _child(inbox, "hold", kill_after=1, boot_id_file=_boot(tmp_path, boot)) == (
            -signal.SIGKILL, ["reset.png"])
    assert _child(inbox, "done", kill_after=2, boot_id_file=_boot(tmp_path, boots[4])) == (
        -signal.SIGKILL, ["b.png", "c.png"])
    reason = (inbox / "rejected" / "reset.png.reason.txt").read_text()
    assert reason.startswith("analysis_interrupted: the machine restarted 3 times while this file was being "
                             "analysed alone"), reason
    assert "process ended" not in reason and not (inbox / "reset.png").exists()


def test_max_reboot_attempts_is_the_number_of_reboots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At max_reboot_attempts = 2 a file alone in hand at two reboots is set aside; attempts of an
    earlier boot made with other files in hand (not alone) count for nothing, however many."""
    inbox = _inbox(tmp_path, ["reset.png", "b.png"])
    st = (inbox / "reset.png").stat()
    reset = file_key("reset.png", st.st_size, st.st_mtime_ns)
    with open(inbox / ".smearscope-processed", "a") as fh:
        fh.write(f"{reset}\tattempt@{BOOT_A}\treset.png\n" * 3)  # boot A: not alone
    monkeypatch.setattr(processed_log, "BOOT_ID_FILE", _boot(tmp_path, BOOT_B))
    config = {"path": inbox, "settle_s": 0.0, "poll_interval_s": 0.01, "max_reboot_attempts": 2}
    frame = FolderSource(FolderSourceConfig(**config)).scan_once()
    assert frame is not None and _name(frame) == "reset.png"  # alone: the reboot of boot B
    monkeypatch.setattr(processed_log, "BOOT_ID_FILE", _boot(tmp_path, BOOT_B[:-2] + "00"))
    frame = FolderSource(FolderSourceConfig(**config)).scan_once()
    assert frame is not None and _name(frame) == "reset.png"  # alone at one reboot: kept
    monkeypatch.setattr(processed_log, "BOOT_ID_FILE", _boot(tmp_path, BOOT_B[:-2] + "01"))
    src = FolderSource(FolderSourceConfig(**config))
    frame = src.scan_once()
    assert frame is not None and _name(frame) == "b.png"
    assert "restarted 2 times" in (inbox / "rejected" / "reset.png.reason.txt").read_text()


def test_attempts_without_a_boot_id_count_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel gives no boot id (not Linux) the attempts are logged without one, as an
    earlier version logged them; such attempts count in any boot: heavy.png, held at two kills in
    a row (alone at the second), is set aside by a start that does know its boot."""
    inbox = _inbox(tmp_path, ["heavy.png", "b.png"])
    boot = _boot(tmp_path, None)
    assert _child(inbox, "keep", kill_after=2, boot_id_file=boot) == (-signal.SIGKILL, ["heavy.png", "b.png"])
    assert _child(inbox, "hold", kill_after=1, boot_id_file=boot) == (-signal.SIGKILL, ["heavy.png"])
    statuses = [ln.split("\t")[1] for ln in (inbox / ".smearscope-processed").read_text().splitlines()]
    assert statuses == ["attempt"] * 3, statuses
    monkeypatch.setattr(processed_log, "BOOT_ID_FILE", _boot(tmp_path, BOOT_B))
    src = _source(inbox)
    frame = src.scan_once()
    assert frame is not None and _name(frame) == "b.png"
    assert (inbox / "rejected" / "heavy.png.reason.txt").read_text().startswith("analysis_interrupted")


def _read_as_before_attempts(path: Path) -> dict[str, str]:
    """The processed-files log as the station read it before it logged attempts (commit aa0d715
    and earlier, e.g. a981fa8): every line's first field is a file version processed, whatever
    its status, and such a file is moved to done/ (or rejected/) without being analysed."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return {parts[0]: parts[1] if len(parts) > 1 else "done" for parts in (ln.split("\t", 2) for ln in lines)}


def _key(inbox: Path, name: str) -> str:
    st = (inbox / name).stat()
    return file_key(name, st.st_size, st.st_mtime_ns)


def test_files_in_hand_at_a_crash_or_a_stop_are_not_processed_for_an_earlier_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downgrade: a station put back to a version from before attempts were logged reads every
    line's key as a file processed. Real processes: one killed holding heavy.png and b.png, the
    next stopped cleanly with heavy.png alone in hand (released). Neither file's key is in the
    log as that version reads it (it would move both to done/ unanalysed); this version still
    counts the kill: heavy.png and b.png are analysed alone, one at a time."""
    inbox = _inbox(tmp_path, ["heavy.png", "b.png"])  # no third: the first child could reach it before its kill
    boot = _boot(tmp_path, BOOT_A)
    assert _child(inbox, "keep", kill_after=2, boot_id_file=boot) == (-signal.SIGKILL, ["heavy.png", "b.png"])
    assert _child(inbox, "exit", boot_id_file=boot) == (0, ["heavy.png"])
    log = inbox / ".smearscope-processed"
    earlier = _read_as_before_attempts(log)
    assert not {_key(inbox, n) for n in ("heavy.png", "b.png")} & set(earlier), log.read_text()
    monkeypatch.setattr(processed_log, "BOOT_ID_FILE", boot)  # restarted in the same boot: the kill counts
    assert ProcessedLog(log, 100).unfinished() == {_key(inbox, "heavy.png"): 1, _key(inbox, "b.png"): 1}


def test_a_log_with_the_earlier_releases_bare_attempts_is_read_as_then_and_rewritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Upgrade from the release that began logging attempts with the bare key (043781b): its
    unfinished attempts still count (heavy.png, killed twice, is set aside; b.png's attempt was
    released) and the log is rewritten at open so that a later downgrade to a version from before
    attempts were logged finds no key of an unfinished file in it."""
    inbox = _inbox(tmp_path, ["heavy.png", "b.png", "c.png"])
    heavy, b, c = (_key(inbox, n) for n in ("heavy.png", "b.png", "c.png"))
    log = inbox / ".smearscope-processed"
    log.write_text(f"{heavy}\tattempt\theavy.png\n{b}\tattempt\tb.png\n{heavy}\tattempt\theavy.png\n"
                   f"{b}\treleased\tb.png\n{c}\tattempt\tc.png\n{c}\tdone\tc.png\n", encoding="utf-8")
    monkeypatch.setattr(processed_log, "BOOT_ID_FILE", _boot(tmp_path, BOOT_B))
    src = _source(inbox)
    earlier = _read_as_before_attempts(log)
    assert earlier.get(c) == "done" and not {heavy, b} & set(earlier), log.read_text()
    frame = src.scan_once()
    assert frame is not None and _name(frame) == "b.png"
    assert (inbox / "rejected" / "heavy.png.reason.txt").read_text().startswith(
        "analysis_interrupted: the station's process ended 2 times")
    src.done(frame)
    assert src.scan_once() is None  # c.png was stored before: moved, not analysed again
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["b.png", "c.png"]


def test_a_log_with_bare_attempts_that_cannot_be_rewritten_is_read_as_it_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first start after the update cannot write the rewritten log (here its temporary file's
    name is taken by a folder; a full disk alike): the station starts all the same, the attempts
    counted as logged (heavy.png, killed twice, set aside; b.png analysed), said at WARNING with
    what the unmarked attempts mean for an earlier version put back."""
    inbox = _inbox(tmp_path, ["heavy.png", "b.png"])
    heavy = _key(inbox, "heavy.png")
    log = inbox / ".smearscope-processed"
    log.write_text(f"{heavy}\tattempt\theavy.png\n{heavy}\tattempt\theavy.png\n", encoding="utf-8")
    (inbox / ".smearscope-processed.tmp").mkdir()
    with caplog.at_level(logging.WARNING, logger="smearscope.device.processed_log"):
        src = _source(inbox)
    [warning] = [r.getMessage() for r in caplog.records if "processed-files log" in r.getMessage()]
    assert warning.startswith("cannot rewrite the processed-files log") and \
        "its attempts stay without their mark: an earlier version put back now would take the files in hand" in warning
    frame = src.scan_once()
    assert frame is not None and _name(frame) == "b.png"
    assert (inbox / "rejected" / "heavy.png.reason.txt").read_text().startswith("analysis_interrupted")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_compacted_log_is_synced_with_the_rename_that_puts_it_in_place(tmp_path: Path) -> None:
    """The log is compacted through a file renamed over it; the new file's bytes were synced, the
    rename not: a power cut could bring the old log back without the lines written after it. Seen
    with strace in a real process: an fsync of the folder after the rename."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    log = folder / ".smearscope-processed"
    log.write_text("".join(f"{i:016x}\tdone\tf{i}.png\n" for i in range(30)))  # over max_entries 10
    child = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from smearscope.device.processed_log import ProcessedLog
        ProcessedLog(Path(sys.argv[1]), 10)
    """)
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=rename,renameat,renameat2,fsync", "-o", str(trace),
                    sys.executable, "-c", child, str(log)], check=True, timeout=120)
    lines = trace.read_text().splitlines()
    renamed = next(i for i, line in enumerate(lines) if "rename" in line and ".smearscope-processed.tmp" in line)
    assert any(re.search(rf"fsync\(\d+<{re.escape(str(folder))}>\)", line) for line in lines[renamed:]), lines
    assert len(log.read_text().splitlines()) == 10
