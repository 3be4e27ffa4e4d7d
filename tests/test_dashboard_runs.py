"""A run started for a specimen, and stopped, from the clinic dashboard in a real browser (Chromium
through selenium, as tests/test_dashboard.py), against a real mosquitto: the command the page
sends, what it says of the station's answer, of a station offline, and of a broker whose ACL
refuses the dashboard's account the command. The form is there only with `smearscope dashboard
--run-control` (tests/test_dashboard_print.py checks a dashboard served without it shows none)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber
from test_dashboard import (
    _closed_run_state,
    _open_with_station_online,
    _page_and_a_station,
    _specimen,
    _status,
    _wait,
    needs_chromium,
)

STATION = "ward-r"
BASE = f"smearscope/{STATION}"


def _answer(send, name: str, body: dict, correlation: bytes | None) -> None:
    send(f"{BASE}/cmd_response/{name}", json.dumps(body), retain=False, correlation=correlation)


def _scanned(inside: Callable[[str], Any], sent: Callable[[str], list], log: Path, specimen_id: str,
             nth: int) -> bytes | None:
    """Types `specimen_id` into the run form as a barcode scanner does (Enter at its end), waits until
    the page has published `nth` start_run commands and returns the last one's correlation data."""
    from selenium.webdriver.common.keys import Keys

    inside(".specimen-id").send_keys(specimen_id, Keys.ENTER)
    _wait("start_run sent", lambda: len(sent("start_run")) == nth, 20, [log])
    return sent("start_run")[-1].correlation_data


def _stop_confirmed(inside: Callable[[str], Any], sent: Callable[[str], list], log: Path, nth: int) -> bytes | None:
    """Clicks Stop run and then Confirm stop, waits until the page has published `nth` stop_run
    commands and returns the last one's correlation data."""
    inside(".stop-run").click()
    inside(".stop-run").click()
    _wait("stop_run sent", lambda: len(sent("stop_run")) == nth, 20, [log])
    return sent("stop_run")[-1].correlation_data


def _started_and_stopped(inside: Callable[[str], Any], send: Callable[..., None], sent: Callable[[str], list],
                         log: Path, specimen_id: str, run_id: str, starts: int, stops: int) -> bytes | None:
    """A run started from the form for `specimen_id` (the page's `starts`th start_run, answered ok as `run_id`,
    target 100 WBC) and stopped with Stop run and Confirm stop (its `stops`th stop_run, left unanswered):
    returns the stop_run's correlation data."""
    _answer(send, "start_run", {"ok": True, "run_id": run_id, "target_wbc": 100, "specimen_id": specimen_id},
            _scanned(inside, sent, log, specimen_id, starts))
    _wait("Stop run", lambda: inside(".stop-run").is_displayed(), 20, [log])
    return _stop_confirmed(inside, sent, log, stops)


def _verify_answered(driver: Any, send: Callable[..., None], log: Path, inside: Callable[[str], Any],
                     sent: Callable[[str], list], run_id: str, **answer: Any) -> None:
    """Waits for Verify on the card's closed run `run_id`, signs it as AB, waits for the one verify_run the page
    publishes and answers it ok (report r2 superseding r1, no cell typed) with `answer` besides."""
    _wait("the run's Verify", lambda: driver.execute_script(
        "const n = document.querySelector(arguments[0]); return n !== null && !n.hidden;",
        f"[data-station='{STATION}'] .verify"), 20, [log])
    inside(".verify-by").send_keys("AB")
    inside(".verify-run").click()
    _wait("verify_run sent", lambda: len(sent("verify_run")) == 1, 20, [log])
    _answer(send, "verify_run", {"ok": True, "run_id": run_id, "report_id": "r2", "supersedes": "r1", "typed_cells": 0,
                                 "reclassified": 0, "left_to_review": 0, **answer}, sent("verify_run")[0].correlation_data)


@contextlib.contextmanager
def _run_control_page(tmp_path: Path, broker: MosquittoBroker, status: str = "online",
                      dashboard_args: tuple[str, ...] = ("--run-control",),
                      ) -> Iterator[tuple[Any, Callable[..., None], Path, str, Callable[[str], Any],
                                          Callable[[str], list]]]:
    """The dashboard (`dashboard_args`, run control by default) open on STATION with `status`
    (retained) shown on its card, and the commands the page publishes on the station's cmd/#
    watched. Yields the driver, send, the dashboard's log, the page's address (as
    _page_and_a_station), inside(selector) (an element of STATION's card) and sent(name) (the
    `name` commands published so far)."""
    from selenium.webdriver.common.by import By

    commands = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/cmd/#"])
    sent = lambda name: [m for m in commands.messages if m.topic == f"{BASE}/cmd/{name}"]
    try:
        commands.wait_ready()
        with _page_and_a_station(tmp_path, broker, dashboard_args) as (driver, send, log, url):
            inside = lambda sel: driver.find_element(By.CSS_SELECTOR, f"[data-station='{STATION}'] {sel}")
            if status == "online":
                _open_with_station_online(driver, send, log, url, STATION)
            else:
                send(f"{BASE}/status", status)
                driver.get(url)
                _wait(f"the {status} station", lambda: _status(driver, STATION) == status, 20, [log])
            yield driver, send, log, url, inside, sent
    finally:
        commands.close()


@pytest.mark.broker
@needs_chromium
def test_a_run_is_started_for_the_specimen_typed_and_stopped_with_a_confirming_second_click(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    from selenium.webdriver.common.keys import Keys

    with _run_control_page(tmp_path, ws_broker, status="offline") as (_driver, send, log, _url, inside, sent):
        # a command now would be lost: no field or button, the reason said
        assert not inside(".specimen-id").is_displayed() and not inside(".start-run").is_displayed()
        assert inside(".run-control-state").text == ("the station is offline: runs are started and stopped when "
                                                     "it is back online")
        send(f"{BASE}/status", "online")
        _wait("the form", lambda: inside(".specimen-id").is_displayed(), 20, [log])
        assert inside(".run-control-state").text == ""
        assert inside(".start-run").is_displayed() and not inside(".stop-run").is_displayed()
        state = lambda: inside(".run-control-state")
        inside(".start-run").click()  # no id typed: nothing sent
        assert state().get_attribute("data-state") == "error" and state().text.startswith("specimen id needed")
        _scanned(inside, sent, log, "  H-2026-0412 ", 1)
        (start,) = sent("start_run")
        assert json.loads(start.payload) == {"specimen_id": "H-2026-0412"} and state().text == "start a run…"
        assert (start.correlation_data or b"").startswith(b"dashboard-")
        _answer(send, "start_run", {"ok": False, "error": "run_open", "message": "other page's run"}, b"other")
        time.sleep(0.5)  # another page's answer changes nothing here
        assert state().text == "start a run…"
        _answer(send, "start_run", {"ok": True, "run_id": "3f2a9c1e-aaaa", "target_wbc": 100,
                                        "specimen_id": "H-2026-0412"}, start.correlation_data)
        _wait("the answer", lambda: state().get_attribute("data-state") == "saved", 20, [log])
        assert state().text == "run 3f2a9c1e started for specimen H-2026-0412"
        assert inside(".specimen-id").get_attribute("value") == ""
        # no run state until the run's first field: Stop at once all the same (a wrong specimen
        # scanned is stopped before any field joins its run)
        _wait("Stop run before any field", lambda: inside(".stop-run").is_displayed(), 5, [log])
        assert not inside(".start-run").is_displayed()
        inside(".specimen-id").send_keys("H-9", Keys.ENTER)  # the next slide's label, too soon: said, not sent
        assert state().text == ("run 3f2a9c1e for specimen H-2026-0412 is still open: stop it (Stop run) before "
                                "starting specimen H-9; nothing sent")
        inside(".specimen-id").clear()
        # the station away and back (a restart takes a run with no field with it): Start again
        send(f"{BASE}/status", "offline")
        send(f"{BASE}/status", "online")
        _wait("Start after the station came back", lambda: inside(".start-run").is_displayed(), 20, [log])
        assert not inside(".stop-run").is_displayed()
        # the run open (its state): Stop instead of Start; the first click only asks
        report = _specimen(STATION, "3f2a9c1e-aaaa", [], time.time()).model_copy(update={"specimen_id": "H-2026-0412"})
        send(f"{BASE}/run", json.dumps({**_closed_run_state(report), "state": "open"}))
        _wait("Stop run", lambda: inside(".stop-run").is_displayed(), 20, [log])
        assert not inside(".start-run").is_displayed() and inside(".specimen-id").is_displayed()
        inside(".stop-run").click()
        assert inside(".stop-run").text == "Confirm stop"
        time.sleep(0.5)
        assert sent("stop_run") == []
        inside(".stop-run").click()
        _wait("stop_run sent", lambda: len(sent("stop_run")) == 1, 20, [log])
        assert inside(".stop-run").text == "Stop run"
        _answer(send, "stop_run", {"ok": True, "run_id": "3f2a9c1e-aaaa", "fields": 12, "classified_wbc": 57,
                                       "target_wbc": 100, "complete": False, "report_id": "r"},
                sent("stop_run")[0].correlation_data)
        _wait("the stop's answer", lambda: state().text == "run 3f2a9c1e stopped: 12 fields, 57 of 100 WBC", 20, [log])
        send(f"{BASE}/run", json.dumps(_closed_run_state(report)))
        _wait("Start again", lambda: inside(".start-run").is_displayed(), 20, [log])
        # a station that does not answer: said after 15 s, not waited for
        inside(".specimen-id").send_keys("H-2", Keys.ENTER)
        _wait("no answer said", lambda: state().text == "no answer from the station", 25, [log])
        # a run open that this page has not seen (started elsewhere, no field yet): the refusal offers Stop
        _answer(send, "start_run", {"ok": False, "error": "run_open", "message": "run 9 is open; stop it first"},
                _scanned(inside, sent, log, "H-3", 3))
        _wait("Stop run offered", lambda: inside(".stop-run").is_displayed(), 20, [log])
        assert state().text == "run 9 is open; stop it first" and not inside(".start-run").is_displayed()
        _answer(send, "stop_run", {"ok": False, "error": "no_run_open", "message": "no specimen run is open"},
                _stop_confirmed(inside, sent, log, 2))
        _wait("Start again", lambda: inside(".start-run").is_displayed(), 20, [log])
        assert not inside(".stop-run").is_displayed()
        # told a run is open, then its states come: it closes (its target reached), Start again
        inside(".specimen-id").clear()
        _answer(send, "start_run", {"ok": False, "error": "run_open", "message": "run 9 is open; stop it first"},
                _scanned(inside, sent, log, "H-4", 4))
        _wait("Stop run offered", lambda: inside(".stop-run").is_displayed(), 20, [log])
        other = _specimen(STATION, "run-9", [], time.time())
        send(f"{BASE}/run", json.dumps({**_closed_run_state(other), "state": "open"}))
        send(f"{BASE}/run", json.dumps(_closed_run_state(other)))
        _wait("Start once that run closed", lambda: inside(".start-run").is_displayed(), 20, [log])
        assert not inside(".stop-run").is_displayed()
        # a stop whose end the station could not keep (a full disk): its answer's message said in red
        inside(".specimen-id").clear()
        stop = _started_and_stopped(inside, send, sent, log, "H-5", "5e5e5e5e-bbbb", starts=5, stops=3)
        told = ("the run's end could not be kept in the outbox file (see the station's log): its report is sent "
                "under r5 unless the station stops before storing it; a start after that reports the run under "
                "another id")
        _answer(send, "stop_run", {"ok": True, "run_id": "5e5e5e5e-bbbb", "fields": 1, "classified_wbc": 3,
                                       "target_wbc": 100, "complete": False, "report_id": "r5", "message": told},
                stop)
        _wait("the stop's answer", lambda: state().text.startswith("run 5e5e5e5e stopped"), 20, [log])
        assert state().text == "run 5e5e5e5e stopped: 1 field, 3 of 100 WBC — " + told
        assert state().get_attribute("data-state") == "held"


@pytest.mark.broker
@needs_chromium
def test_a_broker_whose_acl_refuses_the_dashboard_start_run_is_said_on_the_page(
        tmp_path: Path, broker_with: Callable[..., MosquittoBroker]) -> None:
    """The dashboard's account may lack start_run (a dashboard that only shows): mosquitto answers
    the MQTT 5 publish "not authorised", and the page says so at once rather than wait for an
    answer that cannot come."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    acl = ("user station\ntopic readwrite smearscope/#\n\n"
           "user observer\ntopic read smearscope/#\ntopic write smearscope/+/cmd/get_runs\n"
           "topic write smearscope/+/cmd/get_review\n")
    broker = broker_with(websockets=True, acl=acl)
    with _page_and_a_station(tmp_path, broker, ("--run-control",)) as (driver, send, log, url):
        _open_with_station_online(driver, send, log, url, STATION)
        inside = lambda sel: driver.find_element(By.CSS_SELECTOR, f"[data-station='{STATION}'] {sel}")
        assert inside(".run-control").is_displayed()
        inside(".specimen-id").send_keys("H-2026-0412", Keys.ENTER)
        state = lambda: inside(".run-control-state")
        _wait("the refusal", lambda: state().get_attribute("data-state") == "error", 10, [log])
        assert state().text.startswith("the broker refused the command (") and state().text.endswith(
            "this dashboard's account may not start a run"), state().text


@pytest.mark.broker
@needs_chromium
def test_each_line_of_the_run_form_goes_once_the_run_it_speaks_of_is_no_longer_the_cards(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """What the form says of a run is the truth now. "run X started" goes when that run closes,
    also when its closed state came before the station's answer (a target of a few cells reached on
    the first field: the line stayed beside the closed run until the next start); "run X stopped:
    2 fields, 0 of 3 WBC" stays beside that run's closed state and goes when another run is the
    card's (it stayed until the next start from this page, beside a run started elsewhere)."""
    from selenium.webdriver.common.by import By

    def run(run_id: str, specimen_id: str, state: str, fields: int = 2) -> str:
        report = _specimen(STATION, run_id, [], time.time()).model_copy(
            update={"specimen_id": specimen_id, "fields_analyzed": fields})
        return json.dumps({**_closed_run_state(report), "state": state})

    with _run_control_page(tmp_path, ws_broker) as (driver, send, log, _url, inside, sent):
        line = lambda: inside(".run-control-state").text
        card = lambda attribute: driver.find_element(By.CSS_SELECTOR, f"[data-station='{STATION}']").get_attribute(
            attribute)
        _wait("the form", lambda: inside(".specimen-id").is_displayed(), 20, [log])

        # started, then its run closes: the line goes
        _answer(send, "start_run", {"ok": True, "run_id": "aaaa1111-0001", "target_wbc": 3, "specimen_id": "H-1"},
                _scanned(inside, sent, log, "H-1", 1))
        _wait("the answer", lambda: line() == "run aaaa1111 started for specimen H-1", 20, [log])
        send(f"{BASE}/run", run("aaaa1111-0001", "H-1", "open"))
        send(f"{BASE}/run", run("aaaa1111-0001", "H-1", "closed"))
        _wait("the line gone", lambda: line() == "" and inside(".start-run").is_displayed(), 20, [log])

        # started, its run closed before the station's answer came: no "started" beside it
        second = _scanned(inside, sent, log, "H-2", 2)
        send(f"{BASE}/run", run("bbbb2222-0002", "H-2", "open", 1))
        send(f"{BASE}/run", run("bbbb2222-0002", "H-2", "closed", 1))
        _wait("the closed run shown", lambda: card("data-run-id") == "bbbb2222-0002"
              and card("data-shown") == "final", 20, [log])
        _answer(send, "start_run", {"ok": True, "run_id": "bbbb2222-0002", "target_wbc": 3, "specimen_id": "H-2"},
                second)
        state = lambda: inside(".run-control-state").get_attribute("data-state")
        _wait("the answer taken", lambda: state() != "saving", 20, [log])
        assert (state(), line()) == ("", ""), (state(), line())
        assert inside(".start-run").is_displayed() and not inside(".stop-run").is_displayed()

        # stopped: said beside the stopped run's closed state, gone once another run is the card's
        _answer(send, "start_run", {"ok": True, "run_id": "cccc3333-0003", "target_wbc": 3, "specimen_id": "H-3"},
                _scanned(inside, sent, log, "H-3", 3))
        send(f"{BASE}/run", run("cccc3333-0003", "H-3", "open"))
        _wait("Stop run", lambda: inside(".stop-run").is_displayed() and card("data-run-id") == "cccc3333-0003",
              20, [log])
        _answer(send, "stop_run", {"ok": True, "run_id": "cccc3333-0003", "fields": 2, "classified_wbc": 0,
                                   "target_wbc": 3, "complete": False, "report_id": "r"},
                _stop_confirmed(inside, sent, log, 1))
        stopped = "run cccc3333 stopped: 2 fields, 0 of 3 WBC"
        _wait("the stop's answer", lambda: line() == stopped, 20, [log])
        send(f"{BASE}/run", run("cccc3333-0003", "H-3", "closed"))
        _wait("its closed state", lambda: card("data-shown") == "final", 20, [log])
        assert line() == stopped
        send(f"{BASE}/run", run("dddd4444-0004", "K-1", "open", 1))  # started on another page
        _wait("the stopped line gone", lambda: line() == "" and card("data-run-id") == "dddd4444-0004", 20, [log])


def _state_without_fields(run_id: str, state: str, end_reason: str | None) -> str:
    """A run state as the station publishes one for a run start_run opened with no field
    (service.station.clinic, test_started_runs checks the station's): no report."""
    return json.dumps({"station_id": STATION, "run_id": run_id, "state": state, "end_reason": end_reason,
                       "updated_at": time.time(), "report": None, "rbc_grades": None,
                       "review": {"cells": 0, "not_kept": 0, "overlays": 0},
                       "progress": {"run_id": run_id, "started_by": "command", "started_at": time.time() - 30,
                                    "fields": 0, "classified_wbc": 0, "target_wbc": 100, "specimen_id": "H-2026-0412"}})


@pytest.mark.broker
@needs_chromium
def test_a_run_stopped_from_another_page_before_any_field_gives_the_form_back_to_start(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A run this page started, stopped from another page before its first field: the station's
    states (open, then closed with no field and no report) take the card to the run closed: Start
    again, "run X started" gone, the run line says it closed before any field, with nothing to sign
    or print; a page opened after it (the retained state) reads the same."""

    with _run_control_page(tmp_path, ws_broker) as (driver, send, log, url, inside, sent):
        _wait("the form", lambda: inside(".specimen-id").is_displayed(), 20, [log])
        _answer(send, "start_run", {"ok": True, "run_id": "5d1e0c2b-bbbb", "target_wbc": 100,
                                    "specimen_id": "H-2026-0412"}, _scanned(inside, sent, log, "H-2026-0412", 1))
        send(f"{BASE}/run", _state_without_fields("5d1e0c2b-bbbb", "open", None))
        _wait("the open run", lambda: "open, no field yet" in inside(".run-line").text, 20, [log])
        assert inside(".stop-run").is_displayed() and not inside(".start-run").is_displayed()
        assert inside(".run-control-state").text == "run 5d1e0c2b started for specimen H-2026-0412"
        assert inside(".progress-text").text == "0 / 100 WBC classified"
        # another page stops it: its answer is not this page's, the closed state is everyone's
        _answer(send, "stop_run", {"ok": True, "run_id": "5d1e0c2b-bbbb", "fields": 0, "classified_wbc": 0,
                                   "target_wbc": 100, "complete": False, "report_id": None}, b"dashboard-other-1")
        send(f"{BASE}/run", _state_without_fields("5d1e0c2b-bbbb", "closed", "stopped"))
        _wait("Start again", lambda: inside(".start-run").is_displayed(), 20, [log])
        assert not inside(".stop-run").is_displayed()
        assert inside(".run-control-state").text == ""
        assert inside(".run-line").text.startswith("specimen H-2026-0412 · run 5d1e0c2b · started ")
        assert inside(".run-line").text.endswith("closed (stopped) before any field: no report")
        assert not inside(".verify").is_displayed() and not inside(".print-run").is_displayed()
        driver.get(url)  # a page opened now: the retained closed state
        _wait("the station again", lambda: _status(driver, STATION) == "online", 20, [log])
        _wait("the closed run", lambda: "before any field" in inside(".run-line").text, 20, [log])
        assert inside(".start-run").is_displayed() and not inside(".stop-run").is_displayed()


@pytest.mark.broker
@needs_chromium
def test_a_signature_the_station_holds_is_said_beside_verify_not_shown_as_sent(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """Verify run on a closed run the station holds (a restored state the broker shows further
    along): the station answers ok with `held: true` and a message; the line beside Verify says
    it is not sent, with the station's message, in the held colour, not as a signature sent."""

    with _run_control_page(tmp_path, ws_broker, dashboard_args=()) as (driver, send, log, _url, inside, sent):
        report = _specimen(STATION, "7b1d0c2e-bbbb", [], time.time())
        send(f"{BASE}/run", json.dumps(_closed_run_state(report)))
        held = ("the signed report is held at the station: the broker shows run 7b1d0c2e-bbbb further along "
                "than this station's state")
        _verify_answered(driver, send, log, inside, sent, "7b1d0c2e-bbbb", held=True, message=held)
        state = lambda: inside(".verify-state")
        _wait("the answer", lambda: state().get_attribute("data-state") == "held", 20, [log])
        assert state().text == f"verified: 0 typed, 0 reclassified — not sent: {held}", state().text
        assert state().value_of_css_property("color") == "rgba(170, 17, 17, 1)"


@pytest.mark.broker
@needs_chromium
def test_a_signature_whose_hold_is_not_decided_yet_is_said_beside_verify_not_shown_as_sent(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """Verify run answered before the station's first broker connection settled: ok with `held`: null,
    `hold_decided`: false and a message; the line beside Verify says the station's message, in its
    own colour (neither the sent green nor the held red), not as a signature sent; the station's
    telemetry naming another run held (`held_runs`), the line says it verified, as sent."""

    with _run_control_page(tmp_path, ws_broker, dashboard_args=()) as (driver, send, log, _url, inside, sent):
        report = _specimen(STATION, "7b1d0c2e-cccc", [], time.time())
        send(f"{BASE}/run", json.dumps(_closed_run_state(report)))
        undecided = ("the signed report is stored at the station; whether it is held there is not decided yet: the "
                     "station has not compared its state with the run state the broker keeps")
        _verify_answered(driver, send, log, inside, sent, "7b1d0c2e-cccc", held=None, hold_decided=False,
                         message=undecided)
        state = lambda: inside(".verify-state")
        _wait("the answer", lambda: state().get_attribute("data-state") == "undecided", 20, [log])
        assert state().text == f"verified: 0 typed, 0 reclassified — {undecided}", state().text
        assert state().value_of_css_property("color") == "rgba(138, 90, 0, 1)"
        # the station's telemetry: not decided yet (null), then the run held: said in red, not sent
        sample = {"source": "proc", "read_at": time.time(), "interval_s": 30}
        send(f"{BASE}/telemetry", json.dumps({**sample, "held_runs": None}), retain=False)
        send(f"{BASE}/telemetry", json.dumps({**sample, "held_runs": ["0000aaaa-other"]}), retain=False)
        _wait("the sample", lambda: driver.execute_script(
            "return document.querySelector(arguments[0]).dataset.undecidedRun === undefined;",
            f"[data-station='{STATION}'] .verify-state"), 20, [log])
        assert state().get_attribute("data-state") == "saved", state().text  # decided: not held, sent
        assert state().text == "verified: 0 typed, 0 reclassified", state().text


@pytest.mark.broker
@needs_chromium
def test_a_signature_answered_before_the_hold_was_decided_turns_held_when_the_station_says_it_holds_the_run(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """Verify run answered `held`: null; the station's telemetry then says `held_runs` null (still not
    decided: the line stays amber) and then names the run: the line says it is not sent, in red."""

    with _run_control_page(tmp_path, ws_broker, dashboard_args=()) as (driver, send, log, _url, inside, sent):
        report = _specimen(STATION, "7b1d0c2e-eeee", [], time.time())
        send(f"{BASE}/run", json.dumps(_closed_run_state(report)))
        _verify_answered(driver, send, log, inside, sent, "7b1d0c2e-eeee", held=None, hold_decided=False,
                         message="not decided yet")
        state = lambda: inside(".verify-state")
        _wait("the answer", lambda: state().get_attribute("data-state") == "undecided", 20, [log])
        sample = {"source": "proc", "read_at": time.time(), "interval_s": 30}
        send(f"{BASE}/telemetry", json.dumps({**sample, "held_runs": None}), retain=False)
        _wait("the sample", lambda: inside(".telemetry").text != "", 20, [log])
        time.sleep(0.5)
        assert state().get_attribute("data-state") == "undecided", state().text
        send(f"{BASE}/telemetry", json.dumps({**sample, "held_runs": ["7b1d0c2e-eeee"]}), retain=False)
        _wait("held", lambda: state().get_attribute("data-state") == "held", 20, [log])
        assert state().text.startswith("verified: 0 typed, 0 reclassified — not sent: the report is held at the "
                                       "station: the broker shows this run further along"), state().text
        assert state().value_of_css_property("color") == "rgba(170, 17, 17, 1)"


@pytest.mark.broker
@needs_chromium
def test_a_signature_answered_undecided_is_not_settled_by_a_sample_that_came_before_the_answer(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A sample received before a verify_run answered `held`: null (a station process before it started
    again: decided, none held) does not say the signed report was sent: the line stays amber; a sample
    without `held_runs` (an older station) neither; the next sample naming the run turns it red."""

    with _run_control_page(tmp_path, ws_broker, dashboard_args=()) as (driver, send, log, _url, inside, sent):
        report = _specimen(STATION, "7b1d0c2e-ffff", [], time.time())
        send(f"{BASE}/run", json.dumps(_closed_run_state(report)))
        sample = {"source": "proc", "read_at": time.time(), "interval_s": 30}
        send(f"{BASE}/telemetry", json.dumps({**sample, "held_runs": []}), retain=False)
        _wait("the earlier sample", lambda: inside(".telemetry").text != "", 20, [log])
        _verify_answered(driver, send, log, inside, sent, "7b1d0c2e-ffff", held=None, hold_decided=False,
                         message="not decided yet")
        state = lambda: inside(".verify-state")
        _wait("the answer", lambda: state().get_attribute("data-state") is not None, 20, [log])
        assert state().get_attribute("data-state") == "undecided", state().text
        assert state().text == "verified: 0 typed, 0 reclassified — not decided yet", state().text
        send(f"{BASE}/telemetry", json.dumps({**sample, "read_at": time.time()}), retain=False)  # no held_runs
        _wait("the older station's sample", lambda: driver.execute_script(
            "return document.querySelector(arguments[0]).textContent;", f"[data-station='{STATION}'] .telemetry")
            is not None, 20, [log])
        time.sleep(0.5)
        assert state().get_attribute("data-state") == "undecided", state().text
        send(f"{BASE}/telemetry", json.dumps({**sample, "held_runs": ["7b1d0c2e-ffff"]}), retain=False)
        _wait("held", lambda: state().get_attribute("data-state") == "held", 20, [log])


@pytest.mark.broker
@needs_chromium
def test_a_stop_whose_hold_is_not_decided_yet_is_said_in_its_own_colour_not_as_held(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """Stop run answered before the station's first broker connection settled: ok with `held`: null,
    `hold_decided`: false and the station's message; the run line's answer says that message in the
    not-decided colour (as beside Verify), not in the held red: the report may well be sent; a sample
    that came before the answer does not change that. The station's next telemetry sample saying `held_runs` [] (decided, none held), the line says the stop
    alone, as sent."""

    with _run_control_page(tmp_path, ws_broker) as (_driver, send, log, _url, inside, sent):
        _wait("the form", lambda: inside(".specimen-id").is_displayed(), 20, [log])
        stop = _started_and_stopped(inside, send, sent, log, "H-7", "6a6a6a6a-dddd", starts=1, stops=1)
        # a sample before the answer (an earlier station process: decided, none held) settles nothing
        send(f"{BASE}/telemetry", json.dumps({"source": "proc", "read_at": time.time(), "held_runs": []}), retain=False)
        _wait("the earlier sample", lambda: inside(".telemetry").text != "", 20, [log])
        undecided = ("the run's report is stored at the station; whether it is held there is not decided yet: the "
                     "station has not compared its state with the run state the broker keeps")
        _answer(send, "stop_run", {"ok": True, "run_id": "6a6a6a6a-dddd", "fields": 2, "classified_wbc": 9,
                                   "target_wbc": 100, "complete": False, "report_id": "r6", "held": None,
                                   "hold_decided": False, "message": undecided}, stop)
        state = lambda: inside(".run-control-state")
        _wait("the stop's answer", lambda: state().text.startswith("run 6a6a6a6a stopped"), 20, [log])
        assert state().text == "run 6a6a6a6a stopped: 2 fields, 9 of 100 WBC — " + undecided, state().text
        assert state().get_attribute("data-state") == "undecided"
        assert state().value_of_css_property("color") == "rgba(138, 90, 0, 1)"
        # the station's next sample says its hold is decided and holds no run: the report is sent
        send(f"{BASE}/telemetry", json.dumps({"source": "proc", "read_at": time.time(), "held_runs": []}), retain=False)
        _wait("the decision", lambda: state().get_attribute("data-state") == "saved", 20, [log])
        assert state().text == "run 6a6a6a6a stopped: 2 fields, 9 of 100 WBC", state().text


@pytest.mark.broker
@needs_chromium
def test_a_stop_whose_end_was_not_kept_is_said_in_red_though_its_hold_is_not_decided_yet(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A stop answered before the station's first broker connection settled (`held`: null) whose end
    the outbox file also refused to keep (a full disk: `kept` false) carries both messages in one;
    the not-decided amber then said the disk's refusal in the colour of 'the report may well be
    sent'. It reads in the red of a stop whose end was not kept."""

    with _run_control_page(tmp_path, ws_broker) as (_driver, send, log, _url, inside, sent):
        _wait("the form", lambda: inside(".specimen-id").is_displayed(), 20, [log])
        stop = _started_and_stopped(inside, send, sent, log, "H-8", "7b7b7b7b-eeee", starts=1, stops=1)
        told = ("the run's report is stored at the station; whether it is held there is not decided yet: the "
                "station has not compared its state with the run state the broker keeps. The run's end could not "
                "be kept in the outbox file (see the station's log): its report is sent under r7 unless the station "
                "stops before storing it; a start after that reports the run under another id")
        _answer(send, "stop_run", {"ok": True, "run_id": "7b7b7b7b-eeee", "fields": 2, "classified_wbc": 9,
                                   "target_wbc": 100, "complete": False, "report_id": "r7", "kept": False,
                                   "held": None, "hold_decided": False, "message": told},
                stop)
        state = lambda: inside(".run-control-state")
        _wait("the stop's answer", lambda: state().text.startswith("run 7b7b7b7b stopped"), 20, [log])
        assert state().text == "run 7b7b7b7b stopped: 2 fields, 9 of 100 WBC — " + told, state().text
        assert state().get_attribute("data-state") == "held"
