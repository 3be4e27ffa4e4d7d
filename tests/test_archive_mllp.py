"""`smearscope archive --hl7-mllp HOST:PORT` against a real mosquitto, the station's own publisher,
and hl7apy's MLLP server as the lab system: each specimen report goes there as an ORU^R01 message
and is acknowledged to the broker only once the receiver answers AA; with no receiver, or one that
answers AE, the report is held (not indexed, not acknowledged) and sent again until it is accepted;
a report delivered again once stored is not sent again."""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import MosquittoBroker, free_port, wait_until
from hl7apy.mllp import AbstractHandler, MLLPServer
from test_archive import (
    SPECIMEN,
    STATION,
    Archive,
    Station,
    a_report,
    envelope_of,
    indexed,
    raw_client,
)
from test_hl7 import parsed

from smearscope.cli import main
from smearscope.service.hl7.header import Addressing
from smearscope.service.hl7.oru import control_id, oru_r01

pytestmark = pytest.mark.broker


class Lis:
    """hl7apy's MLLP server on a port: validates what it receives, records it, and answers each
    message with the ACK codes given in turn (then AA)."""

    def __init__(self, port: int, answers: tuple[str, ...] = (), host: str = "127.0.0.1") -> None:
        self.received: list[str] = []
        self.answers = list(answers)
        self.on_receive: Callable[[], None] | None = None  # called with each message, before the ACK
        lis = self

        class Oru(AbstractHandler):
            def reply(self) -> str:
                message = self.incoming_message
                parsed(message)  # strict v2.5.1 ORU_R01, as test_hl7 validates
                lis.received.append(message)
                if lis.on_receive is not None:
                    lis.on_receive()
                code = lis.answers.pop(0) if lis.answers else "AA"
                msh10 = message.split("\r", 1)[0].split("|")[9]
                ack = (f"MSH|^~\\&|LIS|LAB|smearscope|lab-7|20261130091500||ACK^R01^ACK|A{msh10[:19]}|P|2.5.1\r"
                       f"MSA|{code}|{msh10}|{'mapping missing' if code != 'AA' else ''}\r")
                return "\x0b" + ack + "\x1c\r"

        server = type("Server", (MLLPServer,), {"address_family": socket.AF_INET6}) if ":" in host else MLLPServer
        self.server = server(host, port, {"ORU^R01^ORU_R01": (Oru,)}, timeout=10)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def mllp_archive(tmp_path: Path, port: int, lis_port: int) -> Archive:
    archive = Archive(tmp_path, port, tmp_path / "archive")
    archive.argv += ["--hl7-mllp", f"127.0.0.1:{lis_port}"]
    return archive


def _deliveries(directory: Path, columns: str = "destination") -> list[tuple[object, ...]]:
    """The archive's recorded HL7 deliveries (`columns` of hl7_deliveries, in the order recorded),
    read from its index opened read-only."""
    db = sqlite3.connect(f"{(directory / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        return list(db.execute(f"SELECT {columns} FROM hl7_deliveries ORDER BY rowid"))
    finally:
        db.close()


def test_a_report_is_acknowledged_only_once_the_lab_system_accepted_it(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    lis_port = free_port()
    archive = mllp_archive(tmp_path, persistent_broker.port, lis_port)
    # as the lab's interface set it up: MSH-4/5/6 in every message the archive sends
    archive.argv += ["--hl7-sending-facility", "LAB7^2.16.840.1.113883.19.4.6^ISO", "--hl7-receiving-application",
                     "LIS", "--hl7-receiving-facility", "MAINLAB"]
    lab = Addressing("LAB7^2.16.840.1.113883.19.4.6^ISO", "LIS", "MAINLAB")
    station = Station(tmp_path, persistent_broker.port)
    lis: Lis | None = None
    try:
        archive.start()
        first = a_report("run-1", SPECIMEN, 1_796_000_000.0)
        station.publish(first)  # no receiver listening yet
        assert wait_until(lambda: "NOT acknowledged" in archive.text(), 30), archive.text()
        assert f"no ACK from 127.0.0.1:{lis_port}" in archive.text()
        assert indexed(tmp_path / "archive") == 0
        lis = Lis(lis_port, answers=("AE",))  # up, but its first answer refuses the message
        assert wait_until(lambda: indexed(tmp_path / "archive") == 1, 60), archive.text()
        assert "answered 'AE', not accepted (AA or CA): mapping missing" in archive.text()
        assert lis.received == [oru_r01(first, lab)] * 2  # refused, then sent again the same
        assert lis.received[0].split("|")[3:6] == ["LAB7^2.16.840.1.113883.19.4.6^ISO", "LIS", "MAINLAB"]
        assert "HL7 MSH-4 LAB7^2.16.840.1.113883.19.4.6^ISO, MSH-5 LIS, MSH-6 MAINLAB" in archive.text()
        assert "storing again" in archive.text()

        verified = a_report("run-1", SPECIMEN, 1_796_000_200.0, supersedes=first.report_id)
        station.publish(verified)
        assert wait_until(lambda: indexed(tmp_path / "archive") == 2, 30), archive.text()
        assert lis.received[-1] == oru_r01(verified, lab) and len(lis.received) == 3
        assert parsed(lis.received[-1]).msh.msh_10.value == control_id(verified.report_id)

        with raw_client(persistent_broker.port) as client:  # delivered again once stored: not sent again
            client.publish(f"smearscope/{STATION}/report", envelope_of(first), qos=1).wait_for_publish(10)
        assert wait_until(lambda: "was archived already" in archive.text(), 30), archive.text()
        assert len(lis.received) == 3

        # the archive recorded its deliveries in the index: sent from it, nothing goes a second time
        assert _deliveries(tmp_path / "archive", "report_id, destination, control_id, sender") == [
            (r.report_id, f"mllp:127.0.0.1:{lis_port}", control_id(r.report_id), "archive")
            for r in (first, verified)]
        assert main(["archive", "send-hl7", "--all", "--dir", str(tmp_path / "archive"), "--hl7-mllp",
                     f"127.0.0.1:{lis_port}"]) == 0
        assert len(lis.received) == 3
    finally:
        archive.stop()
        station.stop()
        if lis is not None:
            lis.stop()


def test_an_ipv6_lab_system_is_named_in_brackets_in_the_log_and_the_index(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    lis_port = free_port()
    archive = Archive(tmp_path, persistent_broker.port, tmp_path / "archive")
    archive.argv += ["--hl7-mllp", f"[::1]:{lis_port}"]
    station = Station(tmp_path, persistent_broker.port)
    lis = Lis(lis_port, host="::1")
    try:
        archive.start()
        report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
        station.publish(report)
        assert wait_until(lambda: indexed(tmp_path / "archive") == 1, 30), archive.text()
        assert lis.received == [oru_r01(report)]
        assert f"over MLLP to [::1]:{lis_port}, acknowledged" in archive.text()
        assert f"::1:{lis_port}" not in archive.text().replace(f"[::1]:{lis_port}", "")  # never unbracketed
        assert _deliveries(tmp_path / "archive") == [(f"mllp:[::1]:{lis_port}",)]
    finally:
        archive.stop()
        station.stop()
        lis.stop()


def test_a_report_held_for_the_lab_system_survives_a_killed_archive(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    lis_port = free_port()
    archive = mllp_archive(tmp_path, persistent_broker.port, lis_port)
    station = Station(tmp_path, persistent_broker.port)
    lis: Lis | None = None
    try:
        archive.start()
        report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
        station.publish(report)
        assert wait_until(lambda: "NOT acknowledged" in archive.text(), 30), archive.text()
        archive.kill()  # had it acknowledged before the lab system had it, the report would be lost now
        lis = Lis(lis_port)
        archive.start()
        assert wait_until(lambda: indexed(tmp_path / "archive") == 1, 30), archive.text()
        assert lis.received == [oru_r01(report)]
    finally:
        archive.stop()
        station.stop()
        if lis is not None:
            lis.stop()


def test_a_message_the_lab_system_had_when_the_archive_was_killed_comes_again_with_the_same_msh_10(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    """At least once: the LIS takes the message and the archive is killed before it has the ACK (as
    after the ACK and before the index row); the next start sends it again, byte for byte, so the
    LIS recognises it by MSH-10; then it is indexed once and not sent a third time."""
    lis_port = free_port()
    archive = mllp_archive(tmp_path, persistent_broker.port, lis_port)
    station = Station(tmp_path, persistent_broker.port)
    lis = Lis(lis_port)
    lis.on_receive = archive.kill
    try:
        archive.start()
        report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
        station.publish(report)
        assert wait_until(lambda: len(lis.received) == 1 and archive.proc is not None
                          and archive.proc.poll() is not None, 30), archive.text()
        assert indexed(tmp_path / "archive") == 0
        lis.on_receive = None
        archive.start()
        assert wait_until(lambda: indexed(tmp_path / "archive") == 1, 30), archive.text()
        assert lis.received == [oru_r01(report)] * 2
        assert {parsed(m).msh.msh_10.value for m in lis.received} == {control_id(report.report_id)}
        archive.stop()
        archive.start()  # the broker has nothing more for it: nothing sent again
        assert len(lis.received) == 2 and indexed(tmp_path / "archive") == 1
    finally:
        archive.stop()
        station.stop()
        lis.stop()


def test_a_report_whose_index_row_waits_is_not_delivered_again_at_each_try(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    """The lab system accepted the message and the file was written, but the index is locked (another
    writer's transaction): the row cannot be committed, the report is held and tried again. The try
    again neither sends the message to the lab system a second time nor writes the file the engine took."""
    lis_port, hl7_dir = free_port(), tmp_path / "to-lis"
    archive = mllp_archive(tmp_path, persistent_broker.port, lis_port)
    archive.argv += ["--hl7-dir", str(hl7_dir)]
    lis = Lis(lis_port)
    station = Station(tmp_path, persistent_broker.port)
    try:
        archive.start()
        index = sqlite3.connect(tmp_path / "archive" / "index.sqlite", isolation_level=None)
        try:
            index.execute("BEGIN IMMEDIATE")  # another writer's transaction, held
            report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
            station.publish(report)
            assert wait_until(lambda: "database is locked" in archive.text(), 60), archive.text()
            assert lis.received == [oru_r01(report)]
            (hl7_dir / f"{report.report_id}.hl7").unlink()  # the engine took the file
        finally:
            index.execute("ROLLBACK")
            index.close()
        assert wait_until(lambda: indexed(tmp_path / "archive") == 1, 60), archive.text()
        assert lis.received == [oru_r01(report)]  # not sent again
        assert list(hl7_dir.iterdir()) == []  # not written again
        assert sorted(d for (d,) in _deliveries(tmp_path / "archive")) == [  # both recorded with the row
            f"file:{hl7_dir.resolve()}", f"mllp:127.0.0.1:{lis_port}"]
    finally:
        archive.stop()
        station.stop()
        lis.stop()


@pytest.mark.parametrize(("answer", "accepted"), [
    ("MSA|CA|{id}", "CA"),                      # commit accept (enhanced mode): the receiver has it
    ("MSA|AA|SOMEONE-ELSES-ID", None),         # an ACK of another message
    ("MSA|AR|{id}|bad structure", None),       # rejected
    ("no ACK at all", None),                   # an answer without MSA
    (None, None),                              # the connection closed without an answer
])
def test_send_takes_only_an_accepting_ack_of_this_very_message(answer: str | None, accepted: str | None) -> None:
    from smearscope.service.hl7.mllp import NotAcknowledged, send

    class Answer(AbstractHandler):
        def reply(self) -> str:
            if answer is None:
                raise RuntimeError("hang up")  # hl7apy's server closes the connection
            msh10 = self.incoming_message.split("\r", 1)[0].split("|")[9]
            return "\x0b" + "MSH|^~\\&|LIS|LAB|||20261130091500||ACK|1|P|2.5.1\r" + answer.format(id=msh10) + "\r\x1c\r"

    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    port = free_port()
    server = MLLPServer("127.0.0.1", port, {"ORU^R01^ORU_R01": (Answer,)}, timeout=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        if accepted is not None:
            assert send(("127.0.0.1", port), oru_r01(report), control_id(report.report_id), 5) == accepted
        else:
            with pytest.raises(NotAcknowledged):
                send(("127.0.0.1", port), oru_r01(report), control_id(report.report_id), 5)
    finally:
        server.shutdown()
        server.server_close()
