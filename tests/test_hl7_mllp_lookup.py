"""The MLLP receiver's host looked up within the exchange's deadline: a resolver that does not
answer (socket.getaddrinfo for the LIS's name blocked on an Event, every other name resolved as
ever) neither holds an exchange past its timeout nor a stopping archive; the report is held
(unacknowledged, not indexed) and sent once the resolver answers. No network: the name resolves,
once let go, to a real listener on 127.0.0.1."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker import MQTT_USERS, MosquittoBroker, wait_until
from mllp_lis import CONTROL_ID, MESSAGE, Behaviour, RawLis, accept, framed
from test_archive import SPECIMEN, STATION, Station, a_report, envelope_of, indexed

from smearscope.service.archive.daemon import ArchiveDaemon
from smearscope.service.archive.hl7_out import Hl7Output
from smearscope.service.archive.message import read_report
from smearscope.service.config.archive import ArchiveConfig
from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.hl7 import mllp


class SilentResolver:
    """socket.getaddrinfo with `name` not answered until `answer` is set (then resolved as 127.0.0.1);
    every other name (the broker's, paho's) resolved as ever."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.name = name
        self.asked = threading.Event()
        self.answer = threading.Event()
        self.calls = 0
        real = socket.getaddrinfo

        def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> list:
            if host != self.name:
                return real(host, port, *args, **kwargs)  # type: ignore[arg-type]
            self.calls += 1
            self.asked.set()
            self.answer.wait(120)  # a bound for the thread left waiting, should a test fail
            return real("127.0.0.1", port, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


_NAMES = itertools.count(1)


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentResolver]:
    # a name per test: a lookup left running by one test is not waited for by the next
    made = SilentResolver(monkeypatch, f"lis-{next(_NAMES)}.clinic.test")
    yield made
    made.answer.set()


def _send_in_thread(address: tuple[str, int], timeout_s: float,
                    stop: threading.Event | None = None) -> tuple[threading.Thread, list[BaseException | str]]:
    outcome: list[BaseException | str] = []

    def send() -> None:
        try:
            outcome.append(mllp.send(address, MESSAGE, CONTROL_ID, timeout_s, stop))
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            outcome.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, outcome


def test_a_resolver_that_does_not_answer_ends_the_exchange_at_its_timeout(
        resolver: SilentResolver, lis: Callable[[Behaviour], RawLis]) -> None:
    """The lookup unanswered: the send gives up at its 0.5 s timeout, said as the lookup that timed
    out (`unreachable`: the archive holds the report); a second send meanwhile waits for the same
    lookup (one thread per receiver, not per try); once the resolver answers, the message is sent."""
    server = lis(accept)
    address = (resolver.name, server.port)
    for _ in range(2):
        thread, outcome = _send_in_thread(address, 0.5)
        thread.join(30)  # a guard against a hang, not a timing: without the bound it waits for the resolver
        assert not thread.is_alive()
        error = outcome[0]
        assert isinstance(error, mllp.NotAcknowledged) and error.kind == "unreachable"
        assert f"looking {resolver.name} up timed out: the resolver did not answer within the exchange's 0.5 s" \
            in str(error)
    assert resolver.calls == 1 and server.received == []
    resolver.answer.set()
    assert mllp.send(address, MESSAGE, CONTROL_ID, 5) == "AA"
    assert server.received == [framed(MESSAGE.encode())]


def test_a_stop_ends_the_wait_for_a_resolver_that_does_not_answer(resolver: SilentResolver) -> None:
    stop = threading.Event()
    thread, outcome = _send_in_thread((resolver.name, 2575), 300, stop)
    assert resolver.asked.wait(10)
    stop.set()
    thread.join(30)  # a guard against a hang, not a timing: without the stop it waits 300 s
    assert not thread.is_alive()
    assert isinstance(outcome[0], mllp.NotAcknowledged) and outcome[0].kind == "stopped"


def test_a_report_is_held_while_the_resolver_does_not_answer_and_delivered_once_it_does(
        tmp_path: Path, resolver: SilentResolver, lis: Callable[[Behaviour], RawLis]) -> None:
    server = lis(accept)
    output = Hl7Output(tmp_path / "hl7", (resolver.name, server.port), 0.5)
    message = read_report(STATION, envelope_of(a_report("run-1", SPECIMEN, 1_796_000_000.0)))
    with pytest.raises(mllp.NotAcknowledged, match="timed out"):  # an OSError: the archive holds the report
        output(message)
    resolver.answer.set()
    deliveries = output(message)
    assert [d.destination for d in deliveries] == [f"file:{tmp_path / 'hl7'}", f"mllp:{resolver.name}:{server.port}"]
    assert len(server.received) == 1


@pytest.mark.broker
def test_the_archive_holds_the_report_while_the_resolver_is_silent_and_stops_when_told(
        tmp_path: Path, resolver: SilentResolver, lis: Callable[[Behaviour], RawLis],
        broker_with: Callable[..., MosquittoBroker]) -> None:
    """The archive (its storer in a thread), a report published, the LIS's name not answered: the
    report is tried again (not indexed, not acknowledged) and stored once the resolver answers; a
    second archive with a 300 s timeout and a silent resolver stops when told (what SIGTERM does)."""
    server = lis(accept)
    broker = broker_with(persistence=True)
    station = Station(tmp_path, broker.port)

    def archive(name: str, timeout_s: float) -> tuple[ArchiveDaemon, threading.Thread]:
        config = ArchiveConfig(mqtt=MqttConfig(host="127.0.0.1", port=broker.port, username="observer",
                                               client_id=f"archive-{name}"),
                               directory=tmp_path / name, hl7_mllp=f"{resolver.name}:{server.port}",
                               hl7_mllp_timeout_s=timeout_s, retry_s=0.2)
        daemon = ArchiveDaemon(config, MQTT_USERS["observer"])
        runner = threading.Thread(target=daemon.run, daemon=True)
        runner.start()
        return daemon, runner

    daemons: list[ArchiveDaemon] = []
    try:
        daemon, runner = archive("held", 0.5)
        daemons.append(daemon)
        station.publish_until("run-1", 1_796_000_000.0, resolver.asked)
        assert wait_until(lambda: daemon.counts["retried"] >= 2, 60)
        assert indexed(tmp_path / "held") == 0 and server.received == []
        resolver.answer.set()
        assert wait_until(lambda: indexed(tmp_path / "held") >= 1, 60)
        assert server.received
        daemon.stop()
        runner.join(60)

        resolver.answer.clear()
        resolver.asked.clear()
        resolver.name = f"another-{resolver.name}"  # not answered, and no lookup of it running
        slow, slow_runner = archive("stopping", 300)
        daemons.append(slow)
        assert station.publish_until("run-2", 1_796_000_100.0, resolver.asked)
        slow.stop()
        slow_runner.join(60)  # a guard against a hang, not a timing: without the bound it waits 300 s
        assert not slow_runner.is_alive()
        assert indexed(tmp_path / "stopping") == 0 and slow.counts["stored"] == 0
    finally:
        resolver.answer.set()
        for one in daemons:
            one.stop()
        station.stop()
