"""The daemon under faults: SIGKILL with the broker down, a stalled analysis, bad frames, and a
burst of good, half-written and non-image files in a watched folder.

Each daemon is real (threads, outbox, publisher, mosquitto, sd_notify socket); only the analysis is
the oracle `PoolAnalyzer` from tests/test_daemon.py. Child processes import it the same way.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, free_port
from test_daemon import (
    BASE,
    STATION,
    NotifyListener,
    PoolAnalyzer,
    classified_wbc_per_field,
    oracle_pool,
    pool_factory,
    wait_until,
    write_station,
)

from smearscope.device.synthetic import render_field
from smearscope.service.config import load_config
from smearscope.service.ingest import IngestError, RejectReason
from smearscope.service.mqtt.publisher import MqttPublisher
from smearscope.service.station.daemon import StationDaemon, run_daemon
from smearscope.service.station.stopping import STOP_BUDGET_S, StopBudget

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.faults

#: A child's start: the repository and the tests importable, INFO lines to stderr, the pool of
#: field results (argv[2]) loaded; argv[1] is the config.
_CHILD_START = """
import logging, os, pickle, signal, sys, threading
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
from test_daemon import PoolAnalyzer
from smearscope.service.station.daemon import run_daemon
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
with open(sys.argv[2], "rb") as fh:
    pool = pickle.load(fh)
"""

_DAEMON_CHILD = _CHILD_START + """
sys.exit(run_daemon(Path(sys.argv[1]), None, analyzer_factory=lambda config: PoolAnalyzer(pool)))
"""

_STORED = re.compile(r"stored (field|report) message report_id=(\S+) seq=(\d+)")


class DaemonProcess:
    """`run_daemon` in a child process (to be SIGKILLed or SIGTERMed); its log lines collected."""

    def __init__(self, config: Path, pool_file: Path, *args: str, child: str = _DAEMON_CHILD) -> None:
        code = child.format(repo=str(REPO), tests=str(REPO / "tests"))
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(config), str(pool_file), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._new = queue.SimpleQueue[str]()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def stored(self) -> list[tuple[str, str, int]]:
        """(kind, report_id, outbox seq) of every report it logged as stored, in order."""
        found = (_STORED.search(ln) for ln in list(self.lines))
        return [(m[1], m[2], int(m[3])) for m in found if m]

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def received_ids(sub: Subscriber) -> list[tuple[str, str]]:
    """(kind, report_id) of every field/report message received, in arrival order."""
    out = []
    for m in list(sub.messages):
        if m.topic in (f"{BASE}/field", f"{BASE}/report"):
            env = json.loads(m.payload)
            out.append((env["kind"], env["report_id"]))
    return out


_GALLERY_CUT_CHILD = _CHILD_START + """
from smearscope.service.station import review
cut_at, crops_written = int(sys.argv[3]), sys.argv[4] == "after_crops"
stored, seen = threading.Condition(), []

class Stored(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("stored field message"):
            with stored:
                seen.append(record)
                stored.notify_all()
logging.getLogger("smearscope.service.station.workers").addHandler(Stored())
real, calls = review.ReviewGallery.add_field, []

def add_field(self, run_id, image, result):
    calls.append(run_id)
    if len(calls) < cut_at:
        return real(self, run_id, image, result)
    if crops_written:
        real(self, run_id, image, result)
    with stored:  # the field's own message, where the station stores it before its crops
        stored.wait_for(lambda: len(seen) >= cut_at, timeout=5)
    os.kill(os.getpid(), signal.SIGKILL)  # the power goes
review.ReviewGallery.add_field = add_field
sys.exit(run_daemon(Path(sys.argv[1]), None, analyzer_factory=lambda config: PoolAnalyzer(pool)))
"""


@pytest.mark.broker
@pytest.mark.parametrize("cut", ["before_crops", "after_crops"])
def test_a_power_cut_as_a_fields_crops_are_written_loses_none_and_doubles_none(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, cut: str, daemons: Any,
) -> None:
    """The station dies (SIGKILL) as the slide's second field's review crops are being written
    (before_crops) or just after (after_crops). After the restart the run, taken back, counts both
    fields once and its gallery holds each field's crops once: a field whose message was stored
    before its crops were written was never analysed again, and its cells could not be reviewed
    or typed before the run was signed (get_review showed the first field's only)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    pool_file = tmp_path / "pool.pkl"
    pool = oracle_pool(1)  # every field the same cells: the two fields' crops compare
    pool_file.write_bytes(pickle.dumps(list(pool)))
    source = {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.0,
              "microns_per_pixel": 0.2}
    config = write_station(tmp_path, broker.port, source=source, review={"white_cells": "all"})
    sub = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/#"])
    daemon = runner = None
    try:
        sub.wait_ready()
        first = daemons(config, pool_file, "2", cut, child=_GALLERY_CUT_CHILD)
        cv2.imwrite(str(inbox / "a.png"), render_field(60, width=320, height=240).frame.pixels)
        assert wait_until(lambda: [k for k, _, _ in first.stored()] == ["field"], 30), first.lines[-20:]
        cv2.imwrite(str(inbox / "b.png"), render_field(61, width=320, height=240).frame.pixels)
        assert first.wait(30) == -signal.SIGKILL, first.lines[-20:]

        daemon = StationDaemon(load_config(config), analyzer_factory=lambda c: PoolAnalyzer(pool))
        runner = threading.Thread(target=daemon.run, daemon=True)
        runner.start()
        assert wait_until(lambda: (inbox / "done" / "b.png").exists(), 30)

        def command(name: str) -> dict[str, Any]:
            before = len(sub.on_topic(f"{BASE}/cmd_response/{name}"))
            sub.client.publish(f"{BASE}/cmd/{name}", "{}", qos=1)
            assert sub.wait_for(lambda ms: sum(m.topic == f"{BASE}/cmd_response/{name}" for m in ms) > before, 15)
            return json.loads(sub.on_topic(f"{BASE}/cmd_response/{name}")[-1].payload)
        for _ in range(15):  # the restarted station listens once it has subscribed (a command before is lost)
            sub.client.publish(f"{BASE}/cmd/status", "{}", qos=1)
            if sub.wait_for(lambda ms: any(m.topic == f"{BASE}/cmd_response/status" for m in ms), 2):
                break
        stopped = command("stop_run")
        assert stopped["ok"] and stopped["fields"] == 2, stopped
        review, offset, overlays = [], 0, 0
        while offset is not None:
            sub.client.publish(f"{BASE}/cmd/get_review", json.dumps({"run_id": stopped["run_id"], "offset": offset}),
                               qos=1)
            assert sub.wait_for(lambda ms, at=offset: any(json.loads(m.payload).get("offset") == at for m in ms
                                               if m.topic == f"{BASE}/cmd_response/get_review"), 15)
            page = [json.loads(m.payload) for m in sub.on_topic(f"{BASE}/cmd_response/get_review")
                    if json.loads(m.payload).get("offset") == offset][-1]
            assert page["ok"], page
            overlays = page["overlays_on_disk"] if offset == 0 else overlays
            review += [(c["field_id"], c["cell"]) for c in page["cells"]]
            offset = page["next_offset"]
    finally:
        if daemon is not None and runner is not None:
            daemon.request_stop("test over")
            runner.join(30)
        sub.close()
    per_field = Counter(field_id.split(":")[1].split("@")[0] for field_id, _ in review)
    assert len(set(review)) == len(review), "a cell shown twice"
    assert overlays == 2  # one overlay a field
    assert per_field["a.png"] > 0 and per_field == {"a.png": per_field["a.png"], "b.png": per_field["a.png"]}, per_field


@pytest.mark.slow
@pytest.mark.broker
def test_sigkill_with_broker_down_then_restart_drains_outbox_in_order(
    tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], daemons: Callable[..., DaemonProcess],
) -> None:
    broker = broker_with()
    pool_file = tmp_path / "pool.pkl"
    pool_file.write_bytes(pickle.dumps(list(oracle_pool())))
    per_field = classified_wbc_per_field()
    config = write_station(tmp_path, broker.port, target_wbc=per_field[0] + per_field[1])
    sub = observer_on(broker.port, [f"{BASE}/#"])
    first = daemons(config, pool_file)
    assert sub.wait_for(lambda ms: len(received_ids(sub)) >= 4, 30), first.lines[-20:]
    broker.kill()  # the broker crashes mid-run; the daemon keeps storing
    sub.subscribed.clear()
    stored_before_outage = len(first.stored())
    assert wait_until(lambda: len(first.stored()) >= stored_before_outage + 6, 20)
    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    produced_first = first.stored()

    broker.start()
    sub.wait_ready(15)
    second = daemons(config, pool_file)
    wanted = {rid for _, rid, _ in produced_first}
    assert sub.wait_for(lambda ms: wanted <= {r for _, r in received_ids(sub)}, 30), (
        "restarted daemon did not drain the outbox", second.lines[-20:])
    assert wait_until(lambda: sum(k == "field" for k, _, _ in second.stored()) >= 3, 20)
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0, second.lines[-20:]
    produced = produced_first + second.stored()
    assert sub.wait_for(
        lambda ms: {rid for _, rid, _ in produced} <= {r for _, r in received_ids(sub)}, 15)
    assert sub.wait_for(lambda ms: ms[-1].topic == f"{BASE}/status"
                        and ms[-1].payload == b"offline", 10)

    received = received_ids(sub)
    produced_ids = [rid for _, rid, _ in produced]
    delivered = {rid for _, rid in received}
    figures = {
        "produced": len(produced_ids),
        "produced_reports": sum(k == "report" for k, _, _ in produced),
        "stored_during_outage_then_killed": len(produced_first) - stored_before_outage,
        "delivered_unique": len(delivered & set(produced_ids)),
        "duplicates": len(received) - len(delivered),
        "lost": len(set(produced_ids) - delivered),
        "delivered_not_logged": len(delivered - set(produced_ids)),
    }
    print("\nSIGKILL + broker outage figures:", json.dumps(figures))
    assert figures["lost"] == 0
    # A report committed to the outbox in the instant before SIGKILL, before its log line.
    assert figures["delivered_not_logged"] <= 1
    # In order: first arrivals follow the outbox sequence across the kill and the restart.
    seq_of = {rid: seq for _, rid, seq in produced}
    first_arrivals: list[int] = []
    for _, rid in received:
        if rid in seq_of and seq_of[rid] not in first_arrivals:
            first_arrivals.append(seq_of[rid])
    assert first_arrivals == sorted(first_arrivals)
    # The SIGTERMed daemon closed its open run: its last stored message is a specimen report.
    assert produced[-1][0] == "report"


@pytest.mark.slow
def test_stalled_analysis_stops_watchdog_pings(tmp_path: Path) -> None:
    """WATCHDOG=1 flows while fields progress, stops while one analysis is stuck longer than
    watchdog.stall_timeout_s (5 s), and resumes once it finishes."""
    listener = NotifyListener(tmp_path / "notify.sock")
    environ = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "200000",
               "WATCHDOG_PID": str(os.getpid())}
    config = write_station(tmp_path, free_port(), credentials=False)
    stall_s = 7.0
    try:
        code = run_daemon(config, 4, environ=environ,
                          analyzer_factory=pool_factory(stall_on=frozenset({2}), stall_s=stall_s))
        # STOPPING=1 is the station's last datagram: once read, so are all before it
        assert wait_until(lambda: listener.lines("STOPPING=1"), 10)
    finally:
        listener.close()
    assert code == 0
    pings = [t for t, _ in listener.lines("WATCHDOG=1")]
    gaps = [(b - a, a) for a, b in itertools.pairwise(pings)]
    longest, gap_start = max(gaps)
    assert 1.0 <= longest <= stall_s - 5.0 + 1.0, gaps  # silent from 5 s into the stall to its end
    assert any(t > gap_start + longest for t in pings)  # pings resumed
    stalled = [(t, m) for t, m in listener.lines("STATUS=stalled: analysis")]
    assert stalled and abs(stalled[0][0] - gap_start) < 0.5
    others = [b - a for b, a in gaps if a != gap_start]
    assert max(others) < 0.6  # otherwise regular pings every 0.1 s


def test_bad_frames_are_logged_counted_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    failures: dict[int, BaseException] = {
        1: RuntimeError("engine exploded"),
        3: IngestError(RejectReason.CORRUPT, "bad pixels"),
    }
    config = write_station(tmp_path, free_port(), credentials=False)
    daemon = StationDaemon(load_config(config), max_fields=4,
                           analyzer_factory=pool_factory(fail_on=failures))
    with caplog.at_level("INFO", logger="smearscope.service.station.daemon"):
        assert daemon.run() == 0
    snap = daemon.stats.snapshot()
    assert snap["analysed"] == 4
    assert snap["failed"] == {"analysis_error": 1, "corrupt": 1}
    failed = [o for o in daemon.outcomes if o[1] == "failed"]
    assert [o[2] for o in failed] == ["analysis_error", "corrupt"]
    logged = [r for r in caplog.records if "analysis failed (analysis_error)" in r.message]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "RuntimeError: engine exploded" in caplog.text
    assert sum(r.kind == "field" for r in daemon.ledger) == 4


@pytest.mark.slow
def test_folder_burst_of_100_files_each_analysed_once_or_rejected(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.3,
              "decode_grace_s": 0.6, "microns_per_pixel": 0.2}
    config = write_station(tmp_path, free_port(), credentials=False, source=source)
    daemon = StationDaemon(load_config(config), analyzer_factory=pool_factory())
    runner = threading.Thread(target=daemon.run, daemon=True)

    def png(seed: int) -> bytes:
        ok, data = cv2.imencode(".png", render_field(seed, width=256, height=192).frame.pixels)
        assert ok
        return data.tobytes()

    good = {f"good-{i:03d}.png": png(i) for i in range(50)}
    slow = {f"slow-{i:03d}.png": png(100 + i) for i in range(10)}  # written in two steps
    truncated = {f"cut-{i:03d}.png": png(200 + i)[: 3000 + 100 * i] for i in range(20)}
    rng = np.random.default_rng(0)
    junk = {f"note-{i:03d}.txt": b"technician notes\n" for i in range(10)}
    junk |= {f"table-{i:03d}.csv": b"a,b\n1,2\n" for i in range(5)}
    junk |= {f"noise-{i:03d}.png": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
             for i in range(5)}
    runner.start()
    try:
        assert wait_until(lambda: daemon.analyzer is not None, 10)
        files = list(good.items()) + list(truncated.items()) + list(junk.items())
        rng.shuffle(files)  # type: ignore[arg-type]
        for name, data in [(n, d[: len(d) // 2]) for n, d in slow.items()] + files:
            (inbox / name).write_bytes(data)
        time.sleep(0.15)  # less than settle_s: the slow writers finish their files
        for name, data in slow.items():
            with open(inbox / name, "ab") as fh:
                fh.write(data[len(data) // 2:])

        def accounted() -> bool:
            done = len(list((inbox / "done").iterdir()))
            rejected = [p for p in (inbox / "rejected").iterdir()
                        if not p.name.endswith(".reason.txt")]
            return done + len(rejected) == 100 and len(daemon.outcomes) == len(good) + len(slow)

        assert wait_until(accounted, 60), (len(daemon.outcomes), list(inbox.iterdir()))
    finally:
        daemon.request_stop("test over")
        runner.join(30)
    assert not runner.is_alive()

    done = sorted(p.name for p in (inbox / "done").iterdir())
    name = lambda fid: fid.split(":", 1)[1].split("@", 1)[0]
    outcomes = Counter(name(fid) for fid, _, _ in daemon.outcomes)
    assert set(outcomes) == {*good, *slow} and set(outcomes.values()) == {1}  # each exactly once
    analysed = [o for o in daemon.outcomes if o[1] == "analysed"]
    gate = Counter(o[2] for o in daemon.outcomes if o[1] == "rejected")
    # done/ holds the analysed files only; the quality gate's go to rejected/ with its reason
    assert done == sorted(name(o[0]) for o in analysed)
    field_reports = [r for r in daemon.ledger if r.kind == "field"]
    assert len(field_reports) == len(analysed) == len({r.field_id for r in field_reports})
    reasons = Counter(p.read_text().split(":")[0].strip()
                      for p in (inbox / "rejected").glob("*.reason.txt"))
    # The truncated PNGs (20) and the noise (5) are refused by the one decoder with its codes, the
    # text files (15) by their extension, and the gate's refusals carry its code.
    assert reasons == {"truncated": 20, "not_an_image": 20, **gate}
    print("\nfolder burst: analysed", len(analysed), "quality-gate rejected", dict(gate),
          "source rejected", dict(reasons))
    assert len(analysed) + sum(gate.values()) == 60
    assert len(analysed) >= 55  # distinct synthetic fields pass the gate


def _folder_station(tmp_path: Path) -> tuple[Path, StationDaemon, threading.Thread]:
    """A station watching tmp_path/inbox (calibrated, 0.2 um/px) with the oracle analyzer, and the
    thread to run it on (not started)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.2,
              "microns_per_pixel": 0.2}
    config = write_station(tmp_path, free_port(), credentials=False, source=source)
    daemon = StationDaemon(load_config(config), analyzer_factory=pool_factory())
    return inbox, daemon, threading.Thread(target=daemon.run, daemon=True)


def test_a_file_the_quality_gate_refuses_goes_to_rejected_with_its_reason(tmp_path: Path) -> None:
    """A blurred image dropped into the watched folder is refused by the quality gate: it goes to
    rejected/ with out_of_focus as its reason, never to done/ with the analysed fields."""
    inbox, daemon, runner = _folder_station(tmp_path)
    pixels = render_field(11, width=256, height=192).frame.pixels
    runner.start()
    try:
        assert wait_until(lambda: daemon.analyzer is not None, 10)
        assert cv2.imwrite(str(inbox / "sharp.png"), pixels)
        assert wait_until((inbox / "done" / "sharp.png").exists, 20), list(inbox.rglob("*"))
        assert cv2.imwrite(str(inbox / "blurred.png"), cv2.GaussianBlur(pixels, (0, 0), 5))  # 1 um
        moved = lambda: (inbox / "done" / "blurred.png").exists() or (inbox / "rejected" / "blurred.png").exists()
        assert wait_until(moved, 20), list(inbox.rglob("*"))
    finally:
        daemon.request_stop("test over")
        runner.join(30)
    assert not runner.is_alive()
    assert [(o, r) for _, o, r in daemon.outcomes] == [("analysed", None), ("rejected", "out_of_focus")]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["sharp.png"]
    assert (inbox / "rejected" / "blurred.png").exists()
    assert (inbox / "rejected" / "blurred.png.reason.txt").read_text().startswith("out_of_focus: ")


def test_a_copy_of_an_analysed_image_is_refused_not_counted_twice(tmp_path: Path) -> None:
    """The same image again under another name (a technician re-submitting a file) would count its
    cells twice in the specimen: it goes to rejected/ as duplicate_content, naming the field it
    repeats, and is counted as a refusal; the file itself found again (rewritten, or after a crash
    between its store and its move) goes to done/ without a second analysis."""
    inbox, daemon, runner = _folder_station(tmp_path)
    png = lambda seed: cv2.imencode(".png", render_field(seed, width=256, height=192).frame.pixels)[1].tobytes()
    runner.start()
    try:
        assert wait_until(lambda: daemon.analyzer is not None, 10)
        for seed in (7, 8, 9):  # other fields after it: the quality gate's same-field check is for the last ones
            (inbox / f"field-{seed}.png").write_bytes(png(seed))
            assert wait_until(lambda seed=seed: (inbox / "done" / f"field-{seed}.png").exists(), 20)
        (inbox / "field-7 copy.png").write_bytes(png(7))
        reason = inbox / "rejected" / "field-7 copy.png.reason.txt"
        assert wait_until(reason.exists, 20), list(inbox.rglob("*"))
        (inbox / "field-8.png").write_bytes(png(8))  # the file itself again, rewritten (a new time)
        assert wait_until(lambda: len(list((inbox / "done").iterdir())) == 4, 20), list(inbox.rglob("*"))
    finally:
        daemon.request_stop("test over")
        runner.join(30)
    assert not runner.is_alive()
    first = next(fid for fid, outcome, _ in daemon.outcomes if outcome == "analysed")
    assert reason.read_text().startswith(f"duplicate_content: the same image as {first} was analysed before")
    assert "quality gate" not in reason.read_text()  # a copy, not a field the gate or the analysis refused
    assert [(o, r) for _, o, r in daemon.outcomes] == [("analysed", None)] * 3 + [
        ("rejected", "duplicate_content"), ("skipped", "already_stored")]
    assert daemon.workers.stats.snapshot()["rejected"] == {"duplicate_content": 1}
    assert sum(r.kind == "field" for r in daemon.ledger) == 3


def test_a_copy_that_comes_while_its_original_is_analysed_is_refused_and_a_failed_ones_is_not(
    tmp_path: Path,
) -> None:
    """Two fields at a time: a copy that arrives while its original is still being analysed (not
    yet stored) is refused as duplicate_content; an image whose analysis failed was never counted,
    so a copy of it is analysed. (The quality gate is off, so that its same-field check, which
    refuses a copy right after its original, does not take the station's place.)"""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.2,
              "microns_per_pixel": 0.2}
    config = write_station(tmp_path, free_port(), credentials=False, source=source,
                           analysis={"concurrent_fields": 2}, quality={"enabled": False})
    # call 0 (the original) takes 3 s; call 1 fails
    daemon = StationDaemon(load_config(config), analyzer_factory=pool_factory(
        stall_on=frozenset({0}), stall_s=3.0, fail_on={1: RuntimeError("engine exploded")}))
    runner = threading.Thread(target=daemon.run, daemon=True)
    png = lambda seed: cv2.imencode(".png", render_field(seed, width=256, height=192).frame.pixels)[1].tobytes()
    outcome = lambda name: [(o, r) for fid, o, r in daemon.outcomes if fid.split(":", 1)[1].startswith(name + "@")]
    runner.start()
    try:
        assert wait_until(lambda: daemon.analyzer is not None, 10)
        (inbox / "a.png").write_bytes(png(7))
        assert wait_until(lambda: daemon.analyzer.calls == 1, 20)  # a is being analysed (3 s)
        (inbox / "a copy.png").write_bytes(png(7))
        assert wait_until(lambda: outcome("a copy.png") != [], 20), list(daemon.outcomes)
        assert outcome("a.png") == []  # still being analysed when its copy was refused
        (inbox / "c.png").write_bytes(png(9))  # call 1: fails
        assert wait_until(lambda: outcome("c.png") == [("failed", "analysis_error")], 20), list(daemon.outcomes)
        (inbox / "c again.png").write_bytes(png(9))
        assert wait_until(lambda: outcome("c again.png") != [], 20), list(daemon.outcomes)
    finally:
        daemon.request_stop("test over")
        runner.join(30)
    assert not runner.is_alive()
    assert outcome("a copy.png") == [("rejected", "duplicate_content")]
    assert outcome("a.png") == [("analysed", None)] and outcome("c again.png") == [("analysed", None)]
    assert (inbox / "rejected" / "a copy.png.reason.txt").read_text().startswith("duplicate_content")


@pytest.mark.broker
def test_a_slow_analysis_at_a_stop_shortens_the_drain_to_what_the_stop_budget_leaves(
        tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The stop asked for while a field's analysis takes long (3 s), the broker connected but no
    longer answering (its process stopped), mqtt.stop_drain_timeout_s = 30: the drain gets only
    what the stop's budget leaves after the workers' joins and the publisher's own 7 s, so the
    stop ends inside the unit's TimeoutStopSec instead of draining 30 s on top of the joins. The
    budget is 11 s here (40 s in service), so at most 4 s are left to drain; the slow field's
    report is stored and what the broker did not take stays in the outbox."""
    config = write_station(tmp_path, broker.port, mqtt={"stop_drain_timeout_s": 30})
    analyzer = PoolAnalyzer(oracle_pool(), stall_on=frozenset({3}), stall_s=3.0)
    budget_s = MqttPublisher.STOP_AFTER_DRAIN_S + 4.0
    daemon = StationDaemon(load_config(config), analyzer_factory=lambda _: analyzer, stop_budget_s=budget_s)
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(daemon.run()), daemon=True)
    assert broker.proc is not None
    with caplog.at_level(logging.INFO):
        runner.start()
        try:
            assert wait_until(lambda: analyzer.calls >= 4, 30)  # the fourth field's analysis has begun
            assert daemon.publisher is not None and daemon.publisher.state.connected
            os.kill(broker.proc.pid, signal.SIGSTOP)
            daemon.request_stop("signal SIGTERM")
            runner.join(60)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
    assert not runner.is_alive() and codes == [0]
    cut = [r.getMessage() for r in caplog.records if "not mqtt.stop_drain_timeout_s=30" in r.getMessage()]
    assert len(cut) == 1, caplog.text
    drained = float(re.search(r"drained for ([0-9.]+) s", cut[0])[1])
    assert drained <= budget_s - MqttPublisher.STOP_AFTER_DRAIN_S
    taken = float(re.search(r"the stop has taken ([0-9.]+) s", cut[0])[1])
    assert drained == pytest.approx(budget_s - MqttPublisher.STOP_AFTER_DRAIN_S - taken, abs=0.15)
    snap = daemon.stats.snapshot()  # the slow field was analysed and its report stored, as every field's
    assert (analyzer.analysed_ids[3], "analysed", None) in daemon.outcomes
    assert sum(r.kind == "field" for r in daemon.ledger) == snap["analysed"] >= 4 and snap["lost"] == 0
    assert re.search(r"stopping with \d+ messages still in the outbox", caplog.text), caplog.text


def test_the_drain_gets_what_the_stop_budget_leaves() -> None:
    """Counted from the first stop request: the configured drain while the budget allows it,
    less when the joins took long, never below nothing; the service's budget is TimeoutStopSec
    less 5 s, so a stop whose workers join at once still drains the 30 s the config allows."""
    now = [100.0]
    budget = StopBudget(40.0, clock=lambda: now[0])
    budget.start()
    now[0] += 1.0
    budget.start()  # a second request (the supervisor's) does not restart the count
    assert budget.drain_s(30.0, 7.0) == 30.0
    now[0] += 29.0
    assert budget.drain_s(30.0, 7.0) == pytest.approx(3.0)
    now[0] += 10.0
    assert budget.drain_s(30.0, 7.0) == 0.0
    assert budget.join_deadline() == 125.0
    assert STOP_BUDGET_S == 40 and StopBudget(STOP_BUDGET_S, clock=lambda: 0.0).drain_s(30.0, 7.0) == 30.0


@pytest.mark.parametrize(("fails_in", "said"), [
    ({"running"}, "failed while running"),
    ({"stopping"}, "failed while stopping"),
    ({"running", "stopping"}, "failed while running, and again while stopping"),
])
def test_a_station_that_fails_after_its_start_says_whether_it_failed_running_or_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fails_in: set[str], said: str,
) -> None:
    """A station that started (engines warm, threads running, READY=1) and then raises in its
    supervision loop, in its stop, or in both, logs what failed (exit 1, the traceback with it),
    not "failed to start", which sent whoever read the journal after a start problem. No fault
    is known to raise there: the exceptions are put in (a worker check that raises, a source
    whose close raises after releasing), the station around them is real (simulated source,
    outbox file, publisher with no broker answering)."""
    from smearscope.device.sources import FrameSource
    from smearscope.service.station.workers import StationWorkers

    config = write_station(tmp_path, free_port(), credentials=False)
    if "running" in fails_in:
        def checks_then_fails(self: StationWorkers) -> list[str]:
            raise RuntimeError("test: the worker check raised")
        monkeypatch.setattr(StationWorkers, "dead_threads", checks_then_fails)
    if "stopping" in fails_in:
        real_close = FrameSource.close

        def closes_then_fails(self: FrameSource, timeout_s: float = 5.0) -> None:
            real_close(self, timeout_s)
            raise OSError("test: the capture device did not let go")
        monkeypatch.setattr(FrameSource, "close", closes_then_fails)
    caplog.set_level(logging.INFO, logger="smearscope.service.station.daemon")
    # a station that fails while running stops by that; one that does not, after its second field
    max_fields = None if "running" in fails_in else 2
    assert run_daemon(config, max_fields, analyzer_factory=pool_factory()) == 1
    failed = [r for r in caplog.records if r.name == "smearscope.service.station.daemon" and " failed " in r.getMessage()]
    assert [r.getMessage() for r in failed] == [f"station {STATION} {said}"], caplog.text
    assert failed[0].exc_info is not None
    assert "ready" in caplog.text  # it had started
    # each exception's traceback is in the log (the stop's carries the run's as its context)
    assert ("the worker check raised" in caplog.text) == ("running" in fails_in)
    assert ("did not let go" in caplog.text) == ("stopping" in fails_in)
