"""The clinic dashboard on the microscope's small screen, in a real browser (Chromium through
selenium, as tests/test_dashboard.py) against a real mosquitto: at a 1024x600 tablet and an
800x1280 one held upright nothing is wider than the screen and the differential keeps its bars;
every text shown reads at WCAG AA contrast (computed from the page's own colours, as the browser
renders them); a screen reader names each card's run form and each crop's type list, and says the
form's and the Verify form's answers (live regions)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from broker import MosquittoBroker
from test_dashboard import (
    _closed_run_state,
    _open_with_runs,
    _page_and_a_station,
    _specimen,
    _status,
    _wait,
    needs_chromium,
)

from smearscope.service.analysis.morphology import GRADED
from smearscope.service.analysis.report import ClassShare, Flag, Report

ROOT = Path(__file__).resolve().parents[1]


def with_zero_rows(report: Report) -> Report:
    """`report` with a row of 0 for each class of the committed heads' it lacks (the WBC head's
    differential classes, the RBC head's graded ones), as a report since schema 1.3 lists them."""
    def classes(head: str) -> list[str]:
        return json.loads((ROOT / "models" / f"{head}.json").read_text())["classes"]
    def zeros(rows: list[ClassShare], labels: list[str], n: int, grade: str | None) -> list[ClassShare]:
        high = round(100 * 3.8415 / (n + 3.8415), 2)  # Wilson's upper end at 0 of n
        listed = {r.label for r in rows}
        return rows + [ClassShare(label=c, count=0, percent=0.0, ci95_low=0.0, ci95_high=high, grade=grade)
                       for c in sorted(labels) if c not in listed]
    wbc = zeros(report.wbc_differential, [c for c in classes("wbc_head") if c not in ("erythroblast", "platelet")],
                report.counts.wbc, None)
    rbc = zeros(report.rbc_morphology, [c for c in classes("rbc_head") if c in GRADED], report.counts.rbc, "none")
    return report.model_copy(update={"wbc_differential": wbc, "rbc_morphology": rbc})

#: Every visible text node's contrast ratio against the colours behind it (WCAG 2.x relative
#: luminance; the element's opacity and its ancestors' counted), with what AA asks of its size.
CONTRAST_JS = """
const parse = (c) => { const p = c.match(/rgba?\\(([^)]+)\\)/)[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
  return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
const lin = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
const lum = (c) => 0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2]);
const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3])).concat([1]);
const out = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let t = walker.nextNode(); t; t = walker.nextNode()) {
  const e = t.parentElement;
  if (!t.textContent.trim() || !e.checkVisibility() || e.getClientRects().length === 0) continue;
  let bg = [255, 255, 255, 1], alpha = 1;
  const chain = [];
  for (let n = e; n; n = n.parentElement) { chain.push(n); alpha *= Number(getComputedStyle(n).opacity); }
  for (const n of chain.reverse()) { const c = parse(getComputedStyle(n).backgroundColor); if (c[3] > 0) bg = over(c, bg); }
  const s = getComputedStyle(e), fg = parse(s.color);
  const shown = over([fg[0], fg[1], fg[2], fg[3] * alpha], bg);
  const hi = Math.max(lum(shown), lum(bg)), lo = Math.min(lum(shown), lum(bg));
  const px = parseFloat(s.fontSize), large = px >= 24 || (Number(s.fontWeight) >= 700 && px >= 18.66);
  out.push([t.textContent.trim().slice(0, 40), Math.round((hi + 0.05) / (lo + 0.05) * 100) / 100, large ? 3 : 4.5]);
}
return out;
"""


@pytest.mark.broker
@needs_chromium
def test_the_page_on_a_tablet_fits_its_screen_reads_at_aa_contrast_and_names_each_run_form(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    import cv2
    import numpy as np
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    now = time.time()
    flags = [Flag(code="sickle_cells_present", severity="critical", cells=[1], message="120 cells typed sickle"),
             Flag(code="atypical_wbc_present", severity="warning", cells=[2], message="5 white cells could not be typed"),
             Flag(code="few_fields", severity="info", cells=[], message="fewer fields than asked")]
    # every class of the heads' listed, those no cell was given at 0: the card's full length
    closed = with_zero_rows(_specimen("ward-a", "run-a", flags, now - 600)).model_copy(
        update={"specimen_id": "H-2026-0412"})
    open_run = {**_closed_run_state(_specimen("ward-b", "run-b", [], now)), "state": "open"}
    with _page_and_a_station(tmp_path, ws_broker, ("--run-control",)) as (driver, send, log, url):
        for station in ("ward-a", "ward-b", "ward-c"):
            send(f"smearscope/{station}/status", "online")
        _open_with_runs(driver, send, log, url, closed, open_run)
        inside = lambda s, sel: driver.find_element(By.CSS_SELECTOR, f"[data-station='{s}'] {sel}")
        _wait("ward-c", lambda: _status(driver, "ward-c") == "online", 20, [log])
        # ward-c's last sample, then ward-c offline: its telemetry stale, its disk_full alarm shown
        send("smearscope/ward-c/telemetry", json.dumps({"read_at": now, "pipeline": {"disk_full": True, "outbox_messages": 3}}),
             retain=False)
        _wait("the sample", lambda: inside("ward-c", "dd[data-key='pipeline.disk_full']").text == "true", 20, [log])
        send("smearscope/ward-c/status", "offline")
        _wait("stale", lambda: inside("ward-c", "dl.telemetry").get_attribute("data-stale") == "true", 20, [log])
        # ward-a's review gallery: two crops, each with its type list
        crop = base64.b64encode(cv2.imencode(".jpg", np.full((8, 8, 3), 200, np.uint8))[1].tobytes()).decode()
        cells = [{"field_id": "f1", "cell": n, "kind": "wbc", "label": label, "label_score": score, "atypical": False,
                  "typeable": True, "jpeg": crop} for n, label, score in ((3, "unidentified", 0.41), (5, "monocyte", 0.62))]
        send("smearscope/ward-a/cmd_response/get_review", json.dumps({
            "ok": True, "run_id": "run-a", "offset": 0, "total": 2, "not_kept": 0, "next_offset": None,
            "wbc_types": ["lymphocyte", "monocyte"], "rbc_types": ["normal"], "overlay": None, "cells": cells}),
             retain=False)
        _wait("the gallery", lambda: len(driver.find_elements(By.CSS_SELECTOR, "[data-station='ward-a'] select.type")) == 2,
              20, [log])
        inside("ward-a", ".start-run").click()  # no id: the form's error said
        inside("ward-a", ".verify-run").click()  # no initials: the Verify form's error said
        driver.find_element(By.CSS_SELECTOR, "header h1").click()
        ActionChains(driver).send_keys("H-1").perform()  # a scan with no card in use: the header's note
        assert driver.find_element(By.ID, "scan-note").is_displayed()

        for width, height in ((1024, 600), (800, 1280)):
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            try:
                time.sleep(0.3)  # a layout at the new size
                page = driver.execute_script("const d = document.documentElement; return [d.scrollWidth, d.clientWidth];")
                assert page[0] <= page[1], (width, page)  # no horizontal scrolling
                for sel in (".specimen-id", ".start-run", ".critical-alert"):
                    box = inside("ward-a", sel).rect
                    assert box["x"] >= 0 and box["x"] + box["width"] <= page[1] and box["y"] + box["height"] <= height, \
                        (width, sel, box)
                bars = [inside("ward-a", f"tr[data-label='{c}'] td.bar").rect["width"] for c in ("neutrophil", "lymphocyte")]
                # the share and its 95 % interval drawn a pixel per % at least (three columns at 800 px
                # left 56 px, none beside a long cell name)
                assert min(bars) >= 100, (width, bars)
                # a class no white cell was given is shown at 0 (a result), not hidden
                eos = inside("ward-a", "table.differential tr[data-label='eosinophil']")
                assert eos.is_displayed() and [td.text for td in eos.find_elements(By.CSS_SELECTOR, "td")][1:3] == \
                    ["0", "0.0"], width
                driver.save_screenshot(str(tmp_path / f"tablet-{width}x{height}.png"))  # for a person to look at
            finally:
                driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

        texts = driver.execute_script(CONTRAST_JS)
        assert any(t == "true" for t, _, _ in texts) and any(t.startswith("CRITICAL") for t, _, _ in texts)
        assert any(t.startswith("typed keys reached no station") for t, _, _ in texts)
        low = [(t, ratio) for t, ratio, need in texts if ratio < need]
        assert low == [], low

        # a screen reader: each card's form named with its station, its answers and Verify's said
        field = inside("ward-a", ".specimen-id")
        assert field.accessible_name == "specimen id for a run on station ward-a"
        assert inside("ward-b", ".specimen-id").accessible_name == "specimen id for a run on station ward-b"
        for sel in (".run-control-state", ".verify-state"):
            node = inside("ward-a", sel)
            assert node.aria_role == "status" and node.text, sel
        assert inside("ward-a", ".critical-alert").aria_role == "alert"
        # each crop's type list by its crop (every list's title is the same)
        assert [n.accessible_name for n in driver.find_elements(By.CSS_SELECTOR, "[data-station='ward-a'] select.type")] == [
            "type of cell 1, wbc: unidentified (no type sure enough: best 41%)", "type of cell 2, wbc: monocyte 62%"]
