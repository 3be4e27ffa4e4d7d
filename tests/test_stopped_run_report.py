"""The report id `stop_run` answers is the id its specimen report is stored and published under,
also when the station dies between the answer and the store (the report writer's thread stores
it after the answer): the id is kept with the run's end (`ending_runs`) before the answer, and
the start that closes the run stores its report under it.

The station is real (a child process SIGKILLed, its outbox file, publisher, mosquitto, a watched
folder); only the analysis is the oracle `PoolAnalyzer` of tests/test_daemon.py. The outbox file
refuses the report's store with a trigger (as a failing disk would), so the crash comes between
the answer and the store every time."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import cv2
import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, wait_until
from station_child import refusing_outbox, station_child
from test_daemon import BASE, envelopes, start_daemon, stop_daemon
from test_started_runs import _command, _station

from smearscope.device.synthetic import render_field

pytestmark = [pytest.mark.broker, pytest.mark.faults]

_REFUSE = ("CREATE TRIGGER refuse_reports BEFORE INSERT ON closed_runs "
           "BEGIN SELECT RAISE(ABORT, 'test: the file refuses the report'); END")


def test_a_station_killed_between_the_stop_run_answer_and_the_store_sends_the_report_under_the_answered_id(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """start_run, one field stored, stop_run answered with its report id while the outbox file
    refuses the report; SIGKILL; the file takes writes again; the next start closes the run as
    stopped and its report reaches the broker under the id the answer named."""
    config, inbox = _station(tmp_path, broker)
    outbox_path = refusing_outbox(config, _REFUSE)
    with station_child(tmp_path, broker, config) as station:
        sub, first = station.sub, station.first
        started = _command(sub, "start_run", {"specimen_id": "H-2026-0412"})
        assert started["ok"], (started, first.lines[-20:])
        cv2.imwrite(str(inbox / "a.png"), render_field(60, width=320, height=240).frame.pixels)
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/field" for m in ms), 30), first.lines[-20:]
        stopped = _command(sub, "stop_run")
        assert stopped["ok"] and stopped["fields"] == 1 and stopped["report_id"], stopped
        assert "message" not in stopped and stopped["kept"] is True  # its end (and report id) was kept
        # the writer tried to store the report and the file refused it: the crash comes in between
        refused = f"outbox write of report report {stopped['report_id']} failed"
        assert wait_until(lambda: any(refused in line for line in list(first.lines)), 15), first.lines[-20:]
        station.kill()
        assert not sub.on_topic(f"{BASE}/report")
        with closing(sqlite3.connect(outbox_path)) as db:
            assert db.execute("SELECT COUNT(*) FROM closed_runs").fetchone()[0] == 0
            db.execute("DROP TRIGGER refuse_reports")
            db.commit()

        station.restart()
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 30)
    (report,) = envelopes(sub, f"{BASE}/report")
    assert report["report_id"] == stopped["report_id"], (report["report_id"], stopped["report_id"])
    assert report["body"]["report_id"] == stopped["report_id"]
    assert report["body"]["run_id"] == started["run_id"] and report["body"]["end_reason"] == "stopped"
    assert report["body"]["fields_analyzed"] == 1 and report["body"]["specimen_id"] == "H-2026-0412"
    with closing(sqlite3.connect(outbox_path)) as db:  # the mark went with the stored report
        assert db.execute("SELECT COUNT(*) FROM ending_runs").fetchone()[0] == 0


def test_a_stop_whose_end_the_outbox_file_refuses_says_so_in_the_answer(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """The file refuses the run's end (as a full disk would): the answer still names the report's
    id, and says that the id holds only if the station does not stop before storing it; the
    report goes out under it all the same."""
    config, inbox = _station(tmp_path, broker, idle_timeout_s=300.0)  # the default
    refusing_outbox(config, "CREATE TRIGGER refuse_ends BEFORE INSERT ON ending_runs "
                            "BEGIN SELECT RAISE(ABORT, 'test: the file refuses the end'); END")
    sub = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/#"])
    daemon, runner = start_daemon(config)
    try:
        sub.wait_ready()
        assert _command(sub, "start_run")["ok"]
        cv2.imwrite(str(inbox / "a.png"), render_field(60, width=320, height=240).frame.pixels)
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/field" for m in ms), 30)
        stopped = _command(sub, "stop_run")
        assert stopped["ok"] and stopped["report_id"] and stopped["kept"] is False, stopped
        assert stopped["message"] == (
            "the run's end could not be kept in the outbox file (see the station's log): its report is sent under "
            f"{stopped['report_id']} unless the station stops before storing it; a start after that reports the run "
            "under another id"), stopped
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 15)
    finally:
        stop_daemon(daemon, runner)
        sub.close()
    (report,) = envelopes(sub, f"{BASE}/report")
    assert report["report_id"] == stopped["report_id"]


def test_a_stop_not_kept_before_the_hold_is_decided_says_both_apart(
    tmp_path: Path, credentials_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop answered before the station's first broker connection settled (mosquitto not started
    on its port: `held` null) whose end the outbox file refuses (a full disk: `kept` false) carries
    both messages in one; they were joined by a space, so the hold's message ran on into the disk's
    ('... otherwise it is sent the run's end could not be kept ...'). They read as two sentences."""
    from smearscope.service.station import commands

    monkeypatch.setattr(commands, "HOLD_DECISION_WAIT_S", 0.5)  # the broker never comes: not decided
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS)  # its ports picked, nothing listening
    config, inbox = _station(tmp_path, broker)
    refusing_outbox(config, "CREATE TRIGGER refuse_ends BEFORE INSERT ON ending_runs "
                            "BEGIN SELECT RAISE(ABORT, 'test: the file refuses the end'); END")
    daemon, runner = start_daemon(config)
    try:
        assert daemon.handle_command("start_run", {})["ok"]
        cv2.imwrite(str(inbox / "a.png"), render_field(60, width=320, height=240).frame.pixels)
        assert wait_until(lambda: (p := daemon.tracker.progress()) is not None and p.fields == 1, 30)
        stopped = dict(daemon.handle_command("stop_run", {}))
    finally:
        stop_daemon(daemon, runner)
    assert stopped["ok"] and stopped["held"] is None and stopped["kept"] is False, stopped
    hold, end = stopped["message"].split(". The run's end ")
    assert hold.startswith("the run's report is stored at the station; whether it is held there is not decided yet")
    assert hold.endswith("otherwise it is sent"), hold
    assert end.startswith("could not be kept in the outbox file (see the station's log)"), end
