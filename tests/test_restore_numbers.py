"""Run numbers: each run gets the next number of its station as it opens (service.station.durable),
carried in its run state (`progress.run_seq`), so a start on a state restored from a backup tells
the broker's run of a station that went on after the backup by its number, not by its start time
(service.mqtt.run_order): a clock set back by hand between the two no longer hides it. A real
mosquitto; the restored state's publisher as tests/test_restore_held.py makes it, and a whole
station (in-process daemon, watched folder, outbox file) for the numbers themselves."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from broker import (
    MQTT_USERS,
    MosquittoBroker,
    Subscriber,
    retained_run_state,
    run_state,
    wait_until,
)
from test_restore_held import BASE, STATION, _retain, _sent_holding_nothing, _state_message
from test_started_runs import _command, _station

from smearscope.service.config import load_config
from smearscope.service.station.daemon import StationDaemon

pytestmark = [pytest.mark.broker, pytest.mark.faults]


def _numbered_state(run_id: str, fields: int, state: str, started_at: float, run_seq: int | None) -> bytes:
    """A run state of a run the station's state does not hold: begun at `started_at`, numbered `run_seq`
    (None: a version without run numbers, the key absent)."""
    body = json.loads(_state_message(run_id, fields, state).payload)
    body["progress"]["started_at"] = started_at
    if run_seq is not None:
        body["progress"]["run_seq"] = run_seq
    return json.dumps(body).encode()


def _restored(config: Any, began: float) -> Any:
    """The restored state's publisher: runs r-0 (number 4, 10 fields, closed) and r-1 (number 5, 3 fields,
    left open, closed at this start), begun at `began - 500` and `began`; r-1's 3-field report and closed
    run state in its outbox."""
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.mqtt.publisher import MqttPublisher

    publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox))
    publisher.run_watch.known({"r-0": 10, "r-1": 3}, closed_now=("r-1",), starts={"r-0": began - 500, "r-1": began},
                              numbers={"r-0": 4, "r-1": 5})
    publisher.publish_many([("report", "rep-3", json.dumps({"run_id": "r-1", "fields_analyzed": 3}).encode(), "1")],
                           extra=[_state_message("r-1", 3, "closed")])
    return publisher


@pytest.mark.parametrize("number", [6, 5], ids=["above-every-number", "a-number-the-state-gave-another-run"])
def test_a_later_run_begun_under_a_clock_set_back_is_told_by_its_number_and_holds_the_run_left_open(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[Any], caplog: pytest.LogCaptureFixture,
    number: int,
) -> None:
    """The broker keeps run r-9 of the station that went on after the backup, begun (by its clock, set
    back by hand since) 15 min before r-1, the run the restored state left open. Its number, 6 (after
    the state's 5) or 5 (the number the restored station gave its own r-1: the station that went on gave
    it first), says it is the later run: r-1's report and run state are held, said at ERROR naming the
    run numbers. Told by start times, as before run numbers, r-9 looked older and r-1 went out."""
    from test_publisher import make_config

    observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/report"])
    began = time.time() - 3600
    try:
        observer.wait_ready()
        _retain(broker, _numbered_state("r-9", 4, "closed", began - 900, number))
        with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.run_watch"):
            publisher = _restored(make_config(tmp_path, broker.port), began)
            started.append(publisher)
            publisher.start()
            assert wait_until(lambda: publisher.state.parked == 2, 10), (publisher.state, caplog.text)
        assert publisher.run_watch.held == {"r-1": ("closed", 4, 3)} and publisher.run_watch.held_after == {"r-1": "r-9"}
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(said) == 1, caplog.text
        assert f"run r-9 is run number {number} of this station" in said[0] and "told by run numbers" in said[0], said
        assert ("after every run this station's state numbered (the latest, r-1, is number 5" if number == 6 else
                "a number this station's state gave its own run r-1") in said[0], said
        assert "the runs it left open (r-1) were closed there and reported" in said[0], said
        assert not observer.on_topic(f"{BASE}/report"), "r-1's 3-field report went out"
    finally:
        observer.close()


@pytest.mark.parametrize("run_seq", [None, 3], ids=["state-without-a-number", "a-lower-number"])
def test_an_unknown_run_that_is_not_the_later_one_holds_nothing_told_by_start_times_or_its_number(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[Any], caplog: pytest.LogCaptureFixture,
    run_seq: int | None,
) -> None:
    """A run state without a number (a version before run numbers) is ordered by start times as before:
    r-9 began before r-1, an older state the broker kept, nothing held, the WARNING saying 'told by start
    times' and that a clock set back may hide a later run. One numbered 3, below the state's 5, is older
    by its number whatever its start time (here 15 min after r-1): nothing held, no word of the clock."""
    from test_publisher import make_config

    observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/report"])
    began = time.time() - 3600
    try:
        observer.wait_ready()
        _retain(broker, _numbered_state("r-9", 4, "closed", began + (900 if run_seq else -900), run_seq))
        with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.run_watch"):
            publisher = _restored(make_config(tmp_path, broker.port), began)
            said = _sent_holding_nothing(publisher, observer, caplog, started)
        if run_seq is None:
            assert "run r-9 began at " in said and "before run r-1 of this station's state" in said, said
            assert "told by start times" in said and "clock set back" in said, said
        else:
            assert "run r-9 is run number 3 of this station, before run r-1 of this station's state (number 5; " \
                   "told by run numbers)" in said, said
            assert "clock set back" not in said, said
    finally:
        observer.close()


def _start_run(sub: Subscriber) -> tuple[str, int]:
    """start_run, then stop_run: the run's id and the number its retained run state carries."""
    started = _command(sub, "start_run", {"specimen_id": "H-1"})
    assert started["ok"], started
    assert _command(sub, "stop_run")["ok"]
    assert sub.wait_for(lambda ms: any(run_state(m)["run_id"] == started["run_id"] and run_state(m)["state"] == "closed"
                                       for m in ms if m.topic == f"{BASE}/run"), 15)
    state = [run_state(m) for m in sub.on_topic(f"{BASE}/run") if run_state(m)["run_id"] == started["run_id"]][-1]
    return started["run_id"], state["progress"]["run_seq"]


def _daemon(config: Path) -> tuple[StationDaemon, Any]:
    from test_daemon import start_daemon

    return start_daemon(config)


def test_runs_are_numbered_across_restarts_and_a_restored_backup_goes_on_from_its_own_number(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A whole station numbers its runs 1, 2 in their run states (open and closed), 3 after a restart (kept in the outbox file, never given again). Its outbox file restored from a
    backup taken after run 1, the start says the broker's run 3 is later, told by run numbers, and the
    restored station's next run is number 2 again: the backup's counter goes on."""
    from test_daemon import stop_daemon

    config, _ = _station(tmp_path, broker)
    outbox = Path(load_config(config).mqtt.outbox.path)
    backup = tmp_path / "backup"
    sub = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/#"])
    try:
        sub.wait_ready()
        daemon, runner = _daemon(config)
        first = _start_run(sub)
        assert first[1] == 1
        opened = [run_state(m) for m in sub.on_topic(f"{BASE}/run") if run_state(m)["run_id"] == first[0]]
        assert opened[0]["state"] == "open" and opened[0]["progress"]["run_seq"] == 1, opened[0]
        stop_daemon(daemon, runner)
        backup.mkdir()
        for f in outbox.parent.glob(outbox.name + "*"):
            shutil.copy2(f, backup / f.name)

        daemon, runner = _daemon(config)
        assert _start_run(sub)[1] == 2
        stop_daemon(daemon, runner)
        daemon, runner = _daemon(config)
        third = _start_run(sub)
        assert third[1] == 3
        stop_daemon(daemon, runner)
        assert (retained_run_state(broker.port, BASE) or {}).get("progress", {}).get("run_seq") == 3

        for f in outbox.parent.glob(outbox.name + "*"):
            f.unlink()
        for f in backup.iterdir():
            shutil.copy2(f, outbox.parent / f.name)
        with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.run_watch"):
            daemon, runner = _daemon(config)
            assert wait_until(lambda: any("the broker holds run" in r.getMessage() for r in caplog.records), 30)
        said = [r.getMessage() for r in caplog.records if "the broker holds run" in r.getMessage()]
        assert f"run {third[0]} is run number 3 of this station, after every run this station's state numbered " \
               f"(the latest, {first[0]}, is number 1; told by run numbers)" in said[0], said
        assert _start_run(sub)[1] == 2
        stop_daemon(daemon, runner)
    finally:
        sub.close()


def test_a_run_taken_back_keeps_its_number_and_the_highest_number_outlives_the_numbers_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real outbox file: a run start_run opened keeps its number when a later start reads it back
    (open, and once ended without a field); with 2 numbers kept, the third run's number drops the
    first, and the next is 4 after the file is opened again (the highest is never deleted)."""
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.station import durable
    from smearscope.service.station.durable import StationState
    from smearscope.service.station.specimen import SpecimenPolicy, SpecimenTracker

    monkeypatch.setattr(durable, "KEEP_RUN_NUMBERS", 2)
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    state, tracker = StationState(outbox), SpecimenTracker(SpecimenPolicy())
    tracker.number_run = state.number_run
    first = tracker.start(specimen_id="H-1")
    state.run_started(tracker.open_run())
    outbox.close()

    outbox = Outbox(path)
    state = StationState(outbox)
    [taken] = state.open_runs()
    assert (taken.run_id, taken.run_seq) == (first, 1)
    tracker = SpecimenTracker(SpecimenPolicy())
    tracker.number_run = state.number_run
    assert tracker.resume_one([taken]) == [] and tracker.progress().as_dict()["run_seq"] == 1
    closed = tracker.stop()
    assert closed is not None and closed.progress()["run_seq"] == 1
    state.run_ended_without_fields(closed)
    assert [r.run_seq for r in state.runs_without_fields()[0]] == [1]
    for _ in range(2):
        tracker.start()
        tracker.stop()
    assert sorted(state.run_numbers().values()) == [2, 3]
    outbox.close()

    outbox = Outbox(path)
    state = StationState(outbox)
    assert state.number_run("next") == 4
    outbox.close()
