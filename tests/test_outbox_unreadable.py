"""A running publisher whose outbox file stops answering reads (SQLite's own error: the connection's
authorizer refuses the outbox table, as an I/O error or a corrupt page would fail the read), against
a real mosquitto: the drain thread says it once, not a traceback every tick, and a stop completes."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import MosquittoBroker, Subscriber, wait_until
from test_publisher import BASE, make_config, start_publisher

from smearscope.service.mqtt import inflight
from smearscope.service.mqtt.publisher import MqttPublisher

LOGGER = "smearscope.service.mqtt.publisher"


def refuse_outbox(action: int, table: str | None, *rest: object) -> int:
    return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_READ and table == "outbox" else sqlite3.SQLITE_OK


@pytest.mark.broker
def test_a_drain_loop_that_cannot_read_the_outbox_says_so_once_at_error_and_at_info_when_it_reads_again(
    broker: MosquittoBroker, tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    publisher.outbox.read(lambda conn: conn.set_authorizer(refuse_outbox))
    failing = lambda: [r for r in caplog.records if r.name == LOGGER and "MQTT drain loop error" in r.getMessage()]
    assert wait_until(lambda: len(failing()) >= 5, 30), [r.getMessage() for r in caplog.records[-5:]]
    errors = [r for r in failing() if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "prohibited" in errors[0].getMessage() and str(publisher.outbox.path) in errors[0].getMessage()
    assert errors[0].exc_info is None  # the traceback once, at DEBUG
    assert sum(1 for r in failing() if r.exc_info) == 1
    assert all(r.levelno == logging.DEBUG for r in failing() if r is not errors[0])

    publisher.outbox.read(lambda conn: conn.set_authorizer(None))
    again = lambda: [r for r in caplog.records if "MQTT drain loop works again" in r.getMessage()]
    assert wait_until(lambda: bool(again()), 10)
    assert again()[0].levelno == logging.INFO and "prohibited" in again()[0].getMessage()
    publisher.publish_report("report", "after", b"{}", "1")
    assert publisher.wait_until_drained(10)  # sending goes on


@pytest.mark.broker
def test_a_stop_with_an_outbox_that_cannot_be_read_completes_says_what_it_could_not_count_and_goes_offline(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
) -> None:
    """A parked message (over mosquitto's message_size_limit) makes the stop's wait read the outbox."""
    broker = broker_with(extra=("message_size_limit 1500",))  # reports over it, telemetry under
    sub = observer_on(broker.port, [f"{BASE}/status"])
    publisher = start_publisher(make_config(tmp_path, broker.port, protocol="5"), started)
    assert publisher.wait_until_connected(5)
    publisher.publish_report("report", "too-big", json.dumps({"cells": "x" * 5000}).encode(), "1")
    assert wait_until(lambda: publisher.state.parked >= 1, 10)
    publisher.outbox.read(lambda conn: conn.set_authorizer(refuse_outbox))
    caplog.set_level(logging.INFO, logger=LOGGER)
    publisher.stop(drain_timeout=5)
    assert publisher.state.status == "stopped"
    said = [r.getMessage() for r in caplog.records if "counting the outbox's messages" in r.getMessage()]
    assert len(said) == 1 and "prohibited" in said[0], said
    assert wait_until(lambda: any(m.payload == b"offline" for m in list(sub.messages)), 5)
    publisher.outbox.read(lambda conn: conn.set_authorizer(None))
    assert publisher.outbox.counts().messages == 1  # kept for the next start


@pytest.mark.broker
def test_two_reasons_that_take_turns_are_each_said_once_at_error_while_the_outbox_stays_unreadable(
    broker: MosquittoBroker, tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With mqtt.field_message_expiry_s set, the drain's expiry pass (every 10 s) fails on another
    column than its sending passes: two reasons, said once each, not again at each turn."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    publisher = start_publisher(make_config(tmp_path, broker.port, field_message_expiry_s=3600), started)
    assert publisher.wait_until_connected(5)
    publisher.outbox.read(lambda conn: conn.set_authorizer(refuse_outbox))
    failing = lambda: [r for r in caplog.records if r.name == LOGGER and "MQTT drain loop error" in r.getMessage()]
    reasons = lambda: {r.getMessage().split("(", 1)[1].split(";", 1)[0].split(")", 1)[0] for r in failing()
                       if "(" in r.getMessage()}
    # the expiry pass's reason, the sending's, the expiry's again 10 s later, and a sending pass after it
    assert wait_until(lambda: len(reasons()) >= 2 and sum(1 for r in failing() if "outbox.size" in r.getMessage()) >= 2
                      and "outbox.seq" in failing()[-1].getMessage(), 40), [r.getMessage() for r in failing()[-5:]]
    errors = [r.getMessage() for r in failing() if r.levelno >= logging.ERROR]
    assert len(errors) == len(reasons()) == 2, errors
    publisher.outbox.read(lambda conn: conn.set_authorizer(None))


@pytest.mark.broker
def test_an_acknowledgement_settled_beside_a_refusal_while_the_outbox_cannot_be_read_is_not_lost(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
) -> None:
    """A report the broker acknowledged and one it refused as too large (PUBACK 0x95) are settled in one
    pass while the outbox cannot be read: the refusal's look-up of its message fails there. The
    acknowledged report still leaves the outbox once it reads again, and the refused one is parked;
    before, the pass dropped both from the drain's books: the delivered report stayed in the outbox,
    waited on by the stop and sent again at the next connection, the refused one counted as waiting."""
    monkeypatch.setattr(inflight, "DELETE_RETRY_S", 1.0)  # a delete the unreadable outbox refused: tried again soon
    broker = broker_with(extra=("message_size_limit 1500",))  # reports over it, telemetry under
    sub = observer_on(broker.port, [f"{BASE}/report"])
    publisher = start_publisher(make_config(tmp_path, broker.port, protocol="5"), started)
    assert publisher.wait_until_connected(5)
    gate, held = threading.Event(), threading.Event()
    check = publisher.echo.check

    def busy_check() -> None:  # the drain thread stops here once it has sent both
        if not gate.is_set() and len(publisher._inflight) == 2:
            held.set()
            gate.wait(30)
        check()

    publisher.echo.check = busy_check  # type: ignore[method-assign]
    publisher.publish_many([("report", "delivered", b"{}", "1"),
                            ("report", "too-big", json.dumps({"cells": "x" * 5000}).encode(), "1")])
    assert held.wait(5)
    assert sub.wait_for(lambda m: any(json.loads(r.payload)["report_id"] == "delivered" for r in m), 10)
    assert wait_until(lambda: publisher._inflight._events.qsize() >= 2, 5)  # both answers in
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    publisher.outbox.read(lambda conn: conn.set_authorizer(refuse_outbox))
    gate.set()
    assert wait_until(lambda: any("MQTT drain loop error" in r.getMessage() for r in caplog.records), 10)
    publisher.outbox.read(lambda conn: conn.set_authorizer(None))
    assert wait_until(lambda: publisher.outbox.counts().messages == 1, 10), publisher.outbox.counts()
    left = publisher.outbox.pending()
    assert [json.loads(m.payload)["report_id"] for m in left] == ["too-big"]
    assert publisher.state.parked == 1 and publisher.state.in_flight == 0
    assert publisher.wait_until_drained(5)  # the parked one is no message to wait for
