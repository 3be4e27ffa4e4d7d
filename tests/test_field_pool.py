"""Fields analysed side by side come back in capture order; the daemon keeps its order with them."""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
from test_daemon import oracle_pool, station_document, to_toml

from smearscope.device.frame import Frame
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.config import load_config
from smearscope.service.station.daemon import StationDaemon
from smearscope.service.station.field_pool import FieldPool


def test_results_come_back_in_submission_order_whatever_finishes_first() -> None:
    gates = {k: threading.Event() for k in range(3)}

    def analyze(k: int) -> int:
        assert gates[k].wait(30)
        if k == 1:
            raise ValueError("field 1 is bad")
        return k * 10

    pool: FieldPool[int, int] = FieldPool(analyze, 3)
    for k in range(3):
        pool.submit(k)
    assert not pool.has_room()
    gates[2].set()
    gates[1].set()
    assert pool.next_done(timeout=0.2) is None  # field 0 is still running: nothing handed back
    gates[0].set()
    done = [pool.next_done(timeout=30) for _ in range(3)]
    assert [d.work for d in done if d] == [0, 1, 2]
    assert done[0].result == 0 and done[2].result == 20
    assert isinstance(done[1].error, ValueError) and done[1].result is None
    assert pool.pending == 0 and pool.has_room() and pool.active() == 0
    pool.close()


def _number(frame_id: str) -> int:
    """The replayed field's number (its frame ids end in the file's name, f<number>.png)."""
    match = re.search(r"f(\d+)\.png$", frame_id)
    assert match, frame_id
    return int(match.group(1))


class _StaggeredAnalyzer:
    """Thread-safe Analyzer-like: every other field takes longer, so later fields finish first;
    it records how many analyses ran at once and joins `batch_across_fields` like the real one."""

    def __init__(self) -> None:
        self.pool = oracle_pool()
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.shared_with: Any = None

    def batch_across_fields(self, peers: Any, max_delay_s: float) -> None:
        self.shared_with = (peers, max_delay_s)

    def analyze(self, frame: Frame, run_id: str | None = None, specimen_scale: float | None = None,
                check_calibration: bool = False) -> FieldResult:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        index = _number(frame.frame_id)
        time.sleep(0.15 if index % 2 == 0 else 0.01)
        with self.lock:
            self.running -= 1
        base = self.pool[index % len(self.pool)]
        assert base.report.source is not None
        report = base.report.model_copy(update={
            "report_id": str(uuid.uuid4()), "run_id": run_id,
            "source": base.report.source.model_copy(update={"frame_id": frame.frame_id})})
        return FieldResult(report, base.cells, base.input_to_canonical)


def test_daemon_with_two_fields_at_once_stores_reports_in_capture_order(tmp_path: Path) -> None:
    recording = tmp_path / "recording"
    recording.mkdir()
    for k in range(8):
        frame = render_field(700 + k, width=320, height=240).frame
        assert cv2.imwrite(str(recording / f"f{k:02d}.png"), frame.pixels)
    doc = station_document(tmp_path, 1, credentials=False,
                           analysis={"concurrent_fields": 2, "batch_delay_ms": 2.0},
                           source={"kind": "replay", "path": str(recording), "fps": 0.0})
    config = tmp_path / "station.toml"
    config.write_text(to_toml(doc))
    analyzer = _StaggeredAnalyzer()
    daemon = StationDaemon(load_config(config, {}), analyzer_factory=lambda cfg: analyzer,
                           max_fields=8, environ={})
    assert daemon.run() == 0
    fields = [r for r in daemon.ledger if r.kind == "field"]
    assert len(fields) == 8
    captured = [fid for fid, outcome, _ in daemon.outcomes if outcome == "analysed"]
    assert [r.field_id for r in fields] == captured  # stored in the order they were captured
    assert sorted(captured, key=_number) == captured
    assert analyzer.most_at_once == 2
    peers, delay = analyzer.shared_with
    assert delay == 0.002 and peers() == -1  # nothing in flight after the run
    reports = [r for r in daemon.ledger if r.kind == "report"]
    assert sum(r.fields_analyzed or 0 for r in reports) == 8  # every field in exactly one run
