"""A camera whose read() or open() never returns (a stalled GStreamer/CSI pipeline): device.camera_reads.

The capture factory is OpenCV's seam: each fake capture's read() blocks a real thread on an Event,
as a stuck driver call would. The source's clock is injected, so "past the bound" is the test moving
the clock, not the test waiting; a reconnect wait of an hour is the same clock moved an hour.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from smearscope.device.camera_reads import MAX_STUCK_THREADS
from smearscope.device.quality import QualityGate
from smearscope.device.source_config import CameraSourceConfig
from smearscope.device.sources import CameraSource
from smearscope.service.config import StationConfig
from smearscope.service.station.daemon import StationDaemon
from smearscope.service.station.notify import ProgressWatchdog, SystemdNotifier
from smearscope.service.station.requests import RequestQueue
from smearscope.service.station.specimen import SpecimenPolicy, SpecimenTracker
from smearscope.service.station.workers import StationWorkers

PIPELINE = "nvarguscamerasrc sensor-id=0 ! nvvidconv ! appsink"
LONG = 30.0  # the most a step of these tests waits for a thread before failing (never reached when it works)


class _Clock:
    def __init__(self) -> None:
        self.now, self.reads = 1000.0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class _Capture:
    """A capture whose read() blocks on `stuck` (when given) until the test lets it return."""

    def __init__(self, stuck: threading.Event | None = None) -> None:
        self.stuck, self.entered, self.released = stuck, threading.Event(), threading.Event()

    def read(self) -> tuple[bool, Any]:
        self.entered.set()
        if self.stuck is not None:
            self.stuck.wait()
            return False, None
        return True, np.random.default_rng().integers(0, 255, (48, 64, 3), np.uint8)

    def release(self) -> None:
        self.released.set()


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + LONG
    while not condition():
        assert time.monotonic() < deadline, "the condition never came"
        time.sleep(0.005)


def _station_showing(source: CameraSource, tmp_path: Path) -> StationDaemon:
    """A station daemon (not started) whose status, STATUS= line and telemetry read `source`."""
    config = StationConfig.model_validate({"station_id": "st", "source": {"kind": "camera", "device": 3},
                                           "mqtt": {"outbox": {"path": str(tmp_path / "outbox.db")}}})
    daemon = StationDaemon(config, analyzer_factory=lambda c: None, environ={})
    daemon.source = source
    return daemon


def test_a_hung_read_is_said_once_shown_and_a_new_capture_gives_frames(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    clock, release_stuck, may_open = _Clock(), threading.Event(), threading.Event()
    stuck, good = _Capture(release_stuck), _Capture()
    opens: list[int] = []

    def factory(cfg: CameraSourceConfig) -> _Capture:
        opens.append(1)
        if len(opens) == 1:
            return stuck
        may_open.wait()  # the second open waits for the test, so the state between can be read
        return good

    cfg = CameraSourceConfig(name="scope", device=PIPELINE, read_timeout_s=10.0)
    cam = CameraSource(cfg, factory, clock)
    with caplog.at_level(logging.INFO, logger="smearscope.device"):
        thread, out = _in_thread(lambda: next(cam))
        assert stuck.entered.wait(LONG)
        assert cam.state == "reading"
        clock.now += 9.0  # within the bound: a slow read, not a hang
        seen = clock.reads
        _until(lambda: clock.reads > seen + 2)  # the source has looked at the clock since
        assert len(opens) == 1 and cam.camera.hung_calls == 0
        clock.now += 2.0  # 11 s in one read() > 10 s
        _until(lambda: len(opens) == 2)
        assert cam.state == "read_hung" and cam.camera.hung_calls == 1 and cam.camera.stuck_threads == 1
        station = _station_showing(cam, tmp_path)
        status = station.status()
        assert status["source_state"] == "read_hung" and status["camera"] == {"hung_calls": 1, "stuck_threads": 1}
        assert station.status_line().startswith("CAMERA HUNG: reopening")
        assert station._telemetry()["pipeline"]["source_state"] == "read_hung"
        may_open.set()
        thread.join(LONG)
        assert not thread.is_alive()
    assert out[0].pixels.shape == (48, 64, 3) and good.entered.is_set()
    assert cam.state == "idle" and next(cam).pixels.shape == (48, 64, 3)  # frames flow again
    assert station.status()["source_state"] == "idle" and "CAMERA HUNG" not in station.status_line()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert PIPELINE in errors[0] and "read() has not returned after 11 s" in errors[0], errors
    assert not stuck.released.is_set()  # never released under a read in flight
    release_stuck.set()  # the driver call returns at last: its thread releases the capture and ends
    assert stuck.released.wait(LONG)
    _until(lambda: cam.camera.stuck_threads == 0)
    cam.close()
    assert good.released.wait(LONG)


def test_more_stuck_threads_than_the_bound_stop_the_station_for_a_restart(caplog: pytest.LogCaptureFixture) -> None:
    """Every capture hangs: each hang is counted and reopened until MAX_STUCK_THREADS are stuck, and
    the next one ends the capture thread with the station's failure (exit status 1: systemd restarts)."""
    clock, never = _Clock(), threading.Event()
    captures: list[_Capture] = []

    def factory(cfg: CameraSourceConfig) -> _Capture:
        captures.append(_Capture(never))
        return captures[-1]

    stops: list[str] = []
    workers = StationWorkers(source_kind="camera", gate=QualityGate(),
                             tracker=SpecimenTracker(SpecimenPolicy(1000, 60.0, True), station_id="st"),
                             requests=RequestQueue("t"), stop=threading.Event(), request_stop=stops.append,
                             watchdog=ProgressWatchdog(SystemdNotifier(environ={}), interval_s=0),
                             max_fields=None, scale_override=None)
    cam = CameraSource(CameraSourceConfig(name="scope", device="/dev/video0"), factory, clock)
    workers.source, workers.threads = cam, {"analysis": threading.current_thread()}
    with caplog.at_level(logging.INFO, logger="smearscope"):
        thread, _ = _in_thread(workers._capture_loop)
        for n in range(1, MAX_STUCK_THREADS + 2):
            _until(lambda n=n: len(captures) == n and captures[-1].entered.is_set())
            if n <= MAX_STUCK_THREADS:
                assert cam.camera.hung_calls == n - 1
            clock.now += 10.5
        thread.join(LONG)
        assert not thread.is_alive()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert [f"hung call {n}," in e for n, e in enumerate(errors[:-1], 1)] == [True] * MAX_STUCK_THREADS, errors
    assert "'/dev/video0'" in errors[0]
    assert stops == ["camera hung"] and workers.failures == [errors[-1]]
    assert f"{MAX_STUCK_THREADS + 1} camera threads are stuck" in errors[-1] and "Restart=" in errors[-1]
    never.set()
    assert all(c.released.wait(LONG) for c in captures)


def test_a_reconnect_wait_of_an_hour_is_never_a_hang(caplog: pytest.LogCaptureFixture) -> None:
    clock, asked = _Clock(), threading.Event()

    def absent(cfg: CameraSourceConfig) -> None:
        asked.set()

    cfg = CameraSourceConfig(name="scope", device=3, read_timeout_s=10.0, reconnect_initial_s=3600.0,
                             reconnect_max_s=3600.0)
    cam = CameraSource(cfg, absent, clock)
    with caplog.at_level(logging.INFO, logger="smearscope.device"):
        thread, out = _in_thread(lambda: next(cam, None))
        assert asked.wait(LONG)
        _until(lambda: cam.state == "reconnect_wait")
        clock.now += 3599.0
        assert cam.state == "reconnect_wait" and cam.camera.activity.until == 1000.0 + 3600.0
        cam.close()
        thread.join(LONG)
    assert out == [None] and cam.camera.hung_calls == 0 and cam.state == "closed"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("seconds", [0.5, 601.0])
def test_the_read_bound_is_strict(seconds: float) -> None:
    with pytest.raises(ValidationError, match="read_timeout_s"):
        CameraSourceConfig(read_timeout_s=seconds)


def test_a_hung_open_is_a_hung_call_too_and_what_it_opens_late_is_released(caplog: pytest.LogCaptureFixture) -> None:
    clock, open_returns, entered = _Clock(), threading.Event(), threading.Event()
    late, good = _Capture(), _Capture()
    opens: list[int] = []

    def factory(cfg: CameraSourceConfig) -> _Capture:
        opens.append(1)
        if len(opens) == 1:
            entered.set()
            open_returns.wait()  # the pipeline's open blocks
            return late
        return good

    cam = CameraSource(CameraSourceConfig(name="scope", device=PIPELINE, read_timeout_s=5.0), factory, clock)
    with caplog.at_level(logging.ERROR, logger="smearscope.device"):
        thread, out = _in_thread(lambda: next(cam))
        assert entered.wait(LONG)
        assert cam.state == "opening"
        clock.now += 6.0
        thread.join(LONG)
    assert out[0].pixels.shape == (48, 64, 3) and cam.camera.hung_calls == 1 and len(opens) == 2
    assert [r.getMessage() for r in caplog.records if "open() has not returned after 6 s" in r.getMessage()]
    open_returns.set()  # the stuck open returns a capture nobody will read: its thread releases it
    assert late.released.wait(LONG) and not late.entered.is_set()
    cam.close()
