"""The station daemon under the faults of issue 18, each measured against a real mosquitto and
an independent subscriber: a full disk under the outbox (a real tmpfs), and a crash loop over a
watched folder (SIGKILL, again and again). Each test prints its figures (produced, delivered,
lost, duplicated), the rows of the reliability table in docs/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pickle
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
from broker import MosquittoBroker, Subscriber, wait_until
from smallfs import fill, small_tmpfs
from test_daemon import BASE, oracle_pool, write_station
from test_daemon_faults import DaemonProcess

from smearscope.device.synthetic import render_field

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.broker]


def _arrivals(sub: Subscriber, topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in list(sub.messages) if m.topic == f"{BASE}/{topic}"]


def _figures(produced: list[str], arrivals: list[dict[str, Any]]) -> dict[str, int]:
    """produced: message ids stored (report ids); arrivals: envelopes received."""
    received = Counter(e["report_id"] for e in arrivals)
    return {"produced": len(set(produced)), "delivered": len(set(produced) & set(received)),
            "lost": len(set(produced) - set(received)),
            "duplicated": sum(n - 1 for rid, n in received.items() if rid in set(produced))}


def _pool_file(tmp_path: Path) -> Path:
    path = tmp_path / "pool.pkl"
    path.write_bytes(pickle.dumps(list(oracle_pool())))
    return path


def test_disk_full_pauses_the_analysis_and_nothing_is_lost(
    tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], daemons: Callable[..., DaemonProcess],
) -> None:
    """The outbox on an 8 MB tmpfs, filled; the broker is down while the disk fills (so nothing drains),
    comes back while it is full, and space returns later. Wanted: SQLite's real error in the log,
    analysis paused (status disk_full), the acknowledged messages deleted while the disk is still
    full, resumed once space returns, no duplicate storm, no report lost."""
    # Broker persistence: the observer's session (and what it missed) survives the outage.
    broker = broker_with(persistence=True)
    sub = observer_on(broker.port, [f"{BASE}/#"], client_id="disk-full-observer", persistent=True)
    with small_tmpfs(tmp_path / "state", 8192) as state:
        config = write_station(tmp_path, broker.port, target_wbc=1000)
        daemon = daemons(config, _pool_file(tmp_path))
        assert wait_until(lambda: len(daemon.stored()) >= 10, 30), "\n".join(daemon.lines[-20:])
        broker.stop()  # nothing drains: the outbox grows until the disk is full
        filler = fill(state, leave_bytes=64 * 1024)
        assert wait_until(lambda: any("analysis paused" in ln for ln in daemon.lines), 60), (
            "\n".join(daemon.lines[-60:]))  # whole lines: a failure once under a full suite's load
        paused_at = len(daemon.stored())
        time.sleep(3.0)
        assert len(daemon.stored()) <= paused_at + 1, "analysis went on with a full disk"
        broker.start()  # acknowledgements arrive while the disk is still full
        sub.wait_ready(15)
        # they are deleted from the outbox on the disk still full, not sent again at every reconnect
        # (where the disk has no room left at all for the deletes, the outbox's reserve gives it:
        # test_outbox.py)
        def waiting() -> int | None:  # the station's telemetry says how many messages its outbox holds
            last = [m for m in list(sub.messages) if m.topic == f"{BASE}/telemetry"][-1:]
            return json.loads(last[0].payload)["pipeline"]["outbox_messages"] if last else None
        seen = len(sub.messages)
        assert wait_until(lambda: len(sub.messages) > seen and waiting() == 0, 60), "\n".join(daemon.lines[-30:])
        filler.unlink()  # space returns
        assert wait_until(lambda: len(daemon.stored()) >= paused_at + 10, 60), daemon.lines[-20:]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.lines[-30:]
        produced = [rid for _, rid, _ in daemon.stored()]
        assert sub.wait_for(lambda ms: set(produced) <= {e["report_id"] for e in
                            _arrivals(sub, "field") + _arrivals(sub, "report")}, 30)
    log = "\n".join(daemon.lines)
    figures = _figures(produced, _arrivals(sub, "field") + _arrivals(sub, "report"))
    print("\ndisk full figures:", json.dumps(figures))
    telemetry = [json.loads(m.payload) for m in sub.messages if m.topic == f"{BASE}/telemetry"]
    assert any(t["pipeline"]["disk_full"] for t in telemetry), "telemetry never said disk_full"
    assert "database or disk is full" in log
    assert "cannot rollback" not in log and "LOST" not in log
    assert figures["lost"] == 0
    assert figures["duplicated"] <= 20, "a duplicate storm"


@contextlib.contextmanager
def _killed_on_a_full_disk(tmp_path: Path, broker: MosquittoBroker, daemons: Callable[..., DaemonProcess],
                           ) -> Iterator[tuple[Path, Path, DaemonProcess, list[Path]]]:
    """A station (its outbox on an 8 MB tmpfs, one run of 1000 white cells open throughout) that
    stored some fields of its run, then lost the broker, paused on the disk filled and was killed
    there; the disk then filled to the last byte. Yields its config, pool file, the killed station
    and the files that fill the disk, for the duration of the tmpfs."""
    with small_tmpfs(tmp_path / "state", 8192) as state:
        config = write_station(tmp_path, broker.port, target_wbc=1000)
        pool = _pool_file(tmp_path)
        first = daemons(config, pool)
        assert wait_until(lambda: len(first.stored()) >= 5, 30), "\n".join(first.lines[-20:])
        broker.stop()
        fillers = [fill(state, leave_bytes=64 * 1024)]
        assert wait_until(lambda: any("analysis paused" in ln for ln in first.lines), 60), "\n".join(first.lines[-40:])
        first.signal(signal.SIGKILL)
        first.wait(10)
        fillers.append(fill(state, "filler-2"))  # and whatever room was left
        yield config, pool, first, fillers


def test_a_station_restarted_on_a_full_disk_with_its_run_left_open_starts_and_delivers_what_it_holds(
    tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], daemons: Callable[..., DaemonProcess],
) -> None:
    """The station is killed while the disk under its outbox is full (the broker down, a run open)
    and started again on the disk still full. It takes the run back and publishes its state, open:
    that write failed on the full disk and the start with it ('station failed to start', exit 1),
    and at every restart systemd made, so what the outbox held was never delivered and the
    acknowledgements that free its room never came. Now the state waits for room and the start
    goes on: what the killed station stored is delivered on the disk still full, and once there is
    room the analysis resumes and the run's report is stored and delivered."""
    broker = broker_with(persistence=True)
    sub = observer_on(broker.port, [f"{BASE}/#"], client_id="full-restart-observer", persistent=True)
    with _killed_on_a_full_disk(tmp_path, broker, daemons) as (config, pool, first, fillers):
        for restart in range(4):  # each start writes the run's state: the last room goes
            second = daemons(config, pool)
            assert wait_until(lambda d=second: any(" ready (" in ln for ln in d.lines)
                              or d.proc.poll() is not None, 60)
            assert second.proc.poll() is None, (restart, "\n".join(second.lines[-30:]))
            assert any("resumed: left open by the previous process" in ln for ln in second.lines)
            if restart < 3:
                second.signal(signal.SIGKILL)
                second.wait(10)
        broker.start()
        sub.wait_ready(15)
        produced = [rid for _, rid, _ in first.stored()]
        assert sub.wait_for(lambda ms: set(produced) <= {e["report_id"] for e in _arrivals(sub, "field")}, 60), (
            "\n".join(second.lines[-30:]))
        for filler in fillers:
            filler.unlink()  # room again
        assert wait_until(lambda: len(second.stored()) >= 3, 60), "\n".join(second.lines[-30:])
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, "\n".join(second.lines[-30:])
        produced += [rid for _, rid, _ in second.stored()]
        assert second.stored()[-1][0] == "report"  # the run's, stored at the stop
        assert sub.wait_for(lambda ms: set(produced) <= {e["report_id"] for e in
                            _arrivals(sub, "field") + _arrivals(sub, "report")}, 30)
    figures = _figures(produced, _arrivals(sub, "field") + _arrivals(sub, "report"))
    print("\nrestart on a full disk figures:", json.dumps(figures))
    assert figures["lost"] == 0


def test_a_run_left_open_whose_report_a_full_disk_refuses_at_the_start_is_reported_once_there_is_room(
    tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], daemons: Callable[..., DaemonProcess],
) -> None:
    """The station is killed on a full disk with a run open, and started again past the run's idle
    timeout on the disk still full: the start closes the run (restart) and its final report cannot
    be stored. It was tried again only at the next start (which may be weeks away), and the stop's
    summary counted it nowhere. Now it is stored once there is room, before any new field, and
    delivered while the station runs."""
    broker = broker_with(persistence=True)
    sub = observer_on(broker.port, [f"{BASE}/#"], client_id="full-close-observer", persistent=True)
    with _killed_on_a_full_disk(tmp_path, broker, daemons) as (config, pool, first, fillers):
        [run_id] = {m.group(1) for ln in first.lines if (m := re.search(r"stored field message .* run=(\S+)", ln))}
        # the next start comes past the run's idle timeout: the run is closed, not taken back
        write_station(tmp_path, broker.port, specimen={"target_wbc_count": 1000, "idle_timeout_s": 0.5})
        time.sleep(1.0)
        broker.start()
        sub.wait_ready(15)
        second = daemons(config, pool)
        assert wait_until(lambda: any(" ready (" in ln for ln in second.lines) or second.proc.poll() is not None,
                          60), "\n".join(second.lines[-30:])
        assert any(f"run {run_id} left open by the previous process: its final report could not be stored" in ln
                   for ln in second.lines), "\n".join(second.lines[-30:])
        for filler in fillers:
            filler.unlink()  # room again

        def reported() -> bool:
            return any(e["body"].get("run_id") == run_id for e in _arrivals(sub, "report"))
        assert sub.wait_for(lambda ms: reported(), 60), "\n".join(second.lines[-30:])
        assert second.proc.poll() is None
        [closing] = [e["body"] for e in _arrivals(sub, "report") if e["body"].get("run_id") == run_id]
        assert closing["end_reason"] == "restart"
        assert closing["fields_analyzed"] == sum(1 for k, _, _ in first.stored() if k == "field")
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, "\n".join(second.lines[-30:])


def _png(seed: int) -> bytes:
    ok, data = cv2.imencode(".png", render_field(seed, width=256, height=192).frame.pixels)
    assert ok
    return data.tobytes()


def test_a_crash_loop_over_a_watched_folder_loses_no_file_and_no_run(
    tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], daemons: Callable[..., DaemonProcess],
) -> None:
    """100 files in a watched folder; the daemon is SIGKILLed again and again while it works,
    then runs to the end and is stopped. Every file's field report is delivered once per file
    (never analysed twice) and every field belongs to exactly one specimen report. A run left
    open by a kill goes on at a start within its idle timeout (its fields stored by two
    processes, one report); after a longer pause it is closed at the start (specimen_incomplete,
    restart). The files out at each kill are analysed alone after it, none set aside."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = [f"field-{i:03d}.png" for i in range(100)]
    for i, name in enumerate(names):
        (inbox / name).write_bytes(_png(1000 + i))
    broker = broker_with()
    sub = observer_on(broker.port, [f"{BASE}/#"], client_id="crash-loop-observer", persistent=True)
    source = {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.0,
              "decode_grace_s": 0.0, "microns_per_pixel": 0.2}
    idle_s = 8.0
    config = write_station(tmp_path, broker.port, source=source,
                           specimen={"target_wbc_count": 30, "idle_timeout_s": idle_s})
    pool = _pool_file(tmp_path)
    stored: list[tuple[str, str, int]] = []
    processes: list[DaemonProcess] = []
    kills = 0
    while kills < 8 and any((inbox / n).exists() for n in names):
        daemon = daemons(config, pool)
        processes.append(daemon)
        wait_until(lambda d=daemon: sum(k == "field" for k, _, _ in d.stored()) >= 6, 30)
        daemon.signal(signal.SIGKILL)
        daemon.wait(10)
        stored += daemon.stored()
        kills += 1
        if kills % 2 == 0:  # the power back after a while: the run left open is over
            time.sleep(idle_s + 1)
    final = daemons(config, pool)
    processes.append(final)
    assert wait_until(lambda: not any((inbox / n).exists() for n in names), 120), (
        final.lines[-20:])
    time.sleep(0.5)
    final.signal(signal.SIGTERM)
    assert final.wait(60) == 0, final.lines[-30:]
    stored += final.stored()
    produced = [rid for _, rid, _ in stored]
    assert sub.wait_for(lambda ms: set(produced) <= {e["report_id"] for e in
                        _arrivals(sub, "field") + _arrivals(sub, "report")}, 30)
    fields = _arrivals(sub, "field")
    reports = _arrivals(sub, "report")
    figures = _figures(produced, fields + reports)
    per_file = Counter(e["body"]["source"]["frame_id"].split(":", 1)[1].split("@")[0]
                       for e in {e["report_id"]: e for e in fields}.values())
    figures |= {"kills": kills, "files": len(names), "files_with_a_field_report": len(per_file),
                "files_analysed_twice": sum(n > 1 for n in per_file.values())}
    print("\ncrash loop figures:", json.dumps(figures))
    assert kills >= 3
    done = {p.name for p in (inbox / "done").iterdir()}
    assert done == set(names), set(names) - done
    assert figures["lost"] == 0
    assert set(per_file) == set(names) and figures["files_analysed_twice"] == 0
    # the files out at each kill were analysed alone after the restart, and none was set aside
    alone = sum("analysed alone" in ln for p in processes for ln in p.lines)
    assert alone >= kills and not any("analysis_interrupted" in ln for p in processes for ln in p.lines)
    # Every field in exactly one specimen report (the runs a kill left open closed at restart).
    specimens = {e["report_id"]: e["body"] for e in reports}.values()
    run_fields = Counter(e["body"]["run_id"] for e in {e["report_id"]: e for e in fields}.values())
    assert sum(b["fields_analyzed"] for b in specimens) == len(names)
    assert {b["run_id"]: b["fields_analyzed"] for b in specimens} == dict(run_fields)
    restarts = [b for b in specimens if any("restart" in f["message"] for f in b["flags"])]
    assert restarts, "no run was left open by a kill?"
    # runs resumed at a quick restart: their fields stored by two processes, in one report
    runs_of = [{m[1] for m in (re.search(r"stored field message .* run=(\S+)", ln) for ln in p.lines) if m}
               for p in processes]
    spanning = {r for a, b in itertools.pairwise(runs_of) for r in a & b if r != "None"}
    assert spanning and spanning <= set(run_fields), (spanning, [p.lines[-5:] for p in processes])
    assert sum("resumed: left open by the previous process" in ln for p in processes for ln in p.lines) >= len(spanning)
    # and the dashboards' retained live state of each says closed at restart, not "open" forever
    states = _arrivals(sub, "run")
    closed_at_restart = {s["run_id"] for s in states if s["state"] == "closed" and s["end_reason"] == "restart"}
    assert {b["run_id"] for b in restarts} <= closed_at_restart, [(s["run_id"], s["state"]) for s in states]
