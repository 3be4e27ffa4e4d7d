"""Right-to-left text a station or a person gives, in the clinic dashboard in a real browser
(Chromium through selenium, as tests/test_dashboard.py), against a real mosquitto: an Arabic or
Hebrew specimen id with digits, signer, flag text, cell type or station id is isolated where it
stands among the page's own words (<bdi dir=auto>; FIRST STRONG ISOLATE ... POP DIRECTIONAL
ISOLATE where only plain text goes: a list's option, the tab's title, a printed page's foot), so
the words after it stay after it on screen and on paper. Positions are read from the laid-out
text (Range.getClientRects). And a specimen id that is markup is shown as text wherever it is
shown (the run line, the earlier runs, the run form, the printed report and its page foot)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from broker import MosquittoBroker
from test_dashboard import (
    PAGE_INSPECTION,
    _closed_run_state,
    _open_with_runs,
    _page_and_a_station,
    _print_media,
    _specimen,
    _status,
    _wait,
    needs_chromium,
)

from smearscope.service.analysis.report import Flag, Verification

SPECIMEN = "עינת 2026-12"  # a Hebrew accession label with its digits
OTHER_SPECIMEN = "ملف-7"  # an Arabic one, scanned while a run is open
SIGNER = "ישראל"
FLAG_TEXT = "خلايا منجلية كثيرة"  # a flag's text in Arabic
CELL_TYPE = "خلية منجلية"  # a station's own model's type name
STATION = "مختبر-7"  # a topic level: what the page shows as the station's id
OPEN_STATION = "ward-r"

#: Where `arguments[1]` stands in the text of `arguments[0]` as laid out: whether it is the whole
#: text of an element that isolates it (computed unicode-bidi isolate, dir auto), and the x
#: positions of its glyphs and of the nearest letter before and after it on its line.
PLACED = """
const [container, wanted] = arguments;
const walker = document.createTreeWalker(container, NodeFilter.SHOW_TEXT);
const nodes = []; let text = "";
for (let n = walker.nextNode(); n; n = walker.nextNode()) if (n.data.length) { nodes.push([n, text.length]); text += n.data; }
const at = text.indexOf(wanted);
if (at < 0) return { found: false, text };
const locate = (i) => { const [n, start] = nodes.filter(([, s]) => s <= i).pop(); return [n, i - start]; };
const rects = (i, j) => {
  const r = document.createRange(), [a, ao] = locate(i), [b, bo] = locate(j - 1);
  r.setStart(a, ao); r.setEnd(b, bo + 1);
  return [...r.getClientRects()].filter((x) => x.width > 0);
};
const own = rects(at, at + wanted.length);
const top = Math.min(...own.map((x) => x.top)), bottom = Math.max(...own.map((x) => x.bottom));
const sameLine = (rs) => rs.length > 0 && rs.every((x) => x.top + x.height / 2 > top && x.top + x.height / 2 < bottom);
let before = at - 1; while (before >= 0 && /\\s/.test(text[before])) before--;
let after = at + wanted.length; while (after < text.length && /\\s/.test(text[after])) after++;
const b = before >= 0 ? rects(before, before + 1) : [], a = after < text.length ? rects(after, after + 1) : [];
let iso = locate(at)[0].parentElement;
while (iso && iso !== container.parentElement && !/isolate|plaintext/.test(getComputedStyle(iso).unicodeBidi)) iso = iso.parentElement;
return { found: true, text,
         isolated: !!iso && iso !== container.parentElement && iso.textContent === wanted && iso.dir === "auto",
         left: Math.min(...own.map((x) => x.left)), right: Math.max(...own.map((x) => x.right)),
         before: sameLine(b) ? Math.max(...b.map((x) => x.right)) : null,
         after: sameLine(a) ? Math.min(...a.map((x) => x.left)) : null };
"""


def _placed(driver: Any, selector: str, wanted: str, *, before: bool = True, after: bool = True) -> None:
    """`wanted` isolated where `selector` shows it, the letters before and after it (on its line;
    `before`/`after`: there are some) at either side of it."""
    node = driver.find_element("css selector", selector)
    got = driver.execute_script(PLACED, node, wanted)
    assert got["found"], (selector, wanted, got)
    assert got["isolated"], (selector, wanted, got["text"])
    if before:
        assert got["before"] is not None and got["before"] <= got["left"] + 0.5, (selector, wanted, got)
    if after:
        assert got["after"] is not None and got["after"] >= got["right"] - 0.5, (selector, wanted, got)


@pytest.mark.broker
@needs_chromium
def test_right_to_left_ids_names_flags_and_types_keep_the_words_around_them_in_place(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A verified run of a Hebrew specimen id, signed with a Hebrew name, with an Arabic critical
    flag, on a station whose id is Arabic: the run line's date stays after the signer (it showed
    before the name: "verified by 2026-12-07 … ,לארשי"), the gallery's "87%" after the cell's
    Arabic type, the typed count after its type, on paper the signing date after the signer; every
    such string is isolated where it is shown (card title, header, run line, flags, critical alert,
    run form, gallery, printed ids, the two stations' clash line), and the earlier runs' list, the
    tab's title and the printed page's foot hold it between isolate marks."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    now = time.time()
    sickle = Flag(code="sickle_cells_present", severity="critical", cells=[1], message=FLAG_TEXT)
    report = _specimen(STATION, "run-b", [sickle], now - 600).model_copy(update={
        "specimen_id": SPECIMEN,
        "verification": Verification(verified_by=SIGNER, verified_at=now - 60, supersedes="r-0", typed_cells=1,
                                     reclassified=[])})
    state = {**_closed_run_state(report), "review": {"cells": 1}}
    earlier = _closed_run_state(_specimen(STATION, "run-a", [], now - 7200).model_copy(update={
        "specimen_id": SPECIMEN, "verification": report.verification}))
    open_run = _closed_run_state(_specimen(OPEN_STATION, "run-open", [], now))
    open_run = {**open_run, "state": "open", "progress": {**open_run["progress"], "specimen_id": SPECIMEN}}
    base = f"smearscope/{STATION}"
    card = f"[data-station='{STATION}']"
    with _page_and_a_station(tmp_path, ws_broker, ("--run-control",)) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, state, open_run, online=True)
        _wait("the stations online", lambda: _status(driver, STATION) == _status(driver, OPEN_STATION) == "online",
              20, [log])
        send(f"{base}/cmd_response/get_runs", json.dumps({"ok": True, "runs": [earlier]}), retain=False)
        send(f"{base}/cmd_response/get_review", json.dumps({
            "ok": True, "run_id": "run-b", "offset": 0, "total": 1, "not_kept": 0, "next_offset": None,
            "wbc_types": [CELL_TYPE, "lymphocyte"], "rbc_types": ["normal"], "overlay": None,
            "typed_per_type": {CELL_TYPE: 3},
            "cells": [{"field_id": "f1", "cell": 3, "kind": "wbc", "label": CELL_TYPE, "label_score": 0.87,
                       "atypical": False, "typeable": True, "jpeg": ""}]}), retain=False)
        for instance, host in (("cccc00000003", "jetson-3"), ("dddd00000004", "jetson-7"), ("cccc00000003", "jetson-3")):
            send(f"{base}/telemetry", json.dumps({"source": "proc", "read_at": time.time(), "interval_s": 60.0,
                                                  "instance_id": instance, "host": host}), retain=False)
        option = f"{card} select.runs option[value='run-a']"
        _wait("the earlier run, the gallery, the clash", lambda: driver.find_elements(By.CSS_SELECTOR, option)
              and driver.find_elements(By.CSS_SELECTOR, f"{card} .gallery figure")
              and driver.find_element(By.CSS_SELECTOR, card).get_attribute("data-clash") == "true", 20, [log])
        # the run form of the other station: a label scanned while its run is open is refused, both ids said
        field = driver.find_element(By.CSS_SELECTOR, f"[data-station='{OPEN_STATION}'] .specimen-id")
        field.send_keys(OTHER_SPECIMEN, Keys.ENTER)
        form = f"[data-station='{OPEN_STATION}'] .run-control-state"
        _wait("the refusal", lambda: OTHER_SPECIMEN in driver.find_element(By.CSS_SELECTOR, form).text, 20, [log])

        _placed(driver, f"{card} .station-id", STATION, before=False, after=False)
        _placed(driver, "#critical", STATION, after=False)
        _placed(driver, f"{card} .run-line", SPECIMEN)
        _placed(driver, f"{card} .run-line", SIGNER)  # ", <date>" after the name, not before it
        _placed(driver, f"{card} .critical-alert", FLAG_TEXT, after=False)
        _placed(driver, f"{card} ul.flags", FLAG_TEXT, after=False)
        _placed(driver, f"{card} .gallery figcaption", CELL_TYPE)  # "87%" after the type
        _placed(driver, f"{card} .typed-count", CELL_TYPE)  # its count after the type
        _placed(driver, f"{card} .clash", STATION)
        _placed(driver, form, SPECIMEN)
        _placed(driver, form, OTHER_SPECIMEN)
        listed = driver.find_element(By.CSS_SELECTOR, option).get_attribute("textContent")
        assert listed.startswith(f"\u2068{SPECIMEN}\u2069 · run run-a · ") and listed.endswith(
            f"verified (\u2068{SIGNER}\u2069)"), listed
        assert driver.title == f"CRITICAL: \u2068{STATION}\u2069 · smearscope: stations"

        driver.execute_script("window.print = () => {};")
        driver.find_element(By.CSS_SELECTOR, f"{card} .print-run").click()
        feet = driver.execute_script(
            "const s = [...document.styleSheets].find((s) => s.href && s.href.endsWith('/dashboard.css'));"
            "return [...s.cssRules].filter((r) => r instanceof CSSPageRule).map((r) => r.cssText);")
        assert any(f"Specimen \u2068{SPECIMEN}\u2069 · station \u2068{STATION}\u2069 · run run-b" in f for f in feet), feet
        with _print_media(driver):
            _placed(driver, f"{card} .print-ids", SPECIMEN)
            _placed(driver, f"{card} .print-ids", STATION)
            _placed(driver, f"{card} .print-status", SIGNER)  # the signing date after the signer


HOSTILE_SPECIMEN = '<img src=x onerror="window.__pwned=9">'
TYPED_SPECIMEN = "<b id=pwn-typed>S-2</b>"  # scanned while the run is open
#: A specimen id that closes the printed foot's CSS string and adds a rule, were it not escaped.
CSS_SPECIMEN = 'x"; } @page { size: 1px } @page x { content: "\\'


@pytest.mark.broker
@needs_chromium
def test_a_specimen_id_that_is_markup_is_shown_as_text_everywhere_it_is_shown(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A specimen id the station took as given (`<img src=x onerror=...>`) in a run's progress, in
    an earlier run's report, typed into the run form, printed and in the printed page's foot: no
    element made, no handler run, the id shown as text; one that would close the foot's CSS string
    leaves each station its one page rule."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    now = time.time()
    open_run = _closed_run_state(_specimen("ward-x", "run-x", [], now))
    open_run = {**open_run, "state": "open", "progress": {**open_run["progress"], "specimen_id": HOSTILE_SPECIMEN}}
    earlier = _closed_run_state(_specimen("ward-x", "run-w", [], now - 7200).model_copy(
        update={"specimen_id": HOSTILE_SPECIMEN}))
    css = _closed_run_state(_specimen("ward-y", "run-y", [], now).model_copy(update={"specimen_id": CSS_SPECIMEN}))
    with _page_and_a_station(tmp_path, ws_broker, ("--run-control",)) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, open_run, css, online=True)
        card = "[data-station='ward-x']"
        text = lambda sel: driver.find_element(By.CSS_SELECTOR, f"{card} {sel}").get_attribute("textContent")
        _wait("ward-x online", lambda: _status(driver, "ward-x") == "online", 20, [log])
        send("smearscope/ward-x/cmd_response/get_runs", json.dumps({"ok": True, "runs": [earlier]}), retain=False)
        _wait("the earlier run listed", lambda: driver.find_elements(By.CSS_SELECTOR, f"{card} option[value='run-w']"),
              20, [log])
        driver.find_element(By.CSS_SELECTOR, f"{card} .specimen-id").send_keys(TYPED_SPECIMEN, Keys.ENTER)
        _wait("the run form's refusal", lambda: "before starting specimen" in text(".run-control-state"), 20, [log])
        driver.execute_script("window.print = () => {};")
        driver.find_element(By.CSS_SELECTOR, f"{card} .print-run").click()
        feet = driver.execute_script(
            "const s = [...document.styleSheets].find((s) => s.href && s.href.endsWith('/dashboard.css'));"
            "return [...s.cssRules].filter((r) => r instanceof CSSPageRule).map((r) => r.cssText);")
        page = driver.execute_script(PAGE_INSPECTION)
        assert page["pwned"] is None and page["injected"] == 0 and page["handlers"] == [], page
        assert text(".run-line").startswith(f"specimen {HOSTILE_SPECIMEN} · run run-x · ")
        assert text("option[value='run-w']").startswith(f"\u2068{HOSTILE_SPECIMEN}\u2069 · run run-w")
        assert text(".run-control-state") == (f"run run-x for specimen {HOSTILE_SPECIMEN} is still open: stop it "
                                              f"(Stop run) before starting specimen {TYPED_SPECIMEN}; nothing sent")
        assert text(".print-ids").startswith(f"Specimen {HOSTILE_SPECIMEN} · Station ward-x · run run-x")
    # each station's page foot says its specimen whole: the CSS string neither closed nor cut
    assert len(feet) == 2 and all('"Specimen' in f for f in feet), feet
    assert sorted(_css_string(f, f.index('"Specimen')) for f in feet) == [
        f"Specimen \u2068{HOSTILE_SPECIMEN}\u2069 · station \u2068ward-x\u2069 · run run-x",
        f"Specimen \u2068{CSS_SPECIMEN}\u2069 · station \u2068ward-y\u2069 · run run-y"], feet


def _css_string(css: str, at: int) -> str:
    """The text of the CSS string that starts at `at` (its escapes read)."""
    assert css[at] == '"'
    out, i = [], at + 1
    while css[i] != '"':
        if css[i] == "\\":
            hexed = re.match(r"[0-9a-fA-F]{1,6} ?", css[i + 1:])
            out.append(chr(int(hexed.group().strip(), 16)) if hexed else css[i + 1])
            i += 1 + (len(hexed.group()) if hexed else 1)
        else:
            out.append(css[i])
            i += 1
    return "".join(out)
