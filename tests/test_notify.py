"""sd_notify against a real AF_UNIX datagram socket, and the progress-based watchdog."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from smearscope.service.station.notify import (
    ProgressWatchdog,
    SystemdNotifier,
    watchdog_interval_from_env,
)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def _drain(sock: socket.socket, window_s: float) -> list[str]:
    """Every datagram that arrives within `window_s`."""
    messages = []
    deadline = time.monotonic() + window_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return messages


def test_ready_status_watchdog_stopping_arrive(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="engines warm")
    assert sock.recv(4096) == b"READY=1\nSTATUS=engines warm"
    assert notifier.status("analyzing\nfield 3")
    assert sock.recv(4096) == b"STATUS=analyzing field 3"  # newlines would split the protocol
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_abstract_socket_names_are_supported() -> None:
    name = f"smearscope-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = SystemdNotifier(environ={})
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog() is False


def test_send_failure_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.watchdog() is False


def test_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval_from_env({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval_from_env({}) is None
    other_pid = str(os.getpid() + 1)
    env = {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": other_pid}
    assert watchdog_interval_from_env(env) is None


def test_stalled_work_withholds_pings(listener: tuple[socket.socket, str]) -> None:
    """Deterministic clock: idle pings, progressing work pings, stuck work does not."""
    sock, path = listener
    now = [100.0]
    dog = ProgressWatchdog(SystemdNotifier(environ={"NOTIFY_SOCKET": path}), interval_s=30.0,
                           stall_timeout_s=60.0, clock=lambda: now[0])
    assert dog.tick() and sock.recv(4096) == b"WATCHDOG=1"  # idle is healthy
    dog.work_started()
    now[0] += 59.0
    assert dog.tick() and sock.recv(4096) == b"WATCHDOG=1"
    now[0] += 2.0  # 61 s into one frame's analysis
    assert dog.tick() is False
    assert sock.recv(4096).startswith(b"STATUS=stalled: analysis for 61 s")
    assert dog.tick() is False
    assert _drain(sock, 0.1) == []  # no second STATUS, no WATCHDOG
    dog.beat()  # progress inside the long unit of work
    assert dog.tick() and sock.recv(4096) == b"WATCHDOG=1"
    dog.work_finished()
    now[0] += 1000.0
    assert dog.tick()


def test_watchdog_thread_stops_pinging_when_analysis_stalls(
    listener: tuple[socket.socket, str],
) -> None:
    """Real thread, real clock: pings flow, stop during a stalled analysis, resume after it."""
    sock, path = listener
    dog = ProgressWatchdog(SystemdNotifier(environ={"NOTIFY_SOCKET": path}), interval_s=0.02,
                           stall_timeout_s=0.3)
    assert dog.start()
    try:
        assert "WATCHDOG=1" in _drain(sock, 0.2)
        dog.work_started("analysis")
        time.sleep(0.5)  # past the stall timeout
        _drain(sock, 0.05)  # pings sent before the stall was noticed
        stalled = _drain(sock, 0.4)
        assert "WATCHDOG=1" not in stalled, stalled
        dog.work_finished("analysis")
        assert "WATCHDOG=1" in _drain(sock, 0.5)
    finally:
        dog.stop()


def test_no_thread_without_a_systemd_watchdog() -> None:
    dog = ProgressWatchdog(SystemdNotifier(environ={}), interval_s=0)
    assert dog.start() is False
    dog.stop()


def test_extending_sends_extend_timeout_while_the_block_runs_and_stops_at_its_limit(
        listener: tuple[socket.socket, str]) -> None:
    """EXTEND_TIMEOUT_USEC= at once and every step/3 while the block runs; nothing after the block,
    and nothing past the limit (a hung load must still meet the unit's timeout)."""
    sock, path = listener
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    with notifier.extending(step_s=0.3, limit_s=5.0):
        during = _drain(sock, 0.55)
    assert during[0] == "EXTEND_TIMEOUT_USEC=300000" and 4 <= len(during) <= 7, during  # every 0.1 s
    assert set(during) == {"EXTEND_TIMEOUT_USEC=300000"}
    assert _drain(sock, 0.3) == []  # the block ended: no more
    with notifier.extending(step_s=0.3, limit_s=0.25):
        limited = _drain(sock, 0.8)
    assert 1 <= len(limited) <= 3, limited  # sent at 0, 0.1, 0.2 s; none past the 0.25 s limit (else 8)
    quiet = SystemdNotifier(environ={})
    with quiet.extending(step_s=0.3):  # outside systemd: nothing to do, no thread
        pass
