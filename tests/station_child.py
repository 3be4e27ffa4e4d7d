"""A station crashed on purpose: its outbox file made beforehand with triggers that refuse a write (as
a failing disk would), the station run in a child process (the oracle `PoolAnalyzer` of
tests/test_daemon.py) that the test SIGKILLs, then started again in this process on the same config.
Shared by tests/test_started_runs.py, test_stopped_run_report.py, test_verified_run_report.py and
test_restore_held.py."""

from __future__ import annotations

import contextlib
import pickle
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread

from broker import MQTT_USERS, MosquittoBroker, Subscriber
from test_daemon import BASE, oracle_pool, start_daemon, stop_daemon
from test_daemon_faults import DaemonProcess

from smearscope.service.config import load_config
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.station.daemon import StationDaemon
from smearscope.service.station.durable import StationState


def refusing_outbox(config: Path, *triggers: str) -> Path:
    """The station's outbox file made with the station's tables and `triggers` (the station holds the
    file locked while it runs, so they are made before it starts): its path."""
    outbox_path = Path(load_config(config).mqtt.outbox.path)
    outbox_path.parent.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(outbox_path)
    StationState(outbox)  # the station's tables, so the triggers have theirs
    outbox.close()
    with closing(sqlite3.connect(outbox_path)) as db:
        for statement in triggers:
            db.execute(statement)
        db.commit()
    return outbox_path


@dataclass
class ChildStation:
    """The observer and the station's child processes; `restart()` starts the station again here,
    `start_child()` in a further child process."""

    config: Path
    sub: Subscriber
    pool_file: Path
    children: list[DaemonProcess] = field(default_factory=list)
    restarted: list[tuple[StationDaemon, Thread]] = field(default_factory=list)

    @property
    def first(self) -> DaemonProcess:
        """The child process the station first ran in."""
        return self.children[0]

    def kill(self) -> None:
        """SIGKILL the first child process, as a power cut would, and wait for it to go."""
        self.first.signal(signal.SIGKILL)
        assert self.first.wait(10) == -signal.SIGKILL

    def start_child(self) -> DaemonProcess:
        """The station started on the same config in a child process (SIGKILLed after the block)."""
        self.children.append(DaemonProcess(self.config, self.pool_file))
        return self.children[-1]

    def restart(self) -> StationDaemon:
        """The station started again on the same config, in this process (stopped after the block)."""
        self.restarted.append(start_daemon(self.config))
        return self.restarted[-1][0]


@contextlib.contextmanager
def station_child(tmp_path: Path, broker: MosquittoBroker, config: Path) -> Iterator[ChildStation]:
    """An observer on the station's topics, then the station in a child process, for the block once it
    says it is online; after the block the restarted station is stopped, every child SIGKILLed (should
    the block have failed before killing it) and the observer closed (what it received stays readable)."""
    pool_file = tmp_path / "pool.pkl"
    pool_file.write_bytes(pickle.dumps(list(oracle_pool())))
    sub = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/#"])
    station = ChildStation(config, sub, pool_file)
    try:
        sub.wait_ready()
        first = station.start_child()
        assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/status" and m.payload == b"online" for m in ms),
                            60), first.lines[-20:]
        yield station
    finally:
        for daemon, runner in station.restarted:
            stop_daemon(daemon, runner)
        for child in station.children:
            child.signal(signal.SIGKILL)
        sub.close()
