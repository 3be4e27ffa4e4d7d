"""The broker's retained run state is what tells a station restored from an older backup
(service.mqtt.run_watch): the hold compares it with every run the station's state holds, not
only the last; it stays retained whatever expiry field messages carry; and a station that
cannot tell under MQTT 3.1.1 whether it may read it says so. Against a real mosquitto."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, retained_run_state, wait_until
from test_publisher import BASE, make_config

from smearscope.service.mqtt.outbox import NewMessage, Outbox
from smearscope.service.mqtt.publisher import MqttPublisher

pytestmark = [pytest.mark.broker]


def _run_state(run_id: str, fields: int, state: str) -> NewMessage:
    body = {"station_id": "lab-7", "run_id": run_id, "state": state, "end_reason": None,
            "updated_at": time.time(), "progress": {"run_id": run_id, "fields": fields}}
    return NewMessage("field", f"{BASE}/run", json.dumps(body).encode(), run_id, "run-1", qos=1, retain=True)


def _retain(port: int, state: NewMessage) -> None:
    """The broker keeps `state` retained, as an earlier station under this id left it."""
    operator = Subscriber(port, "station", MQTT_USERS["station"], [f"{BASE}/status"], client_id="operator")
    try:
        operator.wait_ready()
        operator.client.publish(f"{BASE}/run", state.payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        operator.close()


def _report(run_id: str, fields: int) -> tuple[str, str, bytes, str]:
    return ("report", f"rep-{run_id}", json.dumps({"run_id": run_id, "fields_analyzed": fields}).encode(), "1")


def _publisher(config: Any, known: dict[str, int], closed_now: tuple[str, ...], started: list[MqttPublisher]) -> MqttPublisher:
    publisher = MqttPublisher(config, "lab-7", Outbox.from_config(config.outbox))
    publisher.run_watch.known(known, closed_now=closed_now)
    started.append(publisher)
    return publisher


def test_a_restored_run_that_is_not_the_last_one_is_held_when_the_broker_shows_it_further_along(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[MqttPublisher],
) -> None:
    """The restored outbox holds the reports of two runs, r-1 (3 fields, the older) and r-2 (the
    last); the broker's retained run state shows r-1 closed at 6 fields. r-1's 3-field report is held
    (not received, parked), r-2's, of which the broker shows nothing newer, is sent."""
    observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/report"])
    try:
        observer.wait_ready()
        _retain(broker.port, _run_state("r-1", 6, "closed"))
        publisher = _publisher(make_config(tmp_path, broker.port), {"r-1": 3, "r-2": 2}, ("r-1", "r-2"), started)
        publisher.publish_many([_report("r-1", 3), _report("r-2", 2)])
        publisher.start()
        assert observer.wait_for(lambda ms: len(ms) >= 1, 10), publisher.state
        assert wait_until(lambda: publisher.state.parked == 1 and publisher.state.in_flight == 0, 10), publisher.state
        assert [json.loads(m.payload)["body"]["run_id"] for m in observer.messages] == ["r-2"]
        assert set(publisher.run_watch.held) == {"r-1"}
        # r-2's row leaves the outbox when the drain settles its PUBACK, a moment after the observer has it
        assert wait_until(lambda: publisher.outbox.counts().reports == 1, 10), publisher.outbox.counts()
    finally:
        observer.close()


def test_field_message_expiry_does_not_expire_the_retained_run_state_on_the_broker(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[MqttPublisher],
) -> None:
    """With mqtt.field_message_expiry_s = 1 (MQTT 5) a field message carries its expiry, the run state
    the station retains carries none: past the 1 s mosquitto still keeps it retained, so a station
    restored later finds it to compare with."""
    observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/run", f"{BASE}/field"])
    try:
        observer.wait_ready()
        config = make_config(tmp_path, broker.port, protocol="5", field_message_expiry_s=1)
        publisher = _publisher(config, {"r-1": 4}, (), started)
        publisher.publish_many([("field", "field-4", b"{}", "1")], extra=[_run_state("r-1", 4, "closed")])
        publisher.start()
        assert observer.wait_for(lambda ms: len(ms) >= 2, 10), publisher.state
        field = observer.on_topic(f"{BASE}/field")[0]
        run = observer.on_topic(f"{BASE}/run")[0]
        assert field.message_expiry is not None and field.message_expiry <= 1, field
        assert run.message_expiry is None, run
        time.sleep(2.5)  # past the field messages' expiry: mosquitto drops a retained message that carries it
        kept = retained_run_state(broker.port, BASE)
        assert kept is not None and kept["run_id"] == "r-1" and kept["progress"]["fields"] == 4, kept
    finally:
        observer.close()


def _said_311(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "smearscope.service.mqtt.run_watch"
            and r.levelno == logging.WARNING and r.getMessage().startswith("MQTT 3.1.1")]


def _acl(run_rights: str) -> str:
    """The example ACL's station rights, with `run_rights` on its run topic, and an observer."""
    return (f"user station\ntopic readwrite {BASE}/field\ntopic readwrite {BASE}/report\n"
            f"topic readwrite {BASE}/cells\ntopic {run_rights} {BASE}/run\ntopic readwrite {BASE}/status\n"
            f"topic readwrite {BASE}/telemetry\ntopic read {BASE}/cmd/#\nuser observer\ntopic readwrite #\n")


def test_a_new_station_under_mqtt_311_that_may_read_its_run_topic_says_no_warning_when_the_broker_keeps_no_run_state(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
    broker_with: Callable[..., MosquittoBroker],
) -> None:
    """A new station (its state holds no run) on a broker that keeps no retained run state, MQTT 3.1.1,
    the example ACL's rights on its run topic: nothing comes on the run topic at its start, which
    under 3.1.1 is also what an ACL that keeps the topic from it looks like. Its first run state,
    sent retained, comes back on its subscription: the topic is readable, and nothing is said at
    WARNING (every first start of a rightly configured 3.1.1 station used to warn)."""
    broker = broker_with(acl=_acl("readwrite"))
    config = make_config(tmp_path, broker.port, protocol="3.1.1")
    publisher = _publisher(config, {}, (), started)
    publisher.publish_many([("field", "field-1", b"{}", "1")], extra=[_run_state("r-1", 1, "open")])
    with caplog.at_level(logging.DEBUG, logger="smearscope"):
        publisher.start()
        assert wait_until(lambda: not publisher.run_watch.listening, 10), caplog.text[-3000:]
        assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10), publisher.state
    kept = retained_run_state(broker.port, BASE)
    assert kept is not None and kept["run_id"] == "r-1", kept
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, warned
    assert any(r.levelno == logging.DEBUG and r.getMessage().startswith(f"MQTT 3.1.1: a message came back on {BASE}/run")
               for r in caplog.records), caplog.text[-3000:]


def _hold_r0(config: Any) -> None:
    """The outbox file keeps a hold of run r-0 from an earlier start (its report parked there)."""
    from smearscope.service.mqtt.run_watch import HELD_TABLE

    with Outbox.from_config(config.outbox) as earlier:
        earlier.write(lambda conn: (conn.execute(HELD_TABLE),
                                    conn.execute("INSERT INTO held_runs VALUES ('r-0', 'closed', 9, 4, 0)")))


def _held_in_file(outbox: Outbox) -> list[str]:
    """The runs the outbox file holds (what the next start holds)."""
    return [r for (r,) in outbox.read(lambda conn: conn.execute("SELECT run_id FROM held_runs").fetchall())]


@pytest.mark.parametrize("readable", [False, True], ids=["run-topic-unreadable", "run-topic-readable"])
def test_under_mqtt_311_a_run_topic_the_acl_keeps_from_the_station_is_said_once_with_the_line_to_add(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, readable: bool,
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
) -> None:
    """The broker keeps run r-1 closed at 6 fields; the restored station holds it at 3, and its outbox
    file keeps a hold of run r-0 from an earlier start, r-0's report parked. Under MQTT 3.1.1 with an
    acl_file that lets the station write its run topic but not read it, mosquitto grants the
    subscription and sends nothing, which looks like a cleared state: the hold of r-0 stays (its
    report not received, the file still naming it), and r-1's run state, which the station sends at
    its start, does not come back within the echo bound: said once at WARNING, naming r-0 as kept
    held and the acl line to add (not again after a broker restart and reconnect). Given read too,
    it holds r-1's report and says nothing of the kind."""
    from smearscope.service.mqtt import echo_watch

    monkeypatch.setattr(echo_watch, "ECHO_BOUND_S", 1.0)
    broker = broker_with(acl=_acl("readwrite" if readable else "write"))
    observer = observer_on(broker.port, [f"{BASE}/report"])
    _retain(broker.port, _run_state("r-1", 6, "closed"))
    config = make_config(tmp_path, broker.port, protocol="3.1.1", reconnect_min_delay_s=1, reconnect_max_delay_s=1)
    _hold_r0(config)
    publisher = _publisher(config, {"r-0": 4, "r-1": 3}, ("r-1",), started)
    publisher.publish_many([_report("r-0", 4), _report("r-1", 3)], extra=[_run_state("r-1", 3, "closed")])
    with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt.run_watch"):
        publisher.start()
        if readable:
            assert wait_until(lambda: publisher.state.parked == 3, 10), publisher.state
            assert set(publisher.run_watch.held) == {"r-0", "r-1"}, publisher.run_watch.held
            assert not _said_311(caplog), caplog.text[-3000:]
            return
        assert wait_until(lambda: len(_said_311(caplog)) > 0, 15), caplog.text[-3000:]
        said = _said_311(caplog)
        assert len(said) == 1, caplog.text[-3000:]
        assert f"'topic read {BASE}/run' and 'topic write {BASE}/run' under 'user station'" in said[0], said[0]
        assert "the runs held (r-0) stay held" in said[0] and "MQTT 5" in said[0], said[0]
        assert set(publisher.run_watch.held) == {"r-0"} and publisher.run_watch.decided.is_set()
        assert observer.wait_for(lambda ms: len(ms) >= 1, 10), publisher.state
        assert wait_until(lambda: publisher.state.parked == 1 and publisher.state.in_flight == 0, 10), publisher.state
        assert [json.loads(m.payload)["body"]["run_id"] for m in observer.messages] == ["r-1"]
        assert _held_in_file(publisher.outbox) == ["r-0"]
        connects = publisher.state.connects
        broker.restart()
        assert wait_until(lambda: publisher.state.connects > connects and publisher.state.connected, 20)
        publisher.publish_many([_report("r-9", 1)], extra=[_run_state("r-9", 1, "closed")])
        assert wait_until(lambda: publisher.outbox.counts().messages == 1, 10), publisher.state  # r-0's report
        time.sleep(1.5)  # past the echo bound of the run state sent after the restart
        assert len(_said_311(caplog)) == 1, _said_311(caplog)
        assert set(publisher.run_watch.held) == {"r-0"} and _held_in_file(publisher.outbox) == ["r-0"]
        assert all(json.loads(m.payload)["body"]["run_id"] != "r-0" for m in observer.messages)


def test_under_mqtt_311_a_hold_is_released_once_the_stations_own_run_state_comes_back_and_sent_on_that_connection(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
) -> None:
    """The outbox file keeps a hold of run r-0 (its report parked); the broker keeps no retained run
    state, MQTT 3.1.1, the station may read its run topic. Nothing comes on the run topic at the
    start, which under 3.1.1 also looks like an ACL that hides it: r-0's report waits, parked, until
    the station's own run state (r-1's) comes back on its subscription; then the hold is released,
    said at WARNING, the file no longer names it, and r-0's report is received on this same
    connection (no reconnect)."""
    broker = broker_with(acl=_acl("readwrite"))
    observer = observer_on(broker.port, [f"{BASE}/report", f"{BASE}/run"])
    config = make_config(tmp_path, broker.port, protocol="3.1.1")
    _hold_r0(config)
    publisher = _publisher(config, {"r-0": 4, "r-1": 2}, (), started)
    publisher.publish_many([_report("r-0", 4)], extra=[_run_state("r-1", 2, "closed")])
    with caplog.at_level(logging.DEBUG, logger="smearscope.service.mqtt.run_watch"):
        publisher.start()
        assert wait_until(lambda: publisher.run_watch.decided.is_set(), 15), caplog.text[-3000:]
        released = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                    and r.getMessage().startswith("run r-0's held run states")]
        assert released and "own run state came back" in released[0], caplog.text[-3000:]
        waited = [r.getMessage() for r in caplog.records if "(held till then: r-0)" in r.getMessage()]
        assert waited, caplog.text[-3000:]
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 10), publisher.state
        assert [json.loads(m.payload)["body"]["run_id"] for m in observer.on_topic(f"{BASE}/report")] == ["r-0"]
        assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10), publisher.state
    assert not publisher.run_watch.held and publisher.state.connects == 1, publisher.state
    assert wait_until(lambda: _held_in_file(publisher.outbox) == [], 10)


def test_under_mqtt_311_a_hold_whose_release_waits_for_the_next_run_state_says_so_and_that_run_releases_it(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
) -> None:
    """The outbox file keeps a hold of run r-0, the station's last run (its report and the run state
    the start states again both parked); the operator cleared the broker's retained run state, MQTT
    3.1.1, the station may read its run topic. Nothing comes on the run topic at the start, which
    under 3.1.1 also looks like an ACL that hides it, and the only run state the station has to send
    is r-0's own, held: nothing of its can come back until its next run's state. That is said at
    WARNING at the start, naming r-0 (the start's WARNING said a start that finds no retained run
    state sends it), and r-0 stays held (its report not received) until r-1's state, sent later on
    that connection, comes back: then r-0 is released and its report received."""
    broker = broker_with(acl=_acl("readwrite"))
    observer = observer_on(broker.port, [f"{BASE}/report"])
    config = make_config(tmp_path, broker.port, protocol="3.1.1")
    _hold_r0(config)
    publisher = _publisher(config, {"r-0": 4}, (), started)
    publisher.publish_many([_report("r-0", 4)], extra=[_run_state("r-0", 4, "closed")])
    with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt.run_watch"):
        publisher.start()
        assert wait_until(lambda: publisher.state.parked == 2, 10), publisher.state
        waits = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                 and "r-0" in r.getMessage() and "next run" in r.getMessage()]
        assert len(waits) == 1, caplog.text[-3000:]
        assert f"no retained run state came on {BASE}/run" in waits[0], waits[0]
        assert set(publisher.run_watch.held) == {"r-0"} and not publisher.run_watch.decided.is_set()
        assert observer.messages == [] and _held_in_file(publisher.outbox) == ["r-0"]
        publisher.publish_many([], extra=[_run_state("r-1", 1, "open")])  # the next run's first state
        assert observer.wait_for(lambda ms: len(ms) >= 1, 15), publisher.state
        assert [json.loads(m.payload)["body"]["run_id"] for m in observer.messages] == ["r-0"]
        assert not publisher.run_watch.held and publisher.run_watch.decided.is_set()


def test_under_mqtt_311_a_start_that_holds_nothing_decides_its_hold_without_waiting_for_its_own_run_state(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], monkeypatch: pytest.MonkeyPatch,
    broker_with: Callable[..., MosquittoBroker],
) -> None:
    """MQTT 3.1.1, an acl_file that lets the station write its run topic but not read it, the broker
    keeping no retained run state, and no hold from an earlier start: nothing it hears or does not hear
    can hold a run (what cannot be read cannot be compared), so the hold is decided once the wait for
    the retained run state ends, not only once the station's own run state is overdue (the echo bound,
    made longer than the test looks here): verify_run and stop_run then answer `held` false at once
    rather than waiting 5 s to answer null."""
    from smearscope.service.mqtt import echo_watch

    monkeypatch.setattr(echo_watch, "ECHO_BOUND_S", 600.0)
    broker = broker_with(acl=_acl("write"))
    config = make_config(tmp_path, broker.port, protocol="3.1.1")
    publisher = _publisher(config, {"r-1": 1}, (), started)
    publisher.publish_many([], extra=[_run_state("r-1", 1, "open")])
    publisher.start()
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10), publisher.state  # acknowledged
    assert wait_until(publisher.run_watch.decided.is_set, 10), publisher.state
    assert not publisher.run_watch.held and publisher.run_watch.listening  # its echo still waited for


def test_telemetry_says_the_runs_held_once_the_hold_is_decided_at_once_not_a_period_later(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[MqttPublisher],
) -> None:
    """The broker shows run r-1 closed at 6 fields, the restored state holds it at 3: the station's
    telemetry says `held_runs` null while its hold is not decided and ["r-1"] once it is, in a sample
    sent then (the sampling period, 30 s, is not waited for): what a dashboard that had a verify_run
    or stop_run answered `held: null` brings its line up to date by."""
    observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/telemetry"])
    try:
        observer.wait_ready()
        _retain(broker.port, _run_state("r-1", 6, "closed"))
        config = make_config(tmp_path, broker.port)
        assert config.telemetry_interval_s == 30
        publisher = MqttPublisher(config, "lab-7", Outbox.from_config(config.outbox),
                                  telemetry_source=lambda: {"source": "test"})
        publisher.run_watch.known({"r-1": 3, "r-2": 2}, closed_now=("r-1", "r-2"))
        started.append(publisher)
        publisher.publish_many([_report("r-1", 3), _report("r-2", 2)])
        publisher.start()
        said = lambda: [json.loads(m.payload).get("held_runs", "absent") for m in list(observer.messages)]
        assert wait_until(lambda: ["r-1"] in said(), 15), said()
        assert all(s in (None, ["r-1"]) for s in said()), said()
    finally:
        observer.close()


def test_doctor_beside_a_running_station_names_the_runs_it_holds_from_its_telemetry(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[MqttPublisher],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The running station holds its outbox file (doctor cannot read the held runs there): doctor
    names the run it holds, r-1, from its next telemetry sample's `held_runs`, with what releases it."""
    from test_parked_visible import _doctor_config

    from smearscope.cli import main

    _retain(broker.port, _run_state("r-1", 6, "closed"))
    config = make_config(tmp_path, broker.port, telemetry_interval_s=2.0)
    publisher = MqttPublisher(config, "lab-7", Outbox.from_config(config.outbox),
                              telemetry_source=lambda: {"source": "test"})
    publisher.run_watch.known({"r-1": 3, "r-2": 2}, closed_now=("r-1", "r-2"))
    started.append(publisher)
    publisher.publish_many([_report("r-1", 3), _report("r-2", 2)])
    publisher.start()
    assert wait_until(lambda: set(publisher.run_watch.held) == {"r-1"} and publisher.run_watch.decided.is_set(), 10)
    main(["doctor", "--config", str(_doctor_config(tmp_path, broker.port, config.outbox.path, 2.0))])
    out = capsys.readouterr().out
    held = [line for line in out.splitlines() if line[6:].startswith("held run")]
    assert len(held) == 1 and held[0].startswith("INFO  held run           the running station (host "), out
    assert " holds run r-1: their run states, specimen reports and FHIR Bundles stay in the outbox" in held[0]
    assert f"mosquitto_pub -r -n -t {BASE}/run, then start the station again" in held[0], held[0]
