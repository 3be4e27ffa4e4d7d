"""Under MQTT 3.1.1 mosquitto acknowledges a message its ACL denies and drops it: the station counted
a report delivered that nobody got. A station that may read its own topics subscribes to them at each
3.1.1 connection and says at ERROR, naming the ACL line to add, a topic whose first acknowledged
message did not come back (service.mqtt.echo_watch). Against a real mosquitto with an acl_file."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import MosquittoBroker, Subscriber, wait_until
from test_publisher import BASE, make_config, start_publisher

from smearscope.service.mqtt import echo_watch
from smearscope.service.mqtt.publisher import MqttPublisher


def _said(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "smearscope.service.mqtt.echo_watch"
            and r.levelno == level]


@pytest.mark.broker
def test_under_mqtt_311_an_acl_that_drops_the_reports_is_said_at_error_with_the_line_to_add(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
) -> None:
    monkeypatch.setattr(echo_watch, "ECHO_BOUND_S", 1.0)
    acl = (f"user station\ntopic write {BASE}/field\ntopic write {BASE}/status\ntopic write {BASE}/telemetry\n"
           f"topic read {BASE}/#\nuser observer\ntopic read #\n")
    broker = broker_with(acl=acl)
    sub = observer_on(broker.port, [f"{BASE}/report", f"{BASE}/field"])
    publisher = start_publisher(make_config(tmp_path, broker.port, protocol="3.1.1"), started)
    assert publisher.wait_until_connected(5)
    with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt.echo_watch"):
        publisher.publish_report("field", "field-1", b"{}", "1")
        publisher.publish_report("report", "denied-1", b"{}", "1")
        # the broker acknowledges both: the station counts the report delivered ...
        assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10), publisher.state
        assert wait_until(lambda: len(_said(caplog, logging.ERROR)) == 1, 10), caplog.text[-3000:]
        # ... which only the field reached a subscriber
        assert sub.wait_for(lambda m: len(m) >= 1, 5)
        assert [json.loads(m.payload)["report_id"] for m in sub.messages] == ["field-1"]
        error = _said(caplog, logging.ERROR)[0]
        assert f"to {BASE}/report and it did not come back" in error, error
        assert f"'topic write {BASE}/report' and 'topic read {BASE}/report' under 'user station'" in error, error
        assert "MQTT 5" in error, error
        publisher.publish_report("report", "denied-2", b"{}", "1")  # said once, not per report
        assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10)
        assert len(_said(caplog, logging.ERROR)) == 1, _said(caplog, logging.ERROR)
        # the line added and the ACL reloaded: the next report comes back, and that is said
        (broker.workdir / "acl").write_text(acl.replace("user observer", f"topic write {BASE}/report\nuser observer"))
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto re-reads its ACL
        assert wait_until(lambda: "Reloading config" in broker.log(), 10), broker.log()[-2000:]
        publisher.publish_report("report", "allowed-1", b"{}", "1")
        assert sub.wait_for(lambda m: any(json.loads(x.payload)["report_id"] == "allowed-1" for x in m), 10)
        assert wait_until(lambda: len(_said(caplog, logging.INFO)) == 1, 10), caplog.text[-3000:]
        assert f"messages to {BASE}/report come back" in _said(caplog, logging.INFO)[0]
    assert not [m for m in _said(caplog, logging.ERROR) if f"{BASE}/field" in m]


@pytest.mark.broker
def test_under_mqtt_311_the_example_acls_rights_pass_the_check_without_a_word(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    broker_with: Callable[..., MosquittoBroker],
) -> None:
    """The station block of config/mosquitto.acl.example (its user renamed to the tests'): each topic's
    first message comes back, at each connection, and nothing is said."""
    monkeypatch.setattr(echo_watch, "ECHO_BOUND_S", 1.0)
    example = (Path(__file__).parents[1] / "config" / "mosquitto.acl.example").read_text()
    block = example[example.index("user station-lab-7"):].split("\n\n")[0].replace("user station-lab-7", "user station")
    broker = broker_with(acl=block + "\n")
    with caplog.at_level(logging.DEBUG, logger="smearscope.service.mqtt.echo_watch"):
        publisher = start_publisher(make_config(tmp_path, broker.port, protocol="3.1.1"), started)
        assert publisher.wait_until_connected(5)
        for connection in (1, 2):
            for kind in ("field", "report"):
                publisher.publish_report(kind, f"{kind}-{connection}", b"{}", "1")
            assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10)
            assert wait_until(lambda: publisher.echo._state == {
                f"{BASE}/field": "back", f"{BASE}/report": "back", f"{BASE}/cells": "waiting"}, 10), \
                publisher.echo._state
            if connection == 1:
                broker.restart()
                assert wait_until(lambda: publisher.state.connects == 2, 15), publisher.state
        time.sleep(0)  # nothing timed: the bound (1 s) is the watch's, checked at each drain tick
    assert not [r for r in caplog.records if r.name == "smearscope.service.mqtt.echo_watch"
                and r.levelno >= logging.WARNING], caplog.text


@pytest.mark.broker
def test_an_acknowledgement_of_the_connection_before_is_not_waited_on_to_come_back_on_the_next(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], monkeypatch: pytest.MonkeyPatch,
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
) -> None:
    """The drain thread busy (a slow disk) while the broker acknowledges a report and the connection is
    then lost and made again: the acknowledgement is settled on the new connection. Its message came
    back (or not) on the connection before; the new one's check does not wait for it, which said at
    ERROR, once the bound passed, that the ACL drops reports it passes on."""
    monkeypatch.setattr(echo_watch, "ECHO_BOUND_S", 1.0)
    broker = broker_with()
    sub = observer_on(broker.port, [f"{BASE}/report"])
    publisher = start_publisher(make_config(tmp_path, broker.port, protocol="3.1.1"), started)
    assert publisher.wait_until_connected(5)
    report_topic = f"{BASE}/report"
    assert wait_until(lambda: publisher.echo._state.get(report_topic) == "waiting", 5)
    gate, held = threading.Event(), threading.Event()
    check = publisher.echo.check

    def busy_check() -> None:  # the drain thread stops here once it has sent the report
        if not gate.is_set() and len(publisher._inflight):  # not in a pass that sent nothing
            held.set()
            gate.wait(30)
        check()

    publisher.echo.check = busy_check  # type: ignore[method-assign]
    publisher.publish_report("report", "r-1", b"{}", "1")
    assert held.wait(5)
    assert sub.wait_for(lambda m: len(m) >= 1, 5)  # delivered: the broker acknowledges it just after
    broker.restart()
    assert wait_until(lambda: publisher.state.connects == 2, 15), publisher.state
    assert wait_until(lambda: publisher.echo._state.get(report_topic) == "waiting", 5)
    gate.set()  # the drain thread settles the first connection's acknowledgement now
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10), publisher.state
    assert report_topic not in publisher.echo._acked, publisher.echo._acked
