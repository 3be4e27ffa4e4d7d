"""The publisher's reconnects against a real mosquitto: a port that takes the connection and never
answers after a refusal, and a password changed on the broker and in the station's credential."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import pytest
from broker import MQTT_USERS, MosquittoBroker, wait_until
from test_publisher import make_config, start_publisher

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
    as the state still said "refused": the journal's last word was the refusal, true no longer."""
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
    finally:
        if listener is not None:
            listener.close()
        broker.stop()
