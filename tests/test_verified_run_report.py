"""A verification verify_run answered ok is never lost: the verified report is kept in the outbox
file before the answer (`answered_verifications`), and a start that finds it not stored stores it
under the answered id. Where the file refuses that write, the verification is refused.

The station is real (a child process SIGKILLed, its outbox file, publisher, mosquitto, a watched
folder); only the analysis is the oracle `PoolAnalyzer` of tests/test_daemon.py. Triggers in the
outbox file refuse a write, as a failing disk would."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import cv2
import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, wait_until
from station_child import refusing_outbox, station_child
from test_daemon import (
    BASE,
    envelopes,
    saw_offline,
    start_daemon,
    stop_daemon,
)
from test_started_runs import _command, _station

from smearscope.device.synthetic import render_field

pytestmark = [pytest.mark.broker, pytest.mark.faults]

# the station holds its outbox file locked while it runs: the triggers are made before it starts
_REFUSE_SIGNED = [f"CREATE TRIGGER refuse_{what} BEFORE {what} ON closed_runs "
                  "WHEN json_extract(NEW.report, '$.verification') IS NOT NULL "
                  "BEGIN SELECT RAISE(ABORT, 'test: the file refuses the signed report'); END"
                  for what in ("INSERT", "UPDATE")]
_REFUSE_KEEPING = ("CREATE TRIGGER refuse_keeping BEFORE INSERT ON answered_verifications "
                   "BEGIN SELECT RAISE(ABORT, 'test: the file refuses the verification'); END")


def _take_signed_reports_again(outbox_path: Path) -> None:
    """The file takes signed reports again (_REFUSE_SIGNED's triggers dropped), as a disk freed would."""
    with closing(sqlite3.connect(outbox_path)) as db:
        for what in ("INSERT", "UPDATE"):
            db.execute(f"DROP TRIGGER refuse_{what}")
        db.commit()


def _holds_with_nothing_waiting(outbox_path: Path, report_id: str) -> None:
    """The station's one closed run holds `report_id`, and no signature waits to be stored."""
    with closing(sqlite3.connect(outbox_path)) as db:
        (held,) = db.execute("SELECT json_extract(report, '$.report_id') FROM closed_runs").fetchone()
        assert held == report_id
        assert db.execute("SELECT COUNT(*) FROM answered_verifications").fetchone()[0] == 0


def _stopped_run(sub: Subscriber, inbox: Path, lines: list[str]) -> dict:
    """A run of one field, stopped, its report on the broker: the answer to stop_run."""
    assert _command(sub, "start_run", {"specimen_id": "H-2026-0412"})["ok"], lines[-20:]
    cv2.imwrite(str(inbox / "a.png"), render_field(60, width=320, height=240).frame.pixels)
    assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/field" for m in ms), 30), lines[-20:]
    stopped = _command(sub, "stop_run")
    assert stopped["ok"] and stopped["report_id"], stopped
    assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 30), lines[-20:]
    return stopped


def test_a_station_killed_between_the_verify_run_answer_and_the_store_sends_the_signed_report_under_the_answered_id(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """A run stopped and its report sent; the outbox file then refuses reports; verify_run answered
    ok; the writer's store refused; SIGKILL; the file takes writes again; the next start sends the
    signed report under the answered id, signed by the same technician at the time signed."""
    config, inbox = _station(tmp_path, broker)
    outbox_path = refusing_outbox(config, *_REFUSE_SIGNED)
    with station_child(tmp_path, broker, config) as station:
        sub, first = station.sub, station.first
        stopped = _stopped_run(sub, inbox, first.lines)
        verified = _command(sub, "verify_run", {"run_id": stopped["run_id"], "verified_by": "Dr A. Okafor"})
        assert verified["ok"] and verified["supersedes"] == stopped["report_id"], verified
        # the writer tried to store the signed report and the file refused it: the crash comes in between
        refused = f"outbox write of report report {verified['report_id']} failed"
        assert wait_until(lambda: any(refused in line for line in list(first.lines)), 15), first.lines[-20:]
        killed_at = time.time()
        station.kill()
        assert len(sub.on_topic(f"{BASE}/report")) == 1  # the stopped run's only
        _take_signed_reports_again(outbox_path)

        station.restart()
        assert sub.wait_for(lambda ms: sum(m.topic == f"{BASE}/report" for m in ms) >= 2, 30)
    signed = envelopes(sub, f"{BASE}/report")[1]
    assert signed["report_id"] == verified["report_id"], (signed["report_id"], verified["report_id"])
    body = signed["body"]
    assert body["report_id"] == verified["report_id"] and body["run_id"] == stopped["run_id"]
    assert body["verification"]["verified_by"] == "Dr A. Okafor"
    assert body["verification"]["supersedes"] == stopped["report_id"]
    assert body["verification"]["verified_at"] < killed_at  # the signature as made, not made again
    assert body["verification"]["left_to_review"] == verified["left_to_review"]
    assert body["specimen_id"] == "H-2026-0412" and body["fields_analyzed"] == 1
    _holds_with_nothing_waiting(outbox_path, verified["report_id"])  # the run holds the signed report


def test_a_verification_the_outbox_file_cannot_keep_is_refused_and_nothing_is_signed(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """The file refuses the verification's record (as a full disk would): verify_run answers
    verification_not_kept, no signed report goes out and the run keeps its report; once the file
    takes writes again (the station restarted), the same verification is answered ok and sent."""
    config, inbox = _station(tmp_path, broker)
    outbox_path = refusing_outbox(config, _REFUSE_KEEPING)
    sub = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/#"])
    with closing(sub):
        daemon, runner = start_daemon(config)
        try:
            sub.wait_ready()
            stopped = _stopped_run(sub, inbox, [])
            refused = _command(sub, "verify_run", {"run_id": stopped["run_id"], "verified_by": "AB"})
            assert not refused["ok"] and refused["error"] == "verification_not_kept", refused
            assert refused["message"] == (
                "the verification could not be kept in the station's outbox file (a full disk? see the station's log): "
                "nothing was signed; verify the run again once the station can write"), refused
            runs = _command(sub, "get_runs")["runs"]
            assert runs[0]["report"]["report_id"] == stopped["report_id"] and runs[0]["report"]["verification"] is None
        finally:
            stop_daemon(daemon, runner)
        assert saw_offline(sub)  # all the station delivered is here: no signed report followed the refusal
        assert len(sub.on_topic(f"{BASE}/report")) == 1
        with closing(sqlite3.connect(outbox_path)) as db:
            db.execute("DROP TRIGGER refuse_keeping")
            db.commit()
        daemon, runner = start_daemon(config)
        try:
            verified = _command(sub, "verify_run", {"run_id": stopped["run_id"], "verified_by": "AB"})
            assert verified["ok"] and verified["supersedes"] == stopped["report_id"], verified
            assert sub.wait_for(lambda ms: sum(m.topic == f"{BASE}/report" for m in ms) >= 2, 15)
        finally:
            stop_daemon(daemon, runner)
    reports = envelopes(sub, f"{BASE}/report")
    assert [r["report_id"] for r in reports] == [stopped["report_id"], verified["report_id"]]


def test_an_amendment_answered_before_the_first_signature_was_stored_is_stored_after_it_at_the_next_start(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """Two verifications of one run answered ok (a second technician amending the first signature)
    while the outbox file refuses signed reports; SIGKILL; the next start stores both under the ids
    answered, the amendment after the signature it supersedes. The start read what each run held
    once, before storing any: the amendment looked as if it followed another report than the run's,
    and was dropped with an ERROR saying a version that did not keep it had signed again."""
    config, inbox = _station(tmp_path, broker)
    outbox_path = refusing_outbox(config, *_REFUSE_SIGNED)
    with station_child(tmp_path, broker, config) as station:
        sub, first = station.sub, station.first
        stopped = _stopped_run(sub, inbox, first.lines)
        signed = _command(sub, "verify_run", {"run_id": stopped["run_id"], "verified_by": "AB"})
        assert signed["ok"] and signed["supersedes"] == stopped["report_id"], signed
        amended = _command(sub, "verify_run", {"run_id": stopped["run_id"], "verified_by": "CD"})
        assert amended["ok"] and amended["supersedes"] == signed["report_id"], amended
        refused = f"outbox write of report report {signed['report_id']} failed"
        assert wait_until(lambda: any(refused in line for line in list(first.lines)), 15), first.lines[-20:]
        station.kill()
        with closing(sqlite3.connect(outbox_path)) as db:
            assert db.execute("SELECT COUNT(*) FROM answered_verifications").fetchone()[0] == 2
        _take_signed_reports_again(outbox_path)

        station.restart()
        assert sub.wait_for(lambda ms: sum(m.topic == f"{BASE}/report" for m in ms) >= 3, 30), \
            [e["report_id"] for e in envelopes(sub, f"{BASE}/report")]
    reports = [e["body"] for e in envelopes(sub, f"{BASE}/report")]
    assert [r["report_id"] for r in reports] == [stopped["report_id"], signed["report_id"], amended["report_id"]]
    assert reports[2]["verification"]["verified_by"] == "CD"
    assert reports[2]["verification"]["supersedes"] == signed["report_id"]
    assert reports[2]["verification"]["supersedes_verified_by"] == "AB"
    _holds_with_nothing_waiting(outbox_path, amended["report_id"])  # the run holds the amendment


def test_an_amendment_of_a_signature_dropped_at_the_start_is_dropped_with_it_not_kept_for_ever(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """Two signatures wait in the outbox file for a run: one that follows another report than the
    run's (signed again by a version that did not keep it) and one amending it. The start drops
    both, as it says; the amendment was kept waiting for the one dropped, for ever (its run never
    pruned from the last closed runs)."""
    from smearscope.service.analysis.report import Report, Verification

    config, inbox = _station(tmp_path, broker)
    outbox_path = refusing_outbox(config)
    sub = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/#"])
    with closing(sub):
        daemon, runner = start_daemon(config)
        try:
            sub.wait_ready()
            stopped = _stopped_run(sub, inbox, [])
        finally:
            stop_daemon(daemon, runner)
        with closing(sqlite3.connect(outbox_path)) as db:
            (text,) = db.execute("SELECT report FROM closed_runs").fetchone()
            report = Report.model_validate_json(text)
            signed = [report.model_copy(update={"report_id": rid, "verification": Verification(
                verified_by=by, verified_at=time.time(), supersedes=follows, typed_cells=0, reclassified=[])})
                for rid, by, follows in (("v-1", "AB", "another-report"), ("v-2", "CD", "v-1"))]
            db.executemany("INSERT INTO answered_verifications VALUES (?, ?, ?, ?, ?, ?)",
                           [(r.report_id, r.run_id, r.verification.verified_by, r.verification.verified_at,
                             r.verification.supersedes, r.model_dump_json()) for r in signed])
            db.commit()
        daemon, runner = start_daemon(config)
        stop_daemon(daemon, runner)
        with closing(sqlite3.connect(outbox_path)) as db:
            assert db.execute("SELECT report_id FROM answered_verifications").fetchall() == []
            (held,) = db.execute("SELECT json_extract(report, '$.report_id') FROM closed_runs").fetchone()
            assert held == stopped["report_id"]
