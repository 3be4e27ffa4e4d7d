"""The publisher's reconnects against a real mosquitto: a port that takes the connection and never
answers after a refusal; a password changed on the broker and in the station's credential, and TLS
files replaced while it runs (read again before the attempt after a failure)."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import (
    MOSQUITTO_PASSWD,
    MQTT_USERS,
    MosquittoBroker,
    Mqtt311OnlyProxy,
    Subscriber,
    TlsMaterial,
    wait_until,
)
from paho.mqtt.enums import CallbackAPIVersion
from test_daemon import start_daemon, stop_daemon, write_station
from test_publisher import BASE, make_config, start_publisher, stop_publisher

from smearscope.service.mqtt.publisher import MqttPublisher

pytestmark = pytest.mark.broker

PUBLISHER_LOG = "smearscope.service.mqtt.publisher"


class SilentListener:
    """A TCP port that accepts every connection and never sends a byte (a hung broker's port)."""

    def __init__(self, port: int) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen(8)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never answered

    def close(self) -> None:
        """The port free again: the accept thread woken (a listening socket closed from another thread
        stays listening while accept() blocks on it, and a broker then restarted on the port cannot bind)."""
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self.server.close()
        for conn in self.accepted:
            conn.close()


def _said(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == PUBLISHER_LOG and text in r.getMessage()]


def test_a_port_that_never_answers_after_a_refusal_is_said_once(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
) -> None:
    """mosquitto refuses the station's password; then its port takes connections and never answers
    (a hung broker). The attempts without a CONNACK were not said at all until a connection was made,
    as the state still said "refused": the journal's last word was the refusal, true no longer. The
    refusal coming back after that is not said again within 10 minutes (failure_news.RESAY_S)."""
    (credentials_dir / "mqtt-password").chmod(0o600)
    (credentials_dir / "mqtt-password").write_text("not-the-password\n")
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS)
    broker.start()
    listener = None
    try:
        with caplog.at_level(logging.DEBUG, logger=PUBLISHER_LOG):
            publisher = start_publisher(make_config(tmp_path, broker.port), started)
            assert wait_until(lambda: publisher.state.status == "refused", 5), publisher.state
            broker.stop()
            listener = SilentListener(broker.port)
            # two attempts without an answer (keepalive 5 s each), said once, as a WARNING
            assert wait_until(lambda: len(_said(caplog, "gave no MQTT answer")) >= 2, 30), publisher.state
        refused = [r for r in _said(caplog, "refused the connection") if r.levelno >= logging.ERROR]
        silent = [r for r in _said(caplog, "gave no MQTT answer") if r.levelno >= logging.WARNING]
        assert len(refused) == 1 and len(silent) == 1, [r.getMessage() for r in caplog.records]
        assert silent[0].levelno == logging.WARNING and refused[0].created < silent[0].created
        assert silent[0].getMessage().startswith(f"broker 127.0.0.1:{broker.port} took the connection")
        state = publisher.state
        assert state.status == "disconnected" and state.last_error == silent[0].getMessage(), state
        assert listener.accepted, "the station's attempts reached the listener"
        # the refusal again: failures that alternate are each said at most once per 10 minutes
        listener.close()
        listener = None
        with caplog.at_level(logging.DEBUG, logger=PUBLISHER_LOG):
            broker.start()
            assert wait_until(lambda: publisher.state.refusals >= 2, 30), publisher.state
        refused = _said(caplog, "refused the connection")
        assert [r.levelno for r in refused] == [logging.ERROR, *[logging.DEBUG] * (len(refused) - 1)], \
            [r.getMessage() for r in refused]
    finally:
        if listener is not None:
            listener.close()
        broker.stop()


def test_a_password_changed_on_the_broker_and_in_the_credential_is_taken_without_a_restart(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
    broker_with: Callable[..., MosquittoBroker], observer_on: Callable[..., Subscriber],
) -> None:
    """The station's password is changed on mosquitto (password_file, SIGHUP: the connection dropped,
    the next CONNECT refused) and then in the station's credential file. The station read that file
    only at start: refused until restarted. Now the attempt after the refusal reads it again, logs
    in, and the report made while refused goes."""
    broker = broker_with()
    sub = observer_on(broker.port, [f"{BASE}/report"])
    with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt"):
        publisher = start_publisher(make_config(tmp_path, broker.port), started)
        assert publisher.wait_until_connected(5)
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(broker.workdir / "passwd"), "station", "rotated"], check=True)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: publisher.state.status == "refused", 10), publisher.state
        publisher.publish_report("report", "made-while-refused", b"{}", "1")
        (credentials_dir / "mqtt-password").chmod(0o600)
        (credentials_dir / "mqtt-password").write_text("rotated\n")
        assert sub.wait_for(lambda m: len(m) == 1, 15), publisher.state
    state = publisher.state
    assert state.connected and state.connects == 2 and state.refusals >= 1, state
    assert wait_until(lambda: publisher.outbox.counts().messages == 0, 5)
    changed = [r.getMessage() for r in caplog.records if r.name == "smearscope.service.mqtt.secrets"]
    assert changed == [("MQTT password in credential 'mqtt-password' changed: used from this connection "
                        "attempt on")], changed
    refused = [r.getMessage() for r in caplog.records if "refused the connection" in r.getMessage()]
    assert refused and "the station reads it again before its next attempt" in refused[0], refused


def test_sighup_has_the_station_read_its_password_again_for_its_next_connection(
    tmp_path: Path, credentials_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload (SIGHUP, `systemctl reload smearscope`) reads the credential again while the station
    is connected: the connection stays, and when mosquitto then takes the old password away (its
    password_file changed, SIGHUP) the station logs in again with the new one, never refused."""
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS)
    broker.start()
    daemon, runner = start_daemon(write_station(tmp_path, broker.port))
    try:
        assert wait_until(lambda: daemon.publisher is not None and daemon.publisher.state.connected, 15)
        publisher = daemon.publisher
        assert publisher is not None
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(broker.workdir / "passwd"), "station", "rotated"], check=True)
        (credentials_dir / "mqtt-password").chmod(0o600)
        (credentials_dir / "mqtt-password").write_text("rotated\n")
        with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt.secrets"):
            daemon.request_reload()  # what the daemon's SIGHUP handler does
            assert wait_until(lambda: any("changed: used from this connection attempt on" in r.getMessage()
                                          for r in caplog.records), 10), caplog.text
        assert publisher.state.connected and publisher.state.connects == 1, publisher.state
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto drops the station, whose old password is gone
        assert wait_until(lambda: publisher.state.connects == 2 and publisher.state.connected, 15), publisher.state
        assert publisher.state.refusals == 0, publisher.state
    finally:
        stop_daemon(daemon, runner)
        broker.stop()


def test_a_reload_hands_the_new_password_to_the_client_on_its_network_thread_before_its_next_connect(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
    broker_with: Callable[..., MosquittoBroker],
) -> None:
    """A reload (the daemon's SIGHUP) reads the credential on the daemon's thread. It set the password on
    the paho client there too, while paho's network thread may be building a CONNECT, which reads the
    password twice (its length, then its bytes: a change between makes a malformed packet), or reading the
    files at the same moment and setting an older password after a newer one. Now the client is changed
    only on its own network thread, just before its next connection attempt: the connection stays, and
    when mosquitto takes the old password away the station logs in with the new one, never refused."""
    broker = broker_with()
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    client = publisher._client
    assert client is not None
    set_on: list[str] = []
    set_password = client.username_pw_set

    def recorded(username: str | None, password: str | None = None) -> None:
        set_on.append(threading.current_thread().name)
        set_password(username, password)

    client.username_pw_set = recorded  # type: ignore[method-assign]
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(broker.workdir / "passwd"), "station", "rotated"], check=True)
    (credentials_dir / "mqtt-password").chmod(0o600)
    (credentials_dir / "mqtt-password").write_text("rotated\n")
    publisher.renew_secrets()  # what the daemon's reload does, on its main thread
    assert publisher.state.connected and publisher.state.connects == 1, publisher.state
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)  # mosquitto drops the station, whose old password is gone
    assert wait_until(lambda: publisher.state.connects == 2 and publisher.state.connected, 15), publisher.state
    assert publisher.state.refusals == 0, publisher.state
    assert set_on == [f"paho-mqtt-client-{publisher.client_id}"], set_on


def test_a_fallback_to_mqtt_311_that_finds_the_tls_files_mid_renewal_tries_again_once_they_are_whole(
    broker: MosquittoBroker, tmp_path: Path, tls_material: TlsMaterial, credentials_dir: Path, started: list[MqttPublisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """protocol "auto" against a broker that refuses MQTT 5: the station makes a 3.1.1 client. Its TLS
    files caught mid-renewal then (a CA file half written) fail that client's making; the fallback is
    tried again and the station connects once the files are whole. Before, the failed making left the
    stopped MQTT 5 client in place and no fallback asked for: the station never connected again."""
    refuse = threading.Event()
    proxy = Mqtt311OnlyProxy(broker.port, tls=tls_material, refuse=refuse)  # TLS in front of mosquitto
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(tls_material.ca_cert.read_bytes())
    try:
        caplog.set_level(logging.DEBUG, logger=PUBLISHER_LOG)
        publisher = start_publisher(make_config(tmp_path, proxy.port, protocol="auto",
                                                tls={"ca_file": str(ca_file)}), started)
        assert proxy.asked_v5.wait(10)
        whole = ca_file.read_bytes()
        ca_file.write_bytes(whole[: len(whole) // 2])  # the renewal half written
        refuse.set()
        failing = lambda: [r for r in caplog.records if "MQTT drain loop error" in r.getMessage()]
        assert wait_until(lambda: bool(failing()), 10)
        ca_file.write_bytes(whole)
        assert publisher.wait_until_connected(10), publisher.state
        assert publisher.state.protocol == "MQTTv311" and proxy.refused_v5 == 1
        assert sum(1 for r in failing() if r.levelno >= logging.ERROR) == 1  # its retries at DEBUG
        publisher.publish_report("report", "after", b"{}", "1")
        assert publisher.wait_until_drained(10)  # through the proxy to mosquitto
    finally:
        proxy.close()


def _sockets_and_threads() -> tuple[int, int]:
    """This process's open sockets (/proc/self/fd) and live threads."""
    fds = Path("/proc/self/fd")
    sockets = 0
    for fd in fds.iterdir():
        try:
            sockets += fd.readlink().name.startswith("socket:")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    return sockets, threading.active_count()


def test_broker_restarts_leave_the_publishers_sockets_and_threads_as_they_were(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher],
    broker_with: Callable[..., MosquittoBroker],
) -> None:
    """A station runs for weeks through broker outages: mosquitto SIGKILLed and started again 6
    times, a report made during each outage delivered (acknowledged) after it. Each reconnect must
    leave no socket and no thread behind: after the 6th the process holds as many sockets and
    threads as after the first connection (a leak of one per reconnect would show as 6)."""
    broker = broker_with()
    publisher = start_publisher(make_config(tmp_path, broker.port), started)
    assert publisher.wait_until_connected(5)
    before = _sockets_and_threads()
    for outage in range(1, 7):
        broker.kill()
        assert wait_until(lambda: not publisher.state.connected, 10), publisher.state
        publisher.publish_report("report", f"made-in-outage-{outage}", b"{}", "1")
        broker.start()
        assert wait_until(lambda outage=outage: publisher.state.delivered == outage, 15), publisher.state
        assert publisher.state.connects == outage + 1, publisher.state
    assert wait_until(lambda: _sockets_and_threads() == before, 5), (before, _sockets_and_threads())


def _hold_every_slot(broker: MosquittoBroker) -> list[mqtt.Client]:
    """Clients holding the connections of a broker at max_connections until one is turned away."""
    holders: list[mqtt.Client] = []
    while len(holders) < 4:  # mosquitto 2.0.11 lets max_connections + 1 in
        holder = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"holder{len(holders)}")
        holder.username_pw_set("observer", MQTT_USERS["observer"])
        holder.connect("127.0.0.1", broker.port)
        holder.loop_start()
        holders.append(holder)
        if not wait_until(holder.is_connected, 5):
            holder.loop_stop()
            holders.pop()
            return holders
    raise AssertionError("the broker took every holder")


def test_a_full_broker_closing_the_connection_is_not_said_to_be_the_wrong_port(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture,
) -> None:
    """mosquitto at max_connections, its slots held, breaks each further connection before the CONNACK:
    a reset, or a close with no error as a TLS listener closes a plain CONNECT. The station, given the
    right port, said the close as "is it the broker's MQTT port? ... a TLS listener? add [mqtt.tls]"; it
    says the broker closed it (its port answers no TLS handshake), once, then quiet."""
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS, listener_extra=("max_connections 1",))
    holders: list[mqtt.Client] = []
    try:
        broker.start()
        holders = _hold_every_slot(broker)
        turned_away = lambda: broker.log().count("denied: max_connections exceeded")
        before = turned_away()  # the holder turned away, and its retries
        with caplog.at_level(logging.DEBUG, logger=PUBLISHER_LOG):
            publisher = start_publisher(make_config(tmp_path, broker.port), started)
            attempts = lambda: _said(caplog, f"broker 127.0.0.1:{broker.port} ")
            # mosquitto resets most ([Errno 104]: the CONNECT came before it turned the connection away); the
            # few it turns away first it closes with no error, as a TLS listener closes a plain CONNECT
            quiet = lambda: [r for r in attempts() if "[Errno" not in r.getMessage()]
            assert wait_until(lambda: len(quiet()) >= 1 and len(attempts()) >= 4, 120), \
                [r.getMessage() for r in attempts()]
            stop_publisher(publisher, started, drain_timeout=0)
        said = [r for r in attempts() if r.levelno >= logging.WARNING]
        assert quiet()[0].getMessage().startswith(f"broker 127.0.0.1:{broker.port} closed the connection before "
                                                  "answering CONNECT (closed, no error given); retrying")
        for record in said:  # each failure once (a reset, a close), and none of them the wrong port
            message = record.getMessage()
            assert "TLS" not in message and "MQTT port" not in message and "[mqtt.tls]" not in message, message
        assert len(said) <= 2, [r.getMessage() for r in said]
        assert publisher.state.connects == 0, publisher.state
        # the TLS handshake asked once for the streak (it holds paho's thread up to 3 s), not at each attempt:
        # the broker turned away each attempt (one more where the stop cut one short) and one handshake
        n = len(attempts())
        assert n + 1 <= turned_away() - before <= n + 2, (turned_away() - before, n)
    finally:
        for holder in holders:
            holder.disconnect()
            holder.loop_stop()
        broker.stop()


def test_a_tls_listener_given_as_a_plain_port_is_said_with_the_tls_to_add(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], broker_with: Callable[..., MosquittoBroker],
    tls_material: TlsMaterial, caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker's TLS listener as [mqtt] port without [mqtt.tls]: mosquitto closes the plain CONNECT
    as a full broker does; its port answers a TLS handshake, so the station says to add [mqtt.tls]."""
    broker = broker_with(tls=tls_material)
    assert broker.tls_port is not None
    with caplog.at_level(logging.DEBUG, logger=PUBLISHER_LOG):
        publisher = start_publisher(make_config(tmp_path, broker.tls_port), started)
        closed = lambda: _said(caplog, f"broker 127.0.0.1:{broker.tls_port} closed the connection before answering")
        assert wait_until(lambda: len(closed()) >= 2, 30), [r.getMessage() for r in caplog.records]
    said = [r for r in closed() if r.levelno >= logging.WARNING]
    assert 1 <= len(said) <= 2, [r.getMessage() for r in closed()]  # a reset, a close with no error: each once
    for record in said:
        assert "its port answers in TLS: add [mqtt.tls]" in record.getMessage(), record.getMessage()
    assert publisher.state.connects == 0
