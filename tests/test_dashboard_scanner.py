"""The run form at the microscope, used as a technician does: a USB barcode scanner types the
slide's label and Enter into whatever has the focus, at once, sometimes twice. In a real browser
(Chromium through selenium, as tests/test_dashboard.py) against a real mosquitto, a station's
account publishing the station's answers and run states (as tests/test_dashboard_runs.py); the
commands the page sends are read off the broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber
from test_dashboard import (
    _closed_run_state,
    _page_and_a_station,
    _specimen,
    _status,
    _wait,
    needs_chromium,
)

STATIONS = ("ward-r", "ward-s")


@pytest.mark.broker
@needs_chromium
def test_a_scanned_label_starts_one_run_on_the_card_in_use_and_is_answered_while_a_run_is_open(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    commands = Subscriber(ws_broker.port, "observer", MQTT_USERS["observer"], ["smearscope/+/cmd/#"])
    starts = lambda s: [json.loads(m.payload)["specimen_id"] for m in commands.messages
                        if m.topic == f"smearscope/{s}/cmd/start_run"]
    stops = lambda s: [m for m in commands.messages if m.topic == f"smearscope/{s}/cmd/stop_run"]
    try:
        commands.wait_ready()
        with _page_and_a_station(tmp_path, ws_broker, ("--run-control",)) as (driver, send, log, url):
            def answer(name: str, sent: object, body: dict) -> None:  # the station's, to the command `sent`
                topic = sent.topic.replace("/cmd/", "/cmd_response/")  # type: ignore[attr-defined]
                send(topic, json.dumps(body), retain=False, correlation=sent.correlation_data)  # type: ignore[attr-defined]

            for s in STATIONS:
                send(f"smearscope/{s}/status", "online")
            driver.get(url)
            inside = lambda s, sel: driver.find_element(By.CSS_SELECTOR, f"[data-station='{s}'] {sel}")
            state = lambda s: inside(s, ".run-control-state").text
            scan = lambda label: ActionChains(driver).send_keys(label + Keys.ENTER).perform()  # to the focus
            focused = lambda: driver.execute_script(
                "const a = document.activeElement; return a.closest('[data-station]')?.dataset.station + ' ' + a.className")
            for s in STATIONS:
                _wait(s, lambda s=s: _status(driver, s) == "online" and inside(s, ".specimen-id").is_displayed(), 20, [log])

            # two cards, the focus in neither: the label reaches no station, and the page says so
            driver.find_element(By.CSS_SELECTOR, "header h1").click()
            scan("H-0")
            note = driver.find_element(By.ID, "scan-note")
            assert note.is_displayed() and note.text.startswith("typed keys reached no station: tap the specimen field")
            assert inside("ward-r", ".specimen-id").get_attribute("value") == "" and starts("ward-r") == []
            # a label longer than the station takes is said, not cut to 64 characters and sent
            inside("ward-r", ".specimen-id").click()
            scan("L" * 70)
            assert state("ward-r").startswith("specimen id too long (70 characters)"), state("ward-r")
            assert not note.is_displayed()  # the field in use
            # 40 characters outside the BMP are 40, as the station counts them (80 UTF-16 units)
            blood = "\U0001fa78" * 40
            scan(blood)
            _wait("the start", lambda: len(starts("ward-r")) == 1, 20, [log])
            assert starts("ward-r") == [blood]
            answer("start_run", commands.messages[-1], {"ok": False, "error": "bad_arguments", "message": "refused"})
            _wait("the refusal", lambda: state("ward-r") == "refused", 20, [log])

            # scanned twice before the station answers: one start_run, the second scan replacing the first
            scan("H 2026-0412 Ü")
            scan("H 2026-0412 Ü")
            assert state("ward-r") == "still waiting for the station's answer to start a run for specimen H 2026-0412 Ü: " \
                "nothing more sent"
            assert inside("ward-r", ".specimen-id").get_attribute("value") == "H 2026-0412 Ü"
            _wait("the start", lambda: len(starts("ward-r")) == 2, 20, [log])
            time.sleep(0.5)
            assert starts("ward-r") == [blood, "H 2026-0412 Ü"]
            answer("start_run", commands.messages[-1], {"ok": True, "run_id": "3f2a9c1e-aaaa", "target_wbc": 100,
                                                        "specimen_id": "H 2026-0412 Ü"})
            _wait("the answer", lambda: state("ward-r") == "run 3f2a9c1e started for specimen H 2026-0412 Ü", 20, [log])

            # the run open: the field stays, with the focus; a label scanned now is answered, not sent
            report = _specimen("ward-r", "3f2a9c1e-aaaa", [], time.time()).model_copy(update={"specimen_id": "H 2026-0412 Ü"})
            send("smearscope/ward-r/run", json.dumps({**_closed_run_state(report), "state": "open"}))
            _wait("Stop run", lambda: inside("ward-r", ".stop-run").is_displayed(), 20, [log])
            assert inside("ward-r", ".specimen-id").is_displayed() and focused() == "ward-r specimen-id"
            scan("H 2026-0412 Ü")
            assert state("ward-r") == "run 3f2a9c1e is already running for specimen H 2026-0412 Ü"
            scan("H-2")
            assert state("ward-r") == ("run 3f2a9c1e for specimen H 2026-0412 Ü is still open: stop it (Stop run) before "
                                       "starting specimen H-2; nothing sent")
            # that run stopped elsewhere (another page): what was said of it goes; another page's run opens
            send("smearscope/ward-r/run", json.dumps(_closed_run_state(report)))
            _wait("said no more", lambda: state("ward-r") == "" and inside("ward-r", ".start-run").is_displayed(), 20, [log])
            other = _specimen("ward-r", "4b7e0d2a-bbbb", [], time.time()).model_copy(update={"specimen_id": "K-1"})
            send("smearscope/ward-r/run", json.dumps({**_closed_run_state(other), "state": "open"}))
            _wait("Stop run", lambda: inside("ward-r", ".stop-run").is_displayed(), 20, [log])
            scan("H-2")
            assert state("ward-r").startswith("run 4b7e0d2a for specimen K-1 is still open")

            # a scanner adding Tab and Enter: each scan's Tab reaches Stop run and its Enter arms it; the
            # next scan's label takes the focus back to the field, which disarms it: no stop, ever
            inside("ward-r", ".specimen-id").click()
            for _ in range(3):
                scan("H-2" + Keys.TAB)
                assert focused() == "ward-r stop-run" and inside("ward-r", ".stop-run").text == "Confirm stop"
            assert stops("ward-r") == []
            # a scan while a button has the focus goes to that card's field: its Enter presses no button
            driver.execute_script("window.print = () => { window.__printed = true; };")
            scan("H-2")
            assert focused() == "ward-r specimen-id" and state("ward-r").endswith("starting specimen H-2; nothing sent")
            assert inside("ward-r", ".stop-run").text == "Stop run"
            inside("ward-r", ".stop-run").click()  # armed: "Confirm stop"
            inside("ward-r", ".stop-run").click()
            _wait("stop_run sent", lambda: len(stops("ward-r")) == 1, 20, [log])
            assert focused() == "ward-r stop-run"
            answer("stop_run", stops("ward-r")[0], {"ok": True, "run_id": "4b7e0d2a-bbbb", "fields": 12,
                                                    "classified_wbc": 57, "target_wbc": 100, "complete": False})
            _wait("the stop's answer", lambda: state("ward-r").startswith("run 4b7e0d2a stopped"), 20, [log])
            # Stop gone: the focus is the field's, and the next slide starts before the closed state comes
            assert focused() == "ward-r specimen-id"
            scan("H-2")
            _wait("the next start", lambda: starts("ward-r")[-1:] == ["H-2"], 20, [log])
            # ... and while the list of earlier runs has it: its type-ahead no longer picks the run whose
            # specimen id the label begins with
            earlier = _closed_run_state(_specimen("ward-r", "0a1b2c3d-cccc", [], time.time() - 3600).model_copy(
                update={"specimen_id": "H-3"}))
            send("smearscope/ward-r/cmd_response/get_runs", json.dumps({"ok": True, "runs": [earlier]}), retain=False)
            _wait("the list", lambda: inside("ward-r", ".runs-pick").is_displayed(), 20, [log])
            inside("ward-r", "select.runs").click()
            inside("ward-r", "select.runs").send_keys(Keys.ESCAPE)
            assert focused() == "ward-r runs"
            scan("H-3")
            assert focused() == "ward-r specimen-id" and inside("ward-r", "select.runs").get_attribute("value") == ""
            # ... and while "Print report" has it: the label in the field, nothing printed
            driver.execute_script("document.querySelector(\"[data-station='ward-r'] .print-run\").focus()")
            scan("H-3")
            assert focused() == "ward-r specimen-id" and inside("ward-r", ".specimen-id").get_attribute("value") == "H-3"
            assert state("ward-r").startswith("still waiting for the station's answer to start a run for specimen H-2")
            # ward-s's Start button has the focus: the label goes into ward-s's field, Enter starts ward-s's run
            driver.execute_script("document.querySelector(\"[data-station='ward-s'] .start-run\").focus()")
            scan("S-9")
            _wait("ward-s's start", lambda: starts("ward-s") == ["S-9"], 20, [log])
            assert starts("ward-r")[-1:] == ["H-2"] and not driver.execute_script("return window.__printed || false")

            # the station goes away before answering: said in its card, not left waiting
            send("smearscope/ward-s/status", "offline")
            _wait("said", lambda: state("ward-s").startswith("the station went away before answering: its run line says"), 20,
                  [log])
            assert inside("ward-s", ".run-control-state").is_displayed() and not inside("ward-s", ".specimen-id").is_displayed()
    finally:
        commands.close()


@pytest.mark.broker
@needs_chromium
def test_a_card_scrolled_to_from_the_header_stops_below_it_while_the_scanners_note_is_shown(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """On a tablet (800 px wide) a scan that reaches no station puts its note in the sticky header,
    a line taller; a card then picked from the header's list (an offline station) stopped under the
    header, its name hidden: the header's height the cards stop below was measured only when the
    header's station lists changed."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ids = [f"ward-{i}" for i in range(1, 9)]
    with _page_and_a_station(tmp_path, ws_broker, ("--run-control",)) as (driver, send, log, url):
        driver.set_window_size(800, 700)
        for station in ids:
            send(f"smearscope/{station}/status", "offline" if station == "ward-4" else "online")
            send(f"smearscope/{station}/run", json.dumps(_closed_run_state(_specimen(station, "run-" + station, [],
                                                                                     time.time()))))
        driver.get(url)
        fields = lambda: [n for n in driver.find_elements(By.CSS_SELECTOR, ".specimen-id") if n.is_displayed()]
        _wait("the cards and their forms", lambda: len(fields()) == 7, 20, [log])
        height = lambda: driver.execute_script("return document.querySelector('header').offsetHeight;")
        before = height()
        driver.find_element(By.CSS_SELECTOR, "header h1").click()
        ActionChains(driver).send_keys("H-0").perform()  # the focus in no card: the note
        assert driver.find_element(By.ID, "scan-note").is_displayed() and height() > before, (before, height())
        driver.execute_async_script("requestAnimationFrame(() => requestAnimationFrame(arguments[0]));")
        driver.execute_script("[...document.getElementById('offline').querySelectorAll('button')]"
                              ".find((b) => b.textContent === 'ward-4').click();")
        rect = lambda sel: driver.execute_script("return document.querySelector(arguments[0]).getBoundingClientRect().toJSON();",
                                                 sel)
        card, header = rect("[data-station='ward-4']"), rect("header")
        assert driver.execute_script("return window.scrollY;") > 0
        assert header["bottom"] <= card["top"] < header["bottom"] + 40, (card, header)
