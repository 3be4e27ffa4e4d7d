"""Two clients logging in with one MQTT client id (a cloned station config or SD card, a station
restarted while its old process still runs, two archives): the broker closes the older connection
at each login, and two clients that both reconnect at once throw each other off for ever. One of
them says so once at ERROR and leaves the connection to the other (service.mqtt.take_over).
Against a real mosquitto (2.0: it closes the older connection without the MQTT 5 reason 0x8E,
which the watch's own test feeds it)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, wait_until
from test_publisher import BASE, make_config, start_publisher

from smearscope.service.mqtt import take_over
from smearscope.service.mqtt.publisher import MqttPublisher
from smearscope.service.mqtt.take_over import (
    PAUSE_MAX_S,
    PAUSE_S,
    SESSION_TAKEN_OVER,
    TakeOverWatch,
)

pytestmark = pytest.mark.broker

LOGGER = "smearscope.service.mqtt.publisher"
SAID = "MQTT client id 'smearscope-lab-7' taken over on broker 127.0.0.1:"


def _said(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and SAID in r.getMessage()]


def _report(publisher: MqttPublisher, report_id: str) -> None:
    publisher.publish_report("report", report_id, json.dumps({"id": report_id}).encode(), "1.4")


def _arrived(observer: Subscriber, report_id: str, timeout: float = 10) -> bool:
    return observer.wait_for(lambda messages: any(
        m.topic == f"{BASE}/report" and json.loads(m.payload).get("report_id") == report_id for m in messages), timeout)


@pytest.mark.parametrize(("protocol", "steps_back", "how"), [
    ("5", 0, "and its retained status at that connection was another process's"),
    ("3.1.1", 1, "3 times in a row, each within 5 s of connecting"),
])
def test_two_stations_under_one_client_id_stop_throwing_each_other_off(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path,
    started: list[MqttPublisher], caplog: pytest.LogCaptureFixture, protocol: str, steps_back: int, how: str,
) -> None:
    """A cloned config: both stations log in as smearscope-lab-7. Before, the broker closed one
    connection at each login of the other, about once a second for as long as both ran. Now one
    says it once at ERROR, shows it in its state (the status command, systemd's STATUS= line) and
    pauses; the other keeps its connection: the broker closes it no more, and its reports arrive.
    MQTT 5: the first station, at its first reconnection, finds the second's status retained and is
    thrown off again within 5 s: it steps back (the newer process keeps the id, as a broker sending
    0x8E has it). MQTT 3.1.1: the first to count three short connections in a row, the second (the
    first's first loss came after a longer connection)."""
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        stations = [start_publisher(make_config(tmp_path / "a", broker.port, protocol=protocol), started)]
        assert stations[0].wait_until_connected(5)
        time.sleep(take_over.SHORT_LIVED_S + 0.5)  # a station that has run a while: its first loss is no short one
        stations.append(start_publisher(make_config(tmp_path / "b", broker.port, protocol=protocol), started))
        assert wait_until(lambda: _said(caplog), 40), [r.getMessage() for r in caplog.records if r.levelno >= 30]
        assert [p.state.status == "taken_over" for p in stations] == [steps_back == 0, steps_back == 1], [
            p.state for p in stations]
        holder = stations[1 - steps_back]
        assert wait_until(lambda: holder.state.connected, 5), holder.state
        connects = holder.state.connects
        # a window far shorter than the 60 s pause: before, it held about 8 connections in turn
        assert not wait_until(lambda: holder.state.connects != connects or not holder.state.connected, 8)
        _report(holder, "spec-holder")
        assert _arrived(observer, "spec-holder")
        assert stations[steps_back].state.status == "taken_over"
    said = _said(caplog)
    assert len(said) == 1, said  # once, not at each try
    assert stations[steps_back].state.last_error == said[0]
    assert (how in said[0] and "tries again in 60 s" in said[0]
            and "a second station with this station_id: a cloned config or SD card" in said[0]
            and "Give each station its own station_id" in said[0]), said[0]
    # short connections alone (3.1.1) are what a broker restarted again and again gives too: both named
    assert ("or that broker restarting again and again" in said[0]) == (protocol == "3.1.1"), said[0]
    assert ("leaves the connection to the other and" in said[0]) == (protocol == "5"), said[0]


@pytest.mark.parametrize(("protocol", "gone"), [
    ("5", "the other client is gone"),
    ("3.1.1", "the other client is gone, or the broker has stopped restarting"),
])
def test_a_station_that_stepped_back_takes_its_client_id_back_once_the_other_is_gone(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path,
    started: list[MqttPublisher], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    protocol: str, gone: str,
) -> None:
    """The other station stopped (the cloned board switched off, the old process ended): the one
    that stepped back connects at its next try, keeps the connection, says at INFO that the client
    id is its own again, and its reports, kept in its outbox meanwhile, arrive. Over MQTT 3.1.1 the
    take-over was told by short connections alone, which a broker restarting again and again gives
    too: the INFO names both. Pauses shortened to 2 to 4 s so the test need not wait a minute."""
    monkeypatch.setattr(take_over, "PAUSE_S", 2)
    monkeypatch.setattr(take_over, "PAUSE_MAX_S", 4)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = start_publisher(make_config(tmp_path / "a", broker.port, protocol=protocol), started)
        assert first.wait_until_connected(5)
        second = start_publisher(make_config(tmp_path / "b", broker.port, protocol=protocol), started)
        assert wait_until(lambda: _said(caplog), 40)
        stepped_back = first if first.state.status == "taken_over" else second
        holder = second if stepped_back is first else first
        _report(stepped_back, "spec-waited")
        holder.stop(drain_timeout=0)
        again = "MQTT client id 'smearscope-lab-7' is this station's again on broker"
        assert wait_until(lambda: any(again in r.getMessage() for r in caplog.records), 20), stepped_back.state
        assert stepped_back.state.connected
        assert _arrived(observer, "spec-waited")
    info = [r.getMessage() for r in caplog.records if again in r.getMessage()]
    assert len(info) == 1 and info[0].endswith(f"has lasted 5 s, {gone}"), info
    assert len(_said(caplog)) == 1


def test_the_watch_steps_back_at_once_on_session_taken_over_and_pauses_longer_while_it_lasts() -> None:
    """MQTT 5 brokers that send DISCONNECT 0x8E (Session taken over) name the cause: stepped back
    at the first, whatever the connection lasted; without it, three short connections in a row, or
    (a station under MQTT 5) one whose start found another process's status retained, never short
    ones alone. Each try closed as quickly doubles the pause up to PAUSE_MAX_S; a connection that
    lasts ends it."""
    now = [0.0]
    watch = TakeOverWatch(clock=lambda: now[0])
    watch.connected()
    now[0] += 3600
    loss = watch.lost(SESSION_TAKEN_OVER)
    assert (loss.taken_over, loss.said, loss.pause_s) == (True, True, PAUSE_S)
    pauses = []
    for _ in range(4):
        now[0] += pauses[-1] if pauses else PAUSE_S
        watch.connected()
        now[0] += 1
        loss = watch.lost(0x80)  # mosquitto 2.0: the socket closed, paho says "Unspecified error"
        assert loss.taken_over and not loss.said
        pauses.append(loss.pause_s)
    assert pauses == [min(PAUSE_S * 2 ** n, PAUSE_MAX_S) for n in range(1, 5)]
    watch.connected()
    now[0] += 4.9
    assert not watch.held()
    now[0] += 0.2
    assert watch.held() and not watch.held() and not watch.taken_over
    for n in range(1, 4):  # no reason given: the third short connection in a row
        now[0] += 100
        watch.connected()
        now[0] += 1
        loss = watch.lost(0x80)
        assert (loss.taken_over, loss.said, loss.short) == (n == 3, n == 3, n)
    assert watch.spells == 2
    watch = TakeOverWatch(clock=lambda: now[0])  # MQTT 5 station: its retained status witnesses
    for _ in range(4):  # a broker restarted again and again: short connections, its own status retained
        now[0] += 100
        watch.connected()
        now[0] += 1
        assert not watch.lost(0x80, witnessing=True).taken_over
    watch.connected()
    watch.witness()  # another process's status, retained when this connection began
    now[0] += 1
    loss = watch.lost(0x80, witnessing=True)
    assert (loss.taken_over, loss.said, loss.pause_s) == (True, True, PAUSE_S)



def test_doctor_says_a_running_station_that_left_the_broker_to_another_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside a running station, doctor reads the unit's STATUS= line (systemctl show; a stand-in
    systemctl here, as this container runs no systemd: tests/test_doctor_memory.py) and says the
    take-over the station says there as a FAIL on `broker client id`; a station connected, or no
    systemd to ask, adds no line."""
    from test_doctor_memory import fake_systemctl

    from smearscope.cli.doctor_broker import client_id_checks
    from smearscope.service.config import MqttConfig
    from smearscope.service.mqtt.take_over import Loss, taken_over_message

    said = taken_over_message("broker.lab:8883", "smearscope-lab-7", Loss(True, True, 1, PAUSE_S), None, "station",
                              "a second station with this station_id")
    mqtt = MqttConfig(host="broker.lab", port=8883)
    # the daemon's status line (service.station.daemon_status): "...; broker <status>: <last_error>"
    running = f"StatusText=3 fields analysed, 0 rejected, 0 failed; outbox 2 (1 reports); broker taken_over: {said}\n"
    monkeypatch.setenv("PATH", f"{fake_systemctl(tmp_path / 'taken', running)}:/usr/bin:/bin")
    checks = client_id_checks(mqtt, "lab-7", "smearscope.service")
    assert checks == [("FAIL", "broker client id", ("the running station (smearscope.service) has left broker "
                       f"broker.lab:8883 to another client logged in as 'smearscope-lab-7', and says: {said}"))]
    assert "show smearscope.service -p StatusText" in (tmp_path / "taken" / "args").read_text()
    connected = "StatusText=3 fields analysed, 0 rejected, 0 failed; outbox 0 (0 reports); broker connected\n"
    monkeypatch.setenv("PATH", f"{fake_systemctl(tmp_path / 'connected', connected)}:/usr/bin:/bin")
    assert client_id_checks(mqtt, "lab-7", "smearscope.service") == []
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no systemctl at all
    assert client_id_checks(mqtt, "lab-7", "smearscope.service") == []


def test_each_status_message_names_its_process_over_mqtt_5(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path,
    started: list[MqttPublisher],
) -> None:
    """`online` and a clean stop's `offline` carry the MQTT 5 user property `instance_id` (the Will
    too, set on the client): what a station reconnecting reads in the retained status to tell
    another process's from its own."""
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    publisher.stop(drain_timeout=0)
    own = {"instance_id": publisher.instance["instance_id"]}
    assert observer.wait_for(lambda ms: [(m.payload, m.user_properties) for m in ms if m.topic == f"{BASE}/status"]
                             == [(b"online", own), (b"offline", own)], 10), observer.on_topic(f"{BASE}/status")


def test_an_archive_that_stepped_back_takes_the_session_back_once_the_other_is_gone(
    persistent_broker: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two archives under one client id: one steps back (ERROR); the other stopped, the first
    connects at its next try, keeps the connection, says at INFO the client id is its own again,
    and stores the report published after. Pauses shortened to 2 to 4 s."""
    import threading

    from test_archive import SPECIMEN, a_report, envelope_of, indexed, raw_client
    from test_archive import STATION as ARCHIVED_STATION

    from smearscope.service.archive.daemon import ArchiveDaemon
    from smearscope.service.config import MqttConfig
    from smearscope.service.config.archive import ArchiveConfig

    monkeypatch.setattr(take_over, "PAUSE_S", 2)
    monkeypatch.setattr(take_over, "PAUSE_MAX_S", 4)
    archives, runners = [], []
    caplog.set_level(logging.INFO, logger="smearscope.service.archive.daemon")
    for name in ("first", "second"):
        config = ArchiveConfig(mqtt=MqttConfig(host="127.0.0.1", port=persistent_broker.port, username="observer",
                                               client_id="archive-twin"), directory=tmp_path / name, retry_s=0.2)
        archives.append(ArchiveDaemon(config, MQTT_USERS["observer"]))
        runners.append(threading.Thread(target=archives[-1].run))
        runners[-1].start()
    try:
        said = "MQTT client id 'archive-twin' taken over on broker"
        assert wait_until(lambda: any(said in r.getMessage() for r in caplog.records), 60)
        stepped_back = next(a for a in archives if a._take_over.taken_over)
        holder = archives[1] if stepped_back is archives[0] else archives[0]
        holder.stop()
        runners[archives.index(holder)].join(30)
        again = "client id 'archive-twin' is this archive's again on broker"
        assert wait_until(lambda: any(again in r.getMessage() for r in caplog.records), 20)
        with raw_client(persistent_broker.port) as client:
            client.publish(f"smearscope/{ARCHIVED_STATION}/report",
                           envelope_of(a_report("run-1", SPECIMEN, 1_796_000_000.0)), qos=1).wait_for_publish(10)
        assert wait_until(lambda: indexed(stepped_back.store.directory) == 1, 20)
    finally:
        for archive in archives:
            archive.stop()
        for runner in runners:
            runner.join(30)
    assert sum(said in r.getMessage() for r in caplog.records) == 1


def test_a_holder_gone_during_the_pause_leaves_no_witness_of_a_second_take_over(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path,
    started: list[MqttPublisher], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MQTT 5: the station that stepped back finds, at its next try, the retained `offline` the
    holder left when it stopped during the pause: another process's status, but published seconds
    before this login (the broker's countdown of its Message Expiry Interval tells the age), so no
    client was thrown off by it. A broker restart closing that connection within 5 s is an outage,
    said as one, not a second take-over (before: state taken_over again, a further pause)."""
    monkeypatch.setattr(take_over, "PAUSE_S", 6)
    monkeypatch.setattr(take_over, "PAUSE_MAX_S", 6)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        first = start_publisher(make_config(tmp_path / "a", broker.port), started)
        assert first.wait_until_connected(5)
        second = start_publisher(make_config(tmp_path / "b", broker.port), started)
        assert wait_until(lambda: _said(caplog), 40)
        stepped_back = first if first.state.status == "taken_over" else second
        holder = second if stepped_back is first else first
        holder.stop(drain_timeout=0)  # its `offline`, retained, some seconds before the next try
        connects = stepped_back.state.connects
        assert wait_until(lambda: stepped_back.state.connects > connects and stepped_back.state.connected, 20)
        lost = "MQTT connection lost to broker"
        before = sum(lost in r.getMessage() for r in caplog.records)
        broker.restart()  # within 5 s of that connection
        assert wait_until(lambda: sum(lost in r.getMessage() for r in caplog.records) > before
                          or stepped_back.state.status == "taken_over", 10), stepped_back.state
        assert stepped_back.state.status != "taken_over", stepped_back.state
        assert wait_until(lambda: stepped_back.state.connected, 20), stepped_back.state
    assert len(_said(caplog)) == 1


@pytest.mark.parametrize("kept", ["none", "own", "previous"])
def test_a_broker_restarted_again_and_again_is_no_take_over_over_mqtt_5(
    tmp_path: Path, started: list[MqttPublisher], credentials_dir: Path, caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest, kept: str,
) -> None:
    """docs/MQTT.md, 'Client ids': a station over MQTT 5 whose broker is restarted three times, each within seconds
    of its reconnection (three connections in a row closed within 5 s, which over MQTT 3.1.1 read as a take-over),
    finds at each connection no other process's status published at that login: none retained (`none`, a broker
    without persistence forgets it at each restart), its own `online` (`own`, a broker with persistence), or at its
    first connection the `offline` its previous process left as it stopped just before this one started
    (`previous`, a station restarted). None of them is taken for a take-over: no ERROR, never `taken_over`, each
    time reconnected with its usual backoff (not paused 60 s), its report on each connection delivered. Fails with the
    witness undone (short connections counted as over 3.1.1), with its own status taken for another's, or with
    the previous process's counted at the first connection."""
    broker: MosquittoBroker = request.getfixturevalue("broker" if kept == "none" else "persistent_broker")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        if kept == "previous":  # the station's previous process, stopped as this one starts
            previous = start_publisher(make_config(tmp_path / "previous", broker.port, protocol="5"), started)
            assert previous.wait_until_connected(5)
            previous.stop(drain_timeout=0)
        station = start_publisher(make_config(tmp_path / "station", broker.port, protocol="5"), started)
        for connects in range(1, 5):
            assert wait_until(lambda: station.state.connects == connects and station.state.connected,  # noqa: B023
                              15), station.state
            # a report acknowledged on this connection: the station has read what the broker sent it before the
            # acknowledgement, the retained status its subscription found included
            _report(station, f"on-connection-{connects}")
            assert station.wait_until_drained(10), station.state
            if connects < 4:
                broker.restart()  # within seconds of that connection
        assert station._take_over.short == 3  # the three connections were closed within 5 s of opening each
    assert station.state.status == "connected" and station._take_over.spells == 0, station.state
    assert _said(caplog) == [], _said(caplog)
