"""MqttPublisher against a real mosquitto: QoS, properties, availability, refusals, TLS, commands."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker import (
    MQTT_USERS,
    MosquittoBroker,
    Mqtt311OnlyProxy,
    PublisherProcess,
    Subscriber,
    TlsMaterial,
    make_client_cert,
    make_tls_material,
    wait_until,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from smearscope.service.config import MqttConfig
from smearscope.service.mqtt.credentials import CredentialError, read_password
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.mqtt.publisher import MqttPublisher

pytestmark = pytest.mark.broker

STATION = "lab-7"
BASE = f"smearscope/{STATION}"
#: A telemetry sample's `parked` while the station holds nothing back (service.mqtt.parked).
NONE_PARKED = {"messages": 0, "reports": 0, "too_large": 0, "oldest": None, "read_error": None}
#: A broker ACL under which the station may write its fields and status but not its reports (MQTT 5
#: answers each report PUBACK 0x87); the observer reads everything.
REPORTS_DENIED_ACL = (f"user station\ntopic write {BASE}/field\ntopic write {BASE}/status\n"
                      f"topic read {BASE}/cmd/#\nuser observer\ntopic read #\n")


def make_config(tmp_path: Path, port: int, **overrides: Any) -> MqttConfig:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "keepalive": 5,
        "username": "station",
        "password_credential": "mqtt-password",
        "reconnect_min_delay_s": 1,
        "reconnect_max_delay_s": 2,
        "stop_drain_timeout_s": 5,
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
    }
    settings.update(overrides)
    return MqttConfig.model_validate(settings)


def retained_status(broker: MosquittoBroker) -> tuple[bytes, bool]:
    """What a subscriber arriving now gets first on the status topic: (payload, retained)."""
    late = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/status"])
    try:
        assert late.wait_for(lambda m: len(m) >= 1, 5)
        return late.messages[0].payload, late.messages[0].retain
    finally:
        late.close()


def start_publisher(
    config: MqttConfig, started: list[MqttPublisher], **kwargs: Any
) -> MqttPublisher:
    publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox), **kwargs)
    started.append(publisher)
    publisher.start()
    return publisher


def stop_publisher(publisher: MqttPublisher, started: list[MqttPublisher], **stop: Any) -> None:
    """Stops a publisher before the test ends (MqttPublisher.stop's `stop` arguments) and closes its
    outbox, so that another may open the file; `started` then no longer holds it."""
    publisher.stop(**stop)
    publisher.outbox.close()
    started.remove(publisher)


def wait_listening(observer: Subscriber) -> None:
    """Waits until the station's command subscription (made in on_connect) has reached the broker:
    a `probe` command published until its answer comes (answered by the station's handler)."""
    def listening() -> bool:
        observer.client.publish(f"{BASE}/cmd/probe", b"{}", qos=1)
        return observer.wait_for(lambda m: any(x.topic.endswith("/cmd_response/probe") for x in m), 1)
    assert wait_until(listening, 10)


def wait_commands_subscribed(broker: MosquittoBroker, publisher: MqttPublisher, timeout: float = 10) -> None:
    """Waits until the broker has taken the station's command subscription (made in on_connect), as
    its log says (`<client id> <qos> <filter>`, written before it answers SUBACK). Unlike
    wait_listening it sends no command, so every answer a test then counts is one of its own."""
    assert wait_until(lambda: broker.subscribed(publisher.client_id, publisher.command_filter) > 0, timeout), (
        f"the broker never took {publisher.client_id}'s subscription to {publisher.command_filter}; "
        f"its log ends:\n{broker.log()[-2000:]}")


def _expiry_of_a_field_stored_at(created_at: float, port: int, observer: Subscriber, tmp_path: Path,
                                 started: list[MqttPublisher]) -> int | None:
    """The Message Expiry Interval a field message stored stamped `created_at` goes out with, from a
    publisher with field_message_expiry_s 600 started on the broker at `port`."""
    config = make_config(tmp_path, port, field_message_expiry_s=600)
    with Outbox.from_config(config.outbox) as outbox:
        outbox.put("field", f"{BASE}/field", b'{"field": 1}', report_id=f"at-{created_at}", schema_version="2.1",
                   created_at=created_at)
    publisher = start_publisher(config, started)
    assert publisher.wait_until_connected(5), publisher.state
    assert observer.wait_for(lambda m: any(x.topic == f"{BASE}/field" for x in m), 10)
    return observer.on_topic(f"{BASE}/field")[0].message_expiry


@pytest.mark.broker
def test_a_field_stored_before_the_clock_was_set_back_expires_within_its_lifetime(
    broker: MosquittoBroker, observer: Subscriber, tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
) -> None:
    """A field message stored an hour 'later' than now (the wall clock set back since) goes out
    with at most `field_message_expiry_s` to live, not the hour on top."""
    expiry = _expiry_of_a_field_stored_at(time.time() + 3600, broker.port, observer, tmp_path, started)
    assert expiry is not None and 590 <= expiry <= 600, expiry



@pytest.mark.broker
def test_field_messages_past_their_expiry_leave_the_outbox_while_no_broker_answers(
    broker: MosquittoBroker, tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
) -> None:
    """An offline lab: the broker is down. A field message older than `field_message_expiry_s` is
    dropped from the outbox meanwhile (docs/STATION.md's data table: kept until expiry), the
    report kept; it goes once the broker is back. Before, the expiry ran only while connected: an
    outage of weeks kept every field message (their field ids may name the patient) until it ended."""
    config = make_config(tmp_path, broker.port, field_message_expiry_s=3600)
    with Outbox.from_config(config.outbox) as outbox:
        outbox.put("field", f"{BASE}/field", b'{"field": 1}', report_id="old-field", schema_version="2.1",
                   created_at=time.time() - 7200)
        outbox.put("report", f"{BASE}/report", b'{"report": 1}', report_id="report", schema_version="2.1",
                   created_at=time.time() - 7200)
    broker.stop()
    publisher = start_publisher(config, started)
    assert wait_until(lambda: publisher.outbox.counts().messages == 1, 15), publisher.outbox.counts()
    assert not publisher.state.connected
    assert [m.report_id for m in publisher.outbox.pending()] == ["report"]
    broker.start()
    assert publisher.wait_until_connected(20), publisher.state
    assert publisher.wait_until_drained(10) and publisher.state.delivered == 1  # the report alone


@pytest.mark.broker
def test_a_field_stamped_in_1970_by_an_earlier_start_goes_out_with_its_whole_lifetime(
    broker: MosquittoBroker, observer: Subscriber, tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
) -> None:
    """A field message a station stored in 1970 (no clock battery, no network time before it was
    restarted) has no age that can be known: the outbox keeps it, and it goes out with
    `field_message_expiry_s` to live, not 1 s as a message 56 years old (a broker then dropped it,
    and the retained run state, for any subscriber not connected that second)."""
    expiry = _expiry_of_a_field_stored_at(86_400.0, broker.port, observer, tmp_path, started)
    assert expiry is not None and 590 <= expiry <= 600, expiry

def test_reports_arrive_with_qos1_properties_and_leave_the_outbox(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    config = make_config(tmp_path, broker.port, field_message_expiry_s=600)
    publisher = start_publisher(config, started)
    assert publisher.wait_until_connected(5), publisher.state
    field_seq = publisher.publish_report("field", "spec-1", b'{"field": 3, "wbc": 2}', "2.1")
    publisher.publish_report("report", "spec-1", b'{"wbc_per_ul": 6400}', "2.1")
    for i in range(30):
        publisher.publish_report("report", f"order-{i}", b"{}", "2.1")

    assert observer.wait_for(
        lambda m: len([x for x in m if "order-29" in x.payload.decode()]) > 0, 10
    )
    field = observer.on_topic(f"{BASE}/field")[0]
    report = observer.on_topic(f"{BASE}/report")[0]
    for msg in (field, report):
        assert msg.qos == 1 and not msg.retain
        assert msg.content_type == "application/json"
        assert msg.user_properties["schema_version"] == "2.1"
        assert msg.user_properties["report_id"] == "spec-1"
    envelope = json.loads(report.payload)
    assert envelope["body"] == {"wbc_per_ul": 6400}
    assert envelope["report_id"] == "spec-1" and envelope["station_id"] == STATION
    assert envelope["message_id"] == report.user_properties["message_id"]
    assert envelope["kind"] == "report" and envelope["schema_version"] == "2.1"
    assert field.message_expiry is not None and 590 <= field.message_expiry <= 600
    assert report.message_expiry is None, "reports never expire"
    order = [json.loads(m.payload)["report_id"] for m in observer.on_topic(f"{BASE}/report")]
    assert order == ["spec-1"] + [f"order-{i}" for i in range(30)], "outbox order is kept"

    # Deleted from the outbox only on PUBACK: all acknowledged now. The delivered count follows
    # the delete (same drain tick, just after it): wait for both, not for the empty outbox alone.
    assert wait_until(lambda: publisher.outbox.counts().messages == 0 and publisher.state.delivered == 32
                      and publisher.state.in_flight == 0, 5), (publisher.outbox.counts(), publisher.state)
    assert field_seq not in [m.seq for m in publisher.outbox.pending()]

    status = observer.on_topic(f"{BASE}/status")
    assert status[-1].payload == b"online"


def test_puback_rejection_keeps_the_message_in_the_outbox(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
) -> None:
    broker = broker_with(acl=REPORTS_DENIED_ACL)
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    report_seq = publisher.publish_report("report", "denied", b"{}", "1")
    publisher.publish_report("field", "allowed", b"{}", "1")
    assert wait_until(lambda: publisher.state.failed_acks >= 1, 5), publisher.state
    assert wait_until(lambda: publisher.state.delivered == 1, 5), publisher.state
    assert [m.seq for m in publisher.outbox.pending()] == [report_seq]
    assert publisher.outbox.pending()[0].attempts >= 1


def test_publish_report_rejects_a_body_that_is_not_json(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    with pytest.raises(ValueError):
        publisher.publish_report("report", "x", b"not json", "1")
    with pytest.raises(ValueError):
        publisher.publish_report("summary", "x", b"{}", "1")  # type: ignore[arg-type]
    assert publisher.outbox.counts().messages == 0


def test_status_is_retained_online_then_offline_on_clean_stop(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    late = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/status"])
    try:
        assert late.wait_for(lambda m: len(m) >= 1, 5)
        assert late.messages[0].payload == b"online" and late.messages[0].retain
        publisher.stop()
        assert publisher.state.status == "stopped"
        assert late.wait_for(lambda m: m[-1].payload == b"offline", 5)
    finally:
        late.close()
    assert retained_status(broker) == (b"offline", True)


def test_last_will_marks_a_killed_publisher_offline(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path,
) -> None:
    child = PublisherProcess(make_config(tmp_path, broker.port).model_dump_json(), STATION)
    try:
        child.wait_for_line("state connected", 10)
        assert observer.wait_for(
            lambda m: any(x.topic == f"{BASE}/status" and x.payload == b"online" for x in m), 5
        )
    finally:
        child.kill()
    # The kernel closes the socket of the killed process; the broker publishes the will.
    assert observer.wait_for(
        lambda m: any(x.topic == f"{BASE}/status" and x.payload == b"offline" for x in m), 5
    )
    assert retained_status(broker) == (b"offline", True)


def test_anonymous_connection_is_refused_and_reported(
    broker: MosquittoBroker, tmp_path: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(tmp_path, broker.port, username=None, password_credential=None)
    with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.publisher"):
        publisher = start_publisher(config, started)
        publisher.publish_report("report", "r1", b"{}", "1")
        assert wait_until(lambda: publisher.state.status == "refused", 5), publisher.state
    state = publisher.state
    assert not state.connected and state.connects == 0
    assert state.last_reason_code == 0x87
    assert state.last_error is not None and "Not authorized" in state.last_error
    assert any("refused the connection" in r.getMessage() for r in caplog.records)
    assert publisher.outbox.counts().messages == 1, "nothing is acknowledged by a refusal"


def test_wrong_password_is_refused_and_never_counted_as_connected(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    (credentials_dir / "mqtt-password").chmod(0o600)
    (credentials_dir / "mqtt-password").write_text("not-the-password\n")
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    # paho retries with backoff (1-2 s); the retry is refused again
    assert wait_until(lambda: publisher.state.refusals >= 2, 10), publisher.state
    state = publisher.state
    assert state.status == "refused" and state.connects == 0 and not state.connected
    assert state.last_error is not None and "0x87" in state.last_error


def test_password_comes_only_from_credentials_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(tmp_path, 1883)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(CredentialError, match="LoadCredential=mqtt-password"):
        read_password(config)
    with pytest.raises(CredentialError, match="cannot read"):
        read_password(config, {"CREDENTIALS_DIRECTORY": str(tmp_path / "nowhere")})
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    assert read_password(config, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "s3cret"
    with Outbox(tmp_path / "o.db") as outbox, pytest.raises(CredentialError):
        MqttPublisher(config, STATION, outbox)
    with pytest.raises(ValidationError, match="password"):
        MqttConfig.model_validate({"username": "station", "password": "in-the-file"})
    with pytest.raises(ValidationError):
        MqttConfig.model_validate({"password_credential": "../etc/shadow", "username": "u"})
    with pytest.raises(ValidationError, match="needs a username"):
        MqttConfig.model_validate({"password_credential": "mqtt-password"})
    for name, field in MqttConfig.model_fields.items():
        assert field.title and field.description, name


def test_tls_with_the_test_ca(
    tmp_path: Path, tls_material: TlsMaterial, credentials_dir: Path, started: list[MqttPublisher],
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
) -> None:
    broker = broker_with(tls=tls_material)
    assert broker.tls_port is not None
    sub = observer_on(broker.tls_port, [f"{BASE}/report"], ca_cert=tls_material.ca_cert)
    config = make_config(tmp_path, broker.tls_port, tls={"ca_file": str(tls_material.ca_cert)})
    publisher = start_publisher(config, started)
    assert publisher.wait_until_connected(5), publisher.state
    publisher.publish_report("report", "tls-1", b"{}", "1")
    assert sub.wait_for(lambda m: len(m) == 1, 5)

    # A broker certificate from another CA is not trusted.
    rogue = make_tls_material(tmp_path / "rogue", common_name="rogue-ca")
    other = make_config(
        tmp_path / "other",
        broker.tls_port,
        client_id="smearscope-other",
        tls={"ca_file": str(rogue.ca_cert)},
    )
    untrusting = start_publisher(other, started)
    assert wait_until(lambda: untrusting.state.last_error is not None, 5)
    assert not untrusting.state.connected and untrusting.state.connects == 0
    assert "TLS" in (untrusting.state.last_error or "")


def test_commands_get_responses_with_correlation_data(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def on_command(name: str, payload: dict[str, Any]) -> dict[str, Any]:
        calls.append((name, payload))
        if name == "fail":
            raise RuntimeError("camera busy")
        return {"ok": True, "echo": payload}

    # A command left retained on the broker reaches the station at its subscription: not run.
    observer.client.publish(f"{BASE}/cmd/stop_run", b'{"stale": 1}', qos=1, retain=True).wait_for_publish(5)
    publisher = start_publisher(make_config(tmp_path, broker.port), started, on_command=on_command)
    assert publisher.wait_until_connected(5)
    assert wait_until(lambda: publisher.state.connected, 5)
    wait_commands_subscribed(broker, publisher)
    # one published retained while the station listens arrives live (MQTT 5 keeps its flag): not run
    observer.client.publish(f"{BASE}/cmd/start_run", b'{"live": 1}', qos=1, retain=True)
    # clearing a retained command (empty and retained) is neither run nor answered; an empty one
    # without the flag (how MQTT 3.1.1 delivers a clearing live) is answered and not run
    observer.client.publish(f"{BASE}/cmd/start_run", b"", qos=1, retain=True)
    observer.client.publish(f"{BASE}/cmd/stop_run", b"", qos=1, retain=True)
    observer.client.publish(f"{BASE}/cmd/stop_run", b"", qos=1)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = b"req-42"
    observer.client.publish(
        f"{BASE}/cmd/recalibrate", json.dumps({"stage": 2}), qos=1, properties=props
    )
    observer.client.publish(f"{BASE}/cmd/fail", b"{}", qos=1)
    observer.client.publish(f"{BASE}/cmd/recalibrate", b"not json", qos=1)
    assert observer.wait_for(lambda m: len([x for x in m if "/cmd_response/" in x.topic]) >= 6, 5)
    # answered in order: an answer to a clearing would come before this last command's
    observer.client.publish(f"{BASE}/cmd/last", b"{}", qos=1)
    assert observer.wait_for(lambda m: any(x.topic.endswith("/cmd_response/last") for x in m), 5)
    responses = [x for x in observer.messages if "/cmd_response/" in x.topic and not x.topic.endswith("/last")]
    assert len(responses) == 6
    for command in ("stop_run", "start_run"):  # the stored one, the live one
        retained = responses.pop(0)
        assert retained.topic.endswith(f"/cmd_response/{command}")
        assert json.loads(retained.payload)["error"] == "retained_command"
    empty = responses.pop(0)
    assert empty.topic.endswith("/cmd_response/stop_run") and json.loads(empty.payload)["error"] == "empty_command"
    first = responses[0]
    assert first.topic == publisher.command_response_topic("recalibrate")
    assert json.loads(first.payload) == {"ok": True, "echo": {"stage": 2}}
    assert first.correlation_data == b"req-42"
    assert json.loads(responses[1].payload) == {"ok": False, "error": "command_failed",
                                                "message": "RuntimeError: camera busy"}
    assert json.loads(responses[2].payload)["ok"] is False
    assert calls == [("recalibrate", {"stage": 2}), ("fail", {}), ("last", {})]


def test_an_answer_that_cannot_be_sent_as_json_is_answered_command_failed(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    """A handler's answer JSON cannot carry (a key that is no string, a loop, a nesting too deep
    for the encoder): the caller still gets an answer, command_failed saying why, with its
    correlation data, and the next command is served."""
    looped: dict[str, Any] = {"ok": True}
    looped["self"] = looped
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    answers: dict[str, Any] = {"tuple_key": {"ok": True, ("a", 1): 2}, "loop": looped,
                               "deep": {"ok": True, "deep": deep}, "status": {"ok": True}}
    publisher = start_publisher(make_config(tmp_path, broker.port), started,
                                on_command=lambda name, payload: answers.get(name, {"ok": True}))
    assert publisher.wait_until_connected(5)
    wait_listening(observer)
    for name in answers:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = f"req-{name}".encode()
        observer.client.publish(f"{BASE}/cmd/{name}", b"{}", qos=1, properties=props)
    assert observer.wait_for(lambda m: any(x.topic.endswith("/cmd_response/status") for x in m), 5), [
        x.topic for x in observer.messages]
    responses = {x.topic.rsplit("/", 1)[1]: x for x in observer.messages
                 if "/cmd_response/" in x.topic and not x.topic.endswith("/probe")}
    assert list(responses) == list(answers)
    for name in ("tuple_key", "loop", "deep"):
        body = json.loads(responses[name].payload)
        assert body["ok"] is False and body["error"] == "command_failed", (name, body)
        assert body["message"].startswith("response not serialisable: "), (name, body)
        assert responses[name].correlation_data == f"req-{name}".encode()
    assert json.loads(responses["status"].payload) == {"ok": True}


def test_a_callback_that_raises_does_not_end_the_network_thread(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = start_publisher(make_config(tmp_path, broker.port), started,
                                on_command=lambda name, payload: {"ok": True, "name": name})
    assert publisher.wait_until_connected(5)
    wait_commands_subscribed(broker, publisher)
    submit = publisher._commands.submit
    calls: list[str] = []

    def failing_once(name: str, *args: Any, **kwargs: Any) -> bool:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("a bug in on_message")
        return submit(name, *args, **kwargs)

    publisher._commands.submit = failing_once  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        observer.client.publish(f"{BASE}/cmd/first", b"{}", qos=1)
        assert wait_until(lambda: calls == ["first"], 5)
        observer.client.publish(f"{BASE}/cmd/second", b"{}", qos=1)
        assert observer.wait_for(lambda m: any(x.topic.endswith("/cmd_response/second") for x in m), 5)
    assert any("a bug in on_message" in r.getMessage() for r in caplog.records)
    publisher.publish_report("report", "after-bug", b"{}", "1")
    assert observer.wait_for(lambda m: any(x.topic == f"{BASE}/report" for x in m), 5)


def test_telemetry_is_qos0_and_not_stored(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    config = make_config(tmp_path, broker.port, telemetry_interval_s=0.1)
    publisher = start_publisher(config, started, telemetry_source=lambda: {"gpu_temp_c": 51.5})
    assert observer.wait_for(
        lambda m: len([x for x in m if x.topic.endswith("/telemetry")]) >= 2, 5
    )
    telemetry = observer.on_topic(f"{BASE}/telemetry")[0]
    sample = json.loads(telemetry.payload)
    # which process sent it: a dashboard tells two stations given one station_id apart by it
    assert telemetry.qos == 0 and sample == {"gpu_temp_c": 51.5, "interval_s": 0.1, "host": socket.gethostname(),
                                             "instance_id": sample["instance_id"], "parked": NONE_PARKED,
                                             "held_runs": sample["held_runs"]}
    assert sample["held_runs"] in (None, [])  # none held; null while the start's hold is not decided yet
    assert re.fullmatch(r"[0-9a-f]{12}", sample["instance_id"])
    assert publisher.outbox.counts().messages == 0
    # every sample of this process says the same instance; another process (a second publisher) another
    assert {json.loads(m.payload)["instance_id"] for m in observer.on_topic(f"{BASE}/telemetry")} == {
        sample["instance_id"]}
    with Outbox(tmp_path / "other-outbox.sqlite3") as other_outbox:
        assert MqttPublisher(config, STATION, other_outbox).instance["instance_id"] != sample["instance_id"]


def test_falls_back_to_mqtt_311_when_the_broker_refuses_v5(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    proxy = Mqtt311OnlyProxy(broker.port)
    try:
        publisher = start_publisher(make_config(tmp_path, proxy.port), started)
        publisher.publish_report("report", "old-broker", b'{"a": 1}', "1")
        assert publisher.wait_until_connected(10), publisher.state
        assert publisher.state.protocol == "MQTTv311" and proxy.refused_v5 >= 1
        assert observer.wait_for(
            lambda m: len([x for x in m if x.topic.endswith("/report")]) == 1, 5
        )
        report = observer.on_topic(f"{BASE}/report")[0]
        # No MQTT 5 properties over 3.1.1: the envelope carries the metadata.
        assert report.user_properties == {}
        assert json.loads(report.payload)["report_id"] == "old-broker"
        assert wait_until(lambda: publisher.outbox.counts().messages == 0, 5)
    finally:
        proxy.close()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def test_clean_stop_logs_no_error(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """paho may find no socket after our own disconnect (a race in its loop); that is the stop,
    not an error. Several stops, so the race is likely to be met."""
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    with caplog.at_level(logging.DEBUG, logger="smearscope.service.mqtt.publisher"):
        for _ in range(3):
            if publisher.state.status == "stopped":
                publisher.start()
            assert publisher.wait_until_connected(5)
            publisher.stop()
            assert publisher.state.status == "stopped"
    assert not _errors(caplog), _errors(caplog)


def test_broker_outage_and_reconnect_log_a_warning_not_an_error(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt.publisher"):
        publisher = start_publisher(make_config(tmp_path, broker.port), started)
        assert publisher.wait_until_connected(5)
        broker.stop()
        assert wait_until(lambda: publisher.state.status == "disconnected", 10)
        # at least one failed reconnect (backoff 1-2 s): the state says the broker cannot be reached
        assert wait_until(lambda: (publisher.state.last_error or "").startswith("cannot reach broker"), 10), \
            publisher.state
        broker.start()
        assert wait_until(lambda: publisher.state.connects == 2, 10), publisher.state
        publisher.stop()
    assert not _errors(caplog), _errors(caplog)
    assert any(r.levelno == logging.WARNING and "connection lost" in r.getMessage()
               for r in caplog.records)
    assert not any("client id" in r.getMessage() for r in caplog.records)  # one outage is no duplicate


def test_socket_reset_while_connected_is_a_warning_other_paho_errors_stay_errors(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker's death reaches paho's loop first, as an ERROR-level 'failed to receive on
    socket', while the publisher still counts itself connected (seen under load in CI-like runs)."""
    from paho.mqtt.enums import LogLevel

    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    with caplog.at_level(logging.DEBUG, logger="smearscope.service.mqtt.publisher"):
        publisher._on_log(None, None, LogLevel.MQTT_LOG_ERR, "failed to receive on socket: [Errno 104] Connection reset by peer")
        publisher._on_log(None, None, LogLevel.MQTT_LOG_ERR, "Caught exception in on_connect: boom")
    # paho's own loop thread logs too (e.g. 'Received SUBACK' at DEBUG): judge only the two lines fed here
    fed = ("failed to receive on socket", "Caught exception in on_connect")
    levels = {
        r.getMessage().split(":")[0]: r.levelno
        for r in caplog.records
        if r.name == "smearscope.service.mqtt.publisher.paho" and r.getMessage().startswith(fed)
    }
    assert levels == {"failed to receive on socket": logging.WARNING, "Caught exception in on_connect": logging.ERROR}


def test_other_paho_errors_stay_errors(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)

    def broken_on_subscribe(*args: Any) -> None:
        raise RuntimeError("callback bug")

    client = publisher._client
    assert client is not None
    client.suppress_exceptions = True  # log it and go on, rather than end paho's thread
    client.on_subscribe = broken_on_subscribe
    with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.publisher"):
        client.subscribe(f"{BASE}/anything", qos=1)
        assert wait_until(lambda: bool(_errors(caplog)), 5)
    assert any("smearscope.service.mqtt.publisher.paho: Caught exception in on_subscribe" in e
               for e in _errors(caplog)), _errors(caplog)


def test_a_stop_while_disconnected_says_what_waits_in_the_outbox(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stopped while the broker is down: nothing can drain; the log says how many messages wait
    for the next start (and why), as a stop that ran out of drain time does."""
    with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt.publisher"):
        publisher = start_publisher(make_config(tmp_path, broker.port), started)
        assert publisher.wait_until_connected(5)
        broker.stop()
        assert wait_until(lambda: publisher.state.status == "disconnected", 10)
        publisher.publish_report("report", "r-1", b'{"report_id": "r-1"}', "1")
        publisher.stop()
    waiting = [r.getMessage() for r in caplog.records if "stopping with" in r.getMessage()]
    assert waiting == [("stopping with 1 messages still in the outbox (not connected to the broker); they are "
                        "sent on next start")], waiting
    assert not _errors(caplog), _errors(caplog)


def test_telemetry_goes_out_at_each_connection_not_a_period_later(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    """A dashboard sees the station's state (a full disk, an outbox backlog) as soon as the station
    is online again, not up to telemetry_interval_s (30 s by default) later: at each connection
    the telemetry is sampled and sent at once, then every period as before."""
    sampled: list[bool] = []  # whether the publisher was connected when the source was sampled
    held: list[MqttPublisher] = []

    def source() -> dict[str, int]:
        sampled.append(bool(held) and held[0].state.connected)
        return {"sample": len(sampled)}

    config = make_config(tmp_path, broker.port, telemetry_interval_s=600.0)
    publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox), telemetry_source=source)
    held.append(publisher)
    started.append(publisher)
    publisher.start()
    assert observer.wait_for(lambda m: len([x for x in m if x.topic.endswith("/telemetry")]) >= 1, 10)
    assert {k: v for k, v in json.loads(observer.on_topic(f"{BASE}/telemetry")[0].payload).items()
            if k not in ("instance_id", "host", "held_runs")} == {"sample": 1, "interval_s": 600.0, "parked": NONE_PARKED}
    # the start's hold decided (none held) is sent at once too: that sample is not the reconnection's
    assert observer.wait_for(lambda m: any(json.loads(x.payload).get("held_runs") == [] for x in m
                                           if x.topic.endswith("/telemetry")), 10)
    before = len(sampled)
    broker.stop()
    assert wait_until(lambda: not publisher.state.connected, 15)
    broker.start()
    assert publisher.wait_until_connected(15), publisher.state
    # sampled again on the new connection, connected (so sent), not 600 s later
    assert wait_until(lambda: len(sampled) > before, 10) and all(sampled[:before + 1]), sampled


def test_a_stop_between_the_telemetry_wait_and_its_clear_is_not_lost(tmp_path: Path, credentials_dir: Path) -> None:
    """stop() sets the stop and then the telemetry's wake; the telemetry thread, woken by a
    connection, clears that wake after its wait. A stop() landing between the two was wiped by
    the clear: one more sample published after stop, then a whole telemetry_interval_s (30 s by
    default) before the thread saw the stop, past stop()'s 5 s join."""
    config = make_config(tmp_path, 1, telemetry_interval_s=600.0)
    sampled: list[int] = []
    publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox),
                              telemetry_source=lambda: sampled.append(1) or {"sample": len(sampled)})
    wake = publisher._telemetry_now
    real_clear = wake.clear
    stopped = []

    def clear() -> None:  # stop() runs just after the wait returned for a connection
        if not stopped:
            stopped.append(True)
            publisher._stop_workers.set()
            wake.set()
        real_clear()

    wake.clear = clear  # type: ignore[method-assign]
    wake.set()  # a connection
    thread = threading.Thread(target=publisher._telemetry_loop, daemon=True)
    thread.start()
    thread.join(2.0)
    try:
        assert not thread.is_alive(), "the telemetry thread missed the stop"
        assert sampled == []
    finally:
        publisher._stop_workers.set()
        real_clear()
        wake.set()
        thread.join(2.0)




def test_a_housekeeping_that_fails_at_every_try_does_not_stop_the_sending(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 10 s housekeeping (expired fields dropped, free pages given back) failing at every try
    (here MemoryError, as SQLite's in-memory VACUUM copy raised on a short memory): the report
    waiting is sent all the same, and the failure is tried (and logged) every 10 s, not every
    tick. It was not sent: the failure came back at every 0.5 s tick, before the sending."""
    config = make_config(tmp_path, broker.port)
    outbox = Outbox.from_config(config.outbox)
    outbox.put("report", f"{BASE}/report", b"{}", report_id="waiting", schema_version="1")
    tries: list[float] = []

    def fails() -> None:
        tries.append(time.monotonic())
        raise MemoryError

    monkeypatch.setattr(outbox, "give_back_space", fails)
    publisher = MqttPublisher(config, STATION, outbox)
    started.append(publisher)
    publisher.start()
    assert observer.wait_for(lambda m: any(x.topic == f"{BASE}/report" for x in m), 10), (publisher.state, len(tries))
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 5)
    assert len(tries) <= 1 + (time.monotonic() - tries[0]) // 10, "due every 10 s, a failed one too"


def test_expired_fields_that_cannot_be_deleted_on_a_full_disk_do_not_stop_the_sending(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    """The outage's backlog filled the disk with field messages that have expired by the time the
    broker is back: deleting them needs room in the WAL (freed pages are zeroed), which the full
    disk and the reserve do not give. The 10 s housekeeping fails (logged); the report that waits
    behind them is sent all the same (it was not: the failure came back at every tick before the
    sending)."""
    from smallfs import fill, small_tmpfs

    with small_tmpfs(tmp_path / "small", 16384) as small:
        config = make_config(tmp_path, broker.port, field_message_expiry_s=60,
                             outbox={"path": str(small / "outbox.sqlite3")})
        with Outbox.from_config(config.outbox) as outbox:  # the outage: stored, none sent
            report = outbox.put("report", f"{BASE}/report", b'{"report_id": "kept"}', report_id="kept",
                                schema_version="1")
            for i in range(500):
                outbox.put("field", f"{BASE}/field", os.urandom(16_000), report_id=f"f{i}", schema_version="1",
                           created_at=time.time() - 3600)
        fill(small)
        publisher = start_publisher(config, started)
        assert publisher.wait_until_connected(5), publisher.state
        assert observer.wait_for(lambda m: any(x.topic == f"{BASE}/report" for x in m), 15), (
            publisher.outbox.counts(), publisher.outbox.holds(report))


def _store_reports_and_fill(config: MqttConfig, small: Path, count: int, spend_reserve: bool = False) -> Path:
    """The outage: `count` 16 kB reports stored, none sent; then the disk filled (the filler's path)."""
    from smallfs import fill

    with Outbox.from_config(config.outbox) as outbox:
        for i in range(count):
            outbox.put("report", f"{BASE}/report", os.urandom(16_000), report_id=f"r{i}", schema_version="1")
    if spend_reserve:  # as a full disk earlier in the outage did
        (small / "outbox.sqlite3.reserve").unlink()
    return fill(small)


def _distinct_reports(observer: Subscriber) -> int:
    return len({m.payload for m in list(observer.messages) if m.topic == f"{BASE}/report"})


def test_acknowledged_messages_all_leave_a_disk_that_stays_full(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    """400 reports (6.4 MB) stored while the broker was away, the disk then filled; the broker comes
    back and acknowledges them all. Their deletes must all succeed on the disk still full (the 2 MB
    reserve and the room the deletes free): they did not. The WAL, never checkpointed on a disk with
    less than 4 MB free, grew into the reserve's room and kept it; the deletes after the first 80 or
    so failed for good, and the outbox stayed at 316 delivered messages until space came back."""
    from smallfs import small_tmpfs

    with small_tmpfs(tmp_path / "small", 16384) as small:
        config = make_config(tmp_path, broker.port, outbox={"path": str(small / "outbox.sqlite3")})
        filler = _store_reports_and_fill(config, small, 400)
        publisher = start_publisher(config, started)
        assert observer.wait_for(lambda m: _distinct_reports(observer) == 400, 30), _distinct_reports(observer)
        assert wait_until(lambda: publisher.outbox.counts().messages == 0, 30), publisher.outbox.counts()
        assert filler.exists() and os.statvfs(small).f_bavail * os.statvfs(small).f_frsize < 3 * 2**20
        assert publisher.state.in_flight == 0


def test_acknowledged_messages_a_full_disk_keeps_are_deleted_in_parts_once_some_room_returns(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The disk full and the reserve already spent: the 400 reports are sent all the same, each once;
    their deletes fail (one warning), and they are not sent again. Then 1.5 MB comes back, less than
    deleting all 400 at once needs (their 6.4 MB go through the WAL, zeroed): they are deleted in
    parts. They were not: the one delete of all 400 was tried again and again, and failed for good."""
    from smallfs import fill, small_tmpfs

    with small_tmpfs(tmp_path / "small", 16384) as small:
        config = make_config(tmp_path, broker.port, outbox={"path": str(small / "outbox.sqlite3")})
        filler = _store_reports_and_fill(config, small, 400, spend_reserve=True)
        with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt"):
            publisher = start_publisher(config, started)
            assert observer.wait_for(lambda m: _distinct_reports(observer) == 400, 30), _distinct_reports(observer)
            assert wait_until(lambda: publisher.state.delivered == 400 and publisher.state.in_flight == 0, 15)
            assert publisher.outbox.counts().messages == 400  # no room at all: none deleted
            # everything is acknowledged: drained, so a stop now would not wait out its drain timeout
            # for deletes the disk refuses (it did: 10 s)
            assert publisher.wait_until_drained(0.0)
            filler.unlink()
            fill(small, leave_bytes=1536 * 1024)
            assert wait_until(lambda: publisher.outbox.counts().messages == 0, 60), publisher.outbox.counts()
        reports = [m for m in observer.messages if m.topic == f"{BASE}/report"]
        assert len(reports) == 400, "sent again"
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                    and r.name == "smearscope.service.mqtt.inflight"]
        assert len(warnings) == 1 and "the disk is full" in warnings[0], warnings


def test_a_stop_on_a_full_disk_says_which_delivered_messages_it_keeps_and_the_next_start_sends_them_again(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The disk full and the reserve spent: 50 reports delivered, none deletable. A stop then has
    nothing to drain (it waited out its drain timeout, and said 50 messages were still waiting);
    it says the 50 are delivered and kept. The next start, with room, sends them again (consumers
    drop repeats by message_id) and deletes them."""
    from smallfs import small_tmpfs

    with small_tmpfs(tmp_path / "small", 16384) as small:
        config = make_config(tmp_path, broker.port, outbox={"path": str(small / "outbox.sqlite3")},
                             stop_drain_timeout_s=30)  # the most the config takes
        filler = _store_reports_and_fill(config, small, 50, spend_reserve=True)
        with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt"):
            publisher = start_publisher(config, started)
            assert wait_until(lambda: publisher.state.delivered == 50 and publisher.state.in_flight == 0, 15)
            assert publisher.outbox.counts().messages == 50
            stopping = threading.Thread(target=publisher.stop, daemon=True)
            stopping.start()
            stopping.join(60)
            assert not stopping.is_alive(), "the stop waits for deletes the full disk refuses"
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping with")]
        assert said == [("stopping with 50 delivered messages a full disk kept in the outbox; they are sent again "
                        "on next start (consumers drop repeats by message_id)")], said
        publisher.outbox.close()
        filler.unlink()
        again = start_publisher(config, started)
        assert observer.wait_for(lambda m: len([x for x in m if x.topic == f"{BASE}/report"]) == 100, 15)
        assert _distinct_reports(observer) == 50
        assert wait_until(lambda: again.outbox.counts().messages == 0, 15), again.outbox.counts()


def _acknowledge_first_of_two(config: MqttConfig) -> tuple[MqttPublisher, threading.Thread, threading.Event]:
    """A publisher (never started) whose drain thread, settling, has just deleted the first of its
    two outbox messages the broker acknowledged, and holds there until `release` is set; the
    second is unacknowledged."""
    from paho.mqtt.reasoncodes import ReasonCode

    outbox = Outbox.from_config(config.outbox)
    publisher = MqttPublisher(config, STATION, outbox)
    inflight, client = publisher._inflight, object()
    seqs = [outbox.put("report", f"{BASE}/report", b"{}", report_id=f"r{i}", schema_version="1.1") for i in range(2)]
    inflight._seq_by_mid.update({1: seqs[0], 2: seqs[1]})
    inflight._seqs.update(seqs)
    deleted, release, ack_many = threading.Event(), threading.Event(), outbox.ack_many

    def held_ack_many(chunk: list[int]) -> int:
        n = ack_many(chunk)
        deleted.set()
        release.wait(10)
        return n

    outbox.ack_many = held_ack_many  # type: ignore[method-assign]
    inflight.post(client, 1, ReasonCode(PacketTypes.PUBACK, "Success"))  # type: ignore[arg-type]
    settling = threading.Thread(target=inflight.settle, args=(client,), daemon=True)
    settling.start()
    assert deleted.wait(10)
    return publisher, settling, release


def test_a_message_acknowledged_and_deleted_as_the_drain_is_checked_never_hides_one_unacknowledged(
    credentials_dir: Path, tmp_path: Path,
) -> None:
    """The drain thread deletes an acknowledged message, then forgets it as kept: checked in
    between, the outbox (one message, the unacknowledged one) and the kept (the deleted one still)
    were equal, and the drain said done with a message the broker never acknowledged."""
    publisher, settling, release = _acknowledge_first_of_two(make_config(tmp_path, 1))
    try:
        assert publisher.outbox.counts().messages == 1
        assert not publisher.wait_until_drained(0.2)
    finally:
        release.set()
        settling.join(10)
    assert not settling.is_alive()
    assert not publisher.wait_until_drained(0.0)
    publisher.outbox.close()


def test_a_message_acknowledged_as_a_stop_looks_is_not_said_kept_by_a_full_disk(
    credentials_dir: Path, tmp_path: Path,
) -> None:
    """A stop that looked between an acknowledgement and its delete (a few ms of SQLite's sync)
    said "stopping with 1 delivered messages a full disk kept in the outbox" on a disk with room:
    seen with a report acknowledged just before a stop. Until a delete has failed, an acknowledged
    message still in the outbox is one being deleted: counted as waiting, never as kept."""
    from paho.mqtt.reasoncodes import ReasonCode

    config = make_config(tmp_path, 1)
    outbox = Outbox.from_config(config.outbox)
    publisher = MqttPublisher(config, STATION, outbox)
    inflight, client = publisher._inflight, object()
    seq = outbox.put("report", f"{BASE}/report", b"{}", report_id="r", schema_version="1.1")
    inflight._seq_by_mid[1] = seq
    inflight._seqs.add(seq)
    deleting, release, ack_many = threading.Event(), threading.Event(), outbox.ack_many

    def held_ack_many(chunk: list[int]) -> int:
        deleting.set()
        release.wait(10)
        return ack_many(chunk)

    outbox.ack_many = held_ack_many  # type: ignore[method-assign]
    inflight.post(client, 1, ReasonCode(PacketTypes.PUBACK, "Success"))  # type: ignore[arg-type]
    settling = threading.Thread(target=inflight.settle, args=(client,), daemon=True)
    settling.start()
    try:
        assert deleting.wait(10)
        assert inflight.undelivered() == (1, 0)
    finally:
        release.set()
        settling.join(10)
    assert inflight.undelivered() == (0, 0) and publisher.wait_until_drained(0.0)
    outbox.close()


def test_a_kept_message_an_expiry_took_is_not_counted_as_kept(credentials_dir: Path, tmp_path: Path) -> None:
    """An acknowledged field message the full disk kept, then taken by an expiry (or an eviction)
    before the drain thread tries its own delete again: it is kept no longer, and the drain still
    waits for the report the broker has yet to acknowledge (it counted the field as kept, and said
    done)."""
    from paho.mqtt.reasoncodes import ReasonCode

    config = make_config(tmp_path, 1)
    publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox))
    outbox, inflight, client = publisher.outbox, publisher._inflight, object()
    field = outbox.put("field", f"{BASE}/field", b"{}", report_id="f", schema_version="1.1",
                       created_at=time.time() - 3600)
    report = outbox.put("report", f"{BASE}/report", b"{}", report_id="r", schema_version="1.1")
    inflight._seq_by_mid.update({1: field, 2: report})
    inflight._seqs.update((field, report))

    def disk_full(chunk: list[int]) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    outbox.ack_many = disk_full  # type: ignore[method-assign]
    inflight.post(client, 1, ReasonCode(PacketTypes.PUBACK, "Success"))  # type: ignore[arg-type]
    assert inflight.settle(client) == (1, 0)  # type: ignore[arg-type]
    assert outbox.counts().messages == 2 and inflight.undelivered() == (1, 1)
    assert outbox.expire_fields(time.time() - 60) == 1
    assert inflight.undelivered() == (1, 0)
    assert not publisher.wait_until_drained(0.2)
    outbox.close()

def _fill_with_reports(outbox: Outbox, fields_before: int = 0) -> int:
    """The outage as the station lives it: `fields_before` field messages (16 kB, expired an hour
    ago), then 16 kB reports stored until the outbox's own writes fill the disk (its WAL then holds
    pages the database file has yet to grow by); how many reports were stored."""
    for i in range(fields_before):
        outbox.put("field", f"{BASE}/field", os.urandom(16_000), report_id=f"f{i}", schema_version="1",
                   created_at=time.time() - 3600)
    stored = 0
    with pytest.raises(sqlite3.OperationalError, match="full"):
        while True:
            outbox.put("report", f"{BASE}/report", os.urandom(16_000), report_id=f"r{stored}", schema_version="1")
            stored += 1
    return stored


def test_acknowledged_reports_all_leave_a_disk_the_outbox_itself_filled_with_expired_fields_first(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
) -> None:
    """The outbox's own puts filled the 16 MB disk while the broker was away: 300 field messages that
    have expired by the time it is back, then reports. The expired fields' delete comes first and is
    refused by the full disk; the reserve is given up for it. The reports are then delivered, and
    their deletes must all succeed on the disk still full. They did not: with no checkpoint after the
    reserve was given up (the one before it failed: the WAL holds pages the database file must grow
    by), that delete took the reserve's room and failed, the WAL kept the room, and every report
    stayed in the outbox (the station paused) until space was freed from outside. With a checkpoint
    once the reserve's room is there, the WAL is emptied: the expired fields' delete goes through,
    and the reports' too."""
    from smallfs import small_tmpfs

    with small_tmpfs(tmp_path / "small", 16384) as small:
        config = make_config(tmp_path, broker.port, field_message_expiry_s=60,
                             outbox={"path": str(small / "outbox.sqlite3")})
        outbox = Outbox.from_config(config.outbox)
        stored = _fill_with_reports(outbox, fields_before=300)
        publisher = MqttPublisher(config, STATION, outbox)
        started.append(publisher)
        publisher.start()
        assert observer.wait_for(lambda m: _distinct_reports(observer) == stored, 30), _distinct_reports(observer)
        assert wait_until(lambda: outbox.counts().reports == 0, 15), (stored, outbox.counts())
        assert os.statvfs(small).f_bavail * os.statvfs(small).f_frsize < 3 * 2**20


def test_a_wal_that_a_full_disk_keeps_from_emptying_is_said_once(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The outbox's own puts filled the disk, the reserve already spent: no acknowledged message can
    be deleted, nor the WAL emptied, until room returns. The checkpoint's failure is said once while
    it lasts (each delete round tries it at every halving of its part): it was a warning each time,
    about ten per round, a round every 10 s, for as long as the disk stayed full."""
    from smallfs import small_tmpfs

    from smearscope.service.mqtt import inflight

    monkeypatch.setattr(inflight, "DELETE_RETRY_S", 1.0)
    with small_tmpfs(tmp_path / "small", 16384) as small:
        config = make_config(tmp_path, broker.port, outbox={"path": str(small / "outbox.sqlite3")})
        outbox = Outbox.from_config(config.outbox)
        (small / "outbox.sqlite3.reserve").unlink()  # as a full disk earlier in the outage did
        stored = _fill_with_reports(outbox)
        with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt"):
            publisher = MqttPublisher(config, STATION, outbox)
            started.append(publisher)
            publisher.start()
            assert observer.wait_for(lambda m: _distinct_reports(observer) == stored, 30), _distinct_reports(observer)
            time.sleep(3.5)  # three more delete rounds
        assert outbox.counts().messages == stored
        said = [r.getMessage() for r in caplog.records if "cannot empty its WAL" in r.getMessage()
                and r.levelno >= logging.WARNING]
        assert len(said) == 1 and "the disk is full" in said[0], said


@pytest.mark.broker
def test_a_client_certificate_the_broker_refuses_is_said_and_the_reports_wait_for_a_good_one(
    tmp_path: Path, tls_material: TlsMaterial, credentials_dir: Path, started: list[MqttPublisher],
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Mutual TLS with a certificate the broker does not trust: under TLS 1.3 the broker refuses it
    after the handshake, so paho got no CONNACK and no connect failure. The state stayed "connecting"
    with no last_error (the daemon said "no MQTT broker answered ... (no connection yet)") and the
    journal held only paho's "failed to receive on socket", a WARNING on every retry."""
    broker = broker_with(tls=tls_material, tls_extra=("require_certificate true",))
    assert broker.tls_port is not None
    certs = tmp_path / "certs"
    certs.mkdir()
    trusted, stranger = make_client_cert(certs, "station", tls_material), make_client_cert(certs, "x", None)
    sub = observer_on(broker.port, [f"{BASE}/report"])  # plain listener
    tls = {"ca_file": str(tls_material.ca_cert)}
    bad = make_config(tmp_path, broker.tls_port, tls={**tls, "certfile": str(stranger[0]), "keyfile": str(stranger[1])})
    ours = "smearscope.service.mqtt.publisher"
    with caplog.at_level(logging.DEBUG, logger=ours):
        publisher = start_publisher(bad, started)
        publisher.publish_report("report", "mtls-1", b"{}", "1")
        assert wait_until(lambda: len([r for r in caplog.records
                                       if r.name == ours and "client certificate" in r.getMessage()]) >= 2, 10)
    said = [r for r in caplog.records if r.name == ours and "client certificate" in r.getMessage()]
    assert [r.levelno for r in said][:2] == [logging.WARNING, logging.DEBUG], said  # said once, then quiet
    message = said[0].getMessage()
    assert f"127.0.0.1:{broker.tls_port}" in message and "UNKNOWN_CA" in message, message
    state = publisher.state
    assert not state.connected and state.last_error == message, state
    paho_lines = [r for r in caplog.records if r.name == f"{ours}.paho" and r.levelno >= logging.WARNING]
    assert paho_lines == [], paho_lines  # its raw socket error is in our line
    assert publisher.outbox.counts().reports == 1  # kept
    stop_publisher(publisher, started)
    good = make_config(tmp_path, broker.tls_port, tls={**tls, "certfile": str(trusted[0]), "keyfile": str(trusted[1])})
    start_publisher(good, started)
    assert sub.wait_for(lambda m: len(m) == 1, 10), sub.messages


def test_a_certificate_judged_not_yet_valid_names_the_station_clock(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A station that boots with a stale clock (no clock battery, no network time yet) judges the
    broker's certificate not yet valid: the connection error names the station's clock as what it
    was judged against, and the report waits in the outbox. The broker's CA and certificate are
    made by openssl 400 days ahead (faketime), a real mosquitto serves them."""
    faketime = shutil.which("faketime")
    if faketime is None:
        pytest.skip("needs faketime")
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "openssl").write_text(f'#!/bin/sh\nexec {faketime} -f +400d {shutil.which("openssl")} "$@"\n')
    (wrapper / "openssl").chmod(0o755)
    with monkeypatch.context() as patched:
        patched.setenv("PATH", f"{wrapper}:{os.environ['PATH']}")
        future = make_tls_material(tmp_path / "future")
    broker = broker_with(tls=future)
    assert broker.tls_port is not None
    config = make_config(tmp_path, broker.tls_port, tls={"ca_file": str(future.ca_cert)})
    publisher = start_publisher(config, started)
    publisher.publish_report("report", "r-1", b"{}", "1")
    assert wait_until(lambda: publisher.state.last_error is not None, 10)
    error = publisher.state.last_error or ""
    assert "not yet valid" in error and "wall clock reads" in error, error
    assert not publisher.state.connected and publisher.outbox.counts().reports == 1


@pytest.mark.broker
def test_a_renamed_stations_waiting_messages_go_out_as_stored_and_the_start_says_so(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A station renamed (station_id lab-7 -> lab-8, the same outbox file) with a field and a
    report still waiting: they go out on the old id's topics, as their envelope says, and nothing
    said so at the start; under a broker account whose rights were moved to the new id they would
    never be delivered. The start now warns once, naming the old topics, the count and the reports."""
    config = make_config(tmp_path, broker.port)
    with Outbox.from_config(config.outbox) as outbox:  # the station as lab-7, the broker out of reach
        old = MqttPublisher(config, STATION, outbox)
        old.publish_report("field", "f-1", b'{"kind": "field"}', "1.1")
        old.publish_report("report", "r-1", b'{"kind": "specimen"}', "1.1")
    watcher = Subscriber(broker.port, "observer", MQTT_USERS["observer"], ["smearscope/#"])
    watcher.wait_ready()
    try:
        renamed = MqttPublisher(config, "lab-8", Outbox.from_config(config.outbox))
        started.append(renamed)
        with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.renamed"):
            renamed.start()
        said = [r.getMessage() for r in caplog.records if r.name == "smearscope.service.mqtt.renamed"]
        assert len(said) == 1 and said[0].startswith(
            "the outbox holds 2 messages (1 of them reports) stored under smearscope/lab-7, not smearscope/lab-8"), said
        assert "allowed to write smearscope/lab-7/#" in said[0]
        assert watcher.wait_for(lambda m: {x.topic for x in m} >= {f"{BASE}/field", f"{BASE}/report"}, 10)
        assert json.loads(watcher.on_topic(f"{BASE}/report")[0].payload)["station_id"] == STATION
        assert wait_until(lambda: renamed.outbox.counts().messages == 0, 10)
        renamed.stop()
        renamed.outbox.close()
        caplog.clear()  # its own messages only: nothing to say at the next start
        again = MqttPublisher(config, "lab-8", Outbox.from_config(config.outbox))
        started.append(again)
        with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.renamed"):
            again.publish_report("report", "r-2", b'{"kind": "specimen"}', "1.1")
            again.start()
        assert not [r for r in caplog.records if r.name == "smearscope.service.mqtt.renamed"]
    finally:
        watcher.close()



@pytest.mark.broker
def test_a_second_station_under_this_station_id_is_said_in_its_log_once(
    broker: MosquittoBroker, credentials_dir: Path, tmp_path: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two stations given one station_id but different client ids (a cloned config whose client_id
    was changed to stop the reconnections): the broker keeps both connected and nothing in either
    log said so. Each station reads its own telemetry topic: another process's sample (another
    instance id) is said at ERROR, naming its host and instance, once however many samples follow;
    a station alone hears only its own and says nothing."""
    logger_name = "smearscope.service.mqtt.twin_watch"
    with caplog.at_level(logging.ERROR, logger=logger_name):
        first = start_publisher(make_config(tmp_path / "a", broker.port, telemetry_interval_s=0.2),
                                started, telemetry_source=lambda: {"sample": 1})
        assert wait_until(lambda: first.twins.heard >= 5, 15), first.twins.heard
        assert not [r for r in caplog.records if r.name == logger_name]
        second = start_publisher(make_config(tmp_path / "b", broker.port, telemetry_interval_s=0.2,
                                             client_id="cloned-lab-7"), started, telemetry_source=lambda: {"sample": 2})
        assert wait_until(lambda: first.twins.others and second.twins.others, 15)
        heard = first.twins.heard
        assert wait_until(lambda: first.twins.heard >= heard + 10, 15)  # more of the other's samples: said once
    said = [r.getMessage() for r in caplog.records if r.name == logger_name]
    other = second.instance
    assert said.count(
        f"another station publishes as lab-7: telemetry from host {other['host']} (instance {other['instance_id']}) "
        f"on {BASE}/telemetry, this station is host {first.instance['host']} (instance {first.instance['instance_id']}); "
        "their reports, runs, retained status and command answers are mixed on the broker and the dashboards: give "
        "each station its own station_id") == 1, said
    assert len(said) == 2 and first.state.connected and second.state.connected  # one line each, both connected
