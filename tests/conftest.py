"""Shared fixtures. Broker fixtures: each test gets its own mosquitto (see tests/broker.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, TlsMaterial, make_tls_material
from mllp_lis import Behaviour, RawLis

from smearscope.service.mqtt.publisher import MqttPublisher


@pytest.fixture(autouse=True)
def _umask_kept() -> Iterator[None]:
    """The process umask as each test found it: `smearscope run`, `smearscope archive` and the
    daemon's own entry point add 027 to it, and a test that calls one in this process would
    otherwise leave every later test's files unreadable to other users (the tests that run the
    station as `nobody` among them)."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


#: The station the publisher tests run as (tests/test_publisher.py, tests/test_mqtt_limits.py).
PUBLISHER_BASE = "smearscope/lab-7"


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A test CA and a server certificate for 127.0.0.1 (made once per session with openssl)."""
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running mosquitto on a free loopback port, password auth only, persistence off."""
    mosquitto = MosquittoBroker(tmp_path / "broker", MQTT_USERS)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running mosquitto that keeps sessions and queued messages across its restarts (persistence on):
    the report archive's tests, whose consumer's queue must outlive a broker restart."""
    mosquitto = MosquittoBroker(tmp_path / "broker", MQTT_USERS, persistence=True)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def ws_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """mosquitto with a WebSockets listener besides its TCP one, as the dashboard's page reaches it."""
    mosquitto = MosquittoBroker(tmp_path / "broker", MQTT_USERS, websockets=True)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def broker_with(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Starts a mosquitto configured as the test says (MosquittoBroker's options: an ACL, TLS,
    persistence, further conf lines...; `users`, accounts of its own instead of MQTT_USERS) in
    tmp_path/broker; stopped after the test."""
    made: list[MosquittoBroker] = []

    def start(users: dict[str, str] | None = None, **options: Any) -> MosquittoBroker:
        made.append(MosquittoBroker(tmp_path / "broker", MQTT_USERS if users is None else users, **options))
        made[-1].start()
        return made[-1]

    yield start
    for mosquitto in reversed(made):
        mosquitto.stop()


@pytest.fixture
def observer_on() -> Iterator[Callable[..., Subscriber]]:
    """Subscribes the observer account to `topics` on a broker's `port` (Subscriber's options
    besides) and waits until the broker has acknowledged the subscription; closed after the test."""
    made: list[Subscriber] = []

    def subscribe(port: int, topics: list[str], **options: Any) -> Subscriber:
        made.append(Subscriber(port, "observer", MQTT_USERS["observer"], topics, **options))
        made[-1].wait_ready()
        return made[-1]

    yield subscribe
    for sub in reversed(made):
        sub.close()


@pytest.fixture
def daemons() -> Iterator[Callable[..., Any]]:
    """Starts station daemons in child processes (tests/test_daemon_faults.py's DaemonProcess: a
    station config, a pickled pool of oracle fields); each one still running is SIGKILLed after the
    test."""
    from test_daemon_faults import DaemonProcess

    made: list[DaemonProcess] = []

    def start(config: Path, pool_file: Path, *args: str, child: str | None = None) -> DaemonProcess:
        """`args` follow the config and the pool in the child's argv; `child` replaces run_daemon's code."""
        made.append(DaemonProcess(config, pool_file, *args, **({"child": child} if child is not None else {})))
        return made[-1]

    yield start
    for daemon in made:
        daemon.signal(signal.SIGKILL)
        daemon.wait(10)


@pytest.fixture
def credentials_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$CREDENTIALS_DIRECTORY as systemd LoadCredential= would provide it, holding 'mqtt-password'."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "mqtt-password").write_text(MQTT_USERS["station"] + "\n")
    directory.chmod(0o500)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    return directory


@pytest.fixture
def observed() -> list[str]:
    """The topics the `observer` fixture follows: the publisher tests' station's. A test module of
    another station overrides this fixture with its own (tests/test_daemon.py)."""
    return [f"{PUBLISHER_BASE}/#"]


@pytest.fixture
def observer(broker: MosquittoBroker, observed: list[str], observer_on: Callable[..., Subscriber]) -> Subscriber:
    """The observer account on `broker`, its subscription to `observed` acknowledged; closed after the test."""
    return observer_on(broker.port, observed)


@pytest.fixture
def started() -> Iterator[list[MqttPublisher]]:
    """Publishers a test starts; stopped afterwards even if the test fails."""
    publishers: list[MqttPublisher] = []
    yield publishers
    for publisher in publishers:
        publisher.stop(drain_timeout=0)
        publisher.outbox.close()


@pytest.fixture
def lis() -> Iterator[Callable[[Behaviour], RawLis]]:
    """Makes lab systems (tests/mllp_lis.py), closed after the test."""
    made: list[RawLis] = []

    def make(behaviour: Behaviour) -> RawLis:
        made.append(RawLis(behaviour))
        return made[-1]

    yield make
    for one in made:
        one.close()
