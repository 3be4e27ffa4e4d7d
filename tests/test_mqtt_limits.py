"""The publisher at its limits, against a real mosquitto: command payloads that would kill a
parser, bursts of commands, a broker that rejects every PUBACK, messages over the broker's
Maximum Packet Size, TLS failures that must say why (issue 18, items 3, 4 and 7)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker import (
    MosquittoBroker,
    Subscriber,
    TlsMaterial,
    free_port,
    make_issued_client_certs,
    make_tls_material,
    wait_until,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_publisher import (
    BASE,
    REPORTS_DENIED_ACL,
    make_config,
    start_publisher,
    stop_publisher,
    wait_commands_subscribed,
    wait_listening,
)

import smearscope.service.mqtt.publisher as publisher_module
from smearscope.service.mqtt import command_worker
from smearscope.service.mqtt.command_worker import MAX_DEPTH, QUEUE_SIZE, nesting_depth
from smearscope.service.mqtt.publisher import MqttPublisher

pytestmark = pytest.mark.broker


def _responses(sub: Subscriber) -> list[Any]:
    return [x for x in list(sub.messages) if "/cmd_response/" in x.topic]


def test_a_deeply_nested_command_is_answered_and_the_next_one_too(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path,
    started: list[MqttPublisher],
) -> None:
    publisher = start_publisher(make_config(tmp_path, broker.port), started,
                                on_command=lambda name, args: {"ok": True, "name": name})
    assert publisher.wait_until_connected(5)
    wait_commands_subscribed(broker, publisher)
    deep = b"[" * 30_000 + b"]" * 30_000  # 60 KB: under the size bound, far over the depth bound
    observer.client.publish(f"{BASE}/cmd/status", deep, qos=1)
    observer.client.publish(f"{BASE}/cmd/status", b"{" * 100_000, qos=1)  # over the size bound
    observer.client.publish(f"{BASE}/cmd/status", b" \r\n\t ", qos=1)  # blank: as empty, not "not JSON"
    observer.client.publish(f"{BASE}/cmd/status", b"{}", qos=1)
    assert observer.wait_for(lambda m: len(_responses(observer)) >= 4, 10), _responses(observer)
    answers = [json.loads(r.payload) for r in _responses(observer)]
    assert answers[0]["error"] == "payload_too_deep" and "deeper" in answers[0]["message"]
    assert answers[1]["error"] == "payload_too_large" and "limit" in answers[1]["message"]
    assert answers[2]["error"] == "empty_command", answers[2]
    assert answers[3] == {"ok": True, "name": "status"}


def test_nesting_depth_ignores_brackets_in_strings() -> None:
    assert nesting_depth(b'{"a": [1, {"b": "[[[[{{{"}]}') == 3
    assert nesting_depth(b'{"a": "\\"[["}') == 1
    assert nesting_depth(b"[" * (MAX_DEPTH + 1)) == MAX_DEPTH + 1


def test_every_command_of_a_burst_gets_an_answer(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path,
    started: list[MqttPublisher],
) -> None:
    def slow(name: str, args: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.005)
        return {"ok": True, "n": args["n"]}

    publisher = start_publisher(make_config(tmp_path, broker.port), started, on_command=slow)
    assert publisher.wait_until_connected(5)
    wait_commands_subscribed(broker, publisher)
    for i in range(200):  # the outbox keeps paho's window busy meanwhile
        publisher.publish_report("field", f"f{i}", json.dumps({"pad": "x" * 2000}).encode(), "1")
    n = 1000
    for i in range(n):
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = f"c{i}".encode()
        observer.client.publish(f"{BASE}/cmd/echo", json.dumps({"n": i}), qos=1, properties=props)
    assert observer.wait_for(lambda m: len(_responses(observer)) >= n, 30), len(_responses(observer))
    # answered in order: an answer more to the burst would come before this last command's
    observer.client.publish(f"{BASE}/cmd/last", json.dumps({"n": n}), qos=1)
    assert observer.wait_for(lambda m: any(r.topic.endswith("/cmd_response/last") for r in _responses(observer)), 10)
    burst = [r for r in _responses(observer) if r.topic.endswith("/cmd_response/echo")]
    got = {r.correlation_data: json.loads(r.payload) for r in burst}
    print(f"\ncommand burst: {n} commands, {len(got)} answered")
    assert len(burst) == n and len(got) == n
    answered = [v for v in got.values() if v["ok"]]
    busy = [v for v in got.values() if not v["ok"]]
    assert all(v["error"] == "busy" for v in busy)
    assert answered, "some commands were served"


def test_busy_answers_waiting_are_bounded_under_a_flood(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path,
    started: list[MqttPublisher], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a command runs and the queue is full, each further command waits for a "busy" answer;
    beyond BUSY_BACKLOG of them a refusal is only counted and logged, so a flood cannot grow the
    station's memory without bound. The bound made 5 here: 32 queued, 8 refused, 5 answered busy."""
    monkeypatch.setattr(command_worker, "BUSY_BACKLOG", 5)
    entered, release = threading.Event(), threading.Event()

    def handler(name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "hold":
            entered.set()
            release.wait(30)
        return {"ok": True, "name": name, **args}

    publisher = start_publisher(make_config(tmp_path, broker.port), started, on_command=handler)
    assert publisher.wait_until_connected(5)
    wait_listening(observer)
    try:
        observer.client.publish(f"{BASE}/cmd/hold", b"{}", qos=1)
        assert entered.wait(10)  # the command thread is busy with it, its queue empty
        for i in range(QUEUE_SIZE + 8):
            observer.client.publish(f"{BASE}/cmd/echo", json.dumps({"n": i}), qos=1)
        assert wait_until(lambda: publisher._commands.refused_unanswered == 3, 10), \
            publisher._commands.refused_unanswered
    finally:
        release.set()
    echoes = lambda: [json.loads(r.payload) for r in _responses(observer) if r.topic.endswith("/echo")]
    assert observer.wait_for(lambda m: len(echoes()) >= QUEUE_SIZE + 5, 10), len(echoes())
    observer.client.publish(f"{BASE}/cmd/last", b"{}", qos=1)  # answered after any busy answer left
    assert observer.wait_for(lambda m: any(r.topic.endswith("/cmd_response/last") for r in m), 10)
    busy = [a for a in echoes() if not a["ok"]]
    assert len(busy) == 5 and all(a["error"] == "busy" for a in busy)
    assert sorted(a["n"] for a in echoes() if a["ok"]) == list(range(QUEUE_SIZE))  # the queued ones, all served
    assert publisher._commands.refused_unanswered == 3


def test_a_rejected_message_is_retried_although_rejections_keep_coming(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publisher_module, "_FAILED_ACK_RETRY_S", 1.0)
    broker = broker_with(acl=REPORTS_DENIED_ACL)
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    first = publisher.publish_report("report", "denied-0", b"{}", "1")
    deadline = time.monotonic() + 4.0
    i = 0
    while time.monotonic() < deadline:  # a new rejection every 0.3 s, for 4 s
        i += 1
        publisher.publish_report("report", f"denied-{i}", b"{}", "1")
        time.sleep(0.3)
    attempts = {m.seq: m.attempts for m in publisher.outbox.pending(limit=1000)}
    assert attempts[first] >= 3, attempts  # retried about every second, not postponed


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_message_over_the_packet_limit_is_parked_and_never_blocks_the_queue(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], protocol: str, caplog: pytest.LogCaptureFixture,
) -> None:
    broker = broker_with(extra=("max_packet_size 65536",))
    sub = observer_on(broker.port, [f"{BASE}/#"])
    # MQTT 5: the broker's CONNACK says 65536; MQTT 3.1.1 has no such property, so the
    # configured limit is what protects the queue.
    overrides: dict[str, Any] = {"protocol": protocol}
    if protocol == "3.1.1":
        overrides["max_packet_size"] = 65536
    publisher = start_publisher(make_config(tmp_path, broker.port, **overrides), started)
    assert publisher.wait_until_connected(5)
    big = json.dumps({"cells": "x" * 75_000}).encode()
    with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt"):
        publisher.publish_report("report", "too-big", big, "1")
        for i in range(24):
            publisher.publish_report("field", f"small-{i}", b"{}", "1")
        assert sub.wait_for(lambda m: len([x for x in m if x.topic == f"{BASE}/field"]) == 24,
                            10), publisher.state
    assert wait_until(lambda: publisher.outbox.counts().messages == 1, 5)
    state = publisher.state
    assert state.parked == 1 and state.connects == 1, (state, broker.log()[-3000:])
    assert state.max_packet_size == 65536
    assert [m.report_id for m in publisher.outbox.pending()] == ["too-big"]
    assert any("parked" in r.message and "too-big" in r.message for r in caplog.records)
    time.sleep(1.0)
    assert publisher.state.connects == 1, "no reconnect storm"
    fields = [x for x in sub.messages if x.topic == f"{BASE}/field"]
    print(f"\noversized message ({protocol}): produced 25, delivered {len(fields)}, parked "
          f"{publisher.state.parked}, connections {publisher.state.connects}")
    # A stop does not wait its drain bound for a message no wait sends, and names it as parked.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt"):
        begun = time.monotonic()
        publisher.stop(drain_timeout=60)
        stopped_in = time.monotonic() - begun
    started.remove(publisher)
    publisher.outbox.close()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping with")]
    assert stopped_in < 30, stopped_in
    assert said == [("stopping with 1 parked messages in the outbox (too large for the broker, or held back); "
                    "they are tried again at the next start")], said


def test_a_tls_failure_says_why(
    tmp_path: Path, tls_material: TlsMaterial, credentials_dir: Path, started: list[MqttPublisher],
    broker_with: Callable[..., MosquittoBroker],
) -> None:
    broker = broker_with(tls=tls_material)
    assert broker.tls_port is not None
    rogue = make_tls_material(tmp_path / "rogue", common_name="rogue-ca")
    config = make_config(tmp_path, broker.tls_port, tls={"ca_file": str(rogue.ca_cert)})
    publisher = start_publisher(config, started)
    assert wait_until(lambda: publisher.state.last_error is not None, 5)
    assert "CERTIFICATE_VERIFY_FAILED" in (publisher.state.last_error or ""), publisher.state


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_command_thread_is_replaced(
    broker: MosquittoBroker, observer: Subscriber, credentials_dir: Path, tmp_path: Path,
    started: list[MqttPublisher],
) -> None:
    def handler(name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "die":
            raise SystemExit("a handler that ends its thread")  # not an Exception: escapes
        return {"ok": True}

    publisher = start_publisher(make_config(tmp_path, broker.port), started, on_command=handler)
    assert publisher.wait_until_connected(5)
    wait_commands_subscribed(broker, publisher)
    first = publisher._commands.threads()[0]
    observer.client.publish(f"{BASE}/cmd/die", b"{}", qos=1)
    first.join(10)
    assert not first.is_alive(), "the handler's SystemExit did not end the command thread"
    # no thread serves commands now: the drain loop starts another within a tick, which answers
    observer.client.publish(f"{BASE}/cmd/status", b"{}", qos=1)
    assert observer.wait_for(lambda m: any(r.topic.endswith("/status") for r in _responses(observer)), 5)
    assert len(publisher._commands.threads()) == 2


def test_at_least_once_reaches_only_consumers_with_persistent_sessions(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber],
) -> None:
    """What docs/MQTT.md tells consumers (issue 18, item 7): the outbox gets every report to the
    broker; a consumer that was away gets them only with a persistent session on a broker that
    keeps sessions across its restarts."""
    broker = broker_with(persistence=True)
    consumers = lambda: (observer_on(broker.port, [f"{BASE}/report"], client_id="clean-consumer"),
                         observer_on(broker.port, [f"{BASE}/report"], client_id="persistent-consumer", persistent=True))
    clean, kept = consumers()
    clean.close()
    kept.close()  # both consumers are away (disconnected, not unsubscribed)
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    for i in range(5):
        publisher.publish_report("report", f"while-away-{i}", b"{}", "1")
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10)
    broker.restart()  # the broker restarts while they are away, too
    clean, kept = consumers()
    assert kept.wait_for(lambda m: len(m) >= 5, 10), len(kept.messages)
    time.sleep(0.5)
    assert clean.messages == []
    docs = (Path(__file__).resolve().parents[1] / "docs" / "MQTT.md").read_text()
    assert "persistent session" in docs and "persistence true" in docs


def test_an_acl_that_denies_the_reports_is_said_once_with_the_topic_and_they_are_sent_once_allowed(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL without the report topic (MQTT 5: PUBACK 0x87): the journal got "broker rejected
    outbox message seq N: Not authorized (0x87); kept for retry" for every message at every retry
    (a WARNING per waiting report each 30 s), naming neither the topic nor the ACL."""
    monkeypatch.setattr(publisher_module, "_FAILED_ACK_RETRY_S", 0.5)
    broker = broker_with(acl=REPORTS_DENIED_ACL)
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    with caplog.at_level(logging.DEBUG, logger="smearscope.service.mqtt.inflight"):
        for i in range(3):
            publisher.publish_report("report", f"denied-{i}", b"{}", "1")
        assert wait_until(lambda: publisher.state.failed_acks >= 9, 10), publisher.state  # three rounds
    said = [r for r in caplog.records if r.name == "smearscope.service.mqtt.inflight"
            and "Not authorized" in r.getMessage()]
    warnings = [r.getMessage() for r in said if r.levelno >= logging.WARNING]
    assert len(said) >= 9 and len(warnings) == 1, [r.getMessage() for r in said]
    assert f"{BASE}/report" in warnings[0] and "ACL" in warnings[0] and "'station'" in warnings[0], warnings[0]
    assert publisher.outbox.counts().reports == 3
    (broker.workdir / "acl").write_text(REPORTS_DENIED_ACL.replace("user observer", f"topic write {BASE}/report\nuser observer"))
    sub = observer_on(broker.port, [f"{BASE}/report"])
    broker.proc.send_signal(signal.SIGHUP)  # mosquitto re-reads its ACL
    assert sub.wait_for(lambda m: len(m) == 3, 10), publisher.state
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 5)


def test_a_report_over_the_brokers_message_size_limit_is_parked_and_sent_once_the_limit_is_raised(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], caplog: pytest.LogCaptureFixture,
) -> None:
    """mosquitto's `message_size_limit` (announced in no CONNACK) answers a larger PUBLISH with
    PUBACK 0x95, which paho took for a protocol error: the connection dropped, the large report went
    again first at every reconnect, the messages behind it were delivered again and again and never
    left the outbox (measured: 6 reconnects in 6 s, 5 small reports received 19 times)."""
    broker = broker_with(persistence=True, extra=("message_size_limit 20000",))
    # A kept session: what the broker takes while the consumer reconnects after its restart waits for it.
    sub = observer_on(broker.port, [f"{BASE}/report"], client_id="size-consumer", persistent=True)
    publisher = start_publisher(make_config(tmp_path, broker.port, protocol="5"), started)
    assert publisher.wait_until_connected(5)
    with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt"):
        publisher.publish_report("report", "too-big", json.dumps({"cells": "x" * 50_000}).encode(), "1")
        for i in range(24):
            publisher.publish_report("report", f"small-{i}", b"{}", "1")
        assert wait_until(lambda: publisher.outbox.counts().messages == 1, 10), publisher.state
    assert [m.report_id for m in publisher.outbox.pending()] == ["too-big"]
    state = publisher.state
    assert state.parked == 1 and state.connects == 1, (state, broker.log()[-3000:])
    said = [r.getMessage() for r in caplog.records if "too-big" in r.getMessage()]
    assert len(said) == 1 and "message_size_limit" in said[0] and "parked" in said[0], said
    assert sub.wait_for(lambda m: len(m) == 24, 5)
    ids = [json.loads(m.payload)["report_id"] for m in sub.messages]
    assert sorted(ids) == sorted(f"small-{i}" for i in range(24)), ids  # each once
    # The operator raises the limit: the parked report goes at the reconnect after the restart.
    broker.extra = ()
    broker._write_config()
    broker.restart()
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 15), publisher.state
    assert publisher.state.parked == 0, publisher.state  # delivered: no longer counted as parked
    assert sub.wait_for(lambda m: any(json.loads(x.payload)["report_id"] == "too-big" for x in m), 5)


def test_a_report_the_broker_refuses_as_too_large_is_said_once_across_its_restarts_and_stays_parked(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A report over mosquitto's `message_size_limit` is tried again after each reconnect (the limit
    may have been raised) and refused again: the ERROR line came again at every reconnect, and the
    parked count fell to 0 in between. Said once; each later refusal at DEBUG; parked throughout."""
    broker = broker_with(extra=("message_size_limit 20000",))
    publisher = start_publisher(make_config(tmp_path, broker.port, protocol="5"), started)
    assert publisher.wait_until_connected(5)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "smearscope.service.mqtt.inflight"
                and "too-big" in r.getMessage()]

    with caplog.at_level(logging.DEBUG, logger="smearscope.service.mqtt.inflight"):
        publisher.publish_report("report", "too-big", json.dumps({"cells": "x" * 50_000}).encode(), "1")
        publisher.publish_report("report", "small", b"{}", "1")
        assert wait_until(lambda: len(refusals()) == 1 and publisher.outbox.counts().messages == 1, 10)
        for restart in range(1, 4):
            broker.restart()
            assert wait_until(lambda: publisher.state.connects == restart + 1  # noqa: B023
                              and len(refusals()) == restart + 1, 15), (publisher.state, len(refusals()))  # noqa: B023
            assert publisher.state.parked == 1, publisher.state
    errors = [r.getMessage() for r in refusals() if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "message_size_limit" in errors[0] and "parked" in errors[0], errors
    assert [m.report_id for m in publisher.outbox.pending()] == ["too-big"]


def test_a_parked_field_message_that_expires_is_no_longer_counted_as_parked(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
) -> None:
    """A field message mosquitto refuses as too large is parked, then expires (field_message_expiry_s)
    and leaves the outbox: it is no longer counted as parked (status, the STATUS= line) once it has
    expired, not only from the next connection on, which counted it meanwhile; nor tried again."""
    broker = broker_with(extra=("message_size_limit 20000",))
    publisher = start_publisher(make_config(tmp_path, broker.port, protocol="5", field_message_expiry_s=1),
                                started)
    assert publisher.wait_until_connected(5)
    publisher.publish_report("field", "too-big", json.dumps({"cells": "x" * 50_000}).encode(), "1")
    assert wait_until(lambda: publisher.state.parked == 1, 10), publisher.state
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 20), publisher.state  # expired
    assert wait_until(lambda: publisher.state.parked == 0, 5), publisher.state  # the same connection
    broker.restart()
    assert wait_until(lambda: publisher.state.connects == 2, 15), publisher.state
    assert wait_until(lambda: publisher.state.parked == 0, 5), publisher.state


def test_a_stop_waits_for_a_report_in_flight_beside_a_parked_message_that_was_evicted(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A field message mosquitto refuses as too large is parked; a report stored while the broker hangs
    takes the outbox over its byte bound, which evicts that field message (gone from the outbox, still
    counted parked until the drain looks again). The station is asked to stop: the stop waits for the
    report (the broker answers once it runs again) and the outbox is empty after. The evicted message's
    count stood for the report: the stop took the outbox for drained at once, left the report in it
    and said it as '1 parked messages'."""
    broker = broker_with(extra=("message_size_limit 20000",))
    config = make_config(tmp_path, broker.port, protocol="5",
                         outbox={"path": str(tmp_path / "outbox.sqlite3"), "max_bytes": 60_000})
    publisher = start_publisher(config, started)
    assert publisher.wait_until_connected(5)
    publisher.publish_report("field", "too-big", json.dumps({"cells": "x" * 50_000}).encode(), "1")
    assert wait_until(lambda: publisher.state.parked == 1, 10), publisher.state
    broker.freeze()  # hung: the report is sent and not acknowledged
    publisher.publish_report("report", "r-1", json.dumps({"run_id": "run-1", "note": "y" * 15_000}).encode(), "1")
    assert publisher.outbox.counts().messages == 1  # the parked field message evicted for it
    assert wait_until(lambda: publisher.state.in_flight == 1, 5), publisher.state
    with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.publisher"):
        stopping = threading.Thread(target=publisher.stop, kwargs={"drain_timeout": 60.0})
        stopping.start()
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGCONT)  # the broker runs again: it acknowledges the report
        stopping.join(70)
    assert not stopping.is_alive()
    assert publisher.outbox.counts().messages == 0, caplog.text  # delivered before the stop went on
    assert "parked messages" not in caplog.text and "still in the outbox" not in caplog.text, caplog.text


def test_a_broker_certificate_from_a_new_ca_says_which_ca_file_and_the_reports_go_once_it_is_replaced(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
) -> None:
    """The broker's certificate is replaced while the station runs: one from the same CA is taken at
    the reconnect; one from a new CA is refused, the station says which ca_file to replace, and the
    reports made meanwhile go once the new CA is put there (read again before the next attempt; the
    station read it only at start, and needed a restart)."""
    first = make_tls_material(tmp_path / "ca-1", common_name="clinic-ca-1")
    live = TlsMaterial(tmp_path / "ca-1" / "ca.crt", tmp_path / "live.crt", tmp_path / "live.key")
    shutil.copy(first.server_cert, live.server_cert)
    shutil.copy(first.server_key, live.server_key)
    broker = broker_with(tls=live)
    assert broker.tls_port is not None
    ca_file = tmp_path / "station-ca.pem"
    shutil.copy(first.ca_cert, ca_file)
    config = make_config(tmp_path, broker.tls_port, tls={"ca_file": str(ca_file)})
    publisher = start_publisher(config, started)
    assert publisher.wait_until_connected(5)
    # A renewal: a new key, its certificate signed by the same CA (a fresh set's request, signed by ca-1).
    renewed = make_tls_material(tmp_path / "ca-1-renewed")
    subprocess.run(["openssl", "x509", "-req", "-in", str(renewed.server_cert.with_suffix(".csr")), "-CA",
                    str(first.ca_cert), "-CAkey", str(first.ca_cert.with_suffix(".key")), "-CAcreateserial",
                    "-out", str(live.server_cert), "-days", "2", "-extfile", str(tmp_path / "ca-1" / "san.ext")],
                   check=True, capture_output=True)
    shutil.copy(renewed.server_key, live.server_key)
    broker.restart()
    assert wait_until(lambda: publisher.state.connects == 2, 10), publisher.state
    other = make_tls_material(tmp_path / "ca-2", common_name="clinic-ca-2")
    shutil.copy(other.server_cert, live.server_cert)
    shutil.copy(other.server_key, live.server_key)
    broker.restart()
    publisher.publish_report("report", "made-while-refused", b"{}", "1")
    assert wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in (publisher.state.last_error or ""), 10)
    said = publisher.state.last_error or ""
    assert f"not signed by the CA in [mqtt.tls] ca_file {ca_file}" in said, said
    assert "the station reads it again before its next attempt" in said, said
    assert publisher.outbox.counts().reports == 1
    shutil.copy(other.ca_cert, ca_file)
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10), publisher.state
    assert publisher.state.connects == 3, publisher.state  # the same publisher, not restarted


def test_a_broker_certificate_for_another_name_says_which_host_it_does_not_name(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
) -> None:
    tls = make_tls_material(tmp_path / "tls", san="DNS:broker.other.example")
    broker = broker_with(tls=tls)
    assert broker.tls_port is not None
    config = make_config(tmp_path, broker.tls_port, tls={"ca_file": str(tls.ca_cert)})
    publisher = start_publisher(config, started)
    assert wait_until(lambda: publisher.state.last_error is not None, 5)
    said = publisher.state.last_error or ""
    assert "mismatch" in said and "does not name '127.0.0.1'" in said and "subjectAltName" in said, said
    assert publisher.state.connects == 0


def test_a_broker_on_ipv6_loopback_takes_the_reports_and_the_log_names_it_in_brackets(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], caplog: pytest.LogCaptureFixture,
) -> None:
    """host = "::1" over TLS (a certificate for IP ::1): delivered. The journal said
    "MQTT connected to ::1:8883", which reads as a port of a longer address: now "[::1]:8883"."""
    tls = make_tls_material(tmp_path / "tls", san="IP:::1")
    broker = broker_with(tls=tls, bind="::1")
    sub = observer_on(broker.port, [f"{BASE}/report"], host="::1")
    config = make_config(tmp_path, broker.tls_port, host="::1", tls={"ca_file": str(tls.ca_cert)})
    with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt.publisher"):
        publisher = start_publisher(config, started)
        publisher.publish_report("report", "over-ipv6", b"{}", "1")
        assert sub.wait_for(lambda m: len(m) == 1, 10), publisher.state
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MQTT connected to")]
    assert said and said[0].startswith(f"MQTT connected to [::1]:{broker.tls_port} "), said
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 5)


@pytest.mark.parametrize("refused", ["expired", "revoked"])
def test_an_expired_or_revoked_client_certificate_is_said_with_what_to_do(
    tmp_path: Path, tls_material: TlsMaterial, credentials_dir: Path, started: list[MqttPublisher],
    broker_with: Callable[..., MosquittoBroker], refused: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Mutual TLS, the broker with a CRL (crlfile): an expired or a revoked station certificate was
    told "use one signed by the CA the broker trusts, not expired" (a revoked one is both). A valid one
    installed over it (the certificate first, its key a moment later) is taken without a restart."""
    certs, crl = make_issued_client_certs(tmp_path / "issued", tls_material)
    broker = broker_with(tls=tls_material, tls_extra=("require_certificate true", f"crlfile {crl}"))
    assert broker.tls_port is not None
    tls = {"ca_file": str(tls_material.ca_cert)}
    crt, key = certs[refused]
    publisher = start_publisher(make_config(tmp_path, broker.tls_port, tls={
        **tls, "certfile": str(crt), "keyfile": str(key)}), started)
    publisher.publish_report("report", "waits", b"{}", "1")
    assert wait_until(lambda: "client certificate" in (publisher.state.last_error or ""), 10), publisher.state
    said = publisher.state.last_error or ""
    expected = ("it is revoked (the broker's crlfile lists it): install a new one" if refused == "revoked"
                else "it has expired: install a renewed one")
    assert f"refused the client certificate {crt}" in said and expected in said, said
    assert "the station reads them again before its next attempt" in said, said
    assert publisher.outbox.counts().reports == 1, said

    def mid_rotation() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "smearscope.service.mqtt.secrets" and "cannot use the "
                "[mqtt.tls] files" in r.getMessage() and "KEY_VALUES_MISMATCH" in r.getMessage()]

    with caplog.at_level(logging.DEBUG, logger="smearscope.service.mqtt.secrets"):
        shutil.copy(certs["valid"][0], crt)  # caught between the two: said, the old pair kept, read again
        assert wait_until(lambda: len(mid_rotation()) >= 2, 10), [r.getMessage() for r in caplog.records]
        shutil.copy(certs["valid"][1], key)
    # said once as a WARNING, its repeats (each attempt before the key came) at DEBUG
    said = [r.levelno for r in mid_rotation()]
    assert said == [logging.WARNING] + [logging.DEBUG] * (len(said) - 1), caplog.text
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 10), publisher.state
    assert publisher.state.connects == 1, publisher.state


def test_a_broker_name_that_does_not_resolve_or_a_port_without_a_listener_says_what_to_check(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
) -> None:
    """Said "cannot reach broker H:P (gaierror: [Errno -2] Name or service not known); retrying"
    and "... (ConnectionRefusedError: ...); retrying", with neither what to check nor the backoff."""
    cases = [({"host": "broker.does-not-exist.invalid"},
              "the name 'broker.does-not-exist.invalid' does not resolve: check [mqtt] host and the station's DNS"),
             ({}, "nothing listens on port {port} there: is the broker running, on this port?")]
    for i, (overrides, expected) in enumerate(cases):
        port = free_port()
        config = make_config(tmp_path, port, outbox={"path": str(tmp_path / f"outbox-{i}.sqlite3")}, **overrides)
        publisher = start_publisher(config, started)
        publisher.publish_report("report", "waits", b"{}", "1")
        assert wait_until(lambda p=publisher: p.state.last_error is not None, 10), publisher.state
        said = publisher.state.last_error or ""
        assert said.startswith(f"cannot reach broker {config.address} (") and expected.format(port=port) in said, said
        assert said.endswith("; retrying with backoff up to 2 s, reports wait in the outbox"), said
        assert publisher.outbox.counts().reports == 1
        stop_publisher(publisher, started, drain_timeout=0)


def test_a_station_given_the_websockets_port_says_so_and_delivers_over_websockets_when_told(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], caplog: pytest.LogCaptureFixture,
) -> None:
    """The dashboard's WebSockets port given as the station's: the listener answers CONNECT with
    HTTP, paho drops it as malformed and retries, and the station said nothing at all (state
    "connecting", no last_error, nothing in the journal). Now said once; `transport = "websockets"`
    delivers through that listener."""
    broker = broker_with(websockets=True)
    sub = observer_on(broker.port, [f"{BASE}/report"])
    assert broker.ws_port is not None
    plain = make_config(tmp_path, broker.ws_port)
    with caplog.at_level(logging.DEBUG, logger="smearscope.service.mqtt.publisher"):
        publisher = start_publisher(plain, started)
        publisher.publish_report("report", "over-websockets", b"{}", "1")
        assert wait_until(lambda: publisher.state.last_error is not None, 10), publisher.state
        assert wait_until(lambda: len([r for r in caplog.records if "no MQTT answer" in r.getMessage()]) >= 2, 10)
    said = [r for r in caplog.records if "no MQTT answer" in r.getMessage()]
    assert [r.levelno for r in said][:2] == [logging.WARNING, logging.DEBUG], said  # once, then quiet
    message = publisher.state.last_error or ""
    assert message.startswith(f"broker 127.0.0.1:{broker.ws_port} took the connection but gave no MQTT answer"), message
    assert 'set [mqtt] transport = "websockets"' in message and publisher.state.connects == 0, message
    stop_publisher(publisher, started, drain_timeout=0)
    start_publisher(make_config(tmp_path, broker.ws_port, transport="websockets"), started)
    assert sub.wait_for(lambda m: len(m) == 1, 10)
    assert json.loads(sub.messages[0].payload)["report_id"] == "over-websockets"


def test_a_telemetry_sample_over_the_brokers_packet_limit_is_dropped_not_sent(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], caplog: pytest.LogCaptureFixture,
) -> None:
    """A sample larger than the connection's packet limit (the broker's announced Maximum Packet Size)
    would make mosquitto close the connection at each sample, the reports' queue with it: it is not
    sent, said once at WARNING; the next sample that fits is sent, and the station stays connected."""
    broker = broker_with(extra=("max_packet_size 4096",))
    sub = observer_on(broker.port, [f"{BASE}/#"])
    sizes = [6000] * 8 + [100] * 1000  # eight samples too large, then small ones

    def source() -> dict[str, Any]:
        return {"padding": "x" * (sizes.pop(0) if sizes else 100)}

    config = make_config(tmp_path, broker.port, telemetry_interval_s=0.1)
    publisher = MqttPublisher(config, "lab-7", publisher_module.Outbox.from_config(config.outbox),
                              telemetry_source=source)
    started.append(publisher)
    with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt"):
        publisher.start()
        assert publisher.wait_until_connected(5)
        assert sub.wait_for(lambda m: any(x.topic == f"{BASE}/telemetry" for x in m), 10), publisher.state
        publisher.publish_report("report", "after", b"{}", "1")
        assert sub.wait_for(lambda m: any(x.topic == f"{BASE}/report" for x in m), 10), publisher.state
    assert publisher.state.connects == 1, (publisher.state, broker.log()[-2000:])
    said = [r.message for r in caplog.records if "telemetry sample" in r.message]
    assert len(said) == 1 and "4096" in said[0], said
    assert all(len(x.payload) < 4096 for x in sub.on_topic(f"{BASE}/telemetry"))

