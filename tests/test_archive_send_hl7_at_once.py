"""Two `smearscope archive send-hl7` processes over the same archive at once (tests/data/archive-v1, two
specimen reports) and one lab system: each report is delivered once, whichever send delivers it. The lab
system (a real MLLP listener, one thread per connection) holds its ACK of the first message it gets until
the test lets it go, so the first send is mid-delivery while the second runs whole. A send killed
mid-delivery leaves a claim that the next send takes over (service.archive.claims). A send beside the
running archive never sends the report the archive is sending."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import MQTT_USERS, MosquittoBroker, wait_until
from mllp_lis import ack as ack_of
from mllp_lis import framed, msh10
from test_archive import REPO, SPECIMEN, a_report, envelope_of, indexed
from test_archive_hold import publish
from test_archive_send_hl7 import FIRST, VERIFIED, VERSION_1

from smearscope.service.hl7 import mllp


class HoldingLis:
    """A lab system that answers AA to each message, the first one only once `release` is set."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.first = threading.Event()
        self.release = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while not data.endswith(mllp.END):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.received.append(msh10(data.lstrip(mllp.START)))
            if len(self.received) == 1:
                self.first.set()
                self.release.wait(60)
            try:
                conn.sendall(framed(ack_of("AA", msh10(data.lstrip(mllp.START)))))
            except OSError:
                pass

    def close(self) -> None:
        self.release.set()
        self.server.close()


@pytest.fixture
def lis() -> Iterator[HoldingLis]:
    made = HoldingLis()
    yield made
    made.close()


def send(archive: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "smearscope", "archive", "send-hl7", "--all", "--dir", str(archive),
            "--hl7-mllp", f"127.0.0.1:{port}", "--hl7-mllp-timeout", "120"]


def deliveries(archive: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(archive / "index.sqlite")
    try:
        return sorted(db.execute("SELECT report_id, destination FROM hl7_deliveries"))
    finally:
        db.close()


def test_two_sends_at_once_deliver_each_report_once(tmp_path: Path, lis: HoldingLis) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(VERSION_1, archive, ignore=shutil.ignore_patterns("README.md"))
    first = subprocess.Popen(send(archive, lis.port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert lis.first.wait(60), "the first send never reached the lab system"
        second = subprocess.run(send(archive, lis.port), check=False, capture_output=True, text=True, timeout=120)
        lis.release.set()
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert len(lis.received) == 2 and len(set(lis.received)) == 2, lis.received  # each message once
    assert first.returncode == 0 and second.returncode == 0, (err, second.stderr)
    assert "1 delivered" in second.stderr and "1 being delivered by another send-hl7" in second.stderr
    assert "1 delivered, 1 already delivered there" in err
    where = f"mllp:127.0.0.1:{lis.port}"
    assert deliveries(archive) == sorted([(FIRST, where), (VERIFIED, where)])
    db = sqlite3.connect(archive / "index.sqlite")
    try:
        assert db.execute("SELECT count(*) FROM hl7_claims").fetchone()[0] == 0  # each claim ended with its record
    finally:
        db.close()


def test_a_claim_left_by_a_killed_send_is_taken_over(tmp_path: Path, lis: HoldingLis) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(VERSION_1, archive, ignore=shutil.ignore_patterns("README.md"))
    killed = subprocess.Popen(send(archive, lis.port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert lis.first.wait(60), "the first send never reached the lab system"
    finally:
        killed.kill()
        killed.wait()
    lis.release.set()
    again = subprocess.run(send(archive, lis.port), check=False, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "2 delivered" in again.stderr  # the killed one's report too: at least once, as documented
    where = f"mllp:127.0.0.1:{lis.port}"
    assert deliveries(archive) == sorted([(FIRST, where), (VERIFIED, where)])


def test_a_delivery_that_fails_leaves_no_claim(tmp_path: Path) -> None:
    """Nothing listening: the send stops (exit 1) and its claim is gone with it, so another send beside a
    running one (whose process lives on) is not kept from that report."""
    archive = tmp_path / "archive"
    shutil.copytree(VERSION_1, archive, ignore=shutil.ignore_patterns("README.md"))
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port nothing answers on once closed
        port = taken.getsockname()[1]
    stopped = subprocess.run(send(archive, port), check=False, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 1 and f"stopped: cannot deliver report {FIRST}" in stopped.stderr
    db = sqlite3.connect(archive / "index.sqlite")
    try:
        assert db.execute("SELECT count(*) FROM hl7_claims").fetchone()[0] == 0
    finally:
        db.close()


def test_a_send_beside_the_running_archive_leaves_it_the_report_it_is_sending(
        tmp_path: Path, lis: HoldingLis, persistent_broker: MosquittoBroker) -> None:
    """The running archive (a real process, a real mosquitto) sends a new report and waits for its ACK; a
    send-hl7 run meanwhile to the same lab system sends nothing: the archive's report has no index row
    until its delivery is recorded with it. The lab system gets the report once."""
    directory = tmp_path / "archive"
    password = tmp_path / "password"
    password.write_text(MQTT_USERS["observer"] + "\n")
    log = tmp_path / "archive.log"
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    with open(log, "ab") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "smearscope", "--log-level", "INFO", "archive", "--broker",
             f"mqtt://127.0.0.1:{persistent_broker.port}", "--username", "observer", "--password-file",
             str(password), "--dir", str(directory), "--hl7-mllp", f"127.0.0.1:{lis.port}",
             "--hl7-mllp-timeout", "120"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        assert wait_until(lambda: "connected to broker" in log.read_text() or daemon.poll() is not None, 60)
        assert daemon.poll() is None, log.read_text()
        publish(persistent_broker.port, envelope_of(report))
        assert lis.first.wait(60), log.read_text()
        beside = subprocess.run(send(directory, lis.port), check=False, capture_output=True, text=True, timeout=120)
        lis.release.set()
        assert wait_until(lambda: indexed(directory) == 1, 60), log.read_text()
    finally:
        daemon.terminate()
        daemon.wait(20)
    assert beside.returncode == 0 and "0 delivered" in beside.stderr, beside.stderr
    assert len(lis.received) == 1
    assert deliveries(directory) == [(report.report_id, f"mllp:127.0.0.1:{lis.port}")]
