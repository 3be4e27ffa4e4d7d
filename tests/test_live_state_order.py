"""The retained run state never runs ahead of the station's stored state: a run state counting N
fields reaches the outbox (and so the broker) after the N-th field message of its run, and a
closed run's state after its specimen report. Before, the analysis thread stored the run state
at once and the outbox writer the field behind it: a crash between the two left the broker
counting a field the restarted station does not hold, which its start took for a state restored
from an older backup (service.mqtt.run_watch: ERROR 'the state is older than what this station
id published')."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from broker import Subscriber
from test_daemon import BASE, classified_wbc_per_field, pool_factory, write_station

from smearscope.service.config import load_config
from smearscope.service.station.daemon import StationDaemon


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
