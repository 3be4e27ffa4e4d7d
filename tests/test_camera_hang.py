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

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from smearscope.device import sources
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
    assert cam.camera.last_hang_at is None and not cam.camera.recovering
    before = time.time()
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
        # the state says what the camera does now (opening again); the hang stays in `camera`
        assert cam.state == "opening" and cam.camera.hung_calls == 1 and cam.camera.stuck_threads == 1
        assert cam.camera.recovering and before <= cam.camera.last_hang_at <= time.time()
        station = _station_showing(cam, tmp_path)
        status = station.status()
        hang = {"hung_calls": 1, "stuck_threads": 1, "last_hang_at": cam.camera.last_hang_at, "recovering": True}
        assert status["source_state"] == "opening" and status["camera"] == hang
        assert station.status_line().startswith("CAMERA HUNG (no frame since): opening")
        pipeline = station._telemetry()["pipeline"]
        assert pipeline["source_state"] == "opening"
        assert {k: pipeline[f"camera_{k}"] for k in hang} == hang
        may_open.set()
        thread.join(LONG)
        assert not thread.is_alive()
    assert out[0].pixels.shape == (48, 64, 3) and good.entered.is_set()
    assert cam.state == "idle" and next(cam).pixels.shape == (48, 64, 3)  # frames flow again
    status = station.status()
    assert status["source_state"] == "idle" and "CAMERA HUNG" not in station.status_line()
    assert status["camera"] == {**hang, "recovering": False}  # the hang stays counted, with its time
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


def test_after_a_hang_a_camera_that_is_gone_is_waited_for_with_backoff_and_the_state_says_so(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A hung read, then the camera is gone (the reopen finds nothing): the source backs off
    (state 'reconnect_wait', one failure, said) instead of opening again at once, over and over;
    the hang stays visible as `camera.recovering` until a frame comes."""
    clock, never = _Clock(), threading.Event()
    stuck = _Capture(never)
    opens: list[int] = []

    def factory(cfg: CameraSourceConfig) -> _Capture | None:
        opens.append(1)
        return stuck if len(opens) == 1 else None  # the camera is gone after the hang

    cfg = CameraSourceConfig(name="scope", device=PIPELINE, read_timeout_s=10.0, reconnect_initial_s=3600.0,
                             reconnect_max_s=3600.0)
    cam = CameraSource(cfg, factory, clock)
    with caplog.at_level(logging.INFO, logger="smearscope.device"):
        thread, out = _in_thread(lambda: next(cam, None))
        assert stuck.entered.wait(LONG)
        clock.now += 11.0
        _until(lambda: cam.state == "reconnect_wait")
        assert len(opens) == 2 and cam.failures == 1 and cam.camera.hung_calls == 1
        assert cam.camera.recovering and cam.camera.activity.until == clock.now + 3600.0
        station = _station_showing(cam, tmp_path)
        assert station.status()["source_state"] == "reconnect_wait"
        assert station.status_line().startswith("CAMERA HUNG (no frame since): reconnect_wait")
        cam.close()
        thread.join(LONG)
    assert out == [None] and len(opens) == 2
    assert [r.getMessage() for r in caplog.records if "did not open; retry 1 in 3600.0 s" in r.getMessage()]
    never.set()
    assert stuck.released.wait(LONG)


@pytest.mark.parametrize(("read_timeout_s", "ffmpeg_ms"), [(10.0, 8000), (1.0, 800), (600.0, 480_000)])
def test_an_rtsp_camera_is_opened_with_ffmpeg_timeouts_under_the_read_bound(
        monkeypatch: pytest.MonkeyPatch, read_timeout_s: float, ffmpeg_ms: int) -> None:
    """FFmpeg's own open/read timeouts come from read_timeout_s, a fifth under it, so a dead RTSP stream
    is FFmpeg's clean error (a reconnect) first and the hang guard only the backstop. OpenCV's seam:
    cv2.VideoCapture is replaced by a recorder (no RTSP server here to stall for real)."""
    calls: list[tuple[Any, ...]] = []

    class _Recorder:
        def __init__(self, *args: Any) -> None:
            calls.append(args)

        def isOpened(self) -> bool:
            return True

    monkeypatch.setattr(sources.cv2, "VideoCapture", _Recorder)
    url = "rtsp://10.0.0.7:554/scope"
    assert isinstance(sources._open_capture(CameraSourceConfig(device=url, read_timeout_s=read_timeout_s)), _Recorder)
    assert calls == [(url, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ffmpeg_ms,
                                             cv2.CAP_PROP_READ_TIMEOUT_MSEC, ffmpeg_ms])]
    calls.clear()
    sources._open_capture(CameraSourceConfig(device=PIPELINE, read_timeout_s=read_timeout_s))
    assert calls == [(PIPELINE, cv2.CAP_GSTREAMER)]  # other backends have no such timeouts


class _Frames(_Capture):
    """A capture that gives `good` frames, then (with `stuck`) blocks in read() as a stalled driver,
    or (without) fails its read as a camera that dropped out."""

    def __init__(self, good: int, stuck: threading.Event | None = None) -> None:
        super().__init__(stuck)
        self.good = good

    def read(self) -> tuple[bool, Any]:
        if self.good:
            self.good -= 1
            return True, np.random.default_rng().integers(0, 255, (48, 64, 3), np.uint8)
        return super().read() if self.stuck is not None else (False, None)


def test_a_hung_read_breaks_the_row_of_good_frames_that_says_a_camera_back(caplog: pytest.LogCaptureFixture) -> None:
    """A camera counts as back after STABLE_FRAMES good frames in a row: one that dropped out, then
    gives 20 frames, hangs and gives 10 more has not given 25 in a row (it was said back, its backoff
    reset, while it kept hanging); 25 after the hang are."""
    from smearscope.device.sources import STABLE_FRAMES

    clock, stuck = _Clock(), threading.Event()
    captures = iter([_Frames(0), _Frames(20, stuck=stuck), _Frames(STABLE_FRAMES + 5)])
    cfg = CameraSourceConfig(name="scope", device=PIPELINE, read_timeout_s=10.0, reconnect_initial_s=0.001,
                             reconnect_max_s=0.002)
    cam = CameraSource(cfg, lambda c: next(captures), clock)
    with caplog.at_level(logging.INFO, logger="smearscope.device"):
        before = [next(cam) for _ in range(20)]  # the first capture's read failed: one failure
        assert cam.failures == 1
        thread, out = _in_thread(lambda: next(cam))
        _until(lambda: cam.state == "reading" and cam.camera.capture is not None and cam.camera.capture.good == 0)
        clock.now += 11.0  # the second capture's read() hangs past the bound
        thread.join(LONG)
        assert not thread.is_alive() and cam.camera.hung_calls == 1
        after = [out[0]] + [next(cam) for _ in range(STABLE_FRAMES - 2)]  # 24 in a row since the hang
        assert cam.failures == 1
        assert not [r for r in caplog.records if "camera back" in r.getMessage()]
        after.append(next(cam))  # the 25th
        assert cam.failures == 0
    assert [r.getMessage() for r in caplog.records if "camera back" in r.getMessage()] == [
        "scope: camera back after 1 failures"]
    assert len(before) + len(after) == 20 + STABLE_FRAMES
    stuck.set()  # the stuck driver call returns: its thread ends
    _until(lambda: cam.camera.stuck_threads == 0)
    cam.close()
