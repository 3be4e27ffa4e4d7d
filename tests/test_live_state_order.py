"""The retained run state never runs ahead of the station's stored state: a run state counting N
fields reaches the outbox (and so the broker) after the N-th field message of its run, and a
closed run's state after its specimen report. Before, the analysis thread stored the run state
at once and the outbox writer the field behind it: a crash between the two left the broker
counting a field the restarted station does not hold, which its start took for a state restored
from an older backup (service.mqtt.run_watch: ERROR 'the state is older than what this station
id published')."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from broker import Subscriber, wait_until
from test_daemon import BASE, classified_wbc_per_field, pool_factory, write_station

from smearscope.service.config import load_config
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.station.daemon import StationDaemon
from smearscope.service.station.durable import StationState


@pytest.mark.broker
def test_a_run_state_reaches_the_broker_after_the_fields_and_report_it_counts(
    tmp_path: Path, broker: Any, credentials_dir: Path,
) -> None:
    observer = Subscriber(broker.port, "observer", "observer-secret", [f"{BASE}/#"])
    observer.wait_ready()
    per_field = classified_wbc_per_field()
    source = {"kind": "simulated", "fields": 500, "fps": 8.0, "width": 480, "height": 360, "seed": 0}
    config = write_station(tmp_path, broker.port, target_wbc=per_field[0] + per_field[1] + per_field[2],
                           source=source)
    daemon = StationDaemon(load_config(config), analyzer_factory=pool_factory(), config_path=config)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/run" and json.loads(m.payload)["state"] == "closed"
                                                for m in ms), 30)
    finally:
        daemon.request_stop("test over")
        runner.join(30)
        observer.close()
    assert not runner.is_alive()

    messages = list(observer.messages)
    first = next(json.loads(m.payload) for m in messages if m.topic == f"{BASE}/run")
    run_id = first["run_id"]
    fields_before, report_before, states = 0, False, []
    for m in messages:
        body = json.loads(m.payload) if m.topic in (f"{BASE}/field", f"{BASE}/report", f"{BASE}/run") else None
        if body is None:
            continue
        if m.topic == f"{BASE}/field" and body["body"]["run_id"] == run_id:
            fields_before += 1
        elif m.topic == f"{BASE}/report" and body["body"]["run_id"] == run_id:
            report_before = True
        elif m.topic == f"{BASE}/run" and body["run_id"] == run_id:
            states.append((body["state"], body["progress"]["fields"], fields_before, report_before))
    assert [s[:2] for s in states] == [("open", 1), ("open", 2), ("closed", 3)], states
    assert all(counted <= stored for _, counted, stored, _ in states), states  # each after its fields
    assert states[-1][3], "the closed run's state came before its specimen report"


@pytest.mark.broker
def test_a_field_the_outbox_refuses_is_not_counted_by_the_run_state_the_broker_keeps(
    tmp_path: Path, broker: Any, credentials_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The outbox file refuses a run's third field (a trigger in the file: SQLite's own error, on the
    field's transaction only) until the station stops and gives the field up. The run state that
    counts it, and every later one of that run, is not sent: the broker keeps the state of the 2
    fields stored, and the next start does not take it for a newer state than its own. Before, the
    states behind the refused fields went out (the closed run at 3 fields or more), and the next
    start said at ERROR that its state was older than what the station published."""
    source = {"kind": "simulated", "fields": 500, "fps": 8.0, "width": 480, "height": 360, "seed": 0}
    config_path = write_station(tmp_path, broker.port, target_wbc=1000, source=source)
    config = load_config(config_path)
    outbox = Outbox.from_config(config.mqtt.outbox)  # the file as the station makes it
    StationState(outbox)
    outbox.close()
    with contextlib.closing(sqlite3.connect(config.mqtt.outbox.path)) as conn, conn:
        conn.execute("CREATE TRIGGER refuse_fields BEFORE INSERT ON specimen_fields "
                     "WHEN (SELECT COUNT(*) FROM specimen_fields) >= 2 "
                     "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    caplog.set_level(logging.INFO)
    daemon = StationDaemon(config, analyzer_factory=pool_factory(), config_path=config_path)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: "refused by the test" in caplog.text and daemon.stats.snapshot()["analysed"] >= 5, 30)
    finally:
        daemon.request_stop("test over")
        runner.join(60)
    assert not runner.is_alive()
    assert "outbox write of field report" in caplog.text and "LOST" in caplog.text  # refused for real, given up

    with contextlib.closing(sqlite3.connect(config.mqtt.outbox.path)) as conn, conn:
        (stored,) = conn.execute("SELECT COUNT(*) FROM specimen_fields").fetchone()
        conn.execute("DROP TRIGGER refuse_fields")
    assert stored == 2
    observer = Subscriber(broker.port, "observer", "observer-secret", [f"{BASE}/run"])
    try:
        observer.wait_ready()
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/run" for m in ms), 10)
        retained = json.loads(next(m.payload for m in observer.messages if m.topic == f"{BASE}/run"))
    finally:
        observer.close()
    assert (retained["state"], retained["progress"]["fields"]) == ("open", 2), retained

    caplog.clear()  # the next start: the broker's state is no newer than the station's
    again = StationDaemon(load_config(config_path), analyzer_factory=pool_factory(), config_path=config_path)
    runner = threading.Thread(target=again.run, daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: again.publisher is not None and not again.publisher.run_watch.listening, 30)
    finally:
        again.request_stop("test over")
        runner.join(60)
    assert again.publisher is not None and again.publisher.run_watch.newer is None, caplog.text
    assert not [r for r in caplog.records if r.name == "smearscope.service.mqtt.run_watch" and r.levelno >= logging.ERROR]
