"""A lab system that rejects one message (AR or CR: the message itself refused) does not hold the
archive: the rejection is final for that message, recorded in the index with the lab system's text
(MSA-3, ERR), said once at ERROR, and the reports behind it go on; a report that supersedes the
rejected one is held back (an amended report never overtakes its original). `archive find
--not-accepted` lists them; `archive send-hl7 --resend` sends the rejected one once the lab is set
up for it, then the one held behind it. An AE (transient) is retried, and given up on after
`--hl7-mllp-error-hold` (0 here: at once). Against a real mosquitto, the station's own publisher,
the archive in its own process and a real MLLP listener (tests/mllp_lis.py)."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import MosquittoBroker, wait_until
from mllp_lis import RawLis, framed
from test_archive import SPECIMEN, Archive, Station, a_report, indexed
from test_archive_send_hl7 import FIRST, VERIFIED, VERSION_1

from smearscope.cli import main
from smearscope.service.hl7.mllp import Rejected, send
from smearscope.service.hl7.oru import control_id, oru_r01

pytestmark = pytest.mark.broker

LIS_TEXT = "OBX-3 770-8 not mapped"
ERR_TEXT = "no such test code in the order"


def answering(codes: dict[str, str]) -> Callable[[socket.socket, bytes], None]:
    """An LIS behaviour: the code `codes` gives each message's MSH-10 (AA for any other), with MSA-3 and an
    ERR segment (ERR-3 an HL7 table 0357 code, ERR-8 the user message) when it is not AA."""
    def behaviour(conn: socket.socket, data: bytes) -> None:
        msh10 = data.split(b"\r", 1)[0].split(b"|")[9].decode()
        code = codes.get(msh10, "AA")
        text = f"MSA|{code}|{msh10}|{LIS_TEXT}\rERR|||207^Application internal error^HL70357|E||||{ERR_TEXT}\r" \
            if code != "AA" else f"MSA|AA|{msh10}\r"
        conn.sendall(framed(f"MSH|^~\\&|LIS|LAB|smearscope|lab-7|20261130091500||ACK^R01^ACK|A1|P|2.5.1\r{text}"
                            .encode()))
    return behaviour


def rejections(directory: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"{(directory / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        return list(db.execute("SELECT report_id, destination, code, lis_text, sender FROM hl7_rejections "
                               "ORDER BY rowid"))
    finally:
        db.close()


def msh10s(lis: RawLis) -> list[str]:
    return [data.split(b"\r", 1)[0].split(b"|")[9].decode() for data in lis.received]


def test_a_rejected_report_is_recorded_listed_and_resent_and_holds_nothing_behind_it(
        tmp_path: Path, persistent_broker: MosquittoBroker, lis: Callable[..., RawLis],
        capsys: pytest.CaptureFixture[str]) -> None:
    first = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    other = a_report("run-2", "H-2026-0413", 1_796_000_100.0)
    verified = a_report("run-1", SPECIMEN, 1_796_000_200.0, supersedes=first.report_id)
    later = a_report("run-3", "H-2026-0414", 1_796_000_300.0)
    codes = {control_id(first.report_id): "AR"}
    lab = lis(answering(codes))
    where = f"mllp:127.0.0.1:{lab.port}"
    directory = tmp_path / "archive"
    archive = Archive(tmp_path, persistent_broker.port, directory)
    archive.argv += ["--hl7-mllp", f"127.0.0.1:{lab.port}"]
    station = Station(tmp_path, persistent_broker.port)
    try:
        archive.start()
        for report in (first, other, verified, later):
            station.publish(report)
        assert wait_until(lambda: indexed(directory) == 4, 60), archive.text()
        # the rejected one is sent once; the verified report of its run is held back, the others go on
        assert msh10s(lab) == [control_id(r.report_id) for r in (first, other, later)]
        said = [line for line in archive.text().splitlines() if "was NOT accepted by" in line]
        assert len(said) == 1 and "ERROR" in said[0] and first.report_id in said[0], archive.text()
        assert "answered 'AR'" in said[0] and f"{LIS_TEXT}; {ERR_TEXT}" in said[0]
        assert f"send-hl7 --resend {first.report_id}" in said[0]
        assert f"report {verified.report_id} is NOT sent to {where}" in archive.text()
        assert rejections(directory) == [
            (first.report_id, where, "AR", f"{LIS_TEXT}; {ERR_TEXT}", "archive"),
            (verified.report_id, where, "held",
             f"the report it supersedes, {first.report_id}, was not accepted there (AR)", "archive")]
        archive.stop()
        archive.start()  # said at each start, where the journal shows it
        assert ("2 archived reports are not accepted by the lab system (rejected, or held behind one): "
                "`smearscope archive find --not-accepted` lists them") in archive.text()
    finally:
        archive.stop()
        station.stop()

    capsys.readouterr()
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory), "--json"]) == 0
    listed = {r["report_id"]: r["hl7_rejections"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(listed) == {first.report_id, verified.report_id}
    assert [(j["code"], j["lis_text"], j["open"]) for j in listed[first.report_id]] == [
        ("AR", f"{LIS_TEXT}; {ERR_TEXT}", True)]
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert f"    HL7 NOT accepted by {where}" in out and f"answered 'AR': {LIS_TEXT}; {ERR_TEXT}" in out

    # the same send without --resend leaves the rejected and the held one alone
    send_hl7 = ["archive", "send-hl7", "--dir", str(directory), "--hl7-mllp", f"127.0.0.1:{lab.port}"]
    assert main([*send_hl7, "--all"]) == 0
    assert "2 not accepted there before" in capsys.readouterr().err
    assert len(lab.received) == 3

    codes.clear()  # the lab's mapping fixed: it takes the message now
    assert main([*send_hl7, "--resend", first.report_id]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{r.report_id} -> {where} (MSH-10 {control_id(r.report_id)})" for r in (first, verified)]
    assert msh10s(lab)[3:] == [control_id(first.report_id), control_id(verified.report_id)]
    assert lab.received[3][1:-2].decode() == oru_r01(first)  # the same message, byte for byte
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory)]) == 1
    capsys.readouterr()
    assert len(rejections(directory)) == 2  # kept, closed by the deliveries since
    assert main(["archive", "find", "--dir", str(directory), "--json"]) == 0
    kept = {r["report_id"]: r["hl7_rejections"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert [j["open"] for j in kept[first.report_id]] == [False]


def test_an_error_answered_past_the_hold_is_given_up_on_and_the_next_reports_go(
        tmp_path: Path, persistent_broker: MosquittoBroker, lis: Callable[..., RawLis]) -> None:
    first = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    other = a_report("run-2", "H-2026-0413", 1_796_000_100.0)
    lab = lis(answering({control_id(first.report_id): "AE"}))
    directory = tmp_path / "archive"
    archive = Archive(tmp_path, persistent_broker.port, directory)
    archive.argv += ["--hl7-mllp", f"127.0.0.1:{lab.port}", "--hl7-mllp-error-hold", "0"]
    station = Station(tmp_path, persistent_broker.port)
    try:
        archive.start()
        for report in (first, other):
            station.publish(report)
        assert wait_until(lambda: indexed(directory) == 2, 60), archive.text()
        assert msh10s(lab) == [control_id(r.report_id) for r in (first, other)]
        assert "answered 'AE' for 0 s" in archive.text()
        assert [r[:3] for r in rejections(directory)] == [
            (first.report_id, f"mllp:127.0.0.1:{lab.port}", "AE")]
    finally:
        archive.stop()
        station.stop()


@pytest.mark.parametrize("code", ["AR", "CR"])
def test_send_raises_rejected_with_the_lab_systems_text(lis: Callable[..., RawLis], code: str) -> None:
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    lab = lis(answering({control_id(report.report_id): code}))
    with pytest.raises(Rejected) as raised:
        send(("127.0.0.1", lab.port), oru_r01(report), control_id(report.report_id), 5)
    assert raised.value.kind == code and raised.value.lis_text == f"{LIS_TEXT}; {ERR_TEXT}"


def test_the_error_hold_counts_the_time_held_before_a_restart(
        tmp_path: Path, persistent_broker: MosquittoBroker, lis: Callable[..., RawLis]) -> None:
    """A report answered AE is held for at most the hold in all, restarts included: a restart (or a
    crash) does not give it the whole hold again, so an archive restarted more often than the hold
    is not held by one message for ever."""
    first = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    other = a_report("run-2", "H-2026-0413", 1_796_000_100.0)
    lab = lis(answering({control_id(first.report_id): "AE"}))
    directory = tmp_path / "archive"
    archive = Archive(tmp_path, persistent_broker.port, directory)
    options = [*archive.argv, "--hl7-mllp", f"127.0.0.1:{lab.port}"]
    archive.argv = [*options, "--hl7-mllp-error-hold", "86400"]
    station = Station(tmp_path, persistent_broker.port)
    try:
        archive.start()
        for report in (first, other):
            station.publish(report)
        # a third try: the second AE was taken, a retry (5 s) after the first
        assert wait_until(lambda: len(lab.received) >= 3, 60), archive.text()
        archive.stop()
        assert indexed(directory) == 0
        tried = len(lab.received)
        archive.argv = [*options, "--hl7-mllp-error-hold", "5"]  # held 5 s before the restart already
        archive.start()
        assert wait_until(lambda: indexed(directory) == 2, 60), archive.text()
        # given up on at its first AE after the restart, not held 5 s more
        assert msh10s(lab)[tried:] == [control_id(first.report_id), control_id(other.report_id)]
        assert [r[:3] for r in rejections(directory)] == [
            (first.report_id, f"mllp:127.0.0.1:{lab.port}", "AE")]
    finally:
        archive.stop()
        station.stop()


def test_a_hold_is_recorded_once_while_it_stands_whatever_send_hl7_again_is_run(
        tmp_path: Path, lis: Callable[..., RawLis], capsys: pytest.CaptureFixture[str]) -> None:
    """`send-hl7 --again` offers the report held behind its rejected original each time: the original is sent
    and rejected again (a new answer, recorded), the held one is not sent and its hold not recorded again."""
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    lab = lis(answering({control_id(FIRST): "AR"}))
    where = f"mllp:127.0.0.1:{lab.port}"
    send_hl7 = ["archive", "send-hl7", "--all", "--dir", str(directory), "--hl7-mllp", f"127.0.0.1:{lab.port}"]
    assert main(send_hl7) == 1
    for _ in range(2):
        assert main([*send_hl7, "--again"]) == 1
    assert [r[:3] for r in rejections(directory)] == [
        (FIRST, where, "AR"), (VERIFIED, where, "held"), (FIRST, where, "AR"), (FIRST, where, "AR")]
    assert msh10s(lab) == [control_id(FIRST)] * 3
    capsys.readouterr()
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory)]) == 0
    assert capsys.readouterr().out.count("held: the report it supersedes") == 1


def test_a_resend_closes_the_rejection_though_the_clock_was_ahead_when_it_was_recorded(
        tmp_path: Path, lis: Callable[..., RawLis], capsys: pytest.CaptureFixture[str]) -> None:
    """A delivery closes the rejection before it whatever the clock said then: a station clock set back
    (NTP correcting a clock that ran ahead) leaves neither the resent report listed as not accepted nor
    the report held behind it unsent."""
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    codes = {control_id(FIRST): "AR"}
    lab = lis(answering(codes))
    where = f"mllp:127.0.0.1:{lab.port}"
    send_hl7 = ["archive", "send-hl7", "--dir", str(directory), "--hl7-mllp", f"127.0.0.1:{lab.port}"]
    assert main([*send_hl7, "--all"]) == 1  # rejected: recorded, the verified report held behind it
    assert [r[:3] for r in rejections(directory)] == [(FIRST, where, "AR"), (VERIFIED, where, "held")]
    db = sqlite3.connect(directory / "index.sqlite")
    with db:  # recorded while the clock was an hour ahead; it has been set right since
        db.execute("UPDATE hl7_rejections SET rejected_at = rejected_at + 3600")
    db.close()
    capsys.readouterr()

    codes.clear()
    assert main([*send_hl7, "--resend", FIRST]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{r} -> {where} (MSH-10 {control_id(r)})" for r in (FIRST, VERIFIED)]
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory)]) == 1
    assert main([*send_hl7, "--resend", FIRST]) == 0  # delivered: not sent a second time
    assert msh10s(lab) == [control_id(FIRST), control_id(FIRST), control_id(VERIFIED)]


def test_an_index_recorded_by_the_previous_layout_is_read_as_it_is_and_upgraded_in_place(
        tmp_path: Path, lis: Callable[..., RawLis], capsys: pytest.CaptureFixture[str]) -> None:
    """An index of version 4 as a smearscope before `closed_at` and `hl7_error_holds` left it: `find`
    (read-only) reads it unchanged, a delivery that smearscope recorded after the rejection closes it
    still, and send-hl7 adds the column and the table in place (the version stays 4)."""
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    codes = {control_id(FIRST): "AR", control_id(VERIFIED): "AR"}
    lab = lis(answering(codes))
    send_hl7 = ["archive", "send-hl7", "--dir", str(directory), "--hl7-mllp", f"127.0.0.1:{lab.port}"]
    assert main([*send_hl7, "--all"]) == 1
    assert main([*send_hl7, "--resend", FIRST]) == 1  # FIRST rejected again, VERIFIED held behind it
    db = sqlite3.connect(directory / "index.sqlite")
    with db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        db.execute("ALTER TABLE hl7_rejections DROP COLUMN closed_at")  # the previous layout
        db.execute("DROP TABLE hl7_error_holds")
        # the previous smearscope delivered FIRST after its rejections (it closed nothing explicitly)
        db.execute("INSERT INTO hl7_deliveries SELECT report_id, destination, control_id, max(rejected_at) + 1, "
                   "'send-hl7', processing_id FROM hl7_rejections WHERE report_id = ?", (FIRST,))
    db.close()
    capsys.readouterr()
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory), "--json"]) == 0
    assert [r["report_id"] for r in map(json.loads, capsys.readouterr().out.splitlines())] == [VERIFIED]

    codes.clear()
    assert main([*send_hl7, "--all"]) == 0  # the held one goes, its original delivered
    assert capsys.readouterr().out.splitlines() == [
        f"{VERIFIED} -> mllp:127.0.0.1:{lab.port} (MSH-10 {control_id(VERIFIED)})"]
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory)]) == 1
    db = sqlite3.connect(f"{(directory / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        assert "closed_at" in {c for (_, c, *_) in db.execute("PRAGMA table_info(hl7_rejections)")}
        assert db.execute("SELECT count(*) FROM hl7_error_holds").fetchone()[0] == 0
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    finally:
        db.close()


def test_the_latest_rejection_is_the_one_recorded_last_whatever_the_clock_said(
        tmp_path: Path, lis: Callable[..., RawLis], capsys: pytest.CaptureFixture[str]) -> None:
    """A report held behind its original, then sent after it and rejected itself, is not accepted for its
    own rejection: `send-hl7 --all` does not send it again, though the clock was set back between the two
    (its rejection recorded at an earlier time than its hold)."""
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    codes = {control_id(FIRST): "AR"}
    lab = lis(answering(codes))
    where = f"mllp:127.0.0.1:{lab.port}"
    send_hl7 = ["archive", "send-hl7", "--dir", str(directory), "--hl7-mllp", f"127.0.0.1:{lab.port}"]
    assert main([*send_hl7, "--all"]) == 1  # FIRST rejected, VERIFIED held behind it
    codes.clear()
    codes[control_id(VERIFIED)] = "AR"
    assert main([*send_hl7, "--resend", FIRST]) == 1  # FIRST taken now, VERIFIED sent after it and rejected
    assert [r[:3] for r in rejections(directory)] == [
        (FIRST, where, "AR"), (VERIFIED, where, "held"), (VERIFIED, where, "AR")]
    db = sqlite3.connect(directory / "index.sqlite")
    with db:  # the clock was set back an hour between the hold and the rejection
        db.execute("UPDATE hl7_rejections SET rejected_at = rejected_at - 3600 WHERE code = 'AR' AND report_id = ?",
                   (VERIFIED,))
    db.close()
    capsys.readouterr()
    assert main([*send_hl7, "--all"]) == 0
    assert "1 not accepted there before" in capsys.readouterr().err
    assert msh10s(lab) == [control_id(FIRST), control_id(FIRST), control_id(VERIFIED)]


def test_a_resend_to_a_folder_and_a_listener_goes_only_where_the_report_was_not_accepted(
        tmp_path: Path, lis: Callable[..., RawLis], capsys: pytest.CaptureFixture[str]) -> None:
    """Rejected at the listener, written to the engine's folder: `--resend` with both sends it to the listener
    only (the engine took the file already: it would get it twice), then the report held behind it."""
    directory, hl7_dir = tmp_path / "archive", tmp_path / "hl7"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    codes = {control_id(FIRST): "AR"}
    lab = lis(answering(codes))
    where = f"mllp:127.0.0.1:{lab.port}"
    send_hl7 = ["archive", "send-hl7", "--dir", str(directory), "--hl7-mllp", f"127.0.0.1:{lab.port}",
                "--hl7-dir", str(hl7_dir)]
    assert main([*send_hl7, "--all"]) == 1
    assert sorted(p.name for p in hl7_dir.iterdir()) == sorted([f"{FIRST}.hl7", f"{VERIFIED}.hl7"])
    for p in hl7_dir.iterdir():  # the engine took them
        p.unlink()
    codes.clear()
    capsys.readouterr()
    assert main([*send_hl7, "--resend", FIRST]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{r} -> {where} (MSH-10 {control_id(r)})" for r in (FIRST, VERIFIED)]
    assert not any(hl7_dir.iterdir())
    assert msh10s(lab) == [control_id(FIRST), control_id(FIRST), control_id(VERIFIED)]


def test_a_report_rejected_in_training_and_delivered_in_production_is_no_longer_listed(
        tmp_path: Path, lis: Callable[..., RawLis], capsys: pytest.CaptureFixture[str]) -> None:
    """Rejected while the lab validated the interface (MSH-11 T), then delivered as production (P): it is
    accepted, so neither `find --not-accepted` nor the archive's count at start names it for ever; a
    delivery in training closes no production rejection."""
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    codes = {control_id(FIRST, "T"): "AR"}
    lab = lis(answering(codes))
    send_hl7 = ["archive", "send-hl7", "--all", "--dir", str(directory), "--hl7-mllp", f"127.0.0.1:{lab.port}"]
    assert main([*send_hl7, "--hl7-processing-id", "T"]) == 1  # FIRST rejected in training, VERIFIED held
    capsys.readouterr()
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(send_hl7) == 0  # as production: both delivered
    assert msh10s(lab)[1:] == [control_id(FIRST), control_id(VERIFIED)]
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory)]) == 1
    capsys.readouterr()

    codes.clear()  # and the other way: rejected in production (VERIFIED held behind it), then delivered in training
    codes[control_id(FIRST)] = "AR"
    assert main([*send_hl7, "--again"]) == 1
    assert main([*send_hl7, "--again", "--hl7-processing-id", "T"]) == 0
    capsys.readouterr()
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory), "--json"]) == 0
    assert {r["report_id"] for r in map(json.loads, capsys.readouterr().out.splitlines())} == {FIRST, VERIFIED}
