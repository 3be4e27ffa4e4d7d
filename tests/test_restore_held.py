"""A station restored from an older backup, whose open run the broker already shows further along:
the shorter report of that run is held in the outbox, not sent over the complete one, until the
operator clears the broker's retained run state (service.mqtt.run_watch). A real mosquitto, the
station in child processes killed and restored as a clinic's board would be."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker import (
    MQTT_USERS,
    MosquittoBroker,
    Received,
    Subscriber,
    retained_run_state,
    run_state,
    wait_until,
)
from station_child import refusing_outbox, station_child
from test_daemon import STATION, oracle_pool, write_station
from test_daemon_faults import DaemonProcess
from test_restore import _folder_source, _png

pytestmark = [pytest.mark.broker, pytest.mark.faults]

BASE = f"smearscope/{STATION}"


def _reports(messages: list[Received], run_id: str) -> list[dict[str, Any]]:
    """The specimen reports of `run_id` among messages received (their bodies), in arrival order."""
    bodies = [json.loads(m.payload)["body"] for m in list(messages) if m.topic == f"{BASE}/report"]
    return [b for b in bodies if b.get("run_id") == run_id]


def _retain(broker: MosquittoBroker, payload: bytes) -> None:
    """The operator retains `payload` as the broker's run state (b"": clears it)."""
    operator = Subscriber(broker.port, "station", MQTT_USERS["station"], [f"{BASE}/status"], client_id="operator")
    try:
        operator.wait_ready()
        operator.client.publish(f"{BASE}/run", payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        operator.close()


def test_a_restored_run_the_broker_shows_further_along_is_held_not_sent_over_it_and_released_on_request(
    tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber],
) -> None:
    """A station analyses 3 fields of a run and its state is saved; it goes on to 6 fields and stops
    (the run's report with 6 fields goes out, the broker keeps 'closed, 6'). The saved state,
    restored and started past the idle timeout, closes the run again with its 3 fields (end reason
    restart) under a new report id. That report and that run state are parked in the outbox: the
    observer receives no 3-field report, the broker still keeps 'closed, 6', status counts them as
    parked, the outbox still holds them, and one ERROR says the run, both counts and how to release.
    The run signed meanwhile (verify_run) is answered ok with held true and a message saying the
    signed report is held until the retained state is cleared, and it is held too (more parked,
    none received). Cleared the broker's retained run state, the next start sends them, the
    restart's report and then the signed one."""
    inbox = tmp_path / "state" / "inbox"
    inbox.mkdir(parents=True)
    pool = tmp_path / "pool.pkl"
    pool.write_bytes(pickle.dumps(list(oracle_pool())))
    broker = broker_with()
    idle_s = 3.0
    observer = observer_on(broker.port, [f"{BASE}/report", f"{BASE}/run", f"{BASE}/cmd_response/#"])
    config = write_station(tmp_path, broker.port, source=_folder_source(inbox),
                           specimen={"target_wbc_count": 1000, "idle_timeout_s": idle_s})
    first = DaemonProcess(config, pool)
    for i in range(3):
        (inbox / f"f{i:02d}.png").write_bytes(_png(3300 + i))
    assert wait_until(lambda: len(first.stored()) >= 3 and not any(inbox.glob("*.png")), 30), first.lines[-20:]
    first.signal(signal.SIGKILL)
    first.wait(10)
    shutil.copytree(tmp_path / "state", tmp_path / "backup")  # saved with its run open at 3 fields

    went_on = DaemonProcess(config, pool)
    for i in range(3, 6):
        (inbox / f"f{i:02d}.png").write_bytes(_png(3300 + i))
    assert observer.wait_for(lambda ms: any(
        m.topic == f"{BASE}/run" and run_state(m)["progress"]["fields"] == 6 for m in ms), 60), went_on.lines[-20:]
    run_id = run_state(observer.on_topic(f"{BASE}/run")[-1])["run_id"]
    went_on.signal(signal.SIGTERM)  # its report goes out with 6 fields
    assert went_on.wait(60) == 0, went_on.lines[-20:]
    assert [r["fields_analyzed"] for r in _reports(observer.messages, run_id)] == [6]
    assert (retained_run_state(broker.port, BASE) or {}).get("state") == "closed"
    time.sleep(idle_s + 1)  # restored past the idle timeout: the run is closed at the start

    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "backup", tmp_path / "state")
    restored = DaemonProcess(config, pool)
    try:
        def command(name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            before = len(observer.on_topic(f"{BASE}/cmd_response/{name}"))
            observer.client.publish(f"{BASE}/cmd/{name}", json.dumps(body or {}), qos=1)
            assert observer.wait_for(
                lambda ms: sum(m.topic == f"{BASE}/cmd_response/{name}" for m in ms) > before, 15)
            return json.loads(observer.on_topic(f"{BASE}/cmd_response/{name}")[-1].payload)

        said_held = lambda: [ln for ln in restored.lines if "ERROR smearscope.service.mqtt.run_watch" in ln]
        assert wait_until(lambda: bool(said_held()), 30), restored.lines[-20:]  # connected and subscribed
        # the drain has passed the run's report and run state (parked), or sent the shorter report
        shorter = lambda: [r for r in _reports(observer.messages, run_id) if r["fields_analyzed"] != 6]
        assert wait_until(lambda: bool(shorter()) or (command("status").get("broker") or {}).get("parked", 0) >= 2,
                          30), restored.lines[-20:]
        assert not shorter(), shorter()  # no report of 3 fields over the one of 6
        status = command("status")
        assert status["broker"]["parked"] >= 2, status
        assert status["broker"]["in_flight"] == 0 and status["outbox"]["reports"] >= 1, status
        stored = [ln for ln in restored.lines if "stored report message" in ln and f"run={run_id}" in ln]
        assert stored and "closed: restart" in stored[0], restored.lines[-30:]
        said = said_held()
        assert len(said) == 1, said
        assert f"the broker holds run {run_id} of station {STATION} (closed, 6 fields, updated " in said[0]
        assert "this station's state holds it with 3 fields" in said[0], said
        assert "are held: parked in the outbox, not sent and not deleted" in said[0], said
        assert f"mosquitto_pub -r -n -t {BASE}/run" in said[0], said
        # the held run signed (its 3 fields, as the restored state holds it): its verified report is held too
        signed = command("verify_run", {"run_id": run_id, "verified_by": "AB"})
        assert signed["ok"] and signed["held"] is True, signed  # signed, and said to be held
        assert signed["message"].startswith("the signed report is held at the station: the broker shows run "
                                            f"{run_id} further along"), signed
        assert f"mosquitto_pub -r -n -t {BASE}/run" in signed["message"], signed
        assert wait_until(lambda: command("status")["broker"]["parked"] > status["broker"]["parked"], 30), \
            restored.lines[-20:]
        assert not shorter(), shorter()
    finally:
        restored.signal(signal.SIGTERM)
        assert restored.wait(60) == 0
    # the stop does not wait for them (no wait sends them) and says them apart from unsent ones
    stopping = [ln for ln in restored.lines if "stopping with" in ln]
    assert any(" parked messages in the outbox (too large for the broker, or held back)" in ln
               for ln in stopping), stopping
    assert not [ln for ln in stopping if "still in the outbox" in ln], stopping
    assert [r["fields_analyzed"] for r in _reports(observer.messages, run_id)] == [6], _reports(observer.messages, run_id)
    kept = retained_run_state(broker.port, BASE) or {}
    assert kept.get("run_id") == run_id and kept["progress"]["fields"] == 6, kept

    # the operator decides the restored state is the right one: the broker's retained run state cleared
    _retain(broker, b"")
    released = DaemonProcess(config, pool)
    try:
        assert observer.wait_for(lambda ms: any(r["fields_analyzed"] == 3 and r.get("verification")
                                                for r in _reports(ms, run_id)), 30), released.lines[-20:]
        # released in the order stored: the restart's report, then its signed one
        assert [(r["fields_analyzed"], (r.get("verification") or {}).get("verified_by"))
                for r in _reports(observer.messages, run_id)] == [(6, None), (3, None), (3, "AB")]
        assert not [ln for ln in released.lines if "ERROR smearscope.service.mqtt.run_watch" in ln]
        # the broker holds no run state: the later subscription's answer released the outbox, not the bound
        assert not [ln for ln in released.lines if "no retained run state heard" in ln], released.lines[-30:]
    finally:
        released.signal(signal.SIGTERM)
        assert released.wait(60) == 0
    kept = retained_run_state(broker.port, BASE) or {}
    assert kept.get("run_id") == run_id and kept["progress"]["fields"] == 3 and kept["state"] == "closed", kept


def _state_message(run_id: str, fields: int, state: str) -> Any:
    from smearscope.service.mqtt.outbox import NewMessage

    body = {"station_id": STATION, "run_id": run_id, "state": state, "end_reason": "restart" if state == "closed" else None,
            "updated_at": time.time(), "progress": {"run_id": run_id, "fields": fields}}
    return NewMessage("field", f"{BASE}/run", json.dumps(body).encode(), run_id, "run-1", qos=1, retain=True)


def test_a_held_run_stays_held_at_a_later_start_once_the_stations_own_runs_replace_the_retained_state(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[Any],
) -> None:
    """The broker keeps run r-1 closed at 6 fields; the restored state closed it at 3 and its report and
    run state are held. The station goes on to run r-2, whose state the broker now keeps. At the next
    start the retained state names r-2, the station's own: r-1's 3-field report is still held, not
    sent over the 6-field one (the hold was decided from the retained state alone, and released
    here). The retained run state cleared, the next start sends it."""
    from test_publisher import make_config

    from smearscope.service.mqtt.run_watch import RunStateWatch

    observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/report", f"{BASE}/run"])
    observer.wait_ready()
    _retain(broker, json.dumps(json.loads(_state_message("r-1", 6, "closed").payload)).encode())
    config = make_config(tmp_path, broker.port)
    report = ("report", "rep-3", json.dumps({"run_id": "r-1", "fields_analyzed": 3}).encode(), "1")

    def start(known: dict[str, int], closed_now: tuple[str, ...] = ()) -> Any:
        from smearscope.service.mqtt.outbox import Outbox
        from smearscope.service.mqtt.publisher import MqttPublisher

        publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox))
        publisher.run_watch.known(known, closed_now=closed_now)
        return publisher

    first = start({"r-1": 3}, closed_now=("r-1",))
    first.publish_many([report], extra=[_state_message("r-1", 3, "closed")])  # stored at the start, before sending
    started.append(first)
    first.start()
    assert wait_until(lambda: first.state.parked == 2, 10), first.state
    first.publish_many([], extra=[_state_message("r-2", 1, "open")])  # the next run: its state is retained
    assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/run" and b'"r-2"' in m.payload for m in ms), 10)
    first.stop(1)
    first.outbox.close()
    assert not [m for m in observer.on_topic(f"{BASE}/report")]

    second = start({"r-1": 3, "r-2": 1})
    started.append(second)
    second.start()
    sent = lambda: [m for m in observer.on_topic(f"{BASE}/report")]
    assert wait_until(lambda: bool(sent()) or second.state.parked == 2, 10), second.state
    assert not sent(), "the 3-field report of r-1 went out over the 6-field one"
    assert isinstance(second.run_watch, RunStateWatch) and "r-1" in second.run_watch.held
    second.stop(1)
    second.outbox.close()

    _retain(broker, b"")
    third = start({"r-1": 3, "r-2": 1})
    started.append(third)
    third.start()
    try:
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 10), third.state
        assert not third.run_watch.held
    finally:
        observer.close()


def test_a_held_run_keeps_one_run_state_in_the_outbox_across_new_states_reconnects_and_starts(
    tmp_path: Path, credentials_dir: Path, started: list[Any], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber],
) -> None:
    """Run r-1 is held (the broker keeps it closed at 6 fields, the station's state holds 3). Its run
    state is stated again as a start does, again twice more (signed, say), and the connection is
    lost twice (each reconnect states the last one again) and the station started once more, which
    states it again: the outbox keeps one run state of r-1, the latest, not one per state, reconnect
    and start. Cleared the broker's retained state, the next start sends that one alone."""
    from test_publisher import make_config

    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.mqtt.publisher import MqttPublisher
    from smearscope.service.station.live_state import LiveState

    broker = broker_with(persistence=True)  # the retained state kept
    observer = observer_on(broker.port, [f"{BASE}/run"])

    config = make_config(tmp_path, broker.port, reconnect_min_delay_s=1, reconnect_max_delay_s=1)
    marks = iter(range(100))

    def start(*, states: int) -> tuple[Any, LiveState]:
        publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox))
        publisher.run_watch.known({"r-1": 3}, closed_now=("r-1",))
        live = LiveState()
        publisher.on_reconnected = lambda: live.republish(publisher)
        for _ in range(states):  # the start's own, then later ones (each marked by its review count)
            message = _state_message("r-1", 3, "closed")
            body = {**json.loads(message.payload), "review": next(marks)}
            live.send(publisher, dataclasses.replace(message, payload=json.dumps(body).encode()))
        started.append(publisher)
        publisher.start()
        return publisher, live

    def held_states(publisher: Any) -> list[int]:
        return [json.loads(m.payload)["review"] for m in publisher.outbox.pending(1000) if m.topic == f"{BASE}/run"]

    _retain(broker, json.dumps(json.loads(_state_message("r-1", 6, "closed").payload)).encode())
    first, _ = start(states=3)
    assert wait_until(lambda: "r-1" in first.run_watch.held and held_states(first) == [2], 10), held_states(first)
    for _ in range(2):
        connects = first.state.connects
        broker.restart()
        assert wait_until(lambda n=connects: first.state.connects > n and first.state.connected, 20), first.state
        assert wait_until(lambda: first.state.in_flight == 0 and first._inflight.parked, 10), first.state
    assert held_states(first) == [2], held_states(first)
    first.stop(1)
    first.outbox.close()
    second, _ = start(states=1)  # held again from the outbox file; the start states it once more
    assert wait_until(lambda: held_states(second) == [3], 10), held_states(second)
    second.stop(1)
    second.outbox.close()
    assert not [m for m in observer.on_topic(f"{BASE}/run") if json.loads(m.payload).get("review") is not None]

    _retain(broker, b"")  # the operator's clear: released
    third, _ = start(states=0)
    assert observer.wait_for(lambda ms: any(json.loads(m.payload).get("review") == 3 for m in ms if m.payload), 10)
    assert wait_until(lambda: third.outbox.counts().messages == 0, 10), third.state
    sent = [json.loads(m.payload).get("review") for m in observer.on_topic(f"{BASE}/run") if m.payload]
    assert [r for r in sent if r is not None] == [3], sent


def test_a_held_runs_run_state_expires_under_field_message_expiry_and_its_report_stays_held(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[Any],
) -> None:
    """With mqtt.field_message_expiry_s, a held run's run state expires from the outbox like any run
    state (on the broker a retained run state carries no expiry: tests/test_run_state_guard.py), while
    its specimen report stays held; a reconnect states the run again (LiveState.republish), and that
    copy is held too, one in the outbox, none received."""
    from test_publisher import make_config

    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.mqtt.publisher import MqttPublisher
    from smearscope.service.station.live_state import LiveState

    observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/report", f"{BASE}/run"])
    try:
        observer.wait_ready()
        _retain(broker, json.dumps(json.loads(_state_message("r-1", 6, "closed").payload)).encode())
        config = make_config(tmp_path, broker.port, protocol="5", field_message_expiry_s=1,
                             reconnect_min_delay_s=1, reconnect_max_delay_s=1)
        publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox))
        publisher.run_watch.known({"r-1": 3}, closed_now=("r-1",))
        live = LiveState()
        publisher.on_reconnected = lambda: live.republish(publisher)
        publisher.publish_many([("report", "rep-3", json.dumps({"run_id": "r-1", "fields_analyzed": 3}).encode(), "1")])
        live.send(publisher, _state_message("r-1", 3, "closed"))
        started.append(publisher)
        publisher.start()
        run_states = lambda: [m for m in publisher.outbox.pending(100) if m.topic == f"{BASE}/run"]
        assert wait_until(lambda: publisher.state.parked == 2, 10), publisher.state
        assert wait_until(lambda: not run_states(), 20), run_states()  # expired (the drain's 10 s pass)
        assert publisher.outbox.counts().reports == 1 and "r-1" in publisher.run_watch.held
        assert wait_until(lambda: publisher.state.parked == 1, 5), publisher.state  # the report alone
        broker.restart()
        assert wait_until(lambda: publisher.state.connects == 2 and publisher.state.connected, 15), publisher.state
        assert wait_until(lambda: len(run_states()) == 1 and publisher.state.parked == 2, 10), publisher.state
        assert not observer.on_topic(f"{BASE}/report"), "the held report went out"
        assert not [m for m in observer.on_topic(f"{BASE}/run") if b'"fields": 3' in m.payload]
    finally:
        observer.close()


def _later_state(run_id: str, fields: int, state: str, started_at: float) -> bytes:
    """A run state of a run the station's state does not hold, begun at `started_at`."""
    body = json.loads(_state_message(run_id, fields, state).payload)
    body["progress"]["started_at"] = started_at
    return json.dumps(body).encode()


def _restored_start(config: Any, closed_now: tuple[str, ...], began: float) -> Any:
    """The restored state's publisher: runs r-0 (10 fields, closed long ago) and r-1 (3 fields, left
    open in the backup, `closed_now` at this start), begun at `began - 500` and `began`."""
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.mqtt.publisher import MqttPublisher

    publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox))
    publisher.run_watch.known({"r-0": 10, "r-1": 3}, closed_now=closed_now, starts={"r-0": began - 500, "r-1": began})
    return publisher


def _sent_holding_nothing(publisher: Any, observer: Subscriber, caplog: pytest.LogCaptureFixture,
                          started: list[Any]) -> str:
    """`publisher` (the restored state's, r-1's report in its outbox) started: the report goes out,
    nothing is held and nothing said at ERROR; the one message naming the broker's run r-9 says that
    nothing is held. That message."""
    started.append(publisher)
    publisher.start()
    assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 10), caplog.text
    assert not publisher.run_watch.held and publisher.run_watch.newer is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    said = [r.getMessage() for r in caplog.records if "the broker holds run r-9" in r.getMessage()]
    assert len(said) == 1 and "nothing is held" in said[0], said
    return said[0]


def test_a_later_run_the_restored_state_lacks_holds_the_run_it_left_open_until_the_retained_state_is_cleared(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[Any], caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker keeps run r-9 (open, 4 fields), which the restored state does not hold and which began
    after every run it holds: the station went on after the backup, and r-1, open in the backup, was
    closed and reported there. r-1's 3-field report and run state from this start are held (none
    received, both parked, one ERROR saying why and how to release), again at the next start
    (said at WARNING, naming r-9); cleared the retained state, the next start sends them."""
    from test_publisher import make_config

    observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/report", f"{BASE}/run"])
    began = time.time() - 3600
    try:
        observer.wait_ready()
        _retain(broker, _later_state("r-9", 4, "open", began + 1800))
        config = make_config(tmp_path, broker.port)
        report = ("report", "rep-3", json.dumps({"run_id": "r-1", "fields_analyzed": 3}).encode(), "1")
        with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.run_watch"):
            first = _restored_start(config, ("r-1",), began)
            first.publish_many([report], extra=[_state_message("r-1", 3, "closed")])
            started.append(first)
            first.start()
            assert wait_until(lambda: first.state.parked == 2, 10), (first.state, caplog.text)
            assert first.run_watch.held == {"r-1": ("open", 4, 3)}
            said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(said) == 1, said
            assert "the broker holds run r-9 of station" in said[0] and "does not hold it (it holds 2 runs)" in said[0]
            assert "run r-9 began at " in said[0] and "after every run this station's state holds (the latest, r-1" in said[0]
            assert "the runs it left open (r-1) were closed there and reported" in said[0], said
            assert "are held: parked in the outbox, not sent and not deleted" in said[0], said
            assert f"mosquitto_pub -r -n -t {BASE}/run" in said[0], said
            assert first.run_watch.held_why("r-1").startswith("the broker shows run r-9, begun after the runs")
            first.stop(1)
            first.outbox.close()
            assert not observer.on_topic(f"{BASE}/report"), "the 3-field report of r-1 went out"
            assert not [m for m in observer.on_topic(f"{BASE}/run") if b'"r-1"' in m.payload]

            caplog.clear()
            second = _restored_start(config, (), began)  # r-1 closed now: the hold comes from the outbox file
            started.append(second)
            second.start()
            assert wait_until(lambda: second.state.parked == 2, 10), second.state
            assert "r-1" in second.run_watch.held and second.run_watch.held_after == {"r-1": "r-9"}
            assert "the broker showed a later run, r-9 (open, 4 fields), that this station's state does not hold" \
                in caplog.text, caplog.text
            second.stop(1)
            second.outbox.close()
            assert not observer.on_topic(f"{BASE}/report")

        _retain(broker, b"")  # the operator's clear: released
        third = _restored_start(config, (), began)
        started.append(third)
        third.start()
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 10), third.state
        assert not third.run_watch.held and not third.run_watch.held_after
        assert third.outbox.read(lambda c: c.execute("SELECT COUNT(*) FROM held_runs_after").fetchone()) == (0,)
    finally:
        observer.close()


def test_an_unknown_run_begun_before_the_restored_states_runs_holds_nothing_and_is_said_at_warning(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[Any], caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker keeps run r-9, which the restored state does not hold and which began before r-1 (and
    r-0), the runs the state holds: an older state the broker kept, not one of a station that went on.
    Nothing is held: r-1's report goes out, and a WARNING says why (no ERROR)."""
    from test_publisher import make_config

    observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/report"])
    began = time.time() - 3600
    try:
        observer.wait_ready()
        _retain(broker, _later_state("r-9", 4, "closed", began - 900))
        config = make_config(tmp_path, broker.port)
        with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.run_watch"):
            publisher = _restored_start(config, ("r-1",), began)
            publisher.publish_many([("report", "rep-3", json.dumps({"run_id": "r-1", "fields_analyzed": 3}).encode(), "1")],
                                   extra=[_state_message("r-1", 3, "closed")])
            said = _sent_holding_nothing(publisher, observer, caplog, started)
        assert "run r-9 began at " in said and "before run r-1 of this station's state" in said, said
    finally:
        observer.close()


def test_stop_run_on_a_run_taken_back_and_held_answers_that_its_report_is_held(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """A real station killed with a run open (one field) is started again within the run's idle
    timeout and takes it back, while the broker keeps a later run of this station id that its state
    lacks (number 50, begun after it): the run it took back is held. stop_run's answer names the
    report id as always, and says, as verify_run's does, that the report is held (`held` true, a
    message naming the later run and the release); it said nothing, and the id never arrived."""
    from test_started_runs import _command, _station

    config, inbox = _station(tmp_path, broker)
    with station_child(tmp_path, broker, config) as station:
        sub, first = station.sub, station.first
        started = _command(sub, "start_run", {"specimen_id": "H-7"})
        assert started["ok"], (started, first.lines[-20:])
        (inbox / "a.png").write_bytes(_png(60))
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/field" for m in ms), 30), first.lines[-20:]
        station.kill()
        later = json.loads(_later_state("r-later", 4, "open", time.time()))
        later["progress"]["run_seq"] = 50
        _retain(broker, json.dumps(later).encode())

        second = station.start_child()
        said = f"the broker holds run r-later of station {STATION}"
        assert wait_until(lambda: any(said in line for line in list(second.lines)), 30), second.lines[-20:]
        assert any(f"specimen run {started['run_id']} resumed" in line for line in list(second.lines))
        stopped = _command(sub, "stop_run")
        assert stopped["ok"] and stopped["run_id"] == started["run_id"] and stopped["report_id"], stopped
        assert stopped["held"] is True, stopped
        assert stopped["message"].startswith("the run's report is held at the station: the broker shows run "
                                             "r-later, begun after the runs"), stopped
        assert f"mosquitto_pub -r -n -t {BASE}/run" in stopped["message"], stopped
        assert not sub.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 2)


def test_a_run_left_open_without_a_field_and_closed_at_a_start_under_a_later_run_is_held_not_sent_over_it(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    """A real station killed with a run start_run opened and no field yet; the next start (the run's
    idle timeout long past) closes it, no report, while the broker keeps a later run of this station
    id that its state lacks (number 50, begun after it). That run was left open in this state like
    any other, and is held as they are: its closed run state (0 fields) is parked, not sent, and the
    broker still retains the later run. It went out and replaced the later run's retained state."""
    import sqlite3
    from contextlib import closing

    from test_daemon import saw_offline
    from test_started_runs import _command, _station

    config, _ = _station(tmp_path, broker)
    outbox_path = refusing_outbox(config)  # no trigger: the station's tables, made before it starts
    with station_child(tmp_path, broker, config) as station:
        sub, first = station.sub, station.first
        started = _command(sub, "start_run", {"specimen_id": "H-8"})
        assert started["ok"], (started, first.lines[-20:])
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/run" and run_state(m).get("run_id") == started["run_id"]
                                           for m in ms), 30), first.lines[-20:]
        station.kill()
        with closing(sqlite3.connect(outbox_path)) as db:  # begun an hour ago: past its idle timeout (600 s)
            assert db.execute("UPDATE started_runs SET started_at = started_at - 3600").rowcount == 1
            db.commit()
        later = json.loads(_later_state("r-later", 4, "open", time.time()))
        later["progress"]["run_seq"] = 50
        _retain(broker, json.dumps(later).encode())
        sub.messages.clear()

        second = station.start_child()
        said = f"the broker holds run r-later of station {STATION}"
        assert wait_until(lambda: any(said in line for line in list(second.lines)), 30), second.lines[-20:]
        assert any(f"run {started['run_id']} for specimen H-8" in line and "closed (restart)" in line
                   for line in list(second.lines)), second.lines[-30:]
        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.lines[-20:]
        assert saw_offline(sub)  # all the station delivered is here
    sent = [run_state(m) for m in sub.on_topic(f"{BASE}/run") if m.payload and not m.retain]
    assert not [s for s in sent if s.get("run_id") == started["run_id"]], sent
    assert (retained_run_state(broker.port, BASE) or {}).get("run_id") == "r-later"
