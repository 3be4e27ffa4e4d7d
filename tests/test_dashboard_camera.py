"""The clinic dashboard saying, on the station's card and in words, when its camera gives no frames,
in headless Chromium against a real mosquitto. The samples are a real station daemon's telemetry
(`StationDaemon._telemetry`) over a real CameraSource whose capture hangs, is gone, or opens slowly
(tests/test_camera_hang.py's fake captures: threads blocked on Events, the clock injected)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from broker import MosquittoBroker
from test_camera_hang import LONG, PIPELINE, _Capture, _Clock, _in_thread, _station_showing, _until
from test_dashboard import (
    _local,
    _open_with_station_online,
    _page_and_a_station,
    _status,
    _wait,
    needs_chromium,
)
from test_dashboard_tablet import CONTRAST_JS

from smearscope.device.source_config import CameraSourceConfig
from smearscope.device.sources import CameraSource


def _telemetry(cam: CameraSource, folder: Path) -> str:
    """What a station whose source is `cam` publishes on its telemetry topic now."""
    folder.mkdir()
    return json.dumps(_station_showing(cam, folder)._telemetry())


@pytest.mark.broker
@needs_chromium
def test_a_camera_giving_no_frames_is_said_beside_the_stations_status(
    tmp_path: Path, ws_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A station's camera that hung (the station waiting to reconnect it), one that is not there,
    and one opening were lines among 20 in the telemetry list, `pipeline.source_state` and
    `pipeline.camera_recovering`: a technician glancing at the card saw "online" and nothing else.
    The card now says "camera: hung, waiting to reconnect" (red), "camera: reconnecting",
    "camera: opening" (amber) beside the status, the hang's count and time while no frame came since,
    and the header names the station; a camera giving frames says nothing. A station gone offline
    keeps its last sample's word, said as the last sample's."""
    from selenium.webdriver.common.by import By

    zone = "Europe/Berlin"
    monkeypatch.setenv("TZ", zone)
    # 1. a read hung past read_timeout_s, then the camera was gone: the station waits to reconnect
    clock, never = _Clock(), threading.Event()
    stuck = _Capture(never)
    opens: list[int] = []

    def gone(cfg: CameraSourceConfig) -> _Capture | None:
        opens.append(1)
        return stuck if len(opens) == 1 else None  # the camera is gone after the hang

    hung_cam = CameraSource(CameraSourceConfig(name="scope", device=PIPELINE, read_timeout_s=10.0,
                                               reconnect_initial_s=3600.0, reconnect_max_s=3600.0), gone, clock)
    hung_thread, _ = _in_thread(lambda: next(hung_cam, None))
    assert stuck.entered.wait(LONG)
    clock.now += 11.0
    _until(lambda: hung_cam.state == "reconnect_wait")
    hung = _telemetry(hung_cam, tmp_path / "hung")
    hang_at = hung_cam.camera.last_hang_at
    assert hang_at is not None
    # 2. a camera not there from the start: waiting to reconnect, no hang
    absent_cam = CameraSource(CameraSourceConfig(name="scope", device=2, reconnect_initial_s=3600.0,
                                                 reconnect_max_s=3600.0), lambda cfg: None,
                              _Clock())
    absent_thread, _ = _in_thread(lambda: next(absent_cam, None))
    _until(lambda: absent_cam.state == "reconnect_wait")
    absent = _telemetry(absent_cam, tmp_path / "absent")
    # 3. a camera opening (its open not returned yet, within the bound)
    may_open, good = threading.Event(), _Capture()

    def slow(cfg: CameraSourceConfig) -> _Capture:
        may_open.wait()  # the open returns when the test lets it
        return good

    slow_cam = CameraSource(CameraSourceConfig(name="scope", device=0), slow, _Clock())
    slow_thread, frames = _in_thread(lambda: next(slow_cam))
    _until(lambda: slow_cam.state == "opening")
    opening = _telemetry(slow_cam, tmp_path / "opening")
    # 4. the same camera giving frames
    may_open.set()
    slow_thread.join(LONG)
    assert frames[0].pixels.shape == (48, 64, 3) and slow_cam.state == "idle"
    reading = _telemetry(slow_cam, tmp_path / "reading")
    for cam, thread in ((hung_cam, hung_thread), (absent_cam, absent_thread), (slow_cam, None)):
        cam.close()
        if thread is not None:
            thread.join(LONG)
    never.set()

    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_station_online(driver, send, log, url, "scope-1")
        card = "[data-station='scope-1']"
        badge = lambda: driver.find_element(By.CSS_SELECTOR, f"{card} .badge.camera")
        line = lambda: driver.find_element(By.CSS_SELECTOR, f"{card} .camera-hang")
        header = lambda: driver.find_element(By.ID, "camera")

        send("smearscope/scope-1/telemetry", hung, retain=False)
        _wait("the hang said", lambda: badge().get_attribute("data-camera") == "hung", 20, [log])
        assert badge().is_displayed() and badge().text == "camera: hung, waiting to reconnect"
        assert line().is_displayed()
        assert line().text == (f"camera hung 1 time, last {_local(hang_at, zone)}; 1 thread still stuck in the "
                               "driver (the station restarts itself at 4)"), line().text
        assert header().is_displayed() and header().text == "camera not giving frames: scope-1"
        assert badge().value_of_css_property("background-color") == "rgba(163, 21, 21, 1)"  # the offline badge's red
        # said in words at AA contrast, beside the status it sits next to
        texts = {t: (ratio, need) for t, ratio, need in driver.execute_script(CONTRAST_JS)}
        for said in ("camera: hung, waiting to reconnect", "camera hung 1 time, last"):
            ratio, need = next(v for t, v in texts.items() if t.startswith(said))
            assert ratio >= need, (said, ratio)

        send("smearscope/scope-1/telemetry", absent, retain=False)
        _wait("reconnecting", lambda: badge().text == "camera: reconnecting", 20, [log])
        assert badge().get_attribute("data-camera") == "reconnect_wait" and not line().is_displayed()
        assert badge().value_of_css_property("background-color") == "rgba(138, 109, 0, 1)"  # amber, as "unknown"
        assert header().is_displayed()
        send("smearscope/scope-1/telemetry", opening, retain=False)
        _wait("opening", lambda: badge().text == "camera: opening", 20, [log])
        send("smearscope/scope-1/telemetry", reading, retain=False)
        _wait("frames again", lambda: badge().get_attribute("data-camera") == "none", 20, [log])
        assert not badge().is_displayed() and not line().is_displayed() and not header().is_displayed()

        send("smearscope/scope-1/telemetry", hung, retain=False)
        _wait("the hang again", lambda: badge().get_attribute("data-camera") == "hung", 20, [log])
        send("smearscope/scope-1/status", "offline")
        _wait("offline", lambda: _status(driver, "scope-1") == "offline", 20, [log])
        # the last sample's word, not the camera's now; the header lists the station as offline instead
        assert badge().text == "camera: hung, waiting to reconnect (last sample)"
        assert not header().is_displayed()
