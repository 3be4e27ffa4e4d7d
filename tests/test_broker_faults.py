"""Fault tests: the publisher's at-least-once guarantee across a broker crash and its own crash."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker import (
    MOSQUITTO_PASSWD,
    MosquittoBroker,
    PublisherProcess,
    Subscriber,
    free_port,
    wait_until,
)
from test_publisher import make_config, stop_publisher

from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.mqtt.publisher import MqttPublisher

pytestmark = [pytest.mark.broker, pytest.mark.faults]

STATION = "lab-9"
REPORTS = f"smearscope/{STATION}/report"


def delivery_figures(sub: Subscriber, produced: list[str]) -> dict[str, int]:
    """Dedupe by report_id (from the MQTT 5 user property, checked against the envelope)."""
    seen: Counter[str] = Counter()
    for msg in sub.on_topic(REPORTS):
        report_id = msg.user_properties["report_id"]
        assert json.loads(msg.payload)["report_id"] == report_id
        seen[report_id] += 1
    delivered = set(seen) & set(produced)
    return {
        "produced": len(produced),
        "delivered": len(delivered),
        "duplicated": sum(n - 1 for n in seen.values()),
        "lost": len(set(produced) - delivered),
    }


@pytest.mark.slow
def test_broker_killed_mid_stream_and_restarted_30s_later_loses_no_report(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], capsys: pytest.CaptureFixture[str],
) -> None:
    # Persistence keeps the subscriber's session (subscription + queue) across the crash, so the
    # test measures the publisher's guarantee rather than whether the subscriber was listening.
    broker = broker_with(persistence=True)
    sub = observer_on(broker.port, [REPORTS], client_id="fault-observer", persistent=True)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    publisher = MqttPublisher(make_config(tmp_path, broker.port), STATION, outbox)
    started.append(publisher)
    produced: list[str] = []
    killed_at_report = in_flight_at_kill = 0
    assert wait_until(lambda: broker.saved(REPORTS), 10), "the subscriber's session never reached the broker's file"
    publisher.start()
    assert publisher.wait_until_connected(5)

    def produce() -> None:
        for i in range(200):
            report_id = f"specimen-{i:03d}"
            publisher.publish_report("report", report_id, json.dumps({"i": i}).encode(), "1")
            produced.append(report_id)
            time.sleep(0.005)

    producer = threading.Thread(target=produce)
    producer.start()
    while len(produced) < 70:
        time.sleep(0.001)
    # Hang the broker, so the reports produced next are handed over but never acknowledged,
    # then crash it: those in flight must be re-sent, not lost.
    broker.freeze()
    assert wait_until(lambda: publisher.state.in_flight >= 10, 5), publisher.state
    in_flight_at_kill = publisher.state.in_flight
    broker.kill()
    killed_at = time.monotonic()
    killed_at_report = len(produced)
    producer.join(30)
    assert len(produced) == 200
    assert wait_until(lambda: not publisher.state.connected, 10)
    assert publisher.state.status == "disconnected"
    time.sleep(max(0.0, killed_at + 30.0 - time.monotonic()))
    broker.start()
    restarted_at = time.monotonic()

    sub.wait_for(lambda m: len({x.user_properties["report_id"] for x in m}) >= 200, 30)
    figures = delivery_figures(sub, produced)
    with capsys.disabled():
        print(
            f"\nbroker fault: killed after {killed_at_report} of 200 reports produced "
            f"({in_flight_at_kill} in flight), "
            f"down 30 s, all delivered {time.monotonic() - restarted_at:.1f} s after "
            f"restart: {figures}; outbox left: {outbox.counts().messages}"
        )
    assert figures["lost"] == 0, figures
    assert figures["delivered"] == 200
    assert wait_until(lambda: outbox.counts().messages == 0, 5), outbox.counts()


def test_killed_publisher_outbox_is_drained_by_its_successor(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    config = make_config(tmp_path, port)
    # Broker down: the child stores 25 reports it cannot send, and is SIGKILLed.
    child = PublisherProcess(config.model_dump_json(), STATION, reports=25)
    try:
        child.wait_for_line("stored 25", 10)
        state_line = child.wait_for_line("state disconnected", 10)
        assert "cannot reach broker" in state_line
    finally:
        child.kill()

    broker_with(port=port)
    sub = observer_on(port, [REPORTS])
    outbox = Outbox(config.outbox.path)
    publisher = MqttPublisher(config, STATION, outbox)
    started.append(publisher)
    assert outbox.counts().messages == 25
    publisher.start()
    assert sub.wait_for(lambda m: len(m) >= 25, 10)
    produced = [f"child-{i}" for i in range(25)]
    figures = delivery_figures(sub, produced)
    with capsys.disabled():
        print(f"\npublisher crash: {figures}")
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert [m.user_properties["report_id"] for m in sub.on_topic(REPORTS)] == produced
    assert wait_until(lambda: outbox.counts().messages == 0, 5)


def test_a_command_answered_while_the_broker_is_down_reaches_the_asker_after_the_restart(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber],
) -> None:
    """The broker dies while a command runs; its answer, published while the connection is down,
    is sent when the station reconnects (the reconnect dropped every unacknowledged message paho
    held, the command answers with the outbox's, so the asker never heard back)."""
    broker = broker_with(persistence=True)
    answers = f"smearscope/{STATION}/cmd_response/status"
    sub = observer_on(broker.port, [answers], client_id="cmd-observer", persistent=True)
    asked, release = threading.Event(), threading.Event()

    def on_command(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        asked.set()
        release.wait(30)
        return {"ok": True, "answered": "while the broker was down"}

    outbox = Outbox(tmp_path / "outbox.sqlite3")
    publisher = MqttPublisher(make_config(tmp_path, broker.port), STATION, outbox, on_command=on_command)
    started.append(publisher)
    assert wait_until(lambda: broker.saved(answers), 10), "the subscriber's session never reached the broker's file"
    publisher.start()
    assert publisher.wait_until_connected(5)
    # connected is the CONNACK; the command subscription follows it: ask until the station hears
    # (a command published in between reaches no subscriber; once it hears, it answers them all)
    for _ in range(20):
        sub.client.publish(f"smearscope/{STATION}/cmd/status", b"{}", qos=1)
        if asked.wait(0.5):
            break
    assert asked.is_set()
    broker.kill()
    assert wait_until(lambda: not publisher.state.connected, 10)
    release.set()
    time.sleep(1.0)  # answered while down: paho keeps the message until it is connected again
    assert not sub.on_topic(answers)
    broker.start()
    assert sub.wait_for(lambda ms: any(m.topic == answers for m in ms), 20), publisher.state
    assert json.loads(sub.on_topic(answers)[-1].payload) == {"ok": True, "answered": "while the broker was down"}


def test_a_password_changed_on_the_broker_is_said_with_what_to_do_and_no_report_is_lost(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker's password_file changes (SIGHUP: mosquitto drops the station's connection and
    refuses its next CONNECT). The journal says once which broker refused which user and what to do;
    the reports wait in the outbox and go once the station restarts with the new password."""
    broker = broker_with()
    sub = observer_on(broker.port, [REPORTS])
    config = make_config(tmp_path, broker.port)
    publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox))
    started.append(publisher)
    publisher.start()
    assert publisher.wait_until_connected(5)
    with caplog.at_level(logging.DEBUG, logger="smearscope.service.mqtt.publisher"):
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(broker.workdir / "passwd"), "station", "rotated"], check=True)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: publisher.state.refusals >= 2, 10), publisher.state  # retried, refused again
        for i in range(3):
            publisher.publish_report("report", f"held-{i}", b"{}", "1")
    state = publisher.state
    assert state.status == "refused" and state.last_reason_code == 0x87, state
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # the repeats at DEBUG
    assert errors[0] == state.last_error
    for part in (f"127.0.0.1:{broker.port}", "Not authorized", "user 'station'", "'mqtt-password'",
                 "reads it again before its next attempt", "up to 2 s"):
        assert part in errors[0], (part, errors[0])
    assert publisher.outbox.counts().reports == 3
    stop_publisher(publisher, started, drain_timeout=0)
    (credentials_dir / "mqtt-password").chmod(0o600)
    (credentials_dir / "mqtt-password").write_text("rotated\n")
    publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox))
    started.append(publisher)
    publisher.start()
    assert sub.wait_for(lambda m: len(m) >= 3, 10), publisher.state
    assert sorted(json.loads(m.payload)["report_id"] for m in sub.messages) == ["held-0", "held-1", "held-2"]
