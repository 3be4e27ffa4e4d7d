"""Two dashboards (`smearscope dashboard` twice, and a page opened twice) on one broker: each page
logs in under a client id of its own, so none throws another off the broker (docs/MQTT.md "Client
ids"). Headless Chromium against a real mosquitto, as tests/test_dashboard.py drives it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from broker import MQTT_USERS, MosquittoBroker, free_port, wait_for_port, wait_until
from test_dashboard import CHROMEDRIVER, _chromium_options, _Proc, needs_chromium

pytestmark = [pytest.mark.broker, needs_chromium]

#: What mosquitto logs when a client logs in with the id of a connected one.
TAKEN_OVER = "already connected, closing old connection"


def test_two_dashboards_and_two_tabs_on_one_broker_keep_their_connections(
        tmp_path: Path, ws_broker: MosquittoBroker) -> None:
    """Two dashboard servers on one broker and one of them open in two tabs: three pages, three
    client ids (`smearscope-dashboard-` and 8 hex digits each), all connected, and the broker closes
    none of them for another's login in the seconds watched."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    password_file = tmp_path / "dashboard-password"
    password_file.write_text(MQTT_USERS["observer"] + "\n")
    ports = [free_port(), free_port()]
    dashboards = [_Proc([sys.executable, "-m", "smearscope", "dashboard", "--port", str(port), "--broker",
                         f"ws://127.0.0.1:{ws_broker.ws_port}", "--username", "observer", "--password-file",
                         str(password_file)], tmp_path / f"dashboard-{port}.log") for port in ports]
    driver = None
    try:
        for port, dashboard in zip(ports, dashboards, strict=True):
            wait_for_port(port, 20, dashboard.proc)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=_chromium_options(tmp_path))
        tabs = []
        for port in (ports[0], ports[1], ports[0]):
            if tabs:
                driver.switch_to.new_window("tab")
            driver.get(f"http://127.0.0.1:{port}/")
            tabs.append(driver.current_window_handle)

        def page(tab: str, script: str) -> object:
            driver.switch_to.window(tab)
            return driver.execute_script(script)

        state = "return document.getElementById('broker').dataset.state"
        assert wait_until(lambda: all(page(t, state) == "connected" for t in tabs), 30), [page(t, state) for t in tabs]
        ids = [page(t, "return client.options.clientId") for t in tabs]
        assert len(set(ids)) == 3 and all(
            isinstance(i, str) and i.startswith("smearscope-dashboard-") and len(i) == 29 for i in ids), ids
        log = ws_broker.log_path
        assert not wait_until(lambda: TAKEN_OVER in log.read_text(), 5), log.read_text()[-2000:]
        assert all(page(t, state) == "connected" for t in tabs)
        assert all(log.read_text().count(f" as {i} ") == 1 for i in ids), log.read_text()[-3000:]  # one login each
    finally:
        if driver is not None:
            driver.quit()
        for dashboard in dashboards:
            dashboard.stop()
