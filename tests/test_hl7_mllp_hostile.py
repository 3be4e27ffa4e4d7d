"""The archive's MLLP sender against lab systems that misbehave, each a real TCP listener on a free
port: one that never answers, answers unframed, streams without end, acknowledges another message,
refuses it (AE/AR/CE/CR), closes or resets mid-ACK, or answers a byte at a time; a name that does
not resolve and a port nobody listens on. Each is NotAcknowledged (an OSError: the archive holds
the report); none holds the sender past its timeout, and a stopping archive is not held at all."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import MQTT_USERS, MosquittoBroker, free_port
from mllp_lis import CONTROL_ID, MESSAGE, Behaviour, RawLis, accept, ack, framed, silent
from test_archive import SPECIMEN, STATION, Station, a_report, envelope_of, indexed

from smearscope.cli import main
from smearscope.service.archive.daemon import ArchiveDaemon
from smearscope.service.archive.hl7_out import Hl7Output
from smearscope.service.archive.message import read_report
from smearscope.service.config.archive import ArchiveConfig
from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.hl7 import mllp
from smearscope.service.hl7.oru import control_id, oru_r01


def test_a_well_behaved_lis_delivers(lis: Callable[[Behaviour], RawLis]) -> None:
    server = lis(lambda conn, _: conn.sendall(framed(ack())))
    assert mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 5) == "AA"
    assert server.received == [framed(MESSAGE.encode())]


@pytest.mark.parametrize("answer, kind, said", [
    (framed(ack(control_id="R-another")), "not an ACK", "acknowledged message 'R-another', not this one"),
    (framed(ack("AE")), "AE", "answered 'AE', not accepted"),
    (framed(ack("AR")), "AR", "answered 'AR'"),
    (framed(ack("CE")), "CE", "answered 'CE'"),
    (framed(ack("CR")), "CR", "answered 'CR'"),
    (ack(), "not an ACK", "closed the connection without a whole ACK"),  # unframed, then closed
    (framed(ack())[:40], "not an ACK", "closed the connection without a whole ACK (40 bytes)"),  # closed mid-ACK
    (framed(b"MSH|^~\\&|LIS\rERR|oops\r"), "not an ACK", "the answer has no MSA segment"),
])
def test_an_answer_that_is_not_an_accepting_ack_of_this_message_is_not_acknowledged(
        lis: Callable[[Behaviour], RawLis], answer: bytes, kind: str, said: str) -> None:
    server = lis(lambda conn, _: conn.sendall(answer))
    with pytest.raises(mllp.NotAcknowledged, match=said.replace("(", r"\(").replace(")", r"\)")) as caught:
        mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 5)
    assert caught.value.kind == kind


def test_silence_an_unframed_ack_left_open_and_a_reset_are_not_acknowledged(
        lis: Callable[[Behaviour], RawLis]) -> None:
    quiet = lis(lambda conn, _: None)
    quiet.behaviour = silent(quiet)
    def unframed_ack(conn: socket.socket, _: bytes) -> None:  # the ACK with no MLLP frame, left open
        conn.sendall(ack())
        unframed.done.wait(60)

    unframed = lis(unframed_ack)

    def reset(conn: socket.socket, _: bytes) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST

    resetting = lis(reset)
    for server in (quiet, unframed):
        with pytest.raises(mllp.NotAcknowledged, match="TimeoutError") as caught:
            mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 0.5)
        assert caught.value.kind == "unreachable"
    with pytest.raises(mllp.NotAcknowledged, match="ConnectionResetError|without an answer"):
        mllp.send(("127.0.0.1", resetting.port), MESSAGE, CONTROL_ID, 5)


def test_an_endless_answer_is_read_only_up_to_the_bound(lis: Callable[[Behaviour], RawLis]) -> None:
    sent = [0]

    def flood(conn: socket.socket, _: bytes) -> None:
        block = b"x" * 65536
        while sent[0] < 64 * mllp.MAX_ACK_BYTES:
            conn.sendall(block)
            sent[0] += len(block)

    server = lis(flood)
    with pytest.raises(mllp.NotAcknowledged, match=f"more than {mllp.MAX_ACK_BYTES} bytes without ending") as caught:
        mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 30)
    assert caught.value.kind == mllp.TOO_BIG == "answer over 1 MiB"


def test_an_ack_dribbled_a_byte_at_a_time_cannot_hold_the_sender_past_its_timeout(
        lis: Callable[[Behaviour], RawLis]) -> None:
    """The timeout bounds the whole exchange: each byte comes well within it, the whole ACK (a byte
    every 50 ms, ~100 bytes) well after it."""
    def dribble(conn: socket.socket, _: bytes) -> None:
        for byte in framed(ack()):
            conn.sendall(bytes([byte]))
            time.sleep(0.05)

    server = lis(dribble)
    with pytest.raises(mllp.NotAcknowledged, match="TimeoutError"):
        mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 1)


def test_a_stop_ends_the_wait_for_a_silent_lis(lis: Callable[[Behaviour], RawLis]) -> None:
    server = lis(lambda conn, _: None)
    server.behaviour = silent(server)
    stop = threading.Event()
    outcome: list[BaseException] = []

    def sending() -> None:
        try:
            mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 300, stop)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=sending, daemon=True)
    thread.start()
    assert server.connected.wait(10)
    stop.set()
    thread.join(30)  # a guard against a hang, not a timing: without the stop it waits 300 s
    assert not thread.is_alive()
    assert isinstance(outcome[0], mllp.NotAcknowledged) and outcome[0].kind == "stopped"


def test_a_name_that_does_not_resolve_and_a_refused_port_are_unreachable() -> None:
    for address in (("no-such-lis.invalid", 2575), ("127.0.0.1", free_port())):
        with pytest.raises(mllp.NotAcknowledged) as caught:
            mllp.send(address, MESSAGE, CONTROL_ID, 5)
        assert caught.value.kind == "unreachable"
        assert ("gaierror" in str(caught.value)) or ("ConnectionRefusedError" in str(caught.value))



@pytest.mark.parametrize("host", ["lis..clinic.lan", "x" * 64 + ".clinic.lan", ".lis"])
def test_a_host_name_no_resolver_can_take_is_refused_at_start_and_unreachable_to_send(
        host: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty label (a typo's double dot) or one over 63 characters is no DNS name: Python's resolver call
    raises UnicodeError (a ValueError, not the OSError a report is held for), which ended the archive at
    its first specimen report, and again at each restart. The archive and send-hl7 refuse it (exit 2,
    nothing opened); send() says it unreachable."""
    with pytest.raises(mllp.NotAcknowledged) as caught:
        mllp.send((host, 2575), MESSAGE, CONTROL_ID, 5)
    assert caught.value.kind == "unreachable"
    argv = ["--dir", str(tmp_path / "a"), "--hl7-mllp", f"{host}:2575"]
    assert main(["archive", "send-hl7", "--all", *argv]) == 2
    assert "--hl7-mllp" in capsys.readouterr().err
    # the daemon in its own process (taken, it would run): the timeout guards against a hang, times nothing
    done = subprocess.run([sys.executable, "-m", "smearscope", "archive", "--broker", "mqtt://127.0.0.1:1", *argv],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--hl7-mllp" in done.stderr
    assert not (tmp_path / "a").exists()

@pytest.mark.broker
def test_a_stopping_archive_is_not_held_by_a_lis_that_never_answers(
        tmp_path: Path, lis: Callable[[Behaviour], RawLis],
        broker_with: Callable[..., MosquittoBroker]) -> None:
    """The archive (its storer in a thread, as `smearscope archive` runs it in its main one), a
    report published, the LIS accepting it and never answering within the archive's 300 s timeout:
    stop() (what SIGTERM calls) ends the run, the report unacknowledged and unindexed."""
    server = lis(lambda conn, _: None)
    server.behaviour = silent(server)
    broker = broker_with(persistence=True)
    station = Station(tmp_path, broker.port)
    config = ArchiveConfig(
        mqtt=MqttConfig(host="127.0.0.1", port=broker.port, username="observer"),
        directory=tmp_path / "archive", hl7_mllp=f"127.0.0.1:{server.port}", hl7_mllp_timeout_s=300)
    daemon = ArchiveDaemon(config, MQTT_USERS["observer"])
    runner = threading.Thread(target=daemon.run, daemon=True)
    try:
        runner.start()
        assert station.publish_until("run-1", 1_796_000_000.0, server.connected)
        daemon.stop()
        runner.join(60)  # a guard against a hang, not a timing: without the stop it waits 300 s
        assert not runner.is_alive()
        assert indexed(tmp_path / "archive") == 0 and daemon.counts["stored"] == 0
    finally:
        daemon.stop()
        station.stop()


def test_a_report_held_for_the_lis_is_not_written_again_to_the_folder_meanwhile(
        tmp_path: Path, lis: Callable[[Behaviour], RawLis]) -> None:
    """With --hl7-dir and --hl7-mllp, the LIS refusing (AE) holds the report after its file was
    written; the engine takes the file; each try again sends to the LIS alone, the file not written
    a second time; once accepted, both deliveries are returned for the index."""
    answers = ["AE", "AE"]

    def lab(conn: socket.socket, data: bytes) -> None:
        msh10 = data.split(b"\r", 1)[0].split(b"|")[9].decode()
        conn.sendall(framed(ack(answers.pop(0) if answers else "AA", msh10)))

    server = lis(lab)
    drop = tmp_path / "hl7"
    output = Hl7Output(drop, ("127.0.0.1", server.port), 5)
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    message = read_report(STATION, envelope_of(report))
    written = drop / f"{report.report_id}.hl7"
    with pytest.raises(mllp.NotAcknowledged, match="'AE'"):
        output(message)
    assert written.read_bytes().decode() == oru_r01(report)
    written.unlink()  # the engine took it
    with pytest.raises(mllp.NotAcknowledged, match="'AE'"):
        output(message)
    assert not written.exists()
    deliveries = output(message)
    assert not written.exists() and len(server.received) == 3
    assert [d.destination for d in deliveries] == output.destinations
    assert {d.control_id for d in deliveries} == {control_id(report.report_id)}
    # another report is written as before
    second = a_report("run-2", SPECIMEN, 1_796_000_100.0)
    assert len(output(read_report(STATION, envelope_of(second)))) == 2
    assert (drop / f"{second.report_id}.hl7").is_file()


def test_the_log_names_reports_not_their_messages(tmp_path: Path, lis: Callable[[Behaviour], RawLis],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A delivery is logged at INFO by report id, path and MSH-10; a LIS that echoes the message back
    instead of an ACK is said with the answer's start alone (MSH): no PID, OBX or specimen id."""
    accepting, echoing = lis(accept), lis(lambda conn, data: conn.sendall(data))
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    message = read_report(STATION, envelope_of(report))
    caplog.set_level("DEBUG")
    assert len(Hl7Output(tmp_path / "hl7", ("127.0.0.1", accepting.port), 5)(message)) == 2
    with pytest.raises(mllp.NotAcknowledged) as caught:
        Hl7Output(None, ("127.0.0.1", echoing.port), 5)(message)
    said = [r.getMessage() for r in caplog.records] + [str(caught.value)]
    assert "the answer has no MSA segment, not an ACK: 'MSH|" in said[-1]
    assert any(report.report_id in line for line in said)
    for line in said:
        assert "PID|" not in line and "OBX|" not in line and SPECIMEN not in line, line


def test_a_stop_ends_a_connection_the_lis_never_completes() -> None:
    """A listener whose accept queue is full (backlog 0, one connection waiting, never accepted)
    drops the SYN: the connection hangs until the 300 s timeout, unless the stop ends it."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    stop = threading.Event()
    outcome: list[BaseException] = []

    def sending() -> None:
        try:
            mllp.send(("127.0.0.1", port), MESSAGE, CONTROL_ID, 300, stop)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=sending, daemon=True)
    try:
        thread.start()
        thread.join(0.5)  # let it reach the connection (either way, the stop must end it)
        stop.set()
        thread.join(30)  # a guard against a hang, not a timing: without the stop it waits 300 s
        assert not thread.is_alive()
        assert isinstance(outcome[0], mllp.NotAcknowledged) and outcome[0].kind == "stopped"
    finally:
        filler.close()
        listener.close()


def test_the_lab_systems_text_reaches_the_journal_escaped(
        tmp_path: Path, lis: Callable[[Behaviour], RawLis], caplog: pytest.LogCaptureFixture,
        broker_with: Callable[..., MosquittoBroker]) -> None:
    """A LIS answering AE with a line break, an ESC sequence (a terminal's clear screen), a
    right-to-left override and a line separator in MSA-3: the archive's ERROR line shows them as
    \\xNN / \\uNNNN on one line (they were written as received, a forged line and terminal control
    in the journal), and the report is stored once the LIS accepts it."""
    answers = ["AE"]

    def lab(conn: socket.socket, data: bytes) -> None:
        msh10 = data.split(b"\r", 1)[0].split(b"|")[9].decode()
        code = answers.pop(0) if answers else "AA"
        why = "mapping\x1b[2J missing \u202eevil\u2028ERROR forged\nERROR another forged line" if code == "AE" else ""
        conn.sendall(framed(f"MSH|^~\\&|LIS|LAB|smearscope|lab-7|20261130091500||ACK^R01^ACK|A1|P|2.5.1\r"
                            f"MSA|{code}|{msh10}|{why}\r".encode()))

    server = lis(lab)
    broker = broker_with(persistence=True)
    station = Station(tmp_path, broker.port)
    config = ArchiveConfig(
        mqtt=MqttConfig(host="127.0.0.1", port=broker.port, username="observer"),
        directory=tmp_path / "archive", hl7_mllp=f"127.0.0.1:{server.port}", hl7_mllp_timeout_s=5, retry_s=1)
    daemon = ArchiveDaemon(config, MQTT_USERS["observer"])
    runner = threading.Thread(target=daemon.run, daemon=True)
    caplog.set_level("INFO")
    try:
        runner.start()
        station.publish_until("run-1", 1_796_000_000.0, server.connected)
        deadline = time.monotonic() + 60  # a guard against a hang: the retry comes after retry_s
        while indexed(tmp_path / "archive") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert indexed(tmp_path / "archive") >= 1, caplog.text
    finally:
        daemon.stop()
        runner.join(60)
        station.stop()
    refused = [r.getMessage() for r in caplog.records if "'AE'" in r.getMessage()]
    assert refused and all(r.levelname == "ERROR" for r in caplog.records if "'AE'" in r.getMessage()), caplog.text
    for line in refused:
        assert "not accepted (AA or CA): mapping\\x1b[2J missing \\u202eevil\\u2028ERROR forged" in line, line
        assert line.splitlines() == [line] and not any(ch in line for ch in "\x1b\u202e\u2028\n\r"), repr(line)
    assert not any("another forged line" in r.getMessage() for r in caplog.records)
