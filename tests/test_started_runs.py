"""A run start_run opened, before any field of it is stored: kept in the outbox file at once
(`started_runs`), so a station restarted in between (a crash, a power cut) takes it back with its
specimen id within its idle timeout, or closes it and says so; the row goes when the run ends.

Each station is real (threads, outbox file, publisher, mosquitto, a watched folder); only the
analysis is the oracle `PoolAnalyzer` of tests/test_daemon.py."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import cv2
import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, retained_run_state, wait_until
from station_child import station_child
from test_daemon import BASE, envelopes, start_daemon, stop_daemon, write_station

from smearscope.device.synthetic import render_field
from smearscope.service.config import load_config
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.station.daemon import StationDaemon
from smearscope.service.station.durable import StationState
from smearscope.service.station.specimen import SpecimenRun

pytestmark = pytest.mark.broker

SPECIMEN = "H-2026-0412"


def _station(tmp_path: Path, broker: MosquittoBroker, idle_timeout_s: float = 600.0) -> tuple[Path, Path]:
    """A watched-folder station (auto_start on, the default) and its folder."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.0,
              "microns_per_pixel": 0.2}
    config = write_station(tmp_path, broker.port, source=source,
                           specimen={"target_wbc_count": 1000, "idle_timeout_s": idle_timeout_s})
    return config, inbox


def _started_rows(config: Path, daemon: StationDaemon | None = None) -> list[tuple[Any, ...]]:
    """The file's started_runs rows: through the running `daemon`'s outbox (which holds the file
    locked), else from the file."""
    query = "SELECT run_id, started_by, target_wbc, specimen_id FROM started_runs"
    if daemon is not None:
        assert daemon.workers.state is not None
        return daemon.workers.state.outbox.read(lambda conn: conn.execute(query).fetchall())
    with closing(sqlite3.connect(load_config(config).mqtt.outbox.path)) as db:
        return db.execute(query).fetchall()


def _command(sub: Subscriber, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """The answer to a command, asked until the station listens (one asked before it subscribed is lost)."""
    topic = f"{BASE}/cmd_response/{name}"
    before = len(sub.on_topic(topic))
    for _ in range(15):
        sub.client.publish(f"{BASE}/cmd/{name}", json.dumps(arguments or {}), qos=1)
        if sub.wait_for(lambda ms: sum(m.topic == topic for m in ms) > before, 2):
            return json.loads(sub.on_topic(topic)[before].payload)
    raise AssertionError(f"no answer to {name}")


@contextlib.contextmanager
def _observed_station(
    config: Path, broker: MosquittoBroker,
) -> Iterator[tuple[Subscriber, StationDaemon, Callable[[], None]]]:
    """An observer on the station's topics, then the station started on a thread, for the block;
    the station stopped (unless the block's stop() did) and the observer closed after it."""
    sub = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/#"])
    running: list[tuple[StationDaemon, threading.Thread]] = []

    def stop() -> None:
        if running:
            stop_daemon(*running.pop())

    try:
        sub.wait_ready()
        running.append(start_daemon(config))
        yield sub, running[0][0], stop
    finally:
        stop()
        sub.close()


def _field(inbox: Path, name: str, seed: int) -> None:
    cv2.imwrite(str(inbox / name), render_field(seed, width=320, height=240).frame.pixels)


@pytest.mark.faults
def test_a_run_started_for_a_specimen_survives_a_power_cut_before_its_first_field(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """start_run {"specimen_id": ...} on a watched-folder station, SIGKILL before the scanner's
    first file: the restarted station takes the run back, the next field joins it (not an
    automatic run of its own) and the run's report names the specimen and keeps its target."""
    config, inbox = _station(tmp_path, broker)
    with station_child(tmp_path, broker, config) as station:
        sub, first = station.sub, station.first
        started = _command(sub, "start_run", {"specimen_id": SPECIMEN, "target_wbc": 500})
        assert started["ok"] and started["specimen_id"] == SPECIMEN, (started, first.lines[-20:])
        # said open with no field at once: every dashboard sees the run started
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/run" and json.loads(m.payload)["run_id"] == started["run_id"]
                                           for m in ms), 15)
        station.kill()  # the power goes before the first file
        assert _started_rows(config) == [(started["run_id"], "command", 500, SPECIMEN)]

        daemon = station.restart()
        # commands are answered from the connection on; the run left open is taken back just after
        assert wait_until(lambda: "analysis" in daemon.workers.threads, 30)
        status = _command(sub, "status")
        assert status["run"]["run_id"] == started["run_id"] and status["run"]["specimen_id"] == SPECIMEN, status
        _field(inbox, "a.png", 60)
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/field" for m in ms), 30)
        field = envelopes(sub, f"{BASE}/field")[0]["body"]
        assert field["run_id"] == started["run_id"]
        assert _started_rows(config, daemon) == []  # its first field's row says the same from now on
        # its state goes out once its field is stored (service.station.live_state)
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/run" for m in ms), 15)
        states = [json.loads(m.payload) for m in sub.on_topic(f"{BASE}/run")]
        assert states and states[-1]["progress"]["specimen_id"] == SPECIMEN and states[-1]["state"] == "open"
        stopped = _command(sub, "stop_run")
        assert stopped["ok"] and stopped["run_id"] == started["run_id"] and stopped["fields"] == 1, stopped
        assert stopped["target_wbc"] == 500
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 15)
    (report,) = [e["body"] for e in envelopes(sub, f"{BASE}/report")]
    assert report["run_id"] == started["run_id"] and report["specimen_id"] == SPECIMEN
    assert report["fields_analyzed"] == 1 and report["end_reason"] == "stopped"
    # open with no field at start_run and again when the restart takes it back, then as its fields come
    mine = [json.loads(m.payload) for m in sub.on_topic(f"{BASE}/run")]
    # (the state the first process stored may go out again from the outbox after the cut)
    said = [(s["state"], s["progress"]["fields"], s["report"] is None) for s in mine if s["run_id"] == started["run_id"]]
    assert [x for k, x in enumerate(said) if k == 0 or said[k - 1] != x] == [
        ("open", 0, True), ("open", 1, False), ("closed", 1, False)], said
    assert _started_rows(config) == []


def test_a_run_started_before_a_restart_past_its_idle_timeout_is_closed_and_said(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The run start_run left in the file (no field of it stored) began longer ago than the idle
    timeout: the start closes it, says so at WARNING naming its specimen, publishes its state closed
    with no field (the previous process said it open) but no report, and get_runs does not list it;
    the next field starts a run of its own."""
    config, inbox = _station(tmp_path, broker, idle_timeout_s=60.0)
    outbox_path = load_config(config).mqtt.outbox.path
    outbox_path.parent.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(outbox_path)
    old = SpecimenRun(target_wbc=500, started_at=time.time() - 120.0, started_by="command", specimen_id=SPECIMEN)
    StationState(outbox).run_started(old)  # what the previous process wrote at start_run
    outbox.close()
    caplog.set_level(logging.INFO)
    with _observed_station(config, broker) as (sub, daemon, _):
        assert wait_until(lambda: "analysis" in daemon.workers.threads, 30)
        assert _command(sub, "status")["run"] is None
        said = [r for r in caplog.records if r.levelno == logging.WARNING and old.run_id in r.getMessage()]
        assert len(said) == 1 and SPECIMEN in said[0].getMessage() and "no report" in said[0].getMessage()
        assert _started_rows(config, daemon) == []
        _field(inbox, "a.png", 60)
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/field" for m in ms), 30)
        field = envelopes(sub, f"{BASE}/field")[0]["body"]
        assert field["run_id"] not in (None, old.run_id)
        stopped = _command(sub, "stop_run")
        assert stopped["ok"] and stopped["run_id"] == field["run_id"] and stopped["fields"] == 1, stopped
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 15)
        runs = _command(sub, "get_runs")
    (report,) = [e["body"] for e in envelopes(sub, f"{BASE}/report")]
    assert report["run_id"] == field["run_id"] and report["specimen_id"] is None
    # its state, closed with no field (the previous process had said it open), and no report
    assert [(s["state"], s["end_reason"], s["progress"]["fields"], s["progress"]["specimen_id"], s["report"])
            for s in map(json.loads, (m.payload for m in sub.on_topic(f"{BASE}/run"))) if s["run_id"] == old.run_id
            ] == [("closed", "restart", 0, SPECIMEN, None)]
    assert [r["run_id"] for r in runs["runs"]] == [field["run_id"]]


def test_a_run_ended_before_any_field_leaves_no_row(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """start_run keeps the run in the file at once; stop_run before any field (answered as
    documented: no fields, no report) and a clean stop of the station before any field both take
    it out, so the next start neither takes back nor closes anything."""
    config, _ = _station(tmp_path, broker)
    caplog.set_level(logging.INFO)
    with _observed_station(config, broker) as (sub, daemon, stop):
        started = _command(sub, "start_run", {"specimen_id": SPECIMEN, "target_wbc": 200})
        assert _started_rows(config, daemon) == [(started["run_id"], "command", 200, SPECIMEN)]
        stopped = _command(sub, "stop_run")
        assert stopped == {"ok": True, "run_id": started["run_id"], "fields": 0, "classified_wbc": 0,
                           "target_wbc": 200, "complete": False, "report_id": None}
        assert _started_rows(config, daemon) == []
        again = _command(sub, "start_run", {"specimen_id": "H-2"})
        assert [row[0] for row in _started_rows(config, daemon)] == [again["run_id"]]
        stop()
    assert _started_rows(config) == []
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and again["run_id"] in r.getMessage()]
    assert len(said) == 1 and "H-2" in said[0] and "stop" in said[0]
    outbox = Outbox(load_config(config).mqtt.outbox.path)
    try:
        assert StationState(outbox).open_runs() == []
    finally:
        outbox.close()
    assert not any(m.topic == f"{BASE}/report" for m in sub.messages)
    # each said open at its start and closed with no field at its end
    assert _run_states(sub.messages, started["run_id"]) == [("open", None, 0, SPECIMEN, None),
                                                            ("closed", "stopped", 0, SPECIMEN, None)]
    assert _run_states(sub.messages, again["run_id"]) == [("open", None, 0, "H-2", None),
                                                          ("closed", "shutdown", 0, "H-2", None)]


def test_a_run_left_without_a_field_past_its_idle_timeout_says_so_to_the_dashboards(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """start_run and no field until the idle timeout: the run ends (idle_timeout) and its closed
    state, with no field, is what the broker keeps, and no report goes out."""
    config, _ = _station(tmp_path, broker, idle_timeout_s=1.0)
    with _observed_station(config, broker) as (sub, _, _):
        started = _command(sub, "start_run", {"specimen_id": SPECIMEN})
        assert sub.wait_for(lambda ms: len(_run_states(ms, started["run_id"])) == 2, 30)
        assert _command(sub, "status")["run"] is None
    assert _run_states(sub.messages, started["run_id"]) == [("open", None, 0, SPECIMEN, None),
                                                            ("closed", "idle_timeout", 0, SPECIMEN, None)]
    assert _retained_run_state(broker)["run_id"] == started["run_id"]
    assert not any(m.topic == f"{BASE}/report" for m in sub.messages)


def test_an_outbox_file_from_before_started_runs_gets_the_table_on_open(tmp_path: Path) -> None:
    """A file an earlier version wrote (no started_runs table) opens with it; the run kept there
    comes back as a run with no field, with its start, target and specimen id."""
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    StationState(outbox)
    outbox.write(lambda conn: conn.execute("DROP TABLE started_runs"))
    outbox.close()
    outbox = Outbox(path)
    try:
        run = SpecimenRun(target_wbc=300, started_at=1_700_000_000.0, started_by="command", specimen_id=SPECIMEN)
        StationState(outbox).run_started(run)
        (back,) = StationState(outbox).open_runs()
        assert (back.run_id, back.started_at, back.started_by, back.target_wbc, back.specimen_id) == (
            run.run_id, run.started_at, "command", 300, SPECIMEN)
        assert back.field_ids == [] and back.last_activity == run.started_at and back.models == {}
    finally:
        outbox.close()


def test_a_start_on_a_full_disk_is_said_and_the_run_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On a real full file system the run's start cannot be kept: said at WARNING (a restart
    before its first field loses it), never raised into start_run; kept again once room returns."""
    from smallfs import fill, small_tmpfs

    caplog.set_level(logging.WARNING)
    with small_tmpfs(tmp_path / "small", 256) as small, Outbox(small / "outbox.sqlite3") as outbox:
        state = StationState(outbox)
        filler = fill(small)
        refused = None
        for k in range(2000):  # the file's free pages take some rows first
            run = SpecimenRun(target_wbc=100, started_at=float(k), started_by="command", specimen_id="S" * 64)
            state.run_started(run)
            if any(run.run_id in r.getMessage() and "could not be kept" in r.getMessage() for r in caplog.records):
                refused = run
                break
        assert refused is not None and outbox.disk_full
        rows = outbox.read(lambda conn: [r[0] for r in conn.execute("SELECT run_id FROM started_runs")])
        assert refused.run_id not in rows
        filler.unlink()
        later = SpecimenRun(target_wbc=100, started_at=1e6, started_by="command", specimen_id="H-3")
        state.run_started(later)
        assert later.run_id in outbox.read(lambda conn: [r[0] for r in conn.execute("SELECT run_id FROM started_runs")])


def _run_states(messages: list[Any], run_id: str) -> list[tuple[Any, ...]]:
    return [(s["state"], s["end_reason"], s["progress"]["fields"], s["progress"]["specimen_id"], s["report"])
            for s in (json.loads(m.payload) for m in messages if m.topic == f"{BASE}/run") if s["run_id"] == run_id]


def _retained_run_state(broker: MosquittoBroker) -> dict[str, Any]:
    """What a dashboard opened now gets on the run topic: the broker's retained state."""
    state = retained_run_state(broker.port, BASE)
    assert state is not None
    return state


def test_a_run_stopped_before_any_field_is_the_retained_run_state_and_the_next_start_holds_it(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """start_run, then stop_run before any field (after a run with a field): the station says the
    run open (no field, `report` null), then closed (stopped, no field); the broker keeps that state
    retained, no longer the run before's. No report or FHIR bundle names the run and get_runs does
    not list it (nothing to show or sign). The next start takes that state for its own (no
    older-state ERROR) and publishes it again as the station's last."""
    config, inbox = _station(tmp_path, broker)
    caplog.set_level(logging.INFO)
    with _observed_station(config, broker) as (sub, daemon, stop):
        _field(inbox, "a.png", 60)
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/field" for m in ms), 30)
        first = _command(sub, "stop_run")
        assert first["ok"] and first["fields"] == 1
        assert sub.wait_for(lambda ms: ("closed", "stopped") in [s[:2] for s in _run_states(ms, first["run_id"])], 15)
        started = _command(sub, "start_run", {"specimen_id": SPECIMEN, "target_wbc": 200})
        assert started["ok"], started
        assert sub.wait_for(lambda ms: _run_states(ms, started["run_id"]) != [], 15)
        stopped = _command(sub, "stop_run")
        assert stopped["ok"] and stopped["fields"] == 0 and stopped["report_id"] is None, stopped
        assert sub.wait_for(lambda ms: len(_run_states(ms, started["run_id"])) == 2, 15)
        runs = _command(sub, "get_runs")
        stop()
    assert _run_states(sub.messages, started["run_id"]) == [("open", None, 0, SPECIMEN, None),
                                                   ("closed", "stopped", 0, SPECIMEN, None)]
    retained = _retained_run_state(broker)
    assert (retained["run_id"], retained["state"], retained["progress"]["fields"]) == (started["run_id"], "closed", 0)
    assert [m.topic for m in sub.messages if started["run_id"].encode() in m.payload
            and m.topic != f"{BASE}/run" and not m.topic.startswith(f"{BASE}/cmd_response/")] == []
    assert [e["body"]["run_id"] for e in envelopes(sub, f"{BASE}/report")] == [first["run_id"]]
    assert [r["run_id"] for r in runs["runs"]] == [first["run_id"]]

    caplog.clear()
    with _observed_station(config, broker) as (sub, daemon, _):
        assert wait_until(lambda: daemon.publisher is not None, 30)
        assert daemon.publisher is not None
        watch = daemon.publisher.run_watch
        assert wait_until(lambda: not watch.listening, 30)  # the broker's retained state compared
        # sent again at the start: the run without a field is the station's last
        assert sub.wait_for(lambda ms: sum(not m.retain for m in ms if m.topic == f"{BASE}/run") > 0, 15)
    assert watch.newer is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    again = [json.loads(m.payload) for m in sub.on_topic(f"{BASE}/run") if not m.retain]
    assert [(s["run_id"], s["state"], s["end_reason"], s["progress"]["fields"]) for s in again] == [
        (started["run_id"], "closed", "stopped", 0)]
    assert _retained_run_state(broker)["run_id"] == started["run_id"]
