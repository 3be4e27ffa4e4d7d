"""The clinic dashboard with many stations, in headless Chromium against a real mosquitto: the page
opened before any station exists, stations appearing, a station retired or renamed (its retained
messages cleared), and two stations given one station id. The messages are those a station sends,
published by the test's own client (tests/test_dashboard.py's helpers)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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


def _cards(driver: Any) -> list[str]:
    return driver.execute_script(  # type: ignore[no-any-return]
        "return [...document.querySelectorAll('#stations section.station')].map((n) => n.dataset.station);")


def _waiting(driver: Any) -> bool:
    return driver.execute_script(  # type: ignore[no-any-return]
        "const e = document.getElementById('empty'); return !!e && e.textContent === 'Waiting for stations\u2026';")


@pytest.mark.broker
@needs_chromium
def test_a_retired_stations_cleared_messages_take_its_card_away_and_make_none(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """The page opened before any station waits for them; stations appear as they say online, in
    order of their ids. A station retired or renamed leaves its retained status and run state on the
    broker, and the page showed its card (offline, its last run) for ever; the operator clears them
    (`mosquitto_pub -r -n`), which reaches an open page as empty messages. Its card now goes (its
    run state's clearing empties its run first); an empty message of a station the page does not
    show makes no card (it made one, 'unknown'); the last card gone, the page waits again; a page
    opened after the clearing shows only the stations still there."""
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        driver.get(url)
        _wait("the page waiting", lambda: _waiting(driver), 20, [log])
        for station in ("ward-b", "ward-a", "ward-old"):
            send(f"smearscope/{station}/status", "online")
        send("smearscope/ward-old/run", json.dumps(_closed_run_state(_specimen("ward-old", "run-o", [], time.time()))))
        _wait("three stations", lambda: _cards(driver) == ["ward-a", "ward-b", "ward-old"], 20, [log])
        assert not _waiting(driver)
        run_line = "[data-station='ward-old'] .run-line"
        _wait("the old station's run", lambda: driver.execute_script(
            f"return document.querySelector(\"{run_line}\").textContent").startswith("run run-o"), 20, [log])
        send("smearscope/ward-old/status", "offline")
        _wait("the old station offline", lambda: _status(driver, "ward-old") == "offline", 20, [log])
        # retired: its run state cleared first, then its status (docs/STATION.md)
        send("smearscope/ward-old/run", "")
        _wait("its run gone", lambda: driver.execute_script(
            f"return document.querySelector(\"{run_line}\").textContent") == "no specimen run yet", 20, [log])
        send("smearscope/ward-old/status", "")
        _wait("its card gone", lambda: _cards(driver) == ["ward-a", "ward-b"], 20, [log])
        send("smearscope/ward-gone/status", "")  # a station the page never showed: no card for it
        send("smearscope/ward-gone/run", "")
        send("smearscope/ward-b/telemetry", json.dumps({"source": "proc", "read_at": time.time()}), retain=False)
        _wait("the sample after the empty messages", lambda: driver.execute_script(
            "return !!document.querySelector(\"[data-station='ward-b'] dd[data-key='source']\")"), 20, [log])
        assert _cards(driver) == ["ward-a", "ward-b"]
        send("smearscope/ward-a/status", "")
        send("smearscope/ward-b/status", "")
        _wait("the page waiting again", lambda: _cards(driver) == [] and _waiting(driver), 20, [log])
        send("smearscope/ward-c/status", "online")
        _wait("a new station", lambda: _cards(driver) == ["ward-c"] and not _waiting(driver), 20, [log])
        driver.get(url)  # a page opened after the clearing: the broker holds only ward-c's
        _wait("ward-c after a reload", lambda: _status(driver, "ward-c") == "online", 20, [log])
        time.sleep(1)  # what else the broker sends at the subscription arrives with ward-c's
        assert _cards(driver) == ["ward-c"]


def _sample(instance: str, host: str, interval_s: float = 30.0) -> str:
    return json.dumps({"source": "proc", "read_at": time.time(), "interval_s": interval_s,
                       "instance_id": instance, "host": host})


@pytest.mark.broker
@needs_chromium
def test_two_stations_under_one_station_id_are_said_and_a_restart_is_not(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """Two stations given one station_id (a cloned config) publish under it in turn, and the page
    showed one card mixing their runs, status and telemetry, saying nothing. Each process's samples
    carry its instance id and host: samples that come back to an instance after another's are two
    stations, said on the card in red, naming both hosts, and in the page's header; a station
    restarted (one instance after the other, never back) is not. The mark goes once no such return
    was seen for four periods."""
    from selenium.webdriver.common.by import By

    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        driver.get(url)
        for station in ("ward-r", "ward-x"):
            send(f"smearscope/{station}/status", "online")
        _wait("both stations", lambda: _cards(driver) == ["ward-r", "ward-x"], 20, [log])
        clash = lambda station: driver.find_element(By.CSS_SELECTOR, f"[data-station='{station}'] .clash")
        header = lambda: driver.find_element(By.ID, "clash")
        # ward-r restarted: one instance, then the next, never back
        for instance in ("aaaa00000001", "aaaa00000001", "bbbb00000002", "bbbb00000002"):
            send("smearscope/ward-r/telemetry", _sample(instance, "jetson-r"), retain=False)
        # ward-x: two machines, their samples in turn
        for instance, host in (("cccc00000003", "jetson-3"), ("dddd00000004", "jetson-7"), ("cccc00000003", "jetson-3")):
            send("smearscope/ward-x/telemetry", _sample(instance, host, interval_s=1.0), retain=False)
        _wait("the clash said", lambda: clash("ward-x").is_displayed(), 20, [log])
        assert clash("ward-x").text == ("two stations publish as ward-x (hosts jetson-7 and jetson-3): their runs, "
                                        "status and telemetry are mixed here; give each its own station_id")
        assert header().is_displayed() and header().text == "one station id, two stations: ward-x"
        assert driver.find_element(By.CSS_SELECTOR, "[data-station='ward-x']").get_attribute("data-clash") == "true"
        # the host is listed with the samples, the instance id (a random token) is not
        assert driver.find_element(By.CSS_SELECTOR, "[data-station='ward-x'] dd[data-key='host']").text == "jetson-3"
        assert not driver.find_elements(By.CSS_SELECTOR, "[data-station='ward-x'] dd[data-key='instance_id']")
        send("smearscope/ward-r/telemetry", _sample("bbbb00000002", "jetson-r"), retain=False)
        time.sleep(1.5)  # the page's marks are redrawn every second
        assert not clash("ward-r").is_displayed()
        # the second machine renamed: only one instance goes on, and after four periods the mark goes
        _wait("the clash mark gone", lambda: not clash("ward-x").is_displayed() and not header().is_displayed(),
              20, [log])
        assert clash("ward-x").text == ""


def _named(driver: Any, summary: str) -> list[str] | None:
    """The stations a header summary names (None while it is hidden)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "const s = document.getElementById(arguments[0]);"
        "return s.hidden ? null : [...s.querySelectorAll('button')].map((b) => b.textContent);", summary)


@pytest.mark.broker
@needs_chromium
def test_twelve_stations_the_header_names_those_that_need_someone_and_stays_in_sight(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """Twelve stations: the cards stay in order of station id, its numbers read as numbers
    (scope-2 before scope-10: they were ordered as text, scope-10 before scope-2), and never move
    under a technician typing cells; about three fit a screen. The header named only critical findings, and
    scrolled away with the cards; an offline station, or one not heard from, was found only by
    scrolling through all twelve. The header now also names the offline stations and those not
    heard from, stays at the top however far the page is scrolled, and a click on a name brings the
    card just below it."""
    from smearscope.service.analysis.report import Flag

    critical = Flag(code="sickle_cells_present", severity="critical", message="sickle cells present")
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        driver.get(url)
        ids = [f"scope-{i}" for i in range(1, 13)]
        for i, station in sorted(enumerate(ids, start=1), key=lambda s: s[1]):  # appearing in any order
            send(f"smearscope/{station}/status", "offline" if i in (2, 10) else "online")
            send(f"smearscope/{station}/run", json.dumps(_closed_run_state(
                _specimen(station, f"run-{i:02d}", [critical] if i in (5, 11) else [], time.time()))))
        _wait("twelve cards", lambda: _cards(driver) == ids, 20, [log])
        send("smearscope/scope-6/telemetry", _sample("eeee00000006", "jetson-6", interval_s=1.0), retain=False)
        _wait("the header's lists", lambda: _named(driver, "offline") == ["scope-2", "scope-10"]
              and _named(driver, "silent") == ["scope-6"], 20, [log])
        assert _named(driver, "critical") == ["scope-5", "scope-11"]
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight);")
        header = lambda: driver.execute_script("return document.querySelector('header').getBoundingClientRect().toJSON();")
        assert header()["top"] == 0 and driver.execute_script("return window.scrollY;") > 2 * header()["height"]
        driver.execute_script("[...document.getElementById('offline').querySelectorAll('button')]"
                              ".find((b) => b.textContent === 'scope-10').click();")
        card = lambda: driver.execute_script(
            "return document.querySelector(\"[data-station='scope-10']\").getBoundingClientRect().toJSON();")
        _wait("scope-10 scrolled to", lambda: abs(card()["top"] - header()["bottom"]) < 40, 10, [log])
        assert card()["top"] >= header()["bottom"], (card(), header())
        send("smearscope/scope-10/status", "online")
        send("smearscope/scope-6/telemetry", _sample("eeee00000006", "jetson-6", interval_s=30.0), retain=False)
        _wait("scope-10 and scope-6 back", lambda: _named(driver, "offline") == ["scope-2"]
              and _named(driver, "silent") is None, 20, [log])


@pytest.mark.broker
@needs_chromium
def test_a_station_whose_clock_is_minutes_off_says_so_and_is_not_taken_for_silent(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """The times a card shows (a run's start and last update, telemetry's read_at) are the
    station's clock's: a station ten minutes behind read "last update 10:02" at 10:12, a run that
    looked stalled. A station whose live sample's read_at is a minute or more off the browser's
    clock now says so beside its status ("station clock 10 min behind this browser's: the times on
    this card are the station's"); one on time says nothing. The page's own mark (not heard from)
    goes by when samples reach it, not by their read_at: a sample read 10 minutes ago by the
    station's clock is not silence."""
    from selenium.webdriver.common.by import By

    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        driver.get(url)
        offsets = {"ward-behind": -600.0, "ward-ahead": 300.0, "ward-ontime": 0.0}
        for station in offsets:
            send(f"smearscope/{station}/status", "online")
        _wait("three stations", lambda: len(_cards(driver)) == 3, 20, [log])
        for station, offset in offsets.items():
            sample = json.loads(_sample("ffff0000000" + str(len(station) % 10), "jetson", interval_s=30.0))
            send(f"smearscope/{station}/telemetry", json.dumps({**sample, "read_at": time.time() + offset}), retain=False)
        clock = lambda station: driver.find_element(By.CSS_SELECTOR, f"[data-station='{station}'] .clock")
        _wait("the samples", lambda: all(driver.find_elements(
            By.CSS_SELECTOR, f"[data-station='{s}'] dd[data-key='read_at']") for s in offsets), 20, [log])
        assert clock("ward-behind").text == ("station clock 10 min behind this browser's: the times on this card are "
                                             "the station's")
        assert clock("ward-ahead").text == "station clock 5 min ahead of this browser's: the times on this card are the station's"
        assert not clock("ward-ontime").is_displayed() and clock("ward-ontime").text == ""
        silence = driver.find_element(By.CSS_SELECTOR, "[data-station='ward-behind'] .silence")
        assert silence.get_attribute("data-overdue") == "false" and _named(driver, "silent") is None


@pytest.mark.broker
@needs_chromium
def test_on_a_narrow_screen_a_cards_panels_stack_and_no_text_runs_into_another(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A tablet held upright, or a browser window beside another: the card kept its three panels
    side by side at any width, and at 500 px the morphology table's grades ran over the telemetry
    panel ("present on 120 of 150 calls" through "no sample yet"). At 640 px or less the panels now
    stack, each as wide as the card, and none holds more than its width (two columns up to 960 px,
    tests/test_dashboard_tablet.py; three beyond)."""
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        driver.set_window_size(500, 900)
        driver.get(url)
        send("smearscope/ward-n/status", "online")
        send("smearscope/ward-n/run", json.dumps(_closed_run_state(_specimen("ward-n", "run-n", [], time.time()))))
        _wait("the run", lambda: driver.execute_script(
            "return document.querySelectorAll(\"[data-station='ward-n'] .morphology tbody tr\").length") == 2, 20, [log])
        panels = driver.execute_script(
            "return [...document.querySelectorAll(\"[data-station='ward-n'] .columns > .panel\")].map((p) => "
            "({left: p.getBoundingClientRect().left, top: p.getBoundingClientRect().top, width: p.clientWidth, "
            "content: p.scrollWidth}));")
        assert len(panels) == 3
        assert len({round(p["left"]) for p in panels}) == 1 and panels[0]["top"] < panels[1]["top"] < panels[2]["top"], panels
        assert all(p["content"] <= p["width"] for p in panels), panels


def _options(driver: Any, station: str) -> list[str] | None:
    """The values of a card's list of runs ("" the current run; None while the list is hidden)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "const c = document.querySelector(`[data-station='${arguments[0]}']`);"
        "return !c || c.querySelector('.runs-pick').hidden ? null : [...c.querySelectorAll('.runs option')].map((o) => o.value);",
        station)


def _pick(driver: Any, station: str, run_id: str) -> None:
    """As a user picks an option of the card's list of runs."""
    driver.execute_script("const s = document.querySelector(`[data-station='${arguments[0]}'] select.runs`);"
                          "s.value = arguments[1]; s.dispatchEvent(new Event('change'));", station, run_id)


def _line(driver: Any, station: str) -> str:
    """The card's run line ("" before the card is there)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "return document.querySelector(`[data-station='${arguments[0]}'] .run-line`)?.textContent || '';", station)


@pytest.mark.broker
@needs_chromium
def test_a_station_back_online_is_asked_for_its_earlier_runs_once(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A station restored (its retained status offline, then online again: restarted, or put back
    from a backup with other runs) was not asked for its earlier runs: the card's list stayed the
    one from before until a run started or closed. It is asked once when it comes back (get_runs),
    not again on a second "online" (a station says it at each connection to the broker)."""
    base = "smearscope/ward-q"
    asked = Subscriber(ws_broker.port, "observer", MQTT_USERS["observer"], [f"{base}/cmd/get_runs"])
    current = _closed_run_state(_specimen("ward-q", "cur-0001", [], time.time()))
    earlier = lambda run_id: _closed_run_state(_specimen("ward-q", run_id, [], time.time() - 3600))
    try:
        asked.wait_ready()
        with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
            send(f"{base}/status", "online")
            send(f"{base}/run", json.dumps(current))
            driver.get(url)
            _wait("the run's get_runs", lambda: len(asked.messages) == 1, 20, [log])
            send(f"{base}/cmd_response/get_runs", json.dumps({"ok": True, "runs": [current, earlier("old-0001")]}),
                 retain=False, correlation=asked.messages[0].correlation_data)
            _wait("the list", lambda: _options(driver, "ward-q") == ["", "old-0001"], 20, [log])
            send(f"{base}/status", "offline")
            _wait("offline", lambda: _status(driver, "ward-q") == "offline", 20, [log])
            send(f"{base}/status", "online")
            _wait("get_runs asked again", lambda: len(asked.messages) == 2, 20, [log])
            assert (asked.messages[1].correlation_data or b"").startswith(b"dashboard-")
            send(f"{base}/status", "online")  # online again, without going away: nothing asked
            send(f"{base}/cmd_response/get_runs", json.dumps({"ok": True, "runs": [current, earlier("old-0002")]}),
                 retain=False, correlation=asked.messages[1].correlation_data)
            _wait("the restored station's list", lambda: _options(driver, "ward-q") == ["", "old-0002"], 20, [log])
            time.sleep(0.5)
            assert len(asked.messages) == 2
    finally:
        asked.close()


@pytest.mark.broker
@needs_chromium
def test_a_cleared_run_state_takes_the_current_run_away_and_keeps_the_earlier_runs(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A station's retained run state cleared (an empty retained message) took the card's current
    run away and with it the earlier run picked from the list, and left the list without the run
    that was current: the station's last closed runs could no longer be reached. The earlier run
    picked stays shown, the list keeps its runs and now holds the run that was current, and
    "current run" reads "no specimen run yet"."""
    base = "smearscope/ward-k"
    current = _closed_run_state(_specimen("ward-k", "cur-0002", [], time.time()))
    old = _closed_run_state(_specimen("ward-k", "old-0003", [], time.time() - 3600))
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send(f"{base}/status", "online")
        send(f"{base}/run", json.dumps(current))
        driver.get(url)
        _wait("the current run", lambda: _line(driver, "ward-k").startswith("run cur-0002"), 20, [log])
        send(f"{base}/cmd_response/get_runs", json.dumps({"ok": True, "runs": [current, old]}), retain=False)
        _wait("the list", lambda: _options(driver, "ward-k") == ["", "old-0003"], 20, [log])
        _pick(driver, "ward-k", "old-0003")
        _wait("the earlier run", lambda: _line(driver, "ward-k").startswith("earlier run old-0003"), 20, [log])
        send(f"{base}/run", "")
        _wait("the run that was current listed", lambda: _options(driver, "ward-k") == ["", "cur-0002", "old-0003"],
              20, [log])
        assert _line(driver, "ward-k").startswith("earlier run old-0003")
        assert driver.execute_script("return document.querySelector(\"[data-station='ward-k'] select.runs\").value;") \
            == "old-0003"
        _pick(driver, "ward-k", "")
        _wait("no current run", lambda: _line(driver, "ward-k") == "no specimen run yet", 20, [log])
        assert _options(driver, "ward-k") == ["", "cur-0002", "old-0003"]
        _pick(driver, "ward-k", "cur-0002")
        _wait("the run that was current", lambda: _line(driver, "ward-k").startswith("earlier run cur-0002"), 20, [log])


@pytest.mark.broker
@needs_chromium
def test_a_button_reached_with_the_keyboard_is_never_under_the_sticky_header(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """Shift+Tab up a long page (eight cards in a 800x700 window) scrolled each control it reached
    to the top edge of the window, under the sticky header: a technician working with the keyboard
    could not see the button about to be pressed (ward-7's "Verify run" from ward-8's "Print
    report"). The page now keeps what the focus reaches below the header, both ways."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ids = [f"ward-{i}" for i in range(1, 9)]
    with _page_and_a_station(tmp_path, ws_broker, ("--run-control",)) as (driver, send, log, url):
        driver.set_window_size(800, 700)
        for station in ids:
            send(f"smearscope/{station}/status", "online")
            send(f"smearscope/{station}/run", json.dumps(_closed_run_state(_specimen(station, "run-" + station, [],
                                                                                     time.time()))))
        driver.get(url)
        _wait("the cards", lambda: driver.execute_script(
            "return document.querySelectorAll('section.station .print-run:not([hidden])').length;") == 8, 20, [log])
        where = ("const a = document.activeElement, card = a.closest('section.station');"
                 "return card ? [card.dataset.station, a.className, a.getBoundingClientRect().top,"
                 " document.querySelector('header').getBoundingClientRect().bottom, scrollY] : null;")
        reached = []
        for key in [Keys.TAB] * 60 + [Keys.SHIFT + Keys.TAB] * 60:
            if key == Keys.TAB:
                ActionChains(driver).send_keys(key).perform()
            else:
                ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
            if (at := driver.execute_script(where)) is not None:
                reached.append(at)
        # the walk went down the page and back up it, through ward-8's and ward-1's controls
        assert {"ward-1", "ward-8"} <= {station for station, *_ in reached} and max(y for *_, y in reached) > 2000
        covered = [(station, what, round(top), round(bottom)) for station, what, top, bottom, _ in reached if top < bottom]
        assert covered == [], covered
