"""`smearscope archive --hl7-dir` against a real mosquitto and the station's own publisher: each
specimen report stored is written as an HL7 v2.5.1 ORU^R01 file an interface engine can take
(hl7apy validates it), whole, before the report is acknowledged; a report delivered again is not
written again; a full HL7 folder holds the report unacknowledged until space returns."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from broker import MosquittoBroker, wait_until
from smallfs import fill, small_tmpfs
from test_archive import (
    SPECIMEN,
    STATION,
    Archive,
    Station,
    a_report,
    as_user,
    envelope_of,
    indexed,
    raw_client,
)
from test_hl7 import parsed

import smearscope.files
from smearscope.cli import main
from smearscope.service.analysis.report import Report
from smearscope.service.archive.hl7_out import Hl7Output
from smearscope.service.archive.message import read_report
from smearscope.service.archive.store import ArchiveStore
from smearscope.service.hl7.oru import oru_r01

pytestmark = pytest.mark.broker


def hl7_archive(tmp_path: Path, port: int, directory: Path, hl7_dir: Path) -> Archive:
    archive = Archive(tmp_path, port, directory)
    archive.argv += ["--hl7-dir", str(hl7_dir)]
    return archive


def signed_again(report: Report, supersedes: Report) -> Report:
    v = report.verification
    assert v is not None and supersedes.verification is not None
    return report.model_copy(update={"verification": v.model_copy(update={
        "supersedes_verified_by": supersedes.verification.verified_by,
        "supersedes_verified_at": supersedes.verification.verified_at})})


def test_each_stored_specimen_report_is_written_as_a_valid_oru_r01_with_its_status(
        tmp_path: Path, persistent_broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]) -> None:
    directory, hl7_dir = tmp_path / "archive", tmp_path / "to-lis"
    archive = hl7_archive(tmp_path, persistent_broker.port, directory, hl7_dir)
    station = Station(tmp_path, persistent_broker.port)
    try:
        archive.start()
        first = a_report("run-1", SPECIMEN, 1_796_000_000.0)
        verified = a_report("run-1", SPECIMEN, 1_796_000_200.0, supersedes=first.report_id)
        again = signed_again(a_report("run-1", SPECIMEN, 1_796_000_300.0, supersedes=verified.report_id), verified)
        for report in (first, verified, again):
            station.publish(report)
        assert wait_until(lambda: indexed(directory) == 3, 30), archive.text()
        assert sorted(p.name for p in hl7_dir.iterdir()) == sorted(f"{r.report_id}.hl7" for r in (first, verified, again))
        for report, status in ((first, "P"), (verified, "F"), (again, "C")):
            data = (hl7_dir / f"{report.report_id}.hl7").read_bytes()
            assert data == oru_r01(report).encode("utf-8")  # the report as the station made it
            msg = parsed(data.decode("utf-8"))
            order = msg.oru_r01_patient_result.oru_r01_order_observation
            assert order.obr.obr_25.value == status and order.obr.obr_2.value == SPECIMEN
            assert order.obr.obr_3.value == "run-1^smearscope"  # one order: F and C replace P in the lab system
        assert all(p.stat().st_mode & 0o777 == 0o640 for p in hl7_dir.iterdir())

        assert main(["archive", "show", again.report_id, "--dir", str(directory), "--hl7"]) == 0
        assert capsys.readouterr().out == oru_r01(again).replace("\r", "\n")

        # the engine took the file away; the station sends the report again (a lost PUBACK): not written again
        (hl7_dir / f"{first.report_id}.hl7").unlink()
        envelope = json.dumps({"envelope_version": 1, "kind": "report", "station_id": STATION,
                               "report_id": first.report_id, "message_id": uuid.uuid4().hex, "schema_version": "1.2",
                               "created_at": "x", "body": json.loads(first.model_dump_json())})
        with raw_client(persistent_broker.port) as client:
            client.publish(f"smearscope/{STATION}/report", envelope, qos=1).wait_for_publish(10)
        assert wait_until(lambda: "was archived already" in archive.text(), 30), archive.text()
        assert not (hl7_dir / f"{first.report_id}.hl7").exists()
        assert not list(hl7_dir.glob(".*"))  # no temporary file left
    finally:
        archive.stop()
        station.stop()


def test_a_full_hl7_folder_holds_the_report_unacknowledged_until_space_returns(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    directory = tmp_path / "archive"
    with small_tmpfs(tmp_path / "to-lis", 512) as hl7_dir:
        archive = hl7_archive(tmp_path, persistent_broker.port, directory, hl7_dir)
        station = Station(tmp_path, persistent_broker.port)
        try:
            archive.start()
            report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
            filler = fill(hl7_dir)
            station.publish(report)
            assert wait_until(lambda: "NOT acknowledged" in archive.text(), 30), archive.text()
            assert indexed(directory) == 0
            archive.kill()  # had it acknowledged before the file, the message would be gone now
            filler.unlink()
            archive.start()
            assert wait_until(lambda: indexed(directory) == 1, 30), archive.text()
            assert (hl7_dir / f"{report.report_id}.hl7").read_bytes() == oru_r01(report).encode("utf-8")
        finally:
            archive.stop()
            station.stop()


def test_show_hl7_of_a_report_not_there_or_not_readable_says_so(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    store = ArchiveStore(tmp_path / "a")
    try:
        odd = json.loads(envelope_of(a_report("run-1", SPECIMEN, 1_796_000_000.0)))
        odd["body"]["unknown_field"] = 1  # a newer station's report: archived, not read as this smearscope's
        stored = store.put_report(read_report(STATION, json.dumps(odd).encode()))
    finally:
        store.close()
    assert main(["archive", "show", stored.report_id, "--dir", str(tmp_path / "a"), "--hl7"]) == 1
    assert "cannot be read as a report of this smearscope" in capsys.readouterr().err
    assert main(["archive", "show", "nope", "--dir", str(tmp_path / "a"), "--hl7"]) == 1


def test_an_hl7_folder_replaced_by_a_link_holds_the_report_said_once_until_the_folder_is_back(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    directory, hl7_dir, elsewhere = tmp_path / "archive", tmp_path / "to-lis", tmp_path / "elsewhere"
    elsewhere.mkdir()
    archive = hl7_archive(tmp_path, persistent_broker.port, directory, hl7_dir)
    station = Station(tmp_path, persistent_broker.port)
    try:
        archive.start()
        first = a_report("run-1", SPECIMEN, 1_796_000_000.0)
        station.publish(first)
        assert wait_until(lambda: indexed(directory) == 1, 30), archive.text()
        hl7_dir.rename(tmp_path / "to-lis.real")
        hl7_dir.symlink_to(elsewhere)
        second = a_report("run-2", SPECIMEN, 1_796_000_100.0)
        station.publish(second)
        assert wait_until(lambda: "NOT acknowledged" in archive.text(), 30), archive.text()
        assert f"the HL7 folder {hl7_dir} was replaced by a symbolic link (to {elsewhere})" in archive.text()
        time.sleep(11)  # two more tries (every 5 s): not said again, nothing written through the link
        assert indexed(directory) == 1 and list(elsewhere.iterdir()) == []
        hl7_dir.unlink()
        (tmp_path / "to-lis.real").rename(hl7_dir)
        assert wait_until(lambda: indexed(directory) == 2, 30), archive.text()
        assert (hl7_dir / f"{second.report_id}.hl7").read_bytes() == oru_r01(second).encode("utf-8")
        assert archive.text().count("cannot store report") == 1
        assert "storing again: report" in archive.text()
    finally:
        archive.stop()
        station.stop()
    assert list(elsewhere.iterdir()) == []
    assert "tries to store again this run" in archive.text() and " 0 tries to store again" not in archive.text()


def test_a_report_whose_times_no_calendar_holds_is_archived_without_hl7_and_blocks_none_behind_it(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    """A report valid by the model whose run lasted longer than any calendar (timing_ms.run_ms) gives an
    OBR-7 `datetime` refuses: with OSError (errno 75, EOVERFLOW) or OverflowError. Neither is a disk
    refusing the file: the report is archived, said at ERROR, and the reports behind it are stored."""
    directory, hl7_dir = tmp_path / "archive", tmp_path / "to-lis"
    archive = hl7_archive(tmp_path, persistent_broker.port, directory, hl7_dir)
    try:
        archive.start()
        eoverflow = a_report("run-1", SPECIMEN, 1_796_000_000.0).model_copy(
            update={"timing_ms": {"run_ms": -float(2 ** 62) * 1000}})  # OSError: Value too large
        overflow = a_report("run-2", SPECIMEN, 1_796_000_100.0).model_copy(
            update={"timing_ms": {"run_ms": -1e23}})  # OverflowError: out of range for time_t
        good = a_report("run-3", SPECIMEN, 1_796_000_200.0)
        with raw_client(persistent_broker.port) as client:  # as a station publishes (its bundle would fail)
            for report in (eoverflow, overflow, good):
                client.publish(f"smearscope/{STATION}/report", envelope_of(report), qos=1).wait_for_publish(10)
        assert wait_until(lambda: indexed(directory) == 3, 30), archive.text()
        assert [p.name for p in hl7_dir.iterdir()] == [f"{good.report_id}.hl7"]
        for report in (eoverflow, overflow):
            assert f"report {report.report_id} from {STATION} cannot be read as a report of this smearscope" \
                in archive.text()
        assert archive.text().count("archived, but no HL7 message was made") == 2  # docs/HL7.md's words
        assert "NOT acknowledged" not in archive.text()
        assert archive.proc is not None and archive.proc.poll() is None
    finally:
        archive.stop()
    for report in (eoverflow, overflow):  # show --hl7 says it, no traceback
        assert main(["archive", "show", report.report_id, "--dir", str(directory), "--hl7"]) == 1


def test_a_value_that_is_no_number_makes_no_message_rather_than_an_nm_of_nan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """JSON as Python reads it takes NaN and Infinity, and the report model lets them through: HL7's NM
    has no such value ('nan', 'inf' are no numbers to an LIS). The report is archived, no message made
    (hl7_out writes no file; show --hl7 says it cannot be read, exit 1)."""
    odd = json.loads(envelope_of(a_report("run-1", SPECIMEN, 1_796_000_000.0)))
    odd["body"]["wbc_differential"][0]["percent"] = float("nan")
    odd["body"]["rbc_size"]["mean_diameter_um"] = float("inf")
    payload = json.dumps(odd).encode()
    assert b"NaN" in payload and b"Infinity" in payload
    message = read_report(STATION, payload)
    hl7_dir = tmp_path / "to-lis"
    output = Hl7Output(hl7_dir, None, 10)
    store = ArchiveStore(tmp_path / "a", output)
    try:
        assert store.put_report(message).new
    finally:
        store.close()
    assert list(hl7_dir.iterdir()) == []
    assert main(["archive", "show", message.report_id, "--dir", str(tmp_path / "a"), "--hl7"]) == 1
    captured = capsys.readouterr()
    assert "cannot be read as a report of this smearscope" in captured.err
    assert "|nan|" not in captured.out and "|inf|" not in captured.out


def test_temporary_files_a_killed_write_left_in_the_hl7_folder_are_removed_at_start(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    """A write killed between its temporary file and the rename leaves `.<id>.hl7.<random>.tmp` in the
    folder the engine reads (the report comes again: nothing is lost); an engine taking `*.hl7` never
    removes it, and it holds patient data. The archive removes those at start, nothing else."""
    directory, hl7_dir = tmp_path / "archive", tmp_path / "to-lis"
    hl7_dir.mkdir()
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    fd, leftover = tempfile.mkstemp(dir=hl7_dir, prefix=f".{report.report_id}.hl7.", suffix=".tmp")
    os.write(fd, oru_r01(report).encode()[:100])
    os.close(fd)
    others = [hl7_dir / "kept.hl7", hl7_dir / ".engine-state.tmp", hl7_dir / "notes.txt"]
    for other in others:
        other.write_text("the engine's")
    archive = hl7_archive(tmp_path, persistent_broker.port, directory, hl7_dir)
    try:
        archive.start()
        assert not Path(leftover).exists()
        assert all(other.read_text() == "the engine's" for other in others)
        assert f"removed {leftover}, left by an interrupted write" in archive.text()
    finally:
        archive.stop()


SEND_AT_GO = """
import sys, time
from pathlib import Path
from smearscope.service.archive.hl7_out import Hl7Output
out, go, done = Hl7Output(Path(sys.argv[1]), None, 5.0), Path(sys.argv[2]), Path(sys.argv[4])
Path(sys.argv[3]).touch()  # imported: ready
while not go.exists():
    time.sleep(0.0005)
failed = []
for k in range(int(sys.argv[5])):  # send-hl7's writes to the HL7 folder, one report after another
    try:
        out.deliver(f"file:{out.directory}", f"report-{k:04d}", "MSH|^~\\&|" + "OBX|" * 2000, f"C{k}")
    except OSError as exc:
        failed.append(f"report-{k:04d}: {exc!r}")
done.touch()
print(failed)
"""

STARTS_AT_GO = """
import sys, time
from pathlib import Path
from smearscope.service.archive.hl7_out import Hl7Output
out, go, done = Hl7Output(Path(sys.argv[1]), None, 5.0), Path(sys.argv[2]), Path(sys.argv[4])
Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.0005)
while not done.exists():  # the archive started again and again while send-hl7 writes
    out.remove_leftovers()
"""


def test_an_archive_starting_while_send_hl7_writes_to_the_hl7_folder_leaves_its_writes_whole(tmp_path: Path) -> None:
    """The archive restarted by an update while `smearscope archive send-hl7` writes to the same HL7 folder:
    its start removes the temporary files killed writes left, not the one send-hl7 is writing (locked until
    renamed). Removing it failed that delivery (FileNotFoundError at the rename: 113 of 300 writes with the
    start repeated throughout); now every report is delivered and nothing temporary is left."""
    hl7_dir, go, done = tmp_path / "to-lis", tmp_path / "go", tmp_path / "done"
    hl7_dir.mkdir()
    ready = [tmp_path / "ready-send", tmp_path / "ready-archive"]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(hl7_dir), str(go), str(r), str(done), "150"],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for code, r in zip((SEND_AT_GO, STARTS_AT_GO), ready, strict=True)]
    while not all(r.exists() for r in ready):
        assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        time.sleep(0.001)
    go.touch()
    sent, started = (p.communicate(timeout=300)[0] for p in procs)
    assert [p.returncode for p in procs] == [0, 0], (sent, started)
    assert sent.strip() == "[]"
    assert sorted(p.name for p in hl7_dir.iterdir()) == [f"report-{k:04d}.hl7" for k in range(150)]


def test_a_write_whose_temporary_file_a_cleanup_removed_before_its_lock_makes_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive's start removing send-hl7's temporary file in the moment between its making and its lock
    (the cleanup run there, between mkstemp and flock): the write makes another and the message lands whole
    (it was written to the removed file and its rename failed)."""
    made, mkstemp = [], tempfile.mkstemp

    def made_then_cleaned(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, tmp = mkstemp(*args, **kwargs)  # type: ignore[call-overload]
        made.append(tmp)
        if len(made) == 1:
            assert smearscope.files.remove_unless_written(Path(tmp))  # not locked yet: removed
        return fd, tmp

    monkeypatch.setattr(smearscope.files.tempfile, "mkstemp", made_then_cleaned)
    smearscope.files.write_atomically(tmp_path / "report-1.hl7", b"MSH|^~\\&|")
    assert len(made) == 2
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("report-1.hl7", b"MSH|^~\\&|")]


def test_a_report_whose_body_names_another_station_than_its_topic_is_refused(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    """The broker lets a station publish on its own topic only; a body naming another station would
    be archived under the topic's station and sent to the lab with the other one in MSH-4 and OBX-18
    (results filed as another analyzer's). It is refused, as an envelope naming another station is."""
    directory, hl7_dir = tmp_path / "archive", tmp_path / "to-lis"
    archive = hl7_archive(tmp_path, persistent_broker.port, directory, hl7_dir)
    try:
        archive.start()
        forged = a_report("run-1", SPECIMEN, 1_796_000_000.0).model_copy(update={"station_id": "lab-9"})
        good = a_report("run-2", SPECIMEN, 1_796_000_100.0)
        with raw_client(persistent_broker.port) as client:  # logged in as the station lab-7
            client.publish(f"smearscope/{STATION}/report", envelope_of(forged), qos=1).wait_for_publish(10)
            client.publish(f"smearscope/{STATION}/report", envelope_of(good), qos=1).wait_for_publish(10)
        assert wait_until(lambda: f"stored report {good.report_id}" in archive.text(), 30), archive.text()
        assert indexed(directory) == 1
        assert "body station_id 'lab-9' is not the topic's station 'lab-7'" in archive.text()
        assert [p.name for p in hl7_dir.iterdir()] == [f"{good.report_id}.hl7"]
    finally:
        archive.stop()


def test_a_report_it_cannot_read_reaches_the_journal_and_the_terminal_escaped(
        tmp_path: Path, persistent_broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]) -> None:
    """The reason a report cannot be read is pydantic's text, which quotes the body's own keys as they are:
    an ESC sequence, a right-to-left override or a line separator in one reached the ERROR line (and `show
    --hl7`'s stderr) raw. They are shown as \\xNN / \\uNNNN, and pydantic's lines joined into one."""
    directory, hl7_dir = tmp_path / "archive", tmp_path / "to-lis"
    archive = hl7_archive(tmp_path, persistent_broker.port, directory, hl7_dir)
    odd = json.loads(envelope_of(a_report("run-1", SPECIMEN, 1_796_000_000.0)))
    odd["body"]["note\x1b[2J\u202e\u2028forged"] = 1  # a key this smearscope does not know
    try:
        archive.start()
        with raw_client(persistent_broker.port) as client:
            client.publish(f"smearscope/{STATION}/report", json.dumps(odd).encode(), qos=1).wait_for_publish(10)
        assert wait_until(lambda: indexed(directory) == 1, 30), archive.text()
    finally:
        archive.stop()
    said = [line for line in archive.text().split("\n") if "cannot be read as a report" in line]
    assert len(said) == 1 and "note\\x1b[2J\\u202e\\u2028forged" in said[0]
    assert not {"\x1b", "\u202e", "\u2028"} & set(archive.text())
    assert main(["archive", "show", odd["report_id"], "--dir", str(directory), "--hl7"]) == 1
    err = capsys.readouterr().err
    assert "note\\x1b[2J\\u202e\\u2028forged" in err and not {"\x1b", "\u202e", "\u2028"} & set(err)


def test_an_hl7_folder_that_cannot_be_made_is_named_and_not_blamed_on_the_archive(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--hl7-dir under a plain file (or on a read-only file system, as under the unit's ProtectSystem=
    without ReadWritePaths=): the archive said 'cannot open the archive at DIR', the archive folder being
    fine. It names the HL7 folder; exit 1 (the folder may be made meanwhile: a restart mends it)."""
    (tmp_path / "plain").write_text("a file")
    hl7_dir = tmp_path / "plain" / "to-lis"
    assert main(["archive", "--broker", "mqtt://127.0.0.1:1", "--dir", str(tmp_path / "archive"),
                 "--hl7-dir", str(hl7_dir)]) == 1
    err = capsys.readouterr().err
    assert f"cannot make the HL7 folder {hl7_dir} (--hl7-dir)" in err and "cannot open the archive" not in err


def _removed_as(uid: int, tmp: Path) -> str:
    """remove_unless_written(tmp) in a process of user and group `uid` forked from this one: 'removed',
    'left' or the error."""
    return as_user(uid, lambda: "removed" if smearscope.files.remove_unless_written(tmp) else "left")


def test_the_archive_removes_a_temporary_file_another_users_killed_write_left_and_leaves_one_being_written(
        ) -> None:
    """`sudo smearscope archive send-hl7` killed mid-write leaves root's temporary file (mode 0640, patient
    data) in the archive user's HL7 folder: the archive's start, which cannot open it to try its lock, removes
    it (it was left, with a warning at every start), and leaves one whose write holds its lock."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a file of another user's")
    with tempfile.TemporaryDirectory() as top:  # under /tmp: the archive's user can reach it (not tmp_path)
        os.chmod(top, 0o755)
        folder = Path(top) / "to-lis"
        folder.mkdir(mode=0o2770)
        os.chown(folder, 65534, 65534)
        _killed_and_under_way(folder)


def _killed_and_under_way(folder: Path) -> None:
    killed = folder / ".R1.hl7.k1ll3d00.tmp"
    killed.write_bytes(b"MSH|^~\\&|")
    os.chmod(killed, 0o640)
    assert _removed_as(65534, killed) == "removed"
    assert not killed.exists()
    writing = folder / ".R2.hl7.wr1t1ng0.tmp"
    writing.write_bytes(b"MSH|^~\\&|")
    os.chmod(writing, 0o640)
    fd = os.open(writing, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as write_atomically holds it until its rename
        assert _removed_as(65534, writing) == "left"
        assert writing.exists()
    finally:
        os.close(fd)


def test_a_write_whose_locked_temporary_file_a_cleanup_removed_makes_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cleanup that could not open the temporary file (another user's) removes it by the kernel's list of
    locks, and a write may lock it between that look and the removal: the write's rename then finds it gone
    and it writes another, the message landing whole."""
    fchmod, removed = os.fchmod, []

    def removed_after_the_lock(fd: int, mode: int) -> None:
        fchmod(fd, mode)
        if not removed:
            removed.append(next(tmp_path.glob(".report-1.hl7.*.tmp")))
            removed[0].unlink()  # the cleanup's removal, after the write took its lock

    monkeypatch.setattr(smearscope.files.os, "fchmod", removed_after_the_lock)
    smearscope.files.write_atomically(tmp_path / "report-1.hl7", b"MSH|^~\\&|", 0o640)
    assert removed
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("report-1.hl7", b"MSH|^~\\&|")]


def test_a_file_system_without_file_locks_still_gets_its_files_written_said_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """NFS without its lock service refuses flock (ENOLCK): the write's temporary file goes unlocked and the file
    is written whole, said once per folder; any other flock error is raised with nothing left behind. The seam is
    fcntl.flock (no such file system here)."""
    import errno
    import logging

    def refuse(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(smearscope.files.fcntl, "flock", refuse)
    with caplog.at_level(logging.WARNING, logger="smearscope.files"):
        smearscope.files.write_atomically(tmp_path / "report-1.hl7", b"MSH|1")
        smearscope.files.write_atomically(tmp_path / "report-2.hl7", b"MSH|2")
    assert (tmp_path / "report-1.hl7").read_bytes() == b"MSH|1" and (tmp_path / "report-2.hl7").read_bytes() == b"MSH|2"
    assert sum("refuses file locks" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(smearscope.files.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(OSError):
        smearscope.files.write_atomically(tmp_path / "report-3.hl7", b"MSH|3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-1.hl7", "report-2.hl7"]
