"""The station daemon end to end: real threads, a real mosquitto, real sd_notify datagrams.

The analysis is the one part replaced: `PoolAnalyzer` hands each frame the result of a real
pipeline run (tiling, merge, ROI, crops, aggregate, report) over a synthetic field with the oracle
segmenter and oracle heads, computed once, so daemon tests do not need trained models and run fast.
The helpers here are also used by tests/test_daemon_faults.py and its child processes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, free_port, make_tls_material, wait_until
from oracle import OracleSegmenter
from pydantic import ValidationError

from smearscope.device.frame import Frame
from smearscope.device.synthetic import SyntheticField, render_field
from smearscope.service.analysis.classify import UNIDENTIFIED, HeadResult
from smearscope.service.analysis.crops import RBC_CROP, WBC_CROP, CropSpec
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions, FieldResult
from smearscope.service.analysis.records import CellCrop
from smearscope.service.analysis.report import Report, ScaleInfo
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX
from smearscope.service.config import EXIT_CONFIG, MqttConfig, StationConfig, load_config
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.station.daemon import StationDaemon, run_daemon

STATION = "bench-1"
BASE = f"smearscope/{STATION}"

# --------------------------------------------------------------------------- helpers


class OracleHead:
    """A classifier head that names each crop's cell from the synthetic field's truth."""

    def __init__(self, field: SyntheticField, spec: CropSpec, kind: str) -> None:
        self.crop_spec = spec
        self.engine = None  # no model behind it (the pipeline asks which stain variant it wants)
        self.classes: list[str] = []  # no probabilities either: results carry the label only
        self._cells = [c for c in field.cells if c.kind == kind]

    def classify(self, crops: Sequence[CellCrop]) -> list[HeadResult]:
        out = []
        for crop in crops:
            cx, cy = (int(v) for v in crop.detection.box.center)
            label = UNIDENTIFIED
            for c in self._cells:
                x0, y0, x1, y1 = c.bbox
                if x0 <= cx < x1 and y0 <= cy < y1 and c.mask[cy - y0, cx - x0]:
                    label = c.subtype or c.morphology or UNIDENTIFIED
                    break
            out.append(HeadResult(label, 0.99))
        return out


@functools.lru_cache(maxsize=4)
def oracle_pool(n: int = 4, seed: int = 500) -> tuple[FieldResult, ...]:
    """Field results of real pipeline runs over synthetic fields with oracle parts."""
    results = []
    for i in range(n):
        f = render_field(seed + i, width=480, height=360, microns_per_pixel=CANONICAL_UM_PER_PX,
                         n_wbc=4)
        heads: Any = (OracleHead(f, RBC_CROP, "rbc"), OracleHead(f, WBC_CROP, "wbc"))  # duck-typed
        analyzer = Analyzer(OracleSegmenter(f), *heads, AnalyzerOptions(stain_method="none"),
                            station_id=STATION)
        results.append(analyzer.analyze(f.frame))
    return tuple(results)


@dataclass
class PoolAnalyzer:
    """Analyzer-like: frame i gets pool[i % n], re-stamped with the frame's id and the run id.

    `stall_s` sleeps on the calls in `stall_on`; `fail_on` maps call index -> exception;
    `scale_estimate`: each field's own scale estimate from its red cells (an uncalibrated
    station's fields), else the pool's given scale."""

    pool: Sequence[FieldResult]
    stall_on: frozenset[int] = frozenset()
    stall_s: float = 0.0
    fail_on: dict[int, BaseException] = field(default_factory=dict)
    calls: int = 0
    analysed_ids: list[str] = field(default_factory=list)
    analysed_scales: list[float | None] = field(default_factory=list)  # each frame's microns_per_pixel
    checked_calibration: list[bool] = field(default_factory=list)  # each frame's check_calibration
    checked_by_frame: dict[str, bool] = field(default_factory=dict)  # the same by frame id (pool threads)
    scale_estimate: float | None = None

    def analyze(self, frame: Frame, run_id: str | None = None, specimen_scale: float | None = None,
                check_calibration: bool = False) -> FieldResult:
        i = self.calls
        self.calls += 1
        if i in self.fail_on:
            raise self.fail_on[i]
        if i in self.stall_on:
            time.sleep(self.stall_s)
        base = self.pool[i % len(self.pool)]
        assert base.report.source is not None
        source = base.report.source.model_copy(update={"frame_id": frame.frame_id,
                                                       "source": frame.source})
        update: dict[str, Any] = {"report_id": str(uuid.uuid4()), "run_id": run_id,
                                  "created_at": time.time(), "source": source}
        if self.scale_estimate is not None:
            update["scale"] = ScaleInfo(microns_per_pixel=self.scale_estimate, method="rbc_size_detection",
                                        canonical_microns_per_pixel=CANONICAL_UM_PER_PX)
        report = base.report.model_copy(update=update)
        self.analysed_ids.append(frame.frame_id)
        self.analysed_scales.append(frame.microns_per_pixel)
        self.checked_calibration.append(check_calibration)
        self.checked_by_frame[frame.frame_id] = check_calibration
        return FieldResult(report, base.cells, base.input_to_canonical)


def pool_factory(**kwargs: Any) -> Callable[[StationConfig], PoolAnalyzer]:
    return lambda config: PoolAnalyzer(oracle_pool(), **kwargs)


def classified_wbc_per_field() -> list[int]:
    return [sum(1 for c in r.cells if c.detection.kind.value == "wbc"
                and c.label not in (None, UNIDENTIFIED)) for r in oracle_pool()]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for station configs: scalars, arrays and nested tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            lines += ["", f"[{name}]", to_toml(v, name + ".")]
    return "\n".join(lines)


def station_document(tmp_path: Path, port: int, *, credentials: bool = True,
                     source: dict[str, Any] | None = None, target_wbc: int = 100,
                     **sections: dict[str, Any]) -> dict[str, Any]:
    mqtt: dict[str, Any] = {
        "host": "127.0.0.1", "port": port, "keepalive": 5, "reconnect_min_delay_s": 1,
        "reconnect_max_delay_s": 1, "stop_drain_timeout_s": 5, "telemetry_interval_s": 0.5,
        "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite3")},
    }
    if credentials:
        mqtt.update(username="station", password_credential="mqtt-password")
    mqtt.update(sections.pop("mqtt", {}))
    doc: dict[str, Any] = {
        "station_id": STATION,
        "source": source or {"kind": "simulated", "fields": 500, "fps": 8.0, "width": 320,
                             "height": 240, "seed": 0},
        "specimen": {"target_wbc_count": target_wbc, "idle_timeout_s": 60.0},
        "mqtt": mqtt,
        "watchdog": {"stall_timeout_s": 5.0},
    }
    doc.update(sections)
    return doc


def write_station(tmp_path: Path, port: int, **kwargs: Any) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(to_toml(station_document(tmp_path, port, **kwargs)) + "\n")
    return path


def envelopes(sub: Subscriber, topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on_topic(topic)]


def saw_offline(sub: Subscriber, timeout: float = 15) -> bool:
    """Whether the station's retained "offline" reached the subscriber within `timeout` s. The
    station publishes it after its stop's drain and the broker passes one client's messages on in
    order, so once it is here every message the station delivered is here too. The daemon's
    return says the broker has them, not that the subscriber's network thread has read them."""
    return sub.wait_for(lambda ms: any(m.topic == f"{BASE}/status" and m.payload == b"offline" for m in ms),
                        timeout)


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in list(self.messages) if m.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def observed() -> list[str]:
    """The topics conftest's `observer` follows here: this station's."""
    return [f"{BASE}/#"]


# --------------------------------------------------------------------------- tests


@pytest.mark.broker
def test_simulated_station_end_to_end_then_sigterm(
    tmp_path: Path, broker: Any, credentials_dir: Path, observer: Subscriber,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Field reports and specimen reports reach a subscriber; SIGTERM publishes the open run's
    report, retained "offline", and returns 0."""
    per_field = classified_wbc_per_field()
    target = per_field[0] + per_field[1]  # the first run completes on its second field
    config = write_station(tmp_path, broker.port, target_wbc=target)

    def terminate_after_fields() -> None:
        if observer.wait_for(lambda ms: sum(m.topic == f"{BASE}/field" for m in ms) >= 5, 30):
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the daemon's handler

    killer = threading.Thread(target=terminate_after_fields, daemon=True)
    killer.start()
    code = run_daemon(config, None, analyzer_factory=pool_factory())
    killer.join(5)
    assert code == 0
    assert saw_offline(observer)

    status = [m.payload.decode() for m in observer.on_topic(f"{BASE}/status")]
    assert status[0] == "online" and status[-1] == "offline"
    fields = envelopes(observer, f"{BASE}/field")
    reports = envelopes(observer, f"{BASE}/report")
    assert len(fields) >= 5
    assert all(e["kind"] == "field" and e["body"]["kind"] == "field" for e in fields)
    bodies = [Report.model_validate(e["body"]) for e in reports]
    assert [b.kind for b in bodies] == ["specimen"] * len(bodies)
    complete, final = bodies[0], bodies[-1]
    assert complete.fields_analyzed == 2 and complete.flags[-1].code == "specimen_complete"
    assert final.flags[-1].code in ("specimen_incomplete", "specimen_complete")
    # Every analysed field joined exactly one run, and every run was reported.
    assert sum(b.fields_analyzed for b in bodies) == len(fields)
    run_of_field = {e["body"]["source"]["frame_id"]: e["body"]["run_id"] for e in fields}
    # Reports are compact; each field's cells came apart, on .../cells (issue 18, item 3).
    cells_of_field: dict[str, list[dict[str, Any]]] = {}
    for e in envelopes(observer, f"{BASE}/cells"):
        assert e["kind"] == "cells"
        cells_of_field.setdefault(e["body"]["field_id"], []).extend(e["body"]["cells"])
    assert all(e["body"]["cells"] == [] and e["body"]["cell_detail"]["count"] ==
               len(cells_of_field.get(e["body"]["source"]["frame_id"], [])) for e in fields)
    for b in bodies:
        ids = [fid for fid, run in run_of_field.items() if run == b.run_id]
        cells = [c for fid in ids for c in cells_of_field.get(fid, [])]
        assert ids and b.cells == [] and b.cell_detail is not None
        assert b.cell_detail.count == len(cells) and b.cell_detail.topic == f"{BASE}/cells"
        assert b.counts.wbc == sum(1 for c in cells if c["kind"] == "wbc")
    # A fresh subscriber sees the retained offline status.
    late = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/status"])
    try:
        assert late.wait_for(lambda ms: any(m.retain for m in ms), 5)
        assert late.on_topic(f"{BASE}/status")[-1].payload == b"offline"
    finally:
        late.close()


@pytest.mark.broker
def test_commands_over_mqtt(
    tmp_path: Path, broker: Any, credentials_dir: Path, observer: Subscriber, caplog: pytest.LogCaptureFixture,
) -> None:
    """start_run, analyze_file, stop_run, status, reload and an unknown command, with answers."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_station(tmp_path, broker.port, source={"kind": "folder", "path": str(inbox),
                                                          "microns_per_pixel": 0.21})
    daemon = StationDaemon(load_config(config), analyzer_factory=pool_factory(),
                           config_path=config)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: any(m.payload == b"online"
                                      for m in observer.on_topic(f"{BASE}/status")), 15)

        def command(name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            before = len(observer.on_topic(f"{BASE}/cmd_response/{name}"))
            observer.client.publish(f"{BASE}/cmd/{name}", json.dumps(body or {}), qos=1)
            assert observer.wait_for(
                lambda ms: sum(m.topic == f"{BASE}/cmd_response/{name}" for m in ms) > before, 15)
            return json.loads(observer.on_topic(f"{BASE}/cmd_response/{name}")[-1].payload)

        too_many = command("start_run", {"target_wbc": 10**23})  # SQLite could not store it: refused
        assert too_many["error"] == "bad_arguments" and "1 to 1000" in too_many["message"]
        assert command("start_run", {"target_wbc": None})["error"] == "bad_arguments"  # leave it out instead
        misspelt = command("start_run", {"target_wbcs": 500})  # not a run at the default target
        assert misspelt["error"] == "bad_arguments" and "'target_wbcs'" in misspelt["message"]
        assert command("status", {"verbose": True})["error"] == "bad_arguments"
        # JSON true is no count (Python calls it the integer 1): refused, not a run of one white cell
        yes = command("start_run", {"target_wbc": True})
        assert not yes["ok"] and yes["error"] == "bad_arguments" and "1 to 1000" in yes["message"], yes
        # a specimen's identifier is matched as typed: text, 1 to 64 printable characters, no space at its ends
        for bad in ("", " H-1", "H-1 ", "H-\n1", "H-\t1", "x" * 65, 412, None, ["H-1"]):
            refused = command("start_run", {"specimen_id": bad})
            assert refused["error"] == "bad_arguments" and "specimen_id" in refused["message"], (bad, refused)
        started = command("start_run", {"target_wbc": 500, "specimen_id": "H-2026-0412 é"})
        assert started["ok"] and started["target_wbc"] == 500 and started["specimen_id"] == "H-2026-0412 é"
        assert command("status")["run"]["specimen_id"] == "H-2026-0412 é"
        assert command("start_run")["error"] == "run_open"  # one run at a time
        image = tmp_path / "field.png"
        cv2.imwrite(str(image), render_field(3, width=320, height=240).frame.pixels)
        analysed = command("analyze_file", {"path": str(image)})
        assert analysed["ok"] and analysed["run_id"] == started["run_id"], analysed
        assert daemon.analyzer.analysed_scales == [0.21]  # the station's microscope's calibrated scale
        again = command("analyze_file", {"path": str(image)})
        # every error answer carries its code and a sentence (docs/MQTT.md), the gate's refusals too
        assert again == {"ok": False, "frame_id": analysed["frame_id"], "error": "duplicate_frame_id",
                         "message": f"the quality gate refused {analysed['frame_id']}: a frame of this id (the "
                                    "same file name and pixels) was analysed already"}
        text = tmp_path / "notes.txt"
        text.write_text("not an image")
        assert command("analyze_file", {"path": str(text)})["error"] == "not_an_image"
        assert command("analyze_file", {"path": "relative.png"})["ok"] is False
        assert command("analyze_file", {"path": f"{image}\0.txt"})["error"] == "bad_arguments"
        (inbox / "notes.txt").write_text("not an image either")  # the folder source refuses it itself
        assert wait_until(lambda: (inbox / "rejected" / "notes.txt").exists(), 15)
        status = command("status")
        assert status["fields_analysed"] == 1 and status["run"]["fields"] == 1 and status["fields_outside_runs"] == 0
        assert status["failed"] == {"not_an_image": 1} and status["broker"]["status"] == "connected"
        assert status["source_rejected"] == {"not_an_image": 1} and status["source_rejected_files"] == 1
        # the rejected count systemd's STATUS= line and the telemetry give: the station's (the
        # repeated file) and the files the folder source set aside itself
        assert status["rejected"] == {"duplicate_frame_id": 1}
        assert "1 field analysed, 2 rejected, 1 failed" in daemon.status_line(), daemon.status_line()  # not "1 fields"
        assert observer.wait_for(lambda ms: any(
            json.loads(m.payload)["pipeline"]["rejected"] == 2 for m in ms if m.topic == f"{BASE}/telemetry"), 10), [
            json.loads(m.payload)["pipeline"] for m in observer.on_topic(f"{BASE}/telemetry")][-3:]

        state, ended = daemon.workers.state, []
        real_ending = state.run_ending
        state.run_ending = lambda run_id, why, report_id: (ended.append((run_id, why, report_id)),
                                                           real_ending(run_id, why, report_id))[1]
        stopped = command("stop_run")
        assert stopped["ok"] and stopped["fields"] == 1 and not stopped["complete"] and "message" not in stopped
        # kept before its report, with the id answered: a crash never resumes it, nor reports it under another id
        assert ended == [(stopped["run_id"], "stopped", stopped["report_id"])]
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/report" for m in ms), 10)
        body = envelopes(observer, f"{BASE}/report")[-1]["body"]
        assert body["report_id"] == stopped["report_id"] and body["fields_analyzed"] == 1
        assert command("stop_run") == {"ok": False, "error": "no_run_open", "message": "no specimen run is open"}

        text_before = config.read_text()
        config.write_text(text_before.replace("target_wbc_count = 100", "target_wbc_count = 200")
                          .replace("keepalive = 5", "keepalive = 7"))
        with caplog.at_level(logging.WARNING, logger="smearscope.service.station.daemon"):
            reloaded = command("reload")
            daemon.request_reload()  # as SIGHUP does: its result is only logged
            assert wait_until(lambda: "reload:" in caplog.text, 10)  # a change that needs a restart, said loudly
        assert "restart the station to apply them" in caplog.text
        assert reloaded["ok"] and reloaded["applied"] == ["specimen"]
        assert reloaded["requires_restart"] == ["mqtt"]
        assert daemon.tracker.policy.target_wbc == 200
        config.write_text(text_before.replace("target_wbc_count = 100", "target_wbc_count = 0"))
        bad = command("reload")
        assert not bad["ok"] and any("specimen.target_wbc_count" in p for p in bad["problems"])
        config.write_text(text_before + "\nlog_level = " + "[" * 5000 + "]" * 5000 + "\n")
        daemon.request_reload()  # SIGHUP with a file its parser chokes on: the station goes on
        deep = command("reload")
        assert not deep["ok"] and any("nested too deeply" in p for p in deep["problems"]), deep
        assert runner.is_alive() and command("status")["state"] == "running"
        import smearscope.service.station.daemon as daemon_module

        def unforeseen(*args: Any, **kwargs: Any) -> None:
            raise MemoryError("a file no check foresaw")
        real_load = daemon_module.load_config
        daemon_module.load_config = unforeseen  # type: ignore[assignment]
        try:
            daemon.request_reload()
            odd = command("reload")
        finally:
            daemon_module.load_config = real_load
        assert not odd["ok"] and odd["problems"] == ["MemoryError: a file no check foresaw"]
        assert runner.is_alive() and command("status")["state"] == "running"
        unknown = command("self_destruct")
        assert unknown["error"] == "unknown_command" and unknown["message"] == "unknown command 'self_destruct'"
    finally:
        daemon.request_stop("test over")
        runner.join(30)
    assert not runner.is_alive()


def _gated_folder_station(tmp_path: Path, broker: Any, concurrent_fields: int, frames: list | None = None,
                          ) -> tuple[StationDaemon, Path, threading.Event, threading.Event]:
    """A watched-folder station (its inbox made under tmp_path) whose analyzer holds the second
    field until the test sets the gate (`entered` is set once it holds it), keeping a weak
    reference to each frame in `frames` when given: (daemon, inbox, entered, gate)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.0,
              "microns_per_pixel": 0.2}
    config = write_station(tmp_path, broker.port, source=source, analysis={"concurrent_fields": concurrent_fields})
    entered, gate = threading.Event(), threading.Event()

    @dataclass
    class GatedAnalyzer(PoolAnalyzer):
        def analyze(self, frame: Frame, run_id: str | None = None, **kwargs: Any) -> FieldResult:
            if frames is not None:
                frames.append(weakref.ref(frame))
            if self.calls == 1:
                entered.set()
                assert gate.wait(30)
            return super().analyze(frame, run_id, **kwargs)
    daemon = StationDaemon(load_config(config), analyzer_factory=lambda c: GatedAnalyzer(oracle_pool()))
    return daemon, inbox, entered, gate


@pytest.mark.broker
def test_a_field_in_analysis_when_the_technician_stops_the_run_stays_out_of_the_next_run(
    tmp_path: Path, broker: Any, credentials_dir: Path, observer: Subscriber,
) -> None:
    """stop_run while the slide's last field is being analysed (fields analysed two at once): that field
    is of the stopped slide. It
    stands alone (its field message without a run, counted in fields_outside_runs) and starts no run
    of its own, so the next slide's run and report never count a field of the previous patient."""
    # two fields at once (the example config's): the analysis thread serves commands while one is analysed
    daemon, inbox, entered, gate = _gated_folder_station(tmp_path, broker, concurrent_fields=2)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()

    def command(name: str) -> dict[str, Any]:
        before = len(observer.on_topic(f"{BASE}/cmd_response/{name}"))
        observer.client.publish(f"{BASE}/cmd/{name}", "{}", qos=1)
        assert observer.wait_for(lambda ms: sum(m.topic == f"{BASE}/cmd_response/{name}" for m in ms) > before, 15)
        return json.loads(observer.on_topic(f"{BASE}/cmd_response/{name}")[-1].payload)

    def field_messages() -> list[dict[str, Any]]:
        return [e["body"] for e in envelopes(observer, f"{BASE}/field")]
    try:
        assert wait_until(lambda: any(m.payload == b"online" for m in observer.on_topic(f"{BASE}/status")), 15)
        for i, name in enumerate(("slide-a-1.png", "slide-a-2.png")):
            cv2.imwrite(str(inbox / name), render_field(40 + i, width=320, height=240).frame.pixels)
            if i == 0:
                assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/field" for m in ms), 15)
        assert entered.wait(15)  # slide A's second field is in the analyzer
        stopped = command("stop_run")
        assert stopped["ok"] and stopped["fields"] == 1, stopped
        gate.set()
        assert observer.wait_for(lambda ms: sum(m.topic == f"{BASE}/field" for m in ms) == 2, 15)
        first, last = field_messages()
        assert first["run_id"] == stopped["run_id"] and last["run_id"] is None, (first["run_id"], last["run_id"])
        status = command("status")
        assert status["run"] is None and status["fields_outside_runs"] == 1 and status["fields_analysed"] == 2
    finally:
        gate.set()
        daemon.request_stop("test over")
        runner.join(30)
    assert not runner.is_alive()
    # the one specimen report is slide A's; no run of the stray field was closed at shutdown
    assert saw_offline(observer)  # a second report, the bug's, would have come before it
    reports = [e["body"] for e in envelopes(observer, f"{BASE}/report")]
    assert [(r["run_id"], r["fields_analyzed"]) for r in reports] == [(stopped["run_id"], 1)]


@pytest.mark.broker
def test_a_stored_fields_frame_is_not_held_while_the_next_field_is_analysed(
    tmp_path: Path, broker: Any, credentials_dir: Path, observer: Subscriber,
) -> None:
    """Once a field's message is stored its frame is let go: the outbox writer kept the last field
    it stored, frame and all, until the next report came, so a station fed 64 MP files held a
    192 MB frame more through every analysis."""
    frames: list[weakref.ref[Frame]] = []
    daemon, inbox, entered, gate = _gated_folder_station(tmp_path, broker, concurrent_fields=1, frames=frames)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: any(m.payload == b"online" for m in observer.on_topic(f"{BASE}/status")), 15)
        cv2.imwrite(str(inbox / "first.png"), render_field(70, width=320, height=240).frame.pixels)
        assert observer.wait_for(lambda ms: any(m.topic == f"{BASE}/field" for m in ms), 15)
        cv2.imwrite(str(inbox / "second.png"), render_field(71, width=320, height=240).frame.pixels)
        assert entered.wait(15)  # the second field is in the analyzer, the first stored
        assert wait_until(lambda: gc.collect() >= 0 and frames[0]() is None, 5), gc.get_referrers(frames[0]())
        gate.set()
        assert observer.wait_for(lambda ms: sum(m.topic == f"{BASE}/field" for m in ms) == 2, 15)
    finally:
        gate.set()
        daemon.request_stop("test over")
        runner.join(30)
    assert not runner.is_alive()


@pytest.mark.broker
def test_a_broker_that_refuses_the_station_is_not_said_to_be_missing(
    tmp_path: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong password: the notice said "no MQTT broker answered at H:P (broker H:P refused the
    connection: Not authorized ...)"; the broker did answer, and the fix is the password."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("not-the-password\n")
    config = write_station(tmp_path, broker.port)
    with caplog.at_level(logging.WARNING, logger="smearscope.service.station.daemon"):
        assert run_daemon(config, 2, analyzer_factory=pool_factory(), environ={"CREDENTIALS_DIRECTORY": str(creds)}) == 0
    notices = [r.getMessage() for r in caplog.records if "reports are kept in the outbox" in r.getMessage()]
    assert len(notices) == 1, notices
    assert notices[0].startswith(f"the MQTT broker at 127.0.0.1:{broker.port} refused the station") and \
        "Not authorized" in notices[0] and "no MQTT broker answered" not in notices[0], notices


def test_embedded_station_without_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    """`smearscope run --max-fields 3` (`make demo`) with no config and no broker: runs, says so
    once (it said it three times: the publisher's warning, the daemon's quoting it, and a copy on
    stdout), stores the reports in the outbox under $STATE_DIRECTORY, prints one line per report,
    exits 0."""
    port = free_port()  # nobody listens there
    environ = {"STATE_DIRECTORY": str(tmp_path / "state"),
               "SMEARSCOPE__MQTT__PORT": str(port),
               "SMEARSCOPE__SOURCE__FPS": "20", "SMEARSCOPE__SOURCE__WIDTH": "320",
               "SMEARSCOPE__SOURCE__HEIGHT": "240"}
    with caplog.at_level(logging.INFO):
        code = run_daemon(None, 3, analyzer_factory=pool_factory(), environ=environ)
    out = capsys.readouterr().out
    assert code == 0
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "Connection refused" in r.getMessage()]
    assert said == [(f"no MQTT broker answered at localhost:{port} (ConnectionRefusedError: [Errno 111] Connection "
                    f"refused): nothing listens on port {port} there: is the broker running, on this port?; retrying "
                    f"with backoff up to 60 s; reports are kept in the outbox {tmp_path / 'state' / 'outbox.sqlite3'} "
                    "and sent when the broker answers")], said
    assert "no MQTT broker answered" not in out and "Connection refused" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("in-outbox")]
    assert len(lines) == 4  # three fields and the final specimen report of the open run
    assert sum("/embedded-sim/field " in ln for ln in lines) == 3
    assert sum("/embedded-sim/report " in ln for ln in lines) == 1
    assert (tmp_path / "state" / "outbox.sqlite3").is_file()
    assert "4 reports: 0 delivered" in out



def test_the_ledger_line_of_each_report_names_its_warning_and_critical_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`smearscope run --max-fields 3` prints, on each report's line, the flags above info that
    the stored report carries: the specimen report of the run ended by the stop says
    `warning:specimen_incomplete`, and no line names a flag its report lacks."""
    from smearscope.service.mqtt.outbox import Outbox

    environ = {"STATE_DIRECTORY": str(tmp_path / "state"),
               "SMEARSCOPE__MQTT__PORT": str(free_port()),  # nobody listens there
               "SMEARSCOPE__SOURCE__FPS": "20", "SMEARSCOPE__SOURCE__WIDTH": "320",
               "SMEARSCOPE__SOURCE__HEIGHT": "240"}
    assert run_daemon(None, 3, analyzer_factory=pool_factory(), environ=environ) == 0
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("in-outbox"):
            words = line.split()
            flags = next((w.removeprefix("flags=") for w in words if w.startswith("flags=")), "")
            printed[words[2]] = flags.split(",") if flags else []
    with Outbox(tmp_path / "state" / "outbox.sqlite3") as box:
        stored = {m.report_id: json.loads(m.payload)["body"] for m in box.pending(limit=100)
                  if m.topic.endswith(("/field", "/report"))}
    assert len(printed) == 4 and set(printed) <= set(stored)
    for report_id, flags in printed.items():
        body = stored[report_id]
        assert flags == [f"{f['severity']}:{f['code']}" for f in body["flags"] if f["severity"] != "info"]
        if body["kind"] == "specimen":
            assert "warning:specimen_incomplete" in flags


def test_a_runs_first_calibrated_fields_check_the_calibration(tmp_path: Path) -> None:
    """The station asks the analyzer to check the calibration on a run's first
    `specimen.calibration_check_fields` calibrated fields only (a scale search each); 0: never."""
    for n, expected in (("2", [True, True, False, False]), ("0", [False] * 4)):
        made: list[PoolAnalyzer] = []

        def factory(config: StationConfig, made: list[PoolAnalyzer] = made) -> PoolAnalyzer:
            made.append(PoolAnalyzer(oracle_pool()))
            return made[-1]
        environ = {"STATE_DIRECTORY": str(tmp_path / f"state{n}"), "SMEARSCOPE__MQTT__PORT": str(free_port()),
                   "SMEARSCOPE__SOURCE__FPS": "20", "SMEARSCOPE__SOURCE__WIDTH": "320",
                   "SMEARSCOPE__SOURCE__HEIGHT": "240", "SMEARSCOPE__SPECIMEN__CALIBRATION_CHECK_FIELDS": n}
        assert run_daemon(None, 4, analyzer_factory=factory, environ=environ) == 0
        (analyzer,) = made
        assert all(analyzer.analysed_scales), "the simulated microscope's fields carry its scale"
        assert analyzer.checked_calibration == expected


def test_fields_analysed_at_once_claim_no_more_calibration_checks_than_asked(tmp_path: Path) -> None:
    """With three fields analysed at once (the first three stalled, so they overlap), a run still
    checks its calibration on its first two fields in capture order, not on every field that
    started before the first one finished."""
    made: list[PoolAnalyzer] = []

    def factory(config: StationConfig) -> PoolAnalyzer:
        made.append(PoolAnalyzer(oracle_pool(), stall_on=frozenset({0, 1, 2}), stall_s=0.3))
        return made[-1]
    environ = {"STATE_DIRECTORY": str(tmp_path / "state"), "SMEARSCOPE__MQTT__PORT": str(free_port()),
               "SMEARSCOPE__SOURCE__FPS": "50", "SMEARSCOPE__SOURCE__WIDTH": "320",
               "SMEARSCOPE__SOURCE__HEIGHT": "240", "SMEARSCOPE__SPECIMEN__CALIBRATION_CHECK_FIELDS": "2",
               "SMEARSCOPE__ANALYSIS__CONCURRENT_FIELDS": "3"}
    assert run_daemon(None, 6, analyzer_factory=factory, environ=environ) == 0
    (analyzer,) = made
    assert len(analyzer.checked_by_frame) == 6
    in_capture_order = [analyzer.checked_by_frame[f] for f in sorted(analyzer.checked_by_frame, key=_frame_number)]
    assert in_capture_order == [True, True, False, False, False, False]


def test_a_failed_field_gives_its_calibration_check_to_the_runs_next_field(tmp_path: Path) -> None:
    """A run's first field fails in the analyzer: the check it claimed goes to the next field, so the
    run still checks its calibration on two fields that were analysed."""
    made: list[PoolAnalyzer] = []

    def factory(config: StationConfig) -> PoolAnalyzer:
        made.append(PoolAnalyzer(oracle_pool(), fail_on={0: RuntimeError("the engine failed")}))
        return made[-1]
    environ = {"STATE_DIRECTORY": str(tmp_path / "state"), "SMEARSCOPE__MQTT__PORT": str(free_port()),
               "SMEARSCOPE__SOURCE__FPS": "20", "SMEARSCOPE__SOURCE__WIDTH": "320",
               "SMEARSCOPE__SOURCE__HEIGHT": "240", "SMEARSCOPE__SPECIMEN__CALIBRATION_CHECK_FIELDS": "2"}
    assert run_daemon(None, 5, analyzer_factory=factory, environ=environ) == 0
    (analyzer,) = made
    assert analyzer.calls == 6 and len(analyzer.analysed_ids) == 5  # the first raised, five analysed
    assert analyzer.checked_calibration == [True, True, False, False, False]


def test_a_field_analysed_by_command_that_fails_gives_its_calibration_check_back() -> None:
    """The analyze_file command's path (StationWorkers.analyse): a calibrated field that claimed its
    run's one check and failed in the analyzer gives the check back to the run."""
    from smearscope.device.quality import QualityGate
    from smearscope.service.station.notify import ProgressWatchdog, SystemdNotifier
    from smearscope.service.station.requests import RequestQueue
    from smearscope.service.station.specimen import SpecimenPolicy, SpecimenTracker
    from smearscope.service.station.workers import StationWorkers

    tracker = SpecimenTracker(SpecimenPolicy(1000, 60.0, True, calibration_check_fields=1), station_id="st")
    workers = StationWorkers(source_kind="folder", gate=QualityGate(), tracker=tracker, requests=RequestQueue("t"),
                             watchdog=ProgressWatchdog(SystemdNotifier(environ={}), interval_s=0),
                             stop=threading.Event(), request_stop=lambda why: None, max_fields=None,
                             scale_override=None)
    analyzer = PoolAnalyzer(oracle_pool(), fail_on={0: RuntimeError("the engine failed")})
    workers.analyzer = analyzer
    frame = Frame(render_field(3, width=320, height=240).frame.pixels, "f0", "command", microns_per_pixel=0.2)
    answer = workers.analyse(frame)
    assert answer["ok"] is False and answer["error"] == "analysis_error" and analyzer.calls == 1
    run_id = tracker.run_for_next_field()
    assert run_id is not None and tracker.claim_calibration_check(run_id)  # the one check is the run's again
    assert not tracker.claim_calibration_check(run_id)


def test_the_analysis_scale_override_is_not_put_on_camera_frames_of_another_size_than_the_first(
        tmp_path: Path) -> None:
    """[analysis] microns_per_pixel is a calibration too, made at one frame size: a camera (a video
    file through a real cv2.VideoCapture; its end an unplug, the file replaced before the reopen)
    back at 64x48 after 160x120 gives frames the override must not be put on, as the source's own
    scale is not; a file analysed by command keeps the override whatever its size."""
    import numpy as np

    from smearscope.device.quality import QualityGate
    from smearscope.device.source_config import CameraSourceConfig
    from smearscope.device.sources import CameraSource
    from smearscope.service.station.notify import ProgressWatchdog, SystemdNotifier
    from smearscope.service.station.requests import RequestQueue
    from smearscope.service.station.specimen import SpecimenPolicy, SpecimenTracker
    from smearscope.service.station.workers import StationWorkers

    def camera_video(size: tuple[int, int], frames: int) -> None:
        tmp = tmp_path / "next.avi"
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), 5, size)
        for i in range(frames):
            writer.write(np.full((size[1], size[0], 3), 40 + 50 * i, np.uint8))
        writer.release()
        tmp.replace(tmp_path / "cam.avi")

    tracker = SpecimenTracker(SpecimenPolicy(1000, 60.0, True), station_id="st")
    workers = StationWorkers(source_kind="camera", gate=QualityGate(), tracker=tracker, requests=RequestQueue("t"),
                             watchdog=ProgressWatchdog(SystemdNotifier(environ={}), interval_s=0),
                             stop=threading.Event(), request_stop=lambda why: None, max_fields=None,
                             scale_override=0.1)
    camera_video((160, 120), 2)
    cfg = CameraSourceConfig(device=str(tmp_path / "cam.avi"), reconnect_initial_s=0.01, reconnect_max_s=0.02)
    with CameraSource(cfg) as cam:
        first = [workers.with_scale(next(cam), camera=True) for _ in range(2)]
        camera_video((64, 48), 2)
        smaller = [workers.with_scale(next(cam), camera=True) for _ in range(2)]
        camera_video((160, 120), 1)
        back = workers.with_scale(next(cam), camera=True)
    assert [f.pixels.shape[:2] for f in smaller] == [(48, 64)] * 2
    assert [f.microns_per_pixel for f in first + smaller + [back]] == [0.1, 0.1, None, None, 0.1]
    command = Frame(np.full((48, 64, 3), 90, np.uint8), "file:x.png@1", "command")
    assert workers.with_scale(command).microns_per_pixel == 0.1


def daemon_of(config: Path) -> StationDaemon:
    """A station daemon of this config with the oracle pool for analyzer."""
    return StationDaemon(load_config(config, {}), analyzer_factory=pool_factory(), config_path=config, environ={})


@contextlib.contextmanager
def running(daemon: StationDaemon) -> Iterator[threading.Thread]:
    """The daemon's main loop on a thread for the block; stopped and joined after it."""
    runner = threading.Thread(target=daemon.run, name="station-main", daemon=True)
    runner.start()
    try:
        yield runner
    finally:
        daemon.request_stop("test over")
        runner.join(30)


def start_daemon(config: Path) -> tuple[StationDaemon, threading.Thread]:
    """A station daemon of this config (its credentials from this process's environment) with the
    oracle pool for analyzer, its main loop started on a thread; stop_daemon stops it."""
    daemon = StationDaemon(load_config(config), analyzer_factory=pool_factory(), config_path=config)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    return daemon, runner


def stop_daemon(daemon: StationDaemon, runner: threading.Thread) -> None:
    """The daemon asked to stop and its main loop joined; fails the test if it runs on 30 s later."""
    daemon.request_stop("test over")
    runner.join(30)
    assert not runner.is_alive()


def _frame_number(frame_id: str) -> int:
    return int("".join(ch for ch in frame_id if ch.isdigit()) or -1)


def test_reload_command_is_applied_on_the_daemons_own_thread(tmp_path: Path) -> None:
    """The reload command arrives on the MQTT command thread; the config it changes belongs to
    the daemon's main thread, which applies it (as for SIGHUP). No broker is needed."""
    doc = station_document(tmp_path, free_port(), credentials=False)
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    daemon = daemon_of(config)
    applied_on: list[str] = []
    original = daemon.reload

    def reload() -> dict[str, Any]:
        applied_on.append(threading.current_thread().name)
        return original()

    daemon.reload = reload  # type: ignore[method-assign]
    with running(daemon) as runner:
        assert wait_until(lambda: daemon.publisher is not None and daemon.workers.threads, 15)
        doc["specimen"] = {**doc["specimen"], "target_wbc_count": 150}
        config.write_text(to_toml(doc))
        answer = daemon.handle_command("reload", {})  # on this thread, as the command worker calls it
        assert answer["ok"] and answer["applied"] == ["specimen"], answer
        assert applied_on == ["station-main"]
        assert daemon.config.specimen.target_wbc_count == 150
        assert daemon.tracker.policy.target_wbc == 150
        # new quality thresholds reach the gate at once: a field every station would take, once
        # stained (or dense) material must cover it all, is refused as empty
        image = tmp_path / "field.png"
        cv2.imwrite(str(image), render_field(3, width=320, height=240).frame.pixels)
        doc["quality"] = {"min_stained_fraction": 1.0, "min_material_fraction": 1.0}
        config.write_text(to_toml(doc))
        answer = daemon.handle_command("reload", {})
        assert answer["ok"] and answer["applied"] == ["quality"], answer
        refused = daemon.handle_command("analyze_file", {"path": str(image)})
        assert refused["ok"] is False and refused["error"] == "empty_field", refused
    assert not runner.is_alive()
    assert daemon.handle_command("reload", {})["error"] == "shutting_down"


def test_a_file_of_a_name_that_is_not_utf8_is_analysed_and_its_report_stored(tmp_path: Path) -> None:
    """analyze_file on a file named r\\xe9sultat.png in Latin-1 (as an SMB share writes it): answered ok and its
    report stored, the name shown as \\xNN as the folder source shows it (the frame id carried the
    raw name, the report could not be serialised, and it was lost after an ok answer); a string
    that is not valid Unicode (a signature cut inside an emoji) is refused, never stored."""
    doc = station_document(tmp_path, free_port(), credentials=False)
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    daemon = daemon_of(config)
    with running(daemon) as runner:
        assert wait_until(lambda: daemon.publisher is not None and daemon.workers.threads, 15)
        image = tmp_path / os.fsdecode(b"r\xe9sultat.png")
        cv2.imwrite(str(tmp_path / "plain.png"), render_field(3, width=320, height=240).frame.pixels)
        (tmp_path / "plain.png").rename(image)
        answer = daemon.handle_command("analyze_file", {"path": str(image)})
        assert answer["ok"] and answer["frame_id"].startswith("file:r\\xe9sultat.png@"), answer
        assert wait_until(lambda: daemon.status()["reports_stored"] >= 1, 15), daemon.status()
        assert daemon.status()["reports_lost"] == 0
        for name, body in (("verify_run", {"run_id": "r", "verified_by": "Dr \ud83d"}),
                           ("analyze_file", {"path": "/tmp/\ud83d.png"}),
                           ("type_cells", {"run_id": "r", "cells": [{"field_id": "f\ud83d", "cell": 0, "type": "x"}]})):
            refused = daemon.handle_command(name, body)
            assert refused["ok"] is False and refused["error"] == "bad_arguments", (name, refused)
            assert "surrogate" in refused["message"], refused
    assert not runner.is_alive() and daemon.status()["reports_lost"] == 0


def test_a_replayed_file_of_a_name_that_is_not_utf8_has_its_report_stored(tmp_path: Path) -> None:
    """A replay folder holding r\\xe9sultat.png in Latin-1: its field report is stored and sent like any
    other, the name shown as \\xNN (its frame id carried the raw name: the report could not be
    serialised, 'storing report ... failed', counted lost, while the run's report counted its cells)."""
    recording = tmp_path / "rec"
    recording.mkdir()
    for seed, name in ((3, b"a.png"), (4, b"r\xe9sultat.png")):
        _, png = cv2.imencode(".png", render_field(seed, width=320, height=240).frame.pixels)
        (recording / os.fsdecode(name)).write_bytes(png.tobytes())
    doc = station_document(tmp_path, free_port(), credentials=False,
                           source={"kind": "replay", "path": str(recording), "fps": 0})
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    daemon = daemon_of(config)
    with running(daemon) as runner:
        assert wait_until(lambda: daemon.status()["reports_stored"] + daemon.status()["reports_lost"] >= 2, 30), \
            daemon.status()
    assert not runner.is_alive() and daemon.status()["reports_lost"] == 0, daemon.status()
    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite3") as db:
        fields = [json.loads(p) for (p,) in db.execute("SELECT payload FROM outbox WHERE topic LIKE '%/field'")]
    assert sorted(f["body"]["source"]["frame_id"] for f in fields) == ["scope:p0:a.png", "scope:p0:r\\xe9sultat.png"]


def test_analyze_file_on_an_uncalibrated_station_refuses_a_blurred_file_at_its_runs_scale(tmp_path: Path) -> None:
    """A station without a calibrated scale cannot judge a file's focus on its own, so analyze_file
    analyses the run's first file however blurred; once the open run's fields agree on a scale,
    a blurred file is refused as out_of_focus, judged at that scale, and not analysed."""
    from smearscope.service.analysis.specimen_scale import SPECIMEN_SCALE_MIN_FIELDS

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    doc = station_document(tmp_path, free_port(), credentials=False, target_wbc=1000,
                           source={"kind": "folder", "path": str(inbox)})  # no microns_per_pixel
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    daemon = StationDaemon(load_config(config, {}), analyzer_factory=pool_factory(scale_estimate=0.1),
                           config_path=config, environ={})

    def field_file(seed: int, blur: bool = False) -> str:
        pixels = render_field(seed, width=640, height=480, microns_per_pixel=0.1).frame.pixels
        path = tmp_path / f"field-{seed}.png"
        assert cv2.imwrite(str(path), cv2.GaussianBlur(pixels, (0, 0), 20) if blur else pixels)  # 2 um
        return str(path)

    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: daemon.publisher is not None and daemon.workers.threads, 15)
        assert daemon.handle_command("start_run", {})["ok"]
        first = daemon.handle_command("analyze_file", {"path": field_file(40, blur=True)})
        assert first["ok"], first  # no scale yet: its focus is not judged
        for seed in range(41, 40 + SPECIMEN_SCALE_MIN_FIELDS):
            assert daemon.handle_command("analyze_file", {"path": field_file(seed)})["ok"]
        assert daemon.tracker.specimen_scale() == pytest.approx(0.1)
        blurred = daemon.handle_command("analyze_file", {"path": field_file(50, blur=True)})
        assert not blurred["ok"] and blurred["error"] == "out_of_focus", blurred
        said = re.fullmatch(r"the quality gate refused (\S+): out of focus: focus ([0-9.]+) \(min_focus ([0-9.]+)\)",
                            blurred["message"])
        assert said is not None and said[1] == blurred["frame_id"], blurred
        assert float(said[2]) < float(said[3]) == daemon.config.quality.min_focus
        assert daemon.analyzer.calls == SPECIMEN_SCALE_MIN_FIELDS
        assert daemon.stats.snapshot()["rejected"] == {"out_of_focus": 1}
    finally:
        daemon.request_stop("test over")
        runner.join(30)
    assert not runner.is_alive()


def test_config_errors_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    doc = station_document(tmp_path, 1883, credentials=False)
    doc["specimen"]["target_wbc_count"] = 0
    bad.write_text(to_toml(doc))
    assert run_daemon(bad, 1) == EXIT_CONFIG
    assert "specimen.target_wbc_count:" in capsys.readouterr().err

    # Valid file, but the models it names are not there: refused before anything runs.
    doc = station_document(tmp_path, free_port(), credentials=False,
                           analysis={"models_dir": str(tmp_path / "no-models")})
    bad.write_text(to_toml(doc))
    assert run_daemon(bad, 1) == EXIT_CONFIG
    assert "analysis.models_dir:" in capsys.readouterr().err

    doc = station_document(tmp_path, free_port(), credentials=True)  # no $CREDENTIALS_DIRECTORY
    bad.write_text(to_toml(doc))
    code = run_daemon(bad, 1, analyzer_factory=pool_factory(),
                      environ={"PATH": os.environ.get("PATH", "")})
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "mqtt.password_credential:" in err
    # run from a shell, as README's `smearscope run --config ...`: the shipped unit already loads the
    # credential (it said only "add LoadCredential= to the systemd unit"): how to run it as the unit would
    assert "sudo systemctl start smearscope" in err, err
    assert ("sudo systemd-run --pipe --wait -p User=smearscope -p LoadCredential=mqtt-password:"
            "/etc/smearscope/mqtt-password /opt/smearscope/venv/bin/smearscope run --config FILE") in err, err


def test_a_publisher_that_fails_to_start_after_the_workers_stops_them_first_and_exits_with_the_reason(
    tmp_path: Path, credentials_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker's TLS CA file is good when the station checks its files, and replaced by one that holds no
    certificate while the engines load (the analyzer factory, which runs between): the workers have started
    when the MQTT publisher fails on it (paho's own TLS setup). The station stops its workers, then closes
    the rest, and exits 78 naming the file; no worker is left running or writing to the closed outbox (no
    traceback). Before, the outbox was closed under the running workers and the SSL error logged with its
    traceback, exit 1."""
    ca = make_tls_material(tmp_path / "tls").ca_cert
    config = write_station(tmp_path, free_port(), mqtt={"tls": {"ca_file": str(ca)}},
                           source={"kind": "simulated", "fields": 500, "fps": 20.0, "width": 480, "height": 360,
                                   "seed": 0})

    def engines_load_while_the_ca_file_is_replaced(cfg: StationConfig) -> PoolAnalyzer:
        ca.write_text("not a certificate\n")
        return PoolAnalyzer(oracle_pool())

    caplog.set_level(logging.INFO)
    before = set(threading.enumerate())
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(
        run_daemon(config, analyzer_factory=engines_load_while_the_ca_file_is_replaced)))
    runner.start()
    runner.join(60)
    assert not runner.is_alive()
    assert result == [EXIT_CONFIG]
    err = capsys.readouterr().err
    assert f"mqtt.tls.ca_file: {ca} holds no usable CA certificate (PEM)" in err, err
    started = [t for t in threading.enumerate() if t not in before and t.name in ("capture", "analysis", "report-writer")]
    assert not started, started  # the workers were stopped, not left behind
    assert not [r for r in caplog.records if r.exc_info or "closed database" in r.getMessage()], caplog.text
    assert "stopping: start failed: mqtt.tls.ca_file" in caplog.text  # the workers' stop was asked first
    Outbox.from_config(load_config(config).mqtt.outbox).close()  # closed and its lock released


def test_notify_ready_after_warmup_status_and_watchdog(tmp_path: Path) -> None:
    """READY=1 only after the engines are warm; STATUS= lines; WATCHDOG=1 pings; STOPPING=1."""
    listener = NotifyListener(tmp_path / "notify.sock")
    warm_at: list[float] = []

    def slow_warm_factory(config: StationConfig) -> PoolAnalyzer:
        time.sleep(0.5)  # engine load and warm-up
        warm_at.append(time.monotonic())
        return PoolAnalyzer(oracle_pool())

    environ = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "200000",
               "WATCHDOG_PID": str(os.getpid())}
    config = write_station(tmp_path, free_port(), credentials=False)
    try:
        assert run_daemon(config, 4, analyzer_factory=slow_warm_factory, environ=environ) == 0
        # STOPPING=1 is the station's last datagram: once read, so are all before it
        assert wait_until(lambda: listener.lines("STOPPING=1"), 10)
    finally:
        listener.close()
    ready = listener.lines("READY=1")
    assert len(ready) == 1 and ready[0][0] >= warm_at[0]
    # the start timeout extended while the engines load, and not after (systemd/smearscope.service)
    extends = listener.lines("EXTEND_TIMEOUT_USEC=")
    assert extends and all(t <= warm_at[0] for t, _ in extends), extends
    assert extends[0][1] == "EXTEND_TIMEOUT_USEC=120000000"
    statuses = [m for _, m in listener.lines("STATUS=")]
    assert statuses[0].startswith("STATUS=starting")
    assert any("4 fields analysed" in s and "outbox" in s and "broker" in s for s in statuses)
    pings = listener.lines("WATCHDOG=1")
    assert len(pings) >= 3
    assert listener.lines("STOPPING=1")


def test_the_status_line_says_why_the_broker_is_not_connected(tmp_path: Path) -> None:
    """`systemctl status` showed "broker disconnected" (or "refused") and no reason: the operator
    had to search the journal for the one line that gave it."""
    port = free_port()  # nothing listens: the connection is refused
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_station(tmp_path, port, credentials=False, source={"kind": "folder", "path": str(inbox)})
    daemon = daemon_of(config)
    with running(daemon) as runner:
        assert wait_until(lambda: daemon.publisher is not None and daemon.publisher.state.last_error, 15)
        line = daemon.status_line()
        assert f"broker disconnected: cannot reach broker 127.0.0.1:{port}" in line and "Connection refused" in line, line
    assert not runner.is_alive()


@pytest.mark.slow
@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "models" / "seg.json").is_file(),
                    reason="models/seg.json missing: trained models not exported into models/ yet")
def test_embedded_station_with_the_real_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The embedded station as shipped: real engines from models/, loaded and warmed up."""
    environ = {"STATE_DIRECTORY": str(tmp_path / "state"),
               "SMEARSCOPE__MQTT__PORT": str(free_port()),
               "SMEARSCOPE__SOURCE__WIDTH": "640", "SMEARSCOPE__SOURCE__HEIGHT": "480"}
    assert run_daemon(None, 2, environ=environ) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("in-outbox")]
    assert sum("/field " in ln for ln in lines) == 2


def test_command_line_log_level_wins_over_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`smearscope --log-level X run`: X, not the config's log_level, at start and on reload."""
    doc = station_document(tmp_path, free_port(), credentials=False)
    doc["log_level"] = "ERROR"
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    levels_at_start: list[int] = []

    def factory(cfg: StationConfig) -> PoolAnalyzer:
        levels_at_start.append(logging.getLogger().level)
        return PoolAnalyzer(oracle_pool())

    root = logging.getLogger()
    before = root.level
    assert run_daemon(config, 1, analyzer_factory=factory, environ={}) == 0
    assert run_daemon(config, 1, analyzer_factory=factory, environ={}, log_level="debug") == 0
    assert levels_at_start == [logging.ERROR, logging.DEBUG]
    assert root.level == before
    assert run_daemon(config, 1, analyzer_factory=factory, log_level="chatty") == EXIT_CONFIG
    assert "--log-level" in capsys.readouterr().err

    daemon = StationDaemon(load_config(config, {}), config_path=config, environ={},
                           log_level_override="DEBUG")
    config.write_text(to_toml({**doc, "log_level": "WARNING"}))
    try:
        assert daemon.reload()["applied"] == ["log_level"]
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)


def test_the_final_summary_counts_evicted_messages_and_says_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """No broker, an outbox bound of 4 messages: the oldest field messages are evicted. The ledger
    must call them evicted, not delivered, and the final log line count them (issue 18, item 7)."""
    config = write_station(tmp_path, free_port(), credentials=False,
                           mqtt={"outbox": {"path": str(tmp_path / "state" / "outbox.sqlite3"),
                                            "max_messages": 4}, "publish_cells": False})
    out = io.StringIO()
    with caplog.at_level("INFO", logger="smearscope.service.station.daemon"):
        assert run_daemon(config, 6, analyzer_factory=pool_factory(), out=out) == 0
    text = out.getvalue()
    states = [ln.split()[0] for ln in text.splitlines() if "smearscope/" in ln]
    assert "delivered" not in states, text
    assert states.count("evicted") >= 2 and "in-outbox" in states, text
    assert "evicted by the outbox bound" in text
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped:")]
    assert stopped and " 0 field messages evicted" not in stopped[0], stopped


def test_the_end_of_run_ledger_reads_the_outbox_a_page_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--max-fields` prints each stored report's state from the outbox without reading it whole
    (payloads and all: up to max_bytes at exit): pages of LEDGER_PAGE messages, up to the last
    report's; a report on a later page is still seen as held, an acknowledged one as delivered."""
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.station.daemon_summary import LEDGER_PAGE, StoredReport, print_ledger

    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        seqs = [box.put("field", f"t/{i}", b"x" * 64, report_id=f"r{i}", schema_version="1")
                for i in range(2 * LEDGER_PAGE + 50)]
        box.ack(seqs[3])
    reads: list[int] = []
    real = Outbox.pending

    def counted(self: Outbox, limit: int = 100, after_seq: int = 0) -> list:
        reads.append(limit)
        return real(self, limit, after_seq)

    monkeypatch.setattr(Outbox, "pending", counted)
    mqtt = MqttConfig.model_validate({"outbox": {"path": str(path)}})
    ledger = [StoredReport("field", f"t/{i}", f"r{i}", seqs[i], None, f"f{i}", 1,
                           {"rbc": 1, "wbc": 0, "platelet": 0}) for i in (3, 10, LEDGER_PAGE + 5)]
    out = io.StringIO()
    print_ledger(ledger, mqtt, out)
    states = [ln.split()[0] for ln in out.getvalue().splitlines() if ln.split()[0] in ("delivered", "in-outbox", "evicted")]
    assert states == ["delivered", "in-outbox", "in-outbox"]
    assert reads and max(reads) <= LEDGER_PAGE and len(reads) == 2  # two pages reach seq LEDGER_PAGE + 6


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime")
def test_a_station_started_on_a_clock_before_this_release_says_so(tmp_path: Path) -> None:
    """A Jetson without a clock battery starts the station in 1970, before network time: the
    station warns in its log once it is ready, naming the clock's reading (the embedded station,
    a real process under faketime, killed once the line is seen)."""
    log = tmp_path / "station.log"
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path / "state"), "FAKETIME_DONT_FAKE_MONOTONIC": "0"}
    cli = shutil.which("smearscope") or str(Path(sys.executable).with_name("smearscope"))
    with log.open("w") as out:
        proc = subprocess.Popen(["faketime", "-f", "@1970-01-02 00:00:00", cli, "run", "--max-fields", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        said = wait_until(lambda: "the wall clock reads 1970-01-02" in log.read_text() or proc.poll() is not None, 180)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    text = log.read_text()
    assert said and "ready" in text, text[-2000:]
    assert re.search(r"WARNING smearscope\.service\.station\.daemon: the wall clock reads 1970-01-02 00:0\d UTC, "
                     r"before this release", text), text[-2000:]


def test_analyze_file_reads_only_the_configured_folders(tmp_path: Path) -> None:
    """With [commands] analyze_file_folders, a file there (or below) is analysed; one elsewhere, one
    reached through a link placed in the folder, '..' out of it, the folder itself and a path
    that names nothing are all refused path_not_allowed before the file is touched (the answer
    says nothing of what is there: no not_found, no not_an_image). Without the setting any file
    is read, as before (the other analyze_file tests)."""
    allowed, outside = tmp_path / "incoming", tmp_path / "elsewhere"
    (allowed / "slide-2").mkdir(parents=True)
    outside.mkdir()
    for seed, path in enumerate((allowed / "a.png", allowed / "slide-2" / "b.png", outside / "c.png"), start=3):
        path.write_bytes(cv2.imencode(".png", render_field(seed, width=320, height=240).frame.pixels)[1].tobytes())
    (outside / "secret.txt").write_text("not an image")
    (allowed / "link.png").symlink_to(outside / "c.png")
    (allowed / "up").symlink_to(outside)
    doc = station_document(tmp_path, free_port(), credentials=False, commands={"analyze_file_folders": [str(allowed)]})
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    daemon = daemon_of(config)
    with running(daemon) as runner:
        assert wait_until(lambda: daemon.publisher is not None and daemon.workers.threads, 15)
        answers = {p: daemon.handle_command("analyze_file", {"path": str(p)}) for p in (
            allowed / "a.png", allowed / "slide-2" / "b.png", outside / "c.png", outside / "secret.txt",
            outside / "none.png", allowed / "link.png", allowed / "up" / "c.png", allowed / ".." / "elsewhere" / "c.png",
            allowed, Path("/etc/passwd"))}
    assert not runner.is_alive()
    read = {p for p, a in answers.items() if a.get("error") != "path_not_allowed"}
    assert read == {allowed / "a.png", allowed / "slide-2" / "b.png"}, answers
    assert all(answers[p]["ok"] for p in read), {p: answers[p] for p in read}
    assert answers[allowed / "slide-2" / "b.png"]["frame_id"].startswith("file:b.png@")
    assert str(allowed) in answers[outside / "c.png"]["message"]
    with pytest.raises(ValidationError, match="not absolute: in"):
        StationConfig.model_validate({**doc, "commands": {"analyze_file_folders": ["in"]}})


@pytest.mark.parametrize("swapped", ["folder", "file"])
def test_analyze_file_does_not_follow_a_link_swapped_in_after_the_folder_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swapped: str) -> None:
    """Someone who writes in an allowed folder swaps a path component (the file's folder, or the
    file) for a link out of it just after analyze_file resolved and checked the path: the file
    opened is judged, not the path checked, so the answer is path_not_allowed and the image
    outside (a real rendered field, which would be analysed) is not."""
    allowed, outside = tmp_path / "incoming", tmp_path / "elsewhere"
    (allowed / "slide").mkdir(parents=True)
    outside.mkdir()
    for seed, path in enumerate((allowed / "slide" / "a.png", outside / "a.png"), start=3):
        path.write_bytes(cv2.imencode(".png", render_field(seed, width=320, height=240).frame.pixels)[1].tobytes())
    asked = allowed / "slide" / "a.png"
    doc = station_document(tmp_path, free_port(), credentials=False, commands={"analyze_file_folders": [str(allowed)]})
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    daemon = daemon_of(config)
    resolve, swaps = os.path.realpath, []

    def resolve_then_swap(path: Any, *args: Any, **kwargs: Any) -> Any:
        real = resolve(path, *args, **kwargs)
        if os.fspath(path) == str(asked) and not swaps:  # the check has its answer; now the swap
            moved, target = (asked.parent, outside) if swapped == "folder" else (asked, outside / "a.png")
            moved.rename(moved.with_name(moved.name + ".old"))
            moved.symlink_to(target)
            swaps.append(moved)
        return real

    with running(daemon) as runner:
        assert wait_until(lambda: daemon.publisher is not None and daemon.workers.threads, 15)
        monkeypatch.setattr(os.path, "realpath", resolve_then_swap)
        answer = daemon.handle_command("analyze_file", {"path": str(asked)})
        monkeypatch.undo()
        assert swaps and asked.resolve() == outside / "a.png"
        again = daemon.handle_command("analyze_file", {"path": str(asked)})  # the link, checked before the read
    assert not runner.is_alive()
    assert answer.get("error") == "path_not_allowed", answer
    assert str(allowed) in answer["message"] and "report_id" not in answer
    assert again.get("error") == "path_not_allowed", again


@pytest.mark.broker
def test_a_station_whose_broker_answered_is_not_said_to_have_none_when_it_loses_it(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The daemon's notice is for a broker that has not answered since the start. A connection lost
    later (the broker restarted, another client logging in under the station's client id) said
    "no MQTT broker answered at H:P (connection lost: Unspecified error)" at its first supervise
    tick 3 s or more after the start; the publisher's "MQTT connection lost" alone says it."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.0, "microns_per_pixel": 0.2}
    daemon = StationDaemon(load_config(write_station(tmp_path, broker.port, source=source)),
                           analyzer_factory=pool_factory())
    runner = threading.Thread(target=daemon.run, daemon=True)
    with caplog.at_level(logging.INFO):
        runner.start()
        try:
            assert wait_until(lambda: daemon.publisher is not None and daemon.publisher.state.connected, 30)
            broker.stop()
            assert wait_until(lambda: any("MQTT connection lost" in r.getMessage() for r in caplog.records), 15)
            # past the notice's 3 s after the start, and two supervise ticks on
            started = daemon._started_at
            assert wait_until(lambda: time.monotonic() - started > 5.0, 10)
            broker.start()
            assert wait_until(lambda: daemon.publisher is not None and daemon.publisher.state.connects == 2, 20)
        finally:
            daemon.request_stop("test over")
            runner.join(30)
    assert not runner.is_alive()
    said = [r.getMessage() for r in caplog.records if "no MQTT broker answered" in r.getMessage()]
    assert said == [], said
