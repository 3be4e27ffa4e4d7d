"""The tests' own broker helper: a port it chose but another process took before mosquitto bound it
makes the first start retry on fresh ports (a TLS test once failed at start-up in a full local run),
and a broker that cannot start says why (its log)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from broker import MOSQUITTO, MQTT_USERS, MosquittoBroker, ephemeral_ports, free_ports

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make test installs it)")


def test_a_port_taken_before_the_first_start_is_replaced(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "b", MQTT_USERS)
    taken = broker.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken))  # bound, not listening: nothing answers there
        broker.start()
        try:
            assert broker.port != taken
            with socket.create_connection(("127.0.0.1", broker.port), timeout=2):
                pass
        finally:
            broker.stop()


def test_a_broker_given_a_taken_port_fails_with_its_log(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        broker = MosquittoBroker(tmp_path / "b", MQTT_USERS, port=squatter.getsockname()[1])
        with pytest.raises(RuntimeError, match="Address already in use"):
            broker.start(timeout=5.0)



def test_a_brokers_ports_lie_outside_the_kernels_ephemeral_range(tmp_path: Path) -> None:
    """A station retrying a stopped broker's port may be given that very port as its source port if it
    lies in the ephemeral range: it connects to itself (TCP simultaneous open), holds the port, and the
    broker's restart there fails with 'Address already in use'. The helper's ports lie outside that
    range, so no connect() is given one; each is free (bound while chosen) and distinct."""
    ephemeral = ephemeral_ports()
    ports = free_ports(40)
    assert len(set(ports)) == 40
    assert [p for p in ports if p in ephemeral] == []
    broker = MosquittoBroker(tmp_path / "b", MQTT_USERS, websockets=True)
    assert [p for p in (broker.port, broker.ws_port) if p in ephemeral] == []
    broker.start()
    try:
        broker.restart()  # the same ports again
        with socket.create_connection(("127.0.0.1", broker.port), timeout=2):
            pass
    finally:
        broker.stop()
