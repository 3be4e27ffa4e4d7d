"""`smearscope archive` in an offline lab: a broker out of reach for many retries is said once per
outage at WARNING (each retry at DEBUG), and its end once, with its length, as the station says its
own (service.mqtt.failure_news): a journal kept for days is not flooded."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import MQTT_USERS, MosquittoBroker, TlsMaterial, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from test_archive import REPO, Archive

pytestmark = pytest.mark.broker


def _lines(text: str, words: str) -> list[str]:
    return [line for line in text.splitlines() if words in line]


def _counting_retries(tmp_path: Path, port: int) -> Archive:
    """The archive for the broker at `port`, logging at DEBUG: each retry, to count them."""
    archive = Archive(tmp_path, port, tmp_path / "archive")
    archive.argv[archive.argv.index("--log-level") + 1] = "DEBUG"
    return archive


def _launch(archive: Archive) -> None:
    """The archive's process started, its output in its log; not waiting for it to connect."""
    with open(archive.log, "ab") as out:
        archive.proc = subprocess.Popen(archive.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def _above_debug(lines: list[str]) -> list[str]:
    return [line for line in lines if " DEBUG " not in line]


def _said_once(lines: list[str], level: str) -> str:
    """The one of `lines` logged above DEBUG, which is at `level` (the others are retries at DEBUG)."""
    said = _above_debug(lines)
    assert len(said) == 1 and f" {level} " in said[0], said
    return said[0]


def test_a_broker_out_of_reach_for_many_retries_is_said_once_and_its_return_once(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS)  # its port chosen, nothing listening there yet
    archive = _counting_retries(tmp_path, broker.port)
    try:
        _launch(archive)
        tries = lambda: _lines(archive.text(), f"cannot reach broker 127.0.0.1:{broker.port}")
        assert wait_until(lambda: len(tries()) >= 4, 60), archive.text()[-3000:]  # backoff 1, 2, 4 s ...
        said = _said_once(tries(), "WARNING")
        assert "ConnectionRefusedError" in said, said
        broker.start()
        assert wait_until(lambda: "connected to broker" in archive.text(), 90), archive.text()[-3000:]
        back = _lines(archive.text(), f"broker 127.0.0.1:{broker.port} reachable again after ")
        assert len(back) == 1 and " INFO " in back[0], archive.text()[-3000:]
        assert len(_above_debug(tries())) == 1, tries()
    finally:
        archive.stop()
        broker.stop()


def test_a_refused_login_is_said_once_while_it_repeats_and_the_acceptance_not_as_reachable_again(
        tmp_path: Path) -> None:
    """A broker that refuses the archive's login at every retry (its password file without the
    archive's password): one ERROR with what to check, each retry at DEBUG; the broker's password
    file mended and re-read (SIGHUP), the archive connects and says the broker accepts it
    again, not 'reachable again' (it was reachable all along)."""
    broker = MosquittoBroker(tmp_path / "broker", {**MQTT_USERS, "observer": "another-secret"})
    archive = _counting_retries(tmp_path, broker.port)
    try:
        broker.start()
        _launch(archive)
        refused = lambda: _lines(archive.text(), f"broker 127.0.0.1:{broker.port} refused the archive's connection")
        assert wait_until(lambda: len(refused()) >= 3, 60), archive.text()[-3000:]
        said = _said_once(refused(), "ERROR")
        assert "does not accept user 'observer' with this password" in said, said
        broker._write_passwords(MQTT_USERS)
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto re-reads its password file, staying up
        assert wait_until(lambda: "connected to broker" in archive.text(), 90), archive.text()[-3000:]
        assert "reachable again" not in archive.text(), archive.text()[-3000:]
        back = _lines(archive.text(), f"broker 127.0.0.1:{broker.port} accepts the archive's connection again after ")
        assert len(back) == 1 and " INFO " in back[0], archive.text()[-3000:]
    finally:
        archive.stop()
        broker.stop()


def test_a_tls_listener_given_as_mqtt_is_said_with_the_scheme_to_use(tmp_path: Path, tls_material: TlsMaterial) -> None:
    """`--broker mqtt://HOST:8883` (the broker's TLS listener, the scheme left plain): mosquitto resets
    each CONNECT it cannot read as TLS, and the archive retried for ever without a word, even at INFO.
    Now one WARNING naming the port and what to use, each retry at DEBUG."""
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS, tls=tls_material)
    assert broker.tls_port is not None
    archive = _counting_retries(tmp_path, broker.tls_port)
    try:
        broker.start()
        _launch(archive)
        tries = lambda: _lines(archive.text(), f"broker 127.0.0.1:{broker.tls_port} closed the connection before "
                                               "answering CONNECT")
        assert wait_until(lambda: len(tries()) >= 3, 60), archive.text()[-3000:]  # backoff 1, 2 s ...
        said = _said_once(tries(), "WARNING")
        assert "its port answers in TLS: use mqtts://HOST:PORT with --ca-file" in said, said
        assert "connected to broker" not in archive.text()
    finally:
        archive.stop()
        broker.stop()


def test_a_full_broker_breaking_the_connection_is_not_said_to_be_the_wrong_port(tmp_path: Path) -> None:
    """mosquitto at its max_connections, other clients holding the slots, breaks each further connection
    before the CONNACK as a TLS listener breaks a plain one. The archive says the broker closed it, not
    to check --broker's port or to use mqtts:// (its port answers no TLS)."""
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS, listener_extra=("max_connections 1",))
    archive = _counting_retries(tmp_path, broker.port)  # its retries after the first too
    holders: list[mqtt.Client] = []
    try:
        broker.start()
        while len(holders) < 4:  # mosquitto 2.0.11 lets max_connections + 1 in: hold until one is turned away
            holder = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"holder{len(holders)}")
            holder.username_pw_set("station", MQTT_USERS["station"])
            holder.connect("127.0.0.1", broker.port)
            holder.loop_start()
            holders.append(holder)
            if not wait_until(holder.is_connected, 5):  # 5 s: a slot freed late (the start's port probe) is retried
                holder.loop_stop()
                holders.pop()
                break
        assert len(holders) < 4, "the broker took every holder"
        turned_away = lambda: broker.log().count("denied: max_connections exceeded")
        before = turned_away()  # the holder turned away, and its retries
        _launch(archive)
        tries = lambda: _lines(archive.text(), f"broker 127.0.0.1:{broker.port} closed the connection")
        said = lambda: [line for line in tries() if " WARNING " in line]
        assert wait_until(lambda: len(said()) >= 1 and len(tries()) >= 4, 60), archive.text()[-3000:]
        archive.stop()
        assert 1 <= len(said()) <= 2, said()  # a reset, a close with no error: each once
        for line in said():
            assert "closed the connection before answering CONNECT" in line, line
            assert "mqtts://" not in line and "TLS" not in line and "MQTT port" not in line, line
        assert "connected to broker" not in archive.text()
        # the TLS handshake asked once for the streak (it holds paho's thread up to 3 s), not at each attempt:
        # the broker turned away each attempt (one more where the stop cut one short) and one handshake
        n = len(tries())
        assert n + 1 <= turned_away() - before <= n + 2, (turned_away() - before, n)
    finally:
        archive.stop()
        for holder in holders:
            holder.disconnect()
            holder.loop_stop()
        broker.stop()


def test_the_archive_started_by_hand_says_it_connected_without_a_log_level(tmp_path: Path) -> None:
    """README's `smearscope archive --broker ... --dir ...`, typed without --log-level: it printed
    nothing at all, connected or not, while its unit (--log-level INFO) logs each connection. The
    daemon's default is INFO; `archive find` keeps the commands' WARNING."""
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS)
    archive = Archive(tmp_path, broker.port, tmp_path / "archive")
    at = archive.argv.index("--log-level")
    del archive.argv[at:at + 2]
    try:
        broker.start()
        _launch(archive)
        assert wait_until(lambda: f"connected to broker 127.0.0.1:{broker.port}" in archive.text(), 30), archive.text()
        said = _lines(archive.text(), "connected to broker")
        assert len(said) == 1 and " INFO " in said[0], archive.text()
    finally:
        archive.stop()
        broker.stop()
    find = subprocess.run([*archive.argv[:archive.argv.index("archive") + 1], "find", "--dir", str(tmp_path / "archive")],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert " INFO " not in find.stdout + find.stderr, find


def test_a_broker_asking_for_a_client_certificate_is_said_with_the_certificate_to_give(
        tmp_path: Path, tls_material: TlsMaterial) -> None:
    """`--broker mqtts://...` with --ca-file but no --certfile, to a TLS listener that requires a client
    certificate: under TLS 1.3 the broker refuses after the handshake, so the socket breaks before any CONNACK.
    The archive says the certificate to give (--certfile, --keyfile), not to use mqtt:// (a plain listener)."""
    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS, tls=tls_material, tls_extra=("require_certificate true",))
    assert broker.tls_port is not None
    archive = Archive(tmp_path, broker.tls_port, tmp_path / "archive")
    at = archive.argv.index("--broker") + 1
    archive.argv[at:at + 1] = [f"mqtts://127.0.0.1:{broker.tls_port}", "--ca-file", str(tls_material.ca_cert)]
    try:
        broker.start()
        _launch(archive)
        said = lambda: [line for line in _lines(archive.text(), f"broker 127.0.0.1:{broker.tls_port}")
                        if " WARNING " in line]
        assert wait_until(lambda: len(said()) >= 1, 30), archive.text()[-3000:]
        (line,) = said()
        assert "client certificate" in line and "--certfile" in line, line
        assert "mqtt://" not in line, line
        assert "connected to broker" not in archive.text()
    finally:
        archive.stop()
        broker.stop()
