"""`smearscope archive send-hl7` on a real archive whose index is of version 1 (tests/data/archive-v1,
left by the archive of commit 2c4762f), with hl7apy's MLLP server as the lab system (it validates
each message strictly) and a real folder: the index is upgraded to version 2, each specimen report
is delivered once to each destination, oldest first, and each delivery recorded, so the same
command sends nothing again unless `--again`; a send the lab system stops goes on from there.
`archive find` lists the deliveries recorded, and `archive show --hl7` with the lab's MSH-4/5/6
prints the message the lab system received, byte for byte (carriage returns as line feeds)."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
from broker import free_port
from test_archive_mllp import Lis

from smearscope.cli import main
from smearscope.service.archive.hl7_out import oru_of
from smearscope.service.archive.store import canonical_destination, open_index
from smearscope.service.hl7.header import Addressing

REPO = Path(__file__).resolve().parents[1]
VERSION_1 = REPO / "tests" / "data" / "archive-v1"
FIRST, VERIFIED = "677c350e-5742-432a-94a7-0cb61535294e", "2954a7b8-d42e-4cfc-a7a8-8cb06e81ecb5"


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    return directory


def message(archive: Path, report_id: str, addressing: Addressing | None = None, whole_ids: bool = False) -> str:
    """The report's message; `whole_ids`: of a run delivered before the index's version 4 (store.whole_ids_run)."""
    return oru_of(next(archive.rglob(f"{report_id}.json")).read_bytes(), addressing,
                  (lambda _run: True) if whole_ids else None)[1]


def deliveries(archive: Path) -> list[tuple[str, str, str, str]]:
    db = sqlite3.connect(f"{(archive / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        return list(db.execute("SELECT report_id, destination, control_id, sender FROM hl7_deliveries "
                               "ORDER BY rowid"))
    finally:
        db.close()


def test_a_version_1_archive_is_sent_once_to_each_destination_unless_again(
        archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    lis = Lis(port)
    hl7_dir = tmp_path / "hl7"
    argv = ["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-mllp", f"127.0.0.1:{port}",
            "--hl7-dir", str(hl7_dir), "--hl7-receiving-application", "LIS", "--hl7-receiving-facility", "LAB"]
    lab = Addressing(receiving_application="LIS", receiving_facility="LAB")
    try:
        assert main(argv) == 0
        expected = [message(archive, FIRST, lab), message(archive, VERIFIED, lab)]  # oldest first: P, then F
        assert lis.received == expected
        assert [m.split("|")[4:6] for m in lis.received] == [["LIS", "LAB"]] * 2
        assert sorted(p.name for p in hl7_dir.iterdir()) == sorted([f"{FIRST}.hl7", f"{VERIFIED}.hl7"])
        assert (hl7_dir / f"{VERIFIED}.hl7").read_bytes() == expected[1].encode()
        rows = deliveries(archive)
        assert sorted((r[0], r[1], r[3]) for r in rows) == sorted(
            (report_id, where, "send-hl7") for report_id in (FIRST, VERIFIED)
            for where in (f"file:{hl7_dir.resolve()}", f"mllp:127.0.0.1:{port}"))
        assert "4 delivered" in capsys.readouterr().err

        for p in hl7_dir.iterdir():  # the engine took the files away: recorded, so not written again
            p.unlink()
        assert main(argv) == 0
        assert len(lis.received) == 2 and not any(hl7_dir.iterdir()) and len(deliveries(archive)) == 4
        assert "0 delivered, 4 already delivered there" in capsys.readouterr().err

        assert main([*argv[:2], "--since", "2026-11-30T00:55:00", *argv[3:], "--again"]) == 0
        assert lis.received[2:] == [expected[1]]  # the verified report alone, the same message again
        assert [p.name for p in hl7_dir.iterdir()] == [f"{VERIFIED}.hl7"]
        assert len(deliveries(archive)) == 6
    finally:
        lis.stop()


def test_a_send_the_lab_system_stops_goes_on_from_there(
        archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    argv = ["archive", "send-hl7", "--since", "2026-11-01", "--dir", str(archive), "--hl7-mllp", f"127.0.0.1:{port}"]
    assert main(argv) == 1  # nothing listening: stopped at the first, nothing recorded
    assert f"stopped: cannot deliver report {FIRST} to mllp:127.0.0.1:{port}" in capsys.readouterr().err
    assert deliveries(archive) == []
    lis = Lis(port, answers=("AA", "AE"))
    try:
        assert main(argv) == 1  # the first accepted, the second refused: the first recorded
        assert f"stopped: cannot deliver report {VERIFIED}" in capsys.readouterr().err
        assert [r[0] for r in deliveries(archive)] == [FIRST]
        assert main(argv) == 0
        assert lis.received == [message(archive, FIRST), message(archive, VERIFIED), message(archive, VERIFIED)]
        assert [r[0] for r in deliveries(archive)] == [FIRST, VERIFIED]
    finally:
        lis.stop()


def test_send_hl7_needs_a_destination_and_an_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["archive", "send-hl7", "--all", "--dir", str(tmp_path)]) == 2
    assert "send-hl7 needs --hl7-dir DIR and/or --hl7-mllp HOST:PORT" in capsys.readouterr().err
    assert main(["archive", "send-hl7", "--all", "--dir", str(tmp_path / "none"), "--hl7-dir",
                 str(tmp_path / "hl7")]) == 1
    assert "no archive at" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert not (tmp_path / "hl7").exists()  # refused before the HL7 folder is made


def test_send_hl7_to_no_archive_makes_no_hl7_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --dir beside an empty folder (no index in it) ends with the clear message, exit 1, and
    neither the --hl7-dir folder nor its parents are made."""
    empty = tmp_path / "empty"
    empty.mkdir()
    hl7_dir = tmp_path / "spool" / "hl7"
    assert main(["archive", "send-hl7", "--all", "--dir", str(empty), "--hl7-dir", str(hl7_dir)]) == 1
    assert f"no archive at {empty} (index.sqlite not there)" in capsys.readouterr().err
    assert not (tmp_path / "spool").exists() and list(empty.iterdir()) == []


def test_a_resend_of_a_report_the_archive_does_not_hold_changes_nothing(
        archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--resend` with a mistyped report id (beside one archived) is checked on the index first, writes
    refused: exit 1 naming it, no HL7 folder made, the version 1 index neither upgraded nor written (every
    file of the archive as it was, no SQLite -wal/-shm left beside it), nothing sent."""
    def files() -> dict[str, bytes]:
        return {str(p.relative_to(archive)): p.read_bytes() for p in sorted(archive.rglob("*")) if p.is_file()}

    before = files()
    hl7_dir = tmp_path / "spool" / "hl7"
    assert main(["archive", "send-hl7", "--resend", FIRST, "--resend", "no-such-report", "--dir", str(archive),
                 "--hl7-dir", str(hl7_dir)]) == 1
    said = capsys.readouterr().err
    assert not (tmp_path / "spool").exists()
    assert files() == before
    assert (f"--resend: no archived specimen report no-such-report in {archive} (`archive find` lists them): "
            "nothing sent, nothing changed") in said
    db = sqlite3.connect(f"{(archive / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        db.close()


def test_find_lists_the_hl7_deliveries_the_index_records(
        archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["archive", "find", "--dir", str(archive), "--json"]) == 0  # version 1, read as it is: none
    assert [json.loads(line)["hl7_deliveries"] for line in capsys.readouterr().out.splitlines()] == [[], []]
    port = free_port()
    lis = Lis(port)
    hl7_dir = tmp_path / "hl7"
    try:
        assert main(["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-dir", str(hl7_dir),
                     "--hl7-mllp", f"127.0.0.1:{port}"]) == 0
    finally:
        lis.stop()
    msh10 = {report_id: message(archive, report_id).split("\r")[0].split("|")[9] for report_id in (FIRST, VERIFIED)}
    destinations = [f"file:{hl7_dir.resolve()}", f"mllp:127.0.0.1:{port}"]
    capsys.readouterr()
    assert main(["archive", "find", "--dir", str(archive), "--json"]) == 0
    listed = {r["report_id"]: r["hl7_deliveries"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(listed) == {FIRST, VERIFIED}
    for report_id, made in listed.items():
        assert sorted((d["destination"], d["sender"], d["control_id"]) for d in made) == sorted(
            (where, "send-hl7", msh10[report_id]) for where in destinations)
        assert all(datetime.fromisoformat(d["delivered_at"]).year >= 2026 for d in made)
    assert main(["archive", "find", "--dir", str(archive), "--specimen", "nope"]) == 1  # filters still apply
    capsys.readouterr()
    assert main(["archive", "find", "--dir", str(archive)]) == 0
    blocks: dict[str, list[str]] = {}  # each report's line, then the indented lines under it
    for line in capsys.readouterr().out.splitlines():
        if not line.startswith(" "):
            report_id = next(r for r in (FIRST, VERIFIED) if r in line)
        blocks.setdefault(report_id, []).append(line)
    for report_id in (FIRST, VERIFIED):
        under = [line for line in blocks[report_id][1:] if line.startswith("    HL7 to ")]
        assert len(under) == 2
        for where, line in zip(destinations, sorted(under)):
            assert re.fullmatch(rf"    HL7 to {re.escape(where)}  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC  by send-hl7  "
                                rf"MSH-10 {re.escape(msh10[report_id])}  MSH-11 P", line)


def test_an_ipv6_destination_an_older_index_recorded_without_brackets_is_the_same_destination(
        archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    open_index(archive.resolve(), read_only=False).close()  # upgraded, as an older smearscope did to version 2
    db = sqlite3.connect(archive / "index.sqlite")
    with db:  # the first report sent by an older smearscope, which wrote the address without brackets
        db.execute("INSERT INTO hl7_deliveries (report_id, destination, control_id, delivered_at, sender) "
                   "VALUES (?, ?, ?, ?, ?)",
                   (FIRST, f"mllp:0:0:0:0:0:0:0:1:{port}", "OLD10", 1_796_000_000.0, "archive"))
    db.close()
    lis = Lis(port, host="::1")
    try:
        assert main(["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-mllp", f"[::1]:{port}"]) == 0
    finally:
        lis.stop()
    assert lis.received == [message(archive, VERIFIED)]  # the first was delivered there already
    assert "1 delivered, 1 already delivered there" in capsys.readouterr().err
    assert deliveries(archive) == [(FIRST, f"mllp:0:0:0:0:0:0:0:1:{port}", "OLD10", "archive"),  # kept as written
                                   (VERIFIED, f"mllp:[::1]:{port}", message(archive, VERIFIED).split("|")[9],
                                    "send-hl7")]
    assert main(["archive", "find", "--dir", str(archive), "--json"]) == 0
    listed = {r["report_id"]: [d["destination"] for d in r["hl7_deliveries"]]
              for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert listed == {FIRST: [f"mllp:[::1]:{port}"], VERIFIED: [f"mllp:[::1]:{port}"]}  # one destination


@pytest.mark.parametrize(("recorded", "canonical"), [
    ("mllp:fd00::5:2575", "mllp:[fd00::5]:2575"),
    ("mllp:[fd00::5]:2575", "mllp:[fd00::5]:2575"),
    ("mllp:FD00:0:0::5:2575", "mllp:[fd00::5]:2575"),
    ("mllp:[FD00:0::5]:2575", "mllp:[fd00::5]:2575"),
    ("mllp:lis.clinic.lan:2575", "mllp:lis.clinic.lan:2575"),
    ("mllp:10.0.0.5:2575", "mllp:10.0.0.5:2575"),
    ("file:/srv/hl7:in", "file:/srv/hl7:in"),
])
def test_destinations_compare_in_one_form(recorded: str, canonical: str) -> None:
    assert canonical_destination(recorded) == canonical


def test_show_hl7_prints_the_message_with_the_labs_addressing(
        archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    lis = Lis(port)
    lab = ["--hl7-sending-facility", "CLINIC^1.2.3.4^ISO", "--hl7-receiving-application", "LIS",
           "--hl7-receiving-facility", "LAB"]
    try:
        assert main(["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-mllp", f"127.0.0.1:{port}",
                     *lab]) == 0
    finally:
        lis.stop()
    capsys.readouterr()
    assert main(["archive", "show", FIRST, "--dir", str(archive), "--hl7", *lab]) == 0
    shown = capsys.readouterr().out
    assert shown == lis.received[0].replace("\r", "\n")
    assert shown.split("|")[3:6] == ["CLINIC^1.2.3.4^ISO", "LIS", "LAB"]
    assert main(["archive", "show", FIRST, "--dir", str(archive), "--hl7"]) == 0  # without: the defaults
    assert capsys.readouterr().out.split("|")[3:6] != ["CLINIC^1.2.3.4^ISO", "LIS", "LAB"]

    assert main(["archive", "show", FIRST, "--dir", str(archive), "--hl7", "--hl7-receiving-facility", "LAB|X"]) == 2
    assert "--hl7-receiving-facility:" in capsys.readouterr().err
    assert main(["archive", "show", FIRST, "--dir", str(archive), "--hl7-receiving-application", "LIS"]) == 2
    assert "are for show --hl7" in capsys.readouterr().err
