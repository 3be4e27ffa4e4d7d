"""Answers that are errors of the MLLP exchange hold a report for at most `--hl7-mllp-error-hold`, as
AE/CE do: an answer over 1 MiB (garbage that never ends its frame), and one that is no ACK of this
message, are then recorded as not accepted with that reason and the reports behind them go on. The
running archive's storer (ArchiveStore with its Hl7Output, a real SQLite index) against a real MLLP
listener (tests/mllp_lis.py)."""

from __future__ import annotations

import itertools
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from mllp_lis import RawLis, accept, framed
from test_archive import SPECIMEN, STATION, a_report, envelope_of

from smearscope.cli import main
from smearscope.service.archive.hl7_out import Hl7Output
from smearscope.service.archive.message import read_report
from smearscope.service.archive.store import ArchiveStore
from smearscope.service.hl7 import mllp


def storer(directory: Path, port: int, error_hold_s: float, timeout_s: float = 5.0) -> ArchiveStore:
    """The running archive's storer: its index, an HL7 output to the listener at `port` consulting it."""
    output = Hl7Output(None, ("127.0.0.1", port), timeout_s, error_hold_s=error_hold_s)
    store = ArchiveStore(directory, on_new_report=output)
    output.use_index(store)
    return store


def rows(directory: Path, query: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"{(directory / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        return list(db.execute(query))
    finally:
        db.close()


def flood(conn: socket.socket, _: bytes) -> None:
    """Answers 2 MiB of garbage with no MLLP end block, then closes (the sender stops reading first)."""
    block = b"<html>" + b"x" * 65530
    for _ in range(32):
        conn.sendall(block)


def not_an_ack(conn: socket.socket, _: bytes) -> None:
    conn.sendall(framed(b"HTTP/1.1 400 Bad Request\r\n\r\n"))


@pytest.mark.parametrize("behaviour, reason, text", [
    (flood, "answer over 1 MiB", "<html>xxx"),
    (not_an_ack, "not an ACK", "HTTP/1.1 400 Bad Request"),
    (lambda conn, data: conn.sendall(data), "not an ACK", "MSH|^~\\&|smearscope|lab-7|"),  # echoes the message
])
def test_an_answer_that_is_no_ack_is_given_up_on_after_the_error_hold_and_the_next_report_goes(
        tmp_path: Path, lis: Callable[..., RawLis], capsys: pytest.CaptureFixture[str],
        behaviour: Callable[[socket.socket, bytes], None], reason: str, text: str) -> None:
    first, other = a_report("run-1", SPECIMEN, 1_796_000_000.0), a_report("run-2", "H-2026-0413", 1_796_000_100.0)
    lab = lis(behaviour)
    message = read_report(STATION, envelope_of(first))  # as the broker delivers it again, the same bytes
    directory = tmp_path / "archive"
    store = storer(directory, lab.port, error_hold_s=600)
    try:  # within the hold: held (not stored), the time it has been held kept in the index
        with pytest.raises(mllp.NotAcknowledged, match=reason):
            store.put_report(message)
        assert rows(directory, "SELECT report_id FROM reports") == []
        assert [r[0] for r in rows(directory, "SELECT report_id FROM hl7_error_holds")] == [first.report_id]
    finally:
        store.close()

    store = storer(directory, lab.port, error_hold_s=0)  # the hold over: given up on at the next such answer
    try:
        assert store.put_report(message).new
        lab.behaviour = accept
        assert store.put_report(read_report(STATION, envelope_of(other))).new
    finally:
        store.close()
    where = f"mllp:127.0.0.1:{lab.port}"
    recorded = rows(directory, "SELECT report_id, destination, code, lis_text FROM hl7_rejections")
    assert [r[:3] for r in recorded] == [(first.report_id, where, reason)]
    kept = str(recorded[0][3])  # the answer's first line: of an echo, its MSH (no specimen id, no result)
    assert kept.startswith(text) and len(kept) <= mllp.MAX_ANSWER_TEXT and SPECIMEN not in kept
    assert rows(directory, "SELECT report_id FROM hl7_deliveries") == [(other.report_id,)]
    assert rows(directory, "SELECT count(*) FROM hl7_error_holds") == [(0,)]
    assert len(lab.received) == 3
    capsys.readouterr()
    assert main(["archive", "find", "--not-accepted", "--dir", str(directory)]) == 0
    assert f"HL7 NOT accepted by {where}" in (out := capsys.readouterr().out) and f"MSH-11 P  {reason}: {text}" in out


def test_the_time_the_lab_system_cannot_be_reached_between_two_errors_does_not_count_toward_the_hold(
        tmp_path: Path, lis: Callable[..., RawLis]) -> None:
    """AE, then a listener that does not answer for longer than the whole hold (1 s here: the exchange's
    1.5 s timeout), then AE again: the outage is not counted (the report is still held, its time held
    kept below the hold), and what is kept goes on over a restart."""
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    message = read_report(STATION, envelope_of(report))
    answers = ["AE", "silent", "AE", "AE"]

    def lab_system(conn: socket.socket, data: bytes) -> None:
        if answers.pop(0) == "silent":  # connected, never answering, until the sender gives up and closes
            while conn.recv(65536):
                pass
        else:
            msh10 = data.split(b"\r", 1)[0].split(b"|")[9].decode()
            conn.sendall(framed(f"MSH|^~\\&|LIS|LAB|smearscope|lab-7|20261130091500||ACK^R01^ACK|A1|P|2.5.1\r"
                                f"MSA|AE|{msh10}|record locked\r".encode()))

    lab = lis(lab_system)
    directory = tmp_path / "archive"
    store = storer(directory, lab.port, error_hold_s=1, timeout_s=1.5)
    try:
        for kind in ("AE", "unreachable", "AE"):
            with pytest.raises(mllp.NotAcknowledged) as caught:
                store.put_report(message)
            assert caught.value.kind == kind
    finally:
        store.close()
    (held,), = rows(directory, "SELECT held_s FROM hl7_error_holds")
    assert 0 <= float(held) < 1  # not the 1.5 s the listener was silent
    assert rows(directory, "SELECT count(*) FROM hl7_rejections") == [(0,)]

    store = storer(directory, lab.port, error_hold_s=float(held))  # restarted: the time kept is the whole hold
    try:
        assert store.put_report(message).new
    finally:
        store.close()
    assert [r[0] for r in rows(directory, "SELECT code FROM hl7_rejections")] == ["AE"]
    assert len(lab.received) == 4


def test_a_lab_system_that_answers_ae_between_outages_is_given_up_on_in_the_end(
        tmp_path: Path, lis: Callable[..., RawLis]) -> None:
    """AE, the connection closed with nothing said (the lab system not answering), AE, ...: each AE after
    an outage counts the time from the try that found no answer to it (one retry's wait), so the time held
    grows with every AE and the hold ends; it stayed 0 while the outages came between every two AEs, and
    the report, and every one behind it, was held for ever."""
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    message = read_report(STATION, envelope_of(report))
    answers = ["AE", "closed"] * 3 + ["AE"]

    def lab_system(conn: socket.socket, data: bytes) -> None:
        if answers.pop(0) == "AE":
            msh10 = data.split(b"\r", 1)[0].split(b"|")[9].decode()
            conn.sendall(framed(f"MSH|^~\\&|LIS|LAB|smearscope|lab-7|20261130091500||ACK^R01^ACK|A1|P|2.5.1\r"
                                f"MSA|AE|{msh10}|record locked\r".encode()))

    lab = lis(lab_system)
    directory = tmp_path / "archive"
    store = storer(directory, lab.port, error_hold_s=3600)
    held: list[float] = []
    try:
        for kind in ["AE", "no-ack"] * 3 + ["AE"]:
            with pytest.raises(mllp.NotAcknowledged) as caught:
                store.put_report(message)
            assert caught.value.kind == kind
            if kind == "AE":
                held += [float(rows(directory, "SELECT held_s FROM hl7_error_holds")[0][0])]
    finally:
        store.close()
    assert held[0] == 0 and all(later > before for before, later in itertools.pairwise(held))
    assert rows(directory, "SELECT count(*) FROM hl7_rejections") == [(0,)]

    lab.behaviour = lambda conn, data: lab_system(conn, data) if answers.append("AE") is None else None
    store = storer(directory, lab.port, error_hold_s=held[-1])  # restarted: what was held is the whole hold
    try:
        assert store.put_report(message).new
    finally:
        store.close()
    assert [r[0] for r in rows(directory, "SELECT code FROM hl7_rejections")] == ["AE"]
