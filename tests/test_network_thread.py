"""paho's network thread ending under the station (service.mqtt.network_thread): it is started again,
the station reconnects and delivers what its outbox holds, and says so at ERROR once."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import MosquittoBroker, Subscriber, wait_until
from test_publisher import make_config

from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.mqtt.publisher import MqttPublisher

pytestmark = [pytest.mark.broker, pytest.mark.faults,
              # the SystemExit that ends paho's thread here on purpose, which pytest reports
              pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")]

STATION = "lab-12"
REPORTS = f"smearscope/{STATION}/report"
SAID = "MQTT network thread ended unexpectedly"


def end_once(client: mqtt.Client, name: str) -> None:
    """The client's `name` (a method paho's thread calls) raises SystemExit the first time: the thread
    ends silently, as threading lets a SystemExit end a thread (suppress_exceptions does not catch it)."""
    real = getattr(client, name)

    def ending(*args: object, **kwargs: object) -> object:
        setattr(client, name, real)
        raise SystemExit(f"{name} interrupted")

    setattr(client, name, ending)


def reports(publisher: MqttPublisher, n: int, tag: str) -> list[str]:
    ids = [f"{tag}-{i}" for i in range(n)]
    for report_id in ids:
        publisher.publish_report("report", report_id, json.dumps({"report_id": report_id}).encode(), "1.0")
    return ids


def said_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and SAID in r.getMessage()]


def test_a_network_thread_ended_in_its_reconnect_wait_is_started_again_and_the_held_reports_are_delivered(
    tmp_path: Path, credentials_dir: Path, caplog: pytest.LogCaptureFixture,
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber], started: list[MqttPublisher],
) -> None:
    """The broker goes away and paho's reconnect wait raises: its thread ends, and with it every
    reconnect. The station starts it again, reconnects when the broker is back and delivers the reports
    stored meanwhile (never reconnected before: the reports stayed in the outbox for good)."""
    broker = broker_with(persistence=True)
    sub = observer_on(broker.port, [REPORTS], client_id="thread-observer", persistent=True)
    # the subscriber's session on disk, so it outlives the broker's restart
    assert wait_until(lambda: broker.saved(REPORTS), 10), "the subscriber's session never reached the broker's file"
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    publisher = MqttPublisher(make_config(tmp_path, broker.port), STATION, outbox)
    started.append(publisher)
    with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt"):
        publisher.start()
        assert publisher.wait_until_connected(5)
        first = reports(publisher, 3, "before")
        assert publisher.wait_until_drained(10)
        client = publisher._client
        assert client is not None
        end_once(client, "_reconnect_wait")
        broker.kill()
        assert wait_until(lambda: not publisher.state.connected, 10)
        held = reports(publisher, 5, "held")
        # the broker back once the thread has ended (and been started again: a drain tick later)
        assert wait_until(lambda: publisher._network.restarts == 1, 10), publisher.state
        broker.start()
        assert publisher.wait_until_drained(20), publisher.state
        assert sub.wait_for(lambda ms: {json.loads(m.payload)["report_id"] for m in ms} >= {*first, *held}, 20)
    assert outbox.counts().messages == 0
    assert len(said_errors(caplog)) == 1, said_errors(caplog)


def test_a_network_thread_ended_by_a_callback_while_connected_is_started_again_and_acknowledgements_are_read(
    tmp_path: Path, credentials_dir: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture,
    observer_on: Callable[..., Subscriber], started: list[MqttPublisher],
) -> None:
    """A callback raises SystemExit on paho's thread while connected: nothing reads the broker's
    acknowledgements nor pings it any more. The station starts the thread again on the same connection
    and every report is delivered and taken out of the outbox (the check undone: the outbox kept them,
    the broker dropped the silent connection and the station never reconnected)."""
    sub = observer_on(broker.port, [REPORTS])
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    publisher = MqttPublisher(make_config(tmp_path, broker.port), STATION, outbox)
    started.append(publisher)
    with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt"):
        publisher.start()
        assert publisher.wait_until_connected(5)
        client = publisher._client
        assert client is not None
        assert client._thread is not None  # paho's network thread runs
        end_once(client, "_handle_pubackcomp")  # the next acknowledgement read ends the thread
        ids = reports(publisher, 10, "acked")
        assert publisher.wait_until_drained(20), publisher.state
        assert sub.wait_for(lambda ms: {json.loads(m.payload)["report_id"] for m in ms} >= set(ids), 10)
    assert publisher._network.restarts == 1
    assert outbox.counts().messages == 0
    assert len(said_errors(caplog)) == 1, said_errors(caplog)



def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_network_threads_started_again_leave_no_wake_up_sockets_open(
    tmp_path: Path, credentials_dir: Path, broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each restart's loop_start makes paho a new pair of wake-up sockets; the pair it replaces is closed as its
    last reference goes (service.mqtt.network_thread says why the station does not close it itself): five
    restarts on a real broker leave the process's open descriptors as they were. Python's own hook for a
    thread's uncaught exception, as in the station: pytest's keeps the traceback, and with it the old pair."""
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    publisher = MqttPublisher(make_config(tmp_path, broker.port), STATION, outbox)
    try:
        publisher.start()
        assert publisher.wait_until_connected(5)
        client = publisher._client
        assert client is not None
        reports(publisher, 1, "warm")
        assert publisher.wait_until_drained(10), publisher.state
        before = open_fds()
        for restart in range(1, 6):
            end_once(client, "_handle_pubackcomp")  # the next acknowledgement read ends the thread
            reports(publisher, 2, f"restart-{restart}")
            assert wait_until(lambda: publisher._network.restarts == restart, 10)  # noqa: B023
            assert publisher.wait_until_drained(10), publisher.state
        assert open_fds() == before
    finally:
        publisher.stop(drain_timeout=0)
        outbox.close()
