"""paho's network thread ending under `smearscope archive` (service.mqtt.network_thread, watched by the
archive's watcher thread): it is started again, the archive reconnects and stores the next report, also while
the storer holds a report or waits for a lab system's ACK. Real mosquitto, a real MLLP listener."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import MQTT_USERS, MosquittoBroker, wait_until
from mllp_lis import Behaviour, RawLis
from test_archive import SPECIMEN, STATION, a_report, envelope_of, indexed, raw_client

from smearscope.service.archive.daemon import ArchiveDaemon
from smearscope.service.archive.query import find
from smearscope.service.config.archive import ArchiveConfig
from smearscope.service.config.mqtt import MqttConfig

pytestmark = [pytest.mark.broker, pytest.mark.faults,
              # the SystemExit that ends paho's thread here on purpose, which pytest reports
              pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")]

SAID = "MQTT network thread ended unexpectedly"


def end_once(client: mqtt.Client, name: str) -> None:
    """The client's `name` (a method paho's thread calls) raises SystemExit the first time: the thread
    ends silently (threading lets a SystemExit end a thread; paho's suppress_exceptions does not catch it)."""
    real = getattr(client, name)

    def ending(*args: object, **kwargs: object) -> object:
        setattr(client, name, real)
        raise SystemExit(f"{name} interrupted")

    setattr(client, name, ending)


def _config(port: int, client_id: str, directory: Path, **archive: object) -> ArchiveConfig:
    """The archive's config as observer on the broker at `port`, reconnecting after 1 to 2 s."""
    return ArchiveConfig(mqtt=MqttConfig(host="127.0.0.1", port=port, username="observer", client_id=client_id,
                                         reconnect_min_delay_s=1, reconnect_max_delay_s=2),
                         directory=directory, **archive)


@contextmanager
def _running(config: ArchiveConfig, caplog: pytest.LogCaptureFixture) -> Iterator[ArchiveDaemon]:
    """The archive's run() on a thread of its own, connected; stopped on leaving, its thread ended."""
    caplog.set_level(logging.INFO)
    daemon = ArchiveDaemon(config, MQTT_USERS["observer"])
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert wait_until(lambda: daemon._connected, 30), caplog.text
        yield daemon
    finally:
        daemon.stop()
        runner.join(30)
    assert not runner.is_alive()


def _publish(port: int, run_id: str, captured: float) -> None:
    """A station's report of `run_id` on the broker at `port`, published at QoS 1."""
    with raw_client(port) as client:
        client.publish(f"smearscope/{STATION}/report", envelope_of(a_report(run_id, SPECIMEN, captured)),
                       qos=1).wait_for_publish(10)


def _end_the_thread_while_the_broker_is_away(daemon: ArchiveDaemon, broker: MosquittoBroker,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """paho's reconnect wait raises once the broker stops; the thread started again, the broker back and
    the archive reconnected to it."""
    end_once(daemon.client, "_reconnect_wait")
    broker.stop()  # SIGTERM: the archive's session, and the report unacknowledged in it, saved
    assert wait_until(lambda: not daemon._connected, 15), caplog.text
    assert wait_until(lambda: daemon._network.restarts == 1, 15), caplog.text
    broker.start()
    assert wait_until(lambda: daemon._connected, 30), caplog.text


def _said_once(caplog: pytest.LogCaptureFixture) -> None:
    """The thread's end said once, at ERROR, with the archive reconnecting."""
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and SAID in r.getMessage()]
    assert len(said) == 1 and "the archive reconnects" in said[0], said


def test_the_archives_network_thread_ended_in_its_reconnect_wait_is_started_again_and_the_next_report_stored(
        tmp_path: Path, persistent_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture) -> None:
    """The broker stops and paho's reconnect wait raises: its thread, which makes every reconnect, ends.
    The storer starts it again; once the broker is back the archive reconnects and stores the report
    published then (the check undone: it never reconnected and the report stayed on the broker)."""
    directory = tmp_path / "archive"
    with _running(_config(persistent_broker.port, "archive-thread", directory), caplog) as daemon:
        _publish(persistent_broker.port, "run-1", 1_796_000_000.0)
        assert wait_until(lambda: indexed(directory) == 1, 30), caplog.text
        end_once(daemon.client, "_reconnect_wait")
        persistent_broker.stop()  # SIGTERM: the archive's session saved
        # the broker back once the thread has ended and been started again (a storer's tick later)
        wait_until(lambda: daemon._network.restarts == 1, 15)
        persistent_broker.start()
        _publish(persistent_broker.port, "run-2", 1_796_100_000.0)
        assert wait_until(lambda: indexed(directory) == 2, 30), caplog.text
        assert {entry.run_id for entry in find(directory)} == {"run-1", "run-2"}
        assert daemon._network.restarts == 1
        _said_once(caplog)


def test_the_archives_network_thread_ended_while_a_report_is_held_is_started_again_and_it_reconnects(
        tmp_path: Path, persistent_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture) -> None:
    """A report held (its station's folder linked out of the archive: refused, tried again every 0.2 s) when the
    broker stops and paho's reconnect wait raises. The storer, between its tries, starts the thread again: the
    archive reconnects to the broker back while it still holds the report, and stores it once the link is gone.
    The check undone: the storer looked at the thread only once no message was held, so the archive stayed away
    from the broker for the whole hold (its session's expiry counting down)."""
    directory, outside = tmp_path / "archive", tmp_path / "elsewhere"
    directory.mkdir()
    outside.mkdir()
    link = directory / STATION
    link.symlink_to(outside)
    with _running(_config(persistent_broker.port, "archive-thread-held", directory, retry_s=0.2), caplog) as daemon:
        _publish(persistent_broker.port, "run-1", 1_796_000_000.0)
        assert wait_until(lambda: daemon.counts["retried"] >= 2, 30), caplog.text  # held
        _end_the_thread_while_the_broker_is_away(daemon, persistent_broker, caplog)
        assert indexed(directory) == 0 and daemon.counts["stored"] == 0  # reconnected while still holding it
        link.unlink()
        assert wait_until(lambda: indexed(directory) == 1, 30), caplog.text
        assert {entry.run_id for entry in find(directory)} == {"run-1"}
        _said_once(caplog)


def test_the_archives_network_thread_ended_while_the_lab_system_keeps_the_ack_waiting_is_started_again(
        tmp_path: Path, persistent_broker: MosquittoBroker, lis: Callable[[Behaviour], RawLis],
        caplog: pytest.LogCaptureFixture) -> None:
    """The storer sends a report over MLLP to a lab system that takes the message and never answers (the
    exchange may last hl7_mllp_timeout_s, 300 s here) when the broker stops and paho's reconnect wait raises.
    The archive's watcher starts the thread again meanwhile: the archive reconnects to the broker back while
    the exchange still waits, and its stop ends the watcher and the exchange. The check undone (the storer
    looked at the thread only between its tries), the thread stayed dead for the whole exchange."""
    directory = tmp_path / "archive"
    lab = lis(lambda conn, data: lab.done.wait(60))  # connected, silent until the test ends
    config = _config(persistent_broker.port, "archive-thread-mllp", directory,
                     hl7_mllp=f"127.0.0.1:{lab.port}", hl7_mllp_timeout_s=300)
    with _running(config, caplog) as daemon:
        _publish(persistent_broker.port, "run-1", 1_796_000_000.0)
        assert wait_until(lambda: len(lab.received) == 1, 30), caplog.text  # the storer waits for its ACK
        _end_the_thread_while_the_broker_is_away(daemon, persistent_broker, caplog)
        # reconnected while the first exchange still waits: one message sent, nothing stored or given up
        assert len(lab.received) == 1 and indexed(directory) == 0
        assert daemon.counts == {"stored": 0, "duplicates": 0, "refused": 0, "dropped": 0, "retried": 0}
        assert "cannot store" not in caplog.text
        _said_once(caplog)
    # stopped cleanly: the watcher ended first, then paho's thread, which nothing started again
    assert not [t for t in threading.enumerate() if t.name == "archive-network-watch"]
    assert daemon.client._thread is None
    assert daemon._network.restarts == 1


def test_the_archives_start_up_failing_on_its_index_leaves_no_network_thread_running(
        tmp_path: Path, broker: MosquittoBroker) -> None:
    """The index changed under the archive between its opening and run() (its deliveries' table dropped by
    another process): run()'s start-up count of the reports a lab system has not accepted raises. paho's
    network thread, started just before, is stopped and the index closed; no thread of the archive is left.
    The change undone (the try began after the start-up lines), paho's thread ran on, reconnecting for ever."""
    directory = tmp_path / "archive"
    config = ArchiveConfig(mqtt=MqttConfig(host="127.0.0.1", port=broker.port, username="observer",
                                           client_id="archive-start-up"), directory=directory,
                           hl7_directory=tmp_path / "hl7")
    before = set(threading.enumerate())
    daemon = ArchiveDaemon(config, MQTT_USERS["observer"])
    with sqlite3.connect(directory / "index.sqlite") as other:
        other.execute("DROP TABLE hl7_deliveries")
    with pytest.raises(sqlite3.OperationalError, match="hl7_deliveries"):
        daemon.run()
    assert daemon.client._thread is None
    assert [t.name for t in set(threading.enumerate()) - before if t.is_alive()] == []
    with pytest.raises(sqlite3.ProgrammingError):  # closed
        daemon.store.report_count()
