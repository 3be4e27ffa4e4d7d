"""MSH-11, the processing id (HL7 table 0103: P production, T training, D debugging), as the lab's
interface analyst sets it while validating the interface (`--hl7-processing-id`): a T message is a
valid v2.5.1 ORU^R01 (hl7apy, strict) with its own MSH-10, and the archive's index records each
delivery with it, so a report sent to a destination in training is still sent there in production
(on a real archive, with hl7apy's MLLP server as the lab system, and a real version 2 index; the
running archive against a real mosquitto)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pydantic
import pytest
from broker import MosquittoBroker, free_port, wait_until
from hl7apy.v2_5_1.tables import TABLES
from test_archive import SPECIMEN, Archive, Station, a_report, indexed
from test_archive_mllp import Lis
from test_archive_send_hl7 import FIRST, VERIFIED, VERSION_1, message
from test_fhir import specimen_report
from test_hl7 import parsed

from smearscope.cli import main
from smearscope.service.config.archive import Hl7OutputConfig
from smearscope.service.hl7.header import Addressing
from smearscope.service.hl7.oru import oru_r01


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    return directory


def msh(message: str) -> list[str]:
    return message.split("\r", 1)[0].split("|")


def recorded(archive: Path) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(f"{(archive / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        return list(db.execute("SELECT report_id, control_id, processing_id FROM hl7_deliveries ORDER BY rowid"))
    finally:
        db.close()


def test_a_training_message_is_valid_v2_5_1_with_msh_11_t_and_its_own_control_id() -> None:
    report = specimen_report()
    production, training, debugging = (oru_r01(report, Addressing(processing_id=p)) for p in ("P", "T", "D"))
    assert oru_r01(report) == production and msh(production)[10] == "P"
    for m, pid in ((training, "T"), (debugging, "D")):
        assert msh(m)[10] == pid and pid in TABLES["HL70103"][1]
        assert parsed(m).msh.msh_11.value == pid  # strict hl7apy parse and ORU_R01 validation
        assert msh(m)[9] != msh(production)[9]  # a lab system dropping seen MSH-10s still takes the P one
    assert len({msh(m)[9] for m in (production, training, debugging)}) == 3
    # the rest of the message is the production one's
    assert training.split("\r", 1)[1] == production.split("\r", 1)[1]


def test_a_processing_id_outside_table_0103_is_refused(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(pydantic.ValidationError, match="hl7_processing_id"):
        Hl7OutputConfig(hl7_processing_id="X")
    with pytest.raises(ValueError, match="table 0103"):
        Addressing(processing_id="Q")
    with pytest.raises(SystemExit) as exit_:
        main(["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-dir", str(archive / "h"),
              "--hl7-processing-id", "X"])
    assert exit_.value.code == 2 and "--hl7-processing-id" in capsys.readouterr().err
    assert main(["archive", "show", FIRST, "--dir", str(archive), "--hl7-processing-id", "T"]) == 2
    assert "are for show --hl7" in capsys.readouterr().err


def test_a_report_sent_in_training_is_sent_again_in_production_then_not_again(
        archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    lis = Lis(port)
    argv = ["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-mllp", f"127.0.0.1:{port}"]
    try:
        assert main([*argv, "--hl7-processing-id", "T"]) == 0
        assert lis.received == [message(archive, r, Addressing(processing_id="T")) for r in (FIRST, VERIFIED)]
        assert [msh(m)[10] for m in lis.received] == ["T", "T"]
        assert [(r, p) for r, _, p in recorded(archive)] == [(FIRST, "T"), (VERIFIED, "T")]
        assert "2 delivered, 0 already" in capsys.readouterr().err

        assert main([*argv, "--hl7-processing-id", "T"]) == 0  # in training again: delivered in training
        assert len(lis.received) == 2 and "0 delivered, 2 already" in capsys.readouterr().err

        assert main(argv) == 0  # production: the training deliveries do not count
        assert lis.received[2:] == [message(archive, r) for r in (FIRST, VERIFIED)]
        assert [msh(m)[10] for m in lis.received[2:]] == ["P", "P"]
        rows = recorded(archive)
        assert [(r, p) for r, _, p in rows] == [(FIRST, "T"), (VERIFIED, "T"), (FIRST, "P"), (VERIFIED, "P")]
        assert [c for _, c, _ in rows] == [msh(m)[9] for m in lis.received]
        assert "2 delivered, 0 already" in capsys.readouterr().err

        assert main(argv) == 0 and len(lis.received) == 4
        assert "0 delivered, 2 already" in capsys.readouterr().err
    finally:
        lis.stop()
    assert main(["archive", "find", "--dir", str(archive)]) == 0
    listed = [line.split("MSH-11 ")[1] for line in capsys.readouterr().out.splitlines() if "    HL7 to " in line]
    assert sorted(listed) == ["P", "P", "T", "T"]
    assert main(["archive", "show", FIRST, "--dir", str(archive), "--hl7", "--hl7-processing-id", "T"]) == 0
    assert capsys.readouterr().out == lis.received[0].replace("\r", "\n")


def test_a_version_2_index_is_upgraded_its_deliveries_production(
        archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    db = sqlite3.connect(archive / "index.sqlite")  # as a smearscope of index version 2 left it
    with db:
        db.execute("CREATE TABLE hl7_deliveries (report_id TEXT NOT NULL, destination TEXT NOT NULL, control_id "
                   "TEXT NOT NULL, delivered_at REAL NOT NULL, sender TEXT NOT NULL)")
        db.execute("CREATE INDEX hl7_deliveries_report ON hl7_deliveries (report_id, destination)")
        db.execute("INSERT INTO hl7_deliveries VALUES (?, ?, ?, ?, ?)",
                   (FIRST, f"mllp:127.0.0.1:{port}", "OLD10", 1_796_000_000.0, "archive"))
        db.execute("PRAGMA user_version = 2")
    db.close()
    assert main(["archive", "find", "--dir", str(archive), "--json"]) == 0  # read as it is, not upgraded
    listed = [d for line in capsys.readouterr().out.splitlines() for d in json.loads(line)["hl7_deliveries"]]
    assert [(d["control_id"], d["processing_id"]) for d in listed] == [("OLD10", "P")]
    lis = Lis(port)
    try:
        assert main(["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-mllp", f"127.0.0.1:{port}"]) == 0
        # the first was delivered there in production, before version 4: the run's messages go as it went
        assert lis.received == [message(archive, VERIFIED, whole_ids=True)]
        assert "1 delivered, 1 already" in capsys.readouterr().err
        assert [(r, p) for r, _, p in recorded(archive)] == [(FIRST, "P"), (VERIFIED, "P")]
    finally:
        lis.stop()


def test_a_version_1_index_an_upgrade_to_version_2_left_unnumbered_records_deliveries(
        archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a smearscope of index version 2 upgrading this version 1 index made its deliveries table, and
    # stopped (power cut) before it numbered the index 2: version 1, with version 2's table
    db = sqlite3.connect(archive / "index.sqlite")
    with db:
        db.execute("CREATE TABLE hl7_deliveries (report_id TEXT NOT NULL, destination TEXT NOT NULL, control_id "
                   "TEXT NOT NULL, delivered_at REAL NOT NULL, sender TEXT NOT NULL)")
        db.execute("CREATE INDEX hl7_deliveries_report ON hl7_deliveries (report_id, destination)")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()
    argv = ["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-dir", str(archive.parent / "hl7")]
    assert main(argv) == 0
    assert "2 delivered, 0 already" in capsys.readouterr().err
    assert [(r, p) for r, _, p in recorded(archive)] == [(FIRST, "P"), (VERIFIED, "P")]
    assert main(argv) == 0 and "0 delivered, 2 already" in capsys.readouterr().err


@pytest.mark.broker
def test_the_running_archive_sends_and_records_training_messages_then_production_ones(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    lis_port = free_port()
    archive = Archive(tmp_path, persistent_broker.port, tmp_path / "archive")
    archive.argv += ["--hl7-mllp", f"127.0.0.1:{lis_port}", "--hl7-processing-id", "T"]
    station = Station(tmp_path, persistent_broker.port)
    lis = Lis(lis_port)
    try:
        archive.start()
        report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
        station.publish(report)
        assert wait_until(lambda: indexed(tmp_path / "archive") == 1, 30), archive.text()
        assert lis.received == [oru_r01(report, Addressing(processing_id="T"))]
        assert "MSH-11 T" in archive.text() and "not as production" in archive.text()
        # the running archive sends only the reports it stores from then on: the warning names the command
        # that sends these in production (the next step of this test)
        warning = next(line for line in archive.text().splitlines() if "not as production" in line)
        assert "archive send-hl7" in warning and "without --hl7-processing-id" in warning
    finally:
        archive.stop()
        station.stop()
    try:
        assert [(r, p) for r, _, p in recorded(tmp_path / "archive")] == [(report.report_id, "T")]
        # the interface validated: the report the archive sent in training goes to the lab in production
        assert main(["archive", "send-hl7", "--all", "--dir", str(tmp_path / "archive"), "--hl7-mllp",
                     f"127.0.0.1:{lis_port}"]) == 0
        assert lis.received[1:] == [oru_r01(report)]
        assert [(r, p) for r, _, p in recorded(tmp_path / "archive")] == [(report.report_id, "T"),
                                                                         (report.report_id, "P")]
    finally:
        lis.stop()
