"""A run's report on paper, from the clinic dashboard in a real browser (Chromium through selenium,
as tests/test_dashboard.py): "Print report" prints the card it belongs to alone, as a report that
says what state its figures are in, whose they are and when it was printed; the browser's own print
gives every station's, one per page (a screenshot of the printed card: print-one.png
in the test's tmp dir). Print media is emulated and the page printed to PDF by
Chromium's DevTools protocol (the print dialog itself is the browser's)."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker import MosquittoBroker
from pdf_pages import page_texts, tagged_spans
from test_dashboard import (
    _closed_run_state,
    _open_with_runs,
    _page_and_a_station,
    _print_media,
    _specimen,
    _status,
    _wait,
    needs_chromium,
)

from smearscope.service.analysis.report import (
    NOT_RECORDED,
    ClassShare,
    Flag,
    ModelInfo,
    Report,
    Verification,
)
from smearscope.service.fhir.bundle import software_text


def _pdf_pages(driver) -> int:
    pdf = base64.b64decode(driver.execute_cdp_cmd("Page.printToPDF", {"printBackground": False})["data"])
    return len(re.findall(rb"/Type\s*/Page(?![s\w])", pdf))


def _same_on_screen_and_paper(driver: Any, shown: Callable[[], Any], want: Any) -> None:
    """Asserts what `shown` reads of the page equals `want` on the screen and with print media emulated."""
    assert shown() == want, shown()
    with _print_media(driver):
        assert shown() == want, shown()


def _lines_on_screen_and_paper(driver: Any, line: str, want: dict[str, str]) -> None:
    """Asserts the `line` element (a CSS selector inside a card) of each station in `want` is shown
    and reads as `want` says, on the screen and on paper."""
    from selenium.webdriver.common.by import By

    element = lambda s: driver.find_element(By.CSS_SELECTOR, f"[data-station='{s}'] {line}")
    _same_on_screen_and_paper(driver, lambda: {s: element(s).text for s in want if element(s).is_displayed()}, want)


@pytest.mark.broker
@needs_chromium
def test_print_report_prints_the_run_shown_alone_as_a_report_and_ctrl_p_each_station_on_its_own_page(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    from selenium.webdriver.common.by import By

    now = time.time()
    atypical = Flag(code="atypical_wbc_present", severity="warning", cells=[1], message="5 white cells could not be typed")
    models = {"seg": ModelInfo(name="seg", sha256="ab" * 32, backend="onnxruntime"),
              "wbc_head": ModelInfo(name="wbc_head", sha256="cd" * 32, backend="onnxruntime")}
    sickle = Flag(code="sickle_cells_present", severity="critical", cells=[1],
                  message="120 cells typed sickle at confidence 0.8 or more")
    # analysed by 0.0.9, signed by 0.1.0 after the station was updated
    verified = _specimen("ward-a", "run-a", [sickle], now - 600).model_copy(update={
        "models": models, "software_version": "0.1.0", "analysis_software": ["0.0.9"], "verification": Verification(verified_by="AB", verified_at=now - 60, supersedes="r-0",
                                                       typed_cells=4, reclassified=[])})
    preliminary = _specimen("ward-b", "run-b", [atypical], now - 300).model_copy(
        update={"models": models, "specimen_id": "H-2026-0412", "software_version": "0.1.0",
                # a run taken back after the update to 0.1.0: its first fields stored by a version that recorded none
                "analysis_software": [NOT_RECORDED, "0.1.0"]})
    open_run = _closed_run_state(_specimen("ward-c", "run-c", [], now))  # its specimen in its progress only
    open_run = {**open_run, "state": "open", "progress": {**open_run["progress"], "specimen_id": "S/7 <b>"}}
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, verified, preliminary, open_run, online=True)
        card = lambda s: driver.find_element(By.CSS_SELECTOR, f"[data-station='{s}']")
        inside = lambda s, sel: card(s).find_element(By.CSS_SELECTOR, sel)
        # served without --run-control: no run form, the station online all the same
        _wait("ward-b online", lambda: _status(driver, "ward-b") == "online", 20, [log])
        assert not inside("ward-b", ".run-control").is_displayed()
        # on screen: the specimen first on the run's line, the button, not the paper's header
        assert inside("ward-b", ".run-line").text.startswith("specimen H-2026-0412 · run run-b · ")
        assert inside("ward-c", ".run-line").text.startswith("specimen S/7 <b> · run run-c · ")
        assert inside("ward-a", ".run-line").text.startswith("run run-a · ")  # none given
        earlier = _closed_run_state(_specimen("ward-a", "run-a0", [], now - 7200).model_copy(update={"specimen_id": "H-1"}))
        send("smearscope/ward-a/cmd_response/get_runs", json.dumps({"ok": True, "runs": [earlier]}), retain=False)
        options = lambda: [o.get_attribute("textContent") for o in card("ward-a").find_elements(By.CSS_SELECTOR, "select.runs option")]
        _wait("the earlier run listed", lambda: len(options()) == 2, 20, [log])
        assert options()[1].startswith("\u2068H-1\u2069 · run run-a0 · "), options()  # the specimen isolated
        assert inside("ward-b", ".print-run").is_displayed() and not inside("ward-b", ".print-meta").is_displayed()
        driver.execute_script("window.print = () => { window.__printed = document.body.dataset.printing || null; };")
        inside("ward-b", ".print-run").click()
        assert driver.execute_script("return window.__printed") == "ward-b"
        with _print_media(driver):
            assert [s for s in ("ward-a", "ward-b", "ward-c") if card(s).is_displayed()] == ["ward-b"]
            for live in (".panel.live", ".panel.review", ".print-run", ".status", ".progress"):
                assert not inside("ward-b", live).is_displayed(), live
            for kept in ("table.differential", "table.morphology", "ul.flags", ".counts-line", ".print-meta"):
                assert inside("ward-b", kept).is_displayed(), kept
            assert inside("ward-b", ".print-status").text.startswith("PRELIMINARY machine result, not verified")
            assert inside("ward-b", ".print-ids").text.startswith(
                "Specimen H-2026-0412 · Station ward-b · run run-b · report r-run-b of ")
            # in the words of the FHIR Device note and the HL7 SFT, not "smearscope (not recorded) and 0.1.0"
            words = "smearscope 0.1.0 (some fields by an earlier version that did not record its number)"
            assert software_text([NOT_RECORDED, "0.1.0"]) == words
            assert inside("ward-b", ".print-models").text == (words + " · Models: seg " + "ab" * 6 + " (onnxruntime) · wbc_head "
                                                               + "cd" * 6 + " (onnxruntime)")
            assert re.fullmatch(r"Printed \d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*", inside("ward-b", ".printed-at").text)
            assert inside("ward-b", "ul.flags").text == "warning: " + atypical.message
            driver.save_screenshot(str(tmp_path / "print-one.png"))  # for a person to look at
            assert _pdf_pages(driver) == 1  # Chromium says beforeprint and afterprint around it, as a print does
            # printed (afterprint): the page as it was; the browser's own print then gives every card, one per page
            assert [s for s in ("ward-a", "ward-b", "ward-c") if card(s).is_displayed()] == ["ward-a", "ward-b", "ward-c"]
            assert _pdf_pages(driver) == 3
            assert inside("ward-a", ".print-status").text.startswith("Verified specimen report: verified by AB, ")
            assert inside("ward-a", ".print-models").text.startswith(
                "smearscope 0.0.9 (verified with smearscope 0.1.0) · Models: seg ")
            alert = inside("ward-a", ".critical-alert")  # on paper too, framed (a background may not print)
            assert alert.is_displayed() and alert.text == "CRITICAL: " + sickle.message
            assert alert.value_of_css_property("border-top-width") == "3px"
            assert inside("ward-c", ".print-status").text.startswith(
                "INTERIM: the run is in progress (40 fields so far); its figures will change.")
            assert inside("ward-c", ".print-models").text == ""  # the report names none
            assert inside("ward-c", ".print-ids").text.startswith("Specimen S/7 <b> · Station ward-c · run run-c")
            # a report for the patient's file that names no specimen says so, not only by leaving it out
            assert inside("ward-a", ".print-ids").text.startswith(
                "Specimen: none given (the run was not started for a specimen id) · Station ward-a · run run-a")
        assert inside("ward-b", ".panel.review").is_displayed() and not inside("ward-b", ".print-meta").is_displayed()
        # an earlier run picked and printed: the current run's critical finding (another specimen's) is
        # said on screen, never on the earlier run's paper
        from selenium.webdriver.support.ui import Select
        Select(inside("ward-a", "select.runs")).select_by_value("run-a0")
        _wait("the earlier run shown", lambda: inside("ward-a", ".print-ids").get_attribute("textContent").startswith(
            "Specimen H-1 · Station ward-a · run run-a0"), 20, [log])
        alert = inside("ward-a", ".critical-alert")
        assert alert.is_displayed() and alert.text == "CRITICAL (current run): " + sickle.message
        with _print_media(driver):
            assert inside("ward-a", ".print-meta").is_displayed() and not alert.is_displayed()


def _long_report(station: str, run_id: str, now: float) -> Report:
    """A specimen report as long as one gets: every white and red cell class the heads name and
    then some, each red-cell grade with its interval, a critical flag and eight warnings."""
    wbc = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "band", "blast",
           "myelocyte", "promyelocyte", "reactive_lymphocyte", "plasma_cell", "unidentified"]
    rbc = ["normal", "macrocyte", "microcyte", "spherocyte", "target", "stomatocyte", "ovalocyte", "teardrop", "burr",
           "schistocyte", "hypochromia", "elliptocyte", "sickle", "other_poikilocyte"]
    flags = [Flag(code="sickle_cells_present", severity="critical", cells=[1], message="120 cells typed sickle")]
    flags += [Flag(code=f"warning_{i}", severity="warning", cells=[1],
                   message=f"warning {i}: a finding on this smear that a person should look at, said at some length")
              for i in range(8)]
    return _specimen(station, run_id, flags, now).model_copy(update={
        "wbc_differential": [ClassShare(label=c, count=10 + i, percent=7.14, ci95_low=2.0, ci95_high=12.5)
                             for i, c in enumerate(wbc)],
        "rbc_morphology": [ClassShare(label=c, count=30 + i, percent=1.5, grade="1+", grade_ci_low="none",
                                      grade_ci_high="2+") for i, c in enumerate(rbc)],
        "specimen_id": 'H-2026/0412 "Ü\\'})


@pytest.mark.broker
@needs_chromium
def test_a_long_report_names_its_specimen_on_every_printed_page_and_cuts_no_row(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A4 and Letter: a long report takes two pages; each says at its foot the specimen, station
    and run and which page of how many (the second page alone said nothing of whose it was), and no
    table row or flag is cut across two pages (read from the tagged PDF's structure)."""
    from selenium.webdriver.common.by import By

    report = _long_report("ward-a", "run-a", time.time())
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send("smearscope/ward-a/status", "online")
        send("smearscope/ward-b/status", "online")
        _open_with_runs(driver, send, log, url, report)
        _wait("ward-b", lambda: _status(driver, "ward-b") == "online", 20, [log])
        driver.execute_script("window.print = () => {};")
        foot = 'SpecimenH-2026/0412"Ü\\·stationward-a·runrun-a'
        for paper, (width, height) in {"A4": (8.27, 11.69), "Letter": (8.5, 11.0)}.items():
            driver.find_element(By.CSS_SELECTOR, "[data-station='ward-a'] .print-run").click()
            pdf = base64.b64decode(driver.execute_cdp_cmd("Page.printToPDF", {
                "paperWidth": width, "paperHeight": height, "generateTaggedPDF": True})["data"])
            (tmp_path / f"long-{paper}.pdf").write_bytes(pdf)  # for a person to look at
            texts = page_texts(pdf)
            assert len(texts) == 2, (paper, len(texts))
            for number, text in enumerate(texts, 1):
                assert foot in text and f"page{number}of2" in text, (paper, number, text[-200:])
            assert "warning7:" in texts[1] and "ward-b" not in "".join(texts)
            cut = [(role, pages) for role, pages in tagged_spans(pdf, ("TR", "LI")) if len(pages) > 1]
            assert cut == [], (paper, cut)
            assert len(tagged_spans(pdf, ("TR",))) == 2 * 15 and len(tagged_spans(pdf, ("LI",))) == 9


@pytest.mark.broker
@needs_chromium
def test_a_card_two_stations_publish_under_prints_without_the_screens_red_frame(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """On paper a card is a report without the screen's frames (a critical one's included: its alert
    is framed instead). A card two stations publish under kept its red frame on paper: the screen's
    [data-clash] rule outranked the print rule, which names only [data-critical]."""
    from selenium.webdriver.common.by import By

    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send("smearscope/ward-x/status", "online")
        _open_with_runs(driver, send, log, url, _specimen("ward-x", "run-x", [], time.time()))
        card = lambda: driver.find_element(By.CSS_SELECTOR, "[data-station='ward-x']")
        for instance, host in (("cccc00000003", "jetson-3"), ("dddd00000004", "jetson-7"), ("cccc00000003", "jetson-3")):
            send("smearscope/ward-x/telemetry", json.dumps({"source": "proc", "read_at": time.time(), "interval_s": 60.0,
                                                            "instance_id": instance, "host": host}), retain=False)
        _wait("the clash said", lambda: card().get_attribute("data-clash") == "true", 20, [log])
        assert card().value_of_css_property("box-shadow") != "none"  # on screen: framed in red
        with _print_media(driver):
            assert card().value_of_css_property("box-shadow") == "none"


def _tables_on_screen_and_paper(tmp_path: Path, ws_broker: MosquittoBroker, station: str, report, cells: str,
                                want: dict) -> None:
    """Publishes `report` as `station`'s closed run, opens the dashboard and asserts its differential and
    morphology rows (`cells`: a script mapping a table row `r` to what is read of it) and its counts line
    equal `want`, on the screen and with print media emulated."""
    from selenium.webdriver.common.by import By

    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, report)
        card = f"[data-station='{station}']"

        def shown() -> dict:
            rows = {t: driver.execute_script(
                f"return [...document.querySelectorAll(arguments[0])].map((r) => {cells})",
                f"{card} table.{t} tbody tr") for t in ("differential", "morphology")}
            return {**rows, "counts": driver.find_element(By.CSS_SELECTOR, f"{card} .counts").text}

        _same_on_screen_and_paper(driver, shown, want)


@pytest.mark.broker
@needs_chromium
def test_shares_intervals_and_nrbc_read_to_one_decimal_on_screen_and_on_paper(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """The report keeps its shares to two decimals for audit; the page showed them so ("53.57",
    "44.12–62.89", "3.26 of 92 RBC", "1.79 per 100 WBC"), a precision no count of 112 white cells
    has, and whole ones bare ("100", "0"). Every share, interval bound and NRBC per 100 WBC now
    reads to one decimal, on the screen and on paper, as `smearscope analyze` prints them (Python's
    rounding: an exact tie such as 96.25 goes to the even digit, 96.2); an interval's bounds rounded
    outward (lower down, upper up), as FHIR, HL7 and the summary send them: to the nearest, 0 of 112
    basophils (0 to 3.32 %) read 0.0–3.3, narrower than the count's interval."""
    from collections import Counter

    from smearscope.service.analysis.aggregate import share_rows
    from smearscope.service.analysis.report import Counts

    report = _specimen("ward-d", "run-d", [], time.time()).model_copy(update={
        "counts": Counts(rbc=4000, wbc=112, platelet=300, nrbc=2), "nrbc_per_100_wbc": 1.79,
        # the analyzer's own shares and Wilson intervals: 53.57 (44.37 to 62.54), 46.43 (37.46 to 55.63), 0 (0 to 3.32)
        "wbc_differential": share_rows(Counter(neutrophil=60, lymphocyte=52, basophil=0)),
        "rbc_morphology": [ClassShare(label="normal", count=3850, percent=96.25),
                           ClassShare(label="target", count=150, percent=3.75, grade="none"),
                           ClassShare(label="spherocyte", count=3, percent=3.26, grade="none", of_cells=92),
                           # one cell of 4000: 0.03 reads 0.0, which says none seen; '<0.1', as FHIR, HL7 and analyze
                           ClassShare(label="elliptocyte", count=1, percent=0.03, grade="none")]})
    # each interval rounded outward, as FHIR, HL7 and the summary send it (to the nearest: 44.4–62.5, 0.0–3.3)
    want = {"differential": [["60", "53.6", "44.3–62.6"], ["52", "46.4", "37.4–55.7"], ["0", "0.0", "0.0–3.4"]],
            "morphology": [["3850", "96.2", ""], ["150", "3.8", "below 1+"], ["3", "3.3 of 92 RBC", "below 1+"],
                           ["1", "<0.1", "below 1+"]],
            "counts": "RBC 4000 · WBC 112 · platelets 300 · NRBC 2 (1.8 per 100 WBC)"}
    assert [f"{s.percent:.1f}" for s in report.rbc_morphology] == ["96.2", "3.8", "3.3", "0.0"]  # as the CLI prints them
    _tables_on_screen_and_paper(tmp_path, ws_broker, "ward-d", report,
                                "[...r.cells].slice(1, 4).map((td) => td.innerText.trim())", want)


@pytest.mark.broker
@needs_chromium
def test_a_share_of_all_but_some_cells_reads_more_than_99_9_and_nrbc_under_a_tenth_less_than_0_1(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """2499 lymphocytes of 2500 white cells (99.96 %) read "100.0", every white cell a lymphocyte beside a
    neutrophil counted; 1 NRBC among them (0.04 per 100 WBC) read "0.0 per 100 WBC" beside "NRBC 1". They
    now read ">99.9" and "<0.1 per 100 WBC", on the screen and on paper, as FHIR, HL7 and analyze send and
    print them (service.fhir.report_view.share_read); a share of every cell (10 000 of 10 000 red cells
    normal) still reads 100.0."""
    from collections import Counter

    from smearscope.service.analysis.aggregate import share_rows
    from smearscope.service.analysis.report import Counts

    report = _specimen("ward-l", "run-l", [], time.time()).model_copy(update={
        "counts": Counts(rbc=10000, wbc=2500, platelet=300, nrbc=1), "nrbc_per_100_wbc": 0.04,
        "wbc_differential": share_rows(Counter(lymphocyte=2499, neutrophil=1)),
        "rbc_morphology": share_rows(Counter(normal=10000, target=0))})
    want = {"differential": [">99.9", "<0.1"], "morphology": ["100.0", "0.0"],
            "counts": "RBC 10000 · WBC 2500 · platelets 300 · NRBC 1 (<0.1 per 100 WBC)"}
    assert f"{report.wbc_differential[0].percent:.1f}" == "100.0"  # what one decimal alone says
    _tables_on_screen_and_paper(tmp_path, ws_broker, "ward-l", report, "r.cells[2].innerText.trim()", want)


@pytest.mark.broker
@needs_chromium
def test_the_scales_source_and_the_red_cells_size_are_on_screen_and_on_paper(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """The report says whether its red cells were sized at a calibrated scale (rbc_size.calibrated,
    the flags size_not_assessable_without_calibration, sizes_from_calibrated_fields_only,
    calibration_suspect, calibration_drift_suspected) and their mean diameter, SD, CV and median, as `smearscope analyze`
    prints them; the page and its printout said neither, so a run at an estimated scale read like
    a calibrated one but for a grey info flag. Each card now says, above its morphology table,
    where its scale came from and the red cells' size (the CV of diameters named as no RDW)."""

    from smearscope.service.analysis.report import SizeStats

    now = time.time()
    calibrated = _specimen("ward-k", "run-k", [], now)
    estimated = _specimen("ward-e", "run-e", [Flag(
        code="size_not_assessable_without_calibration", severity="info", message="the scale was estimated")], now
    ).model_copy(update={"rbc_size": SizeStats(n=200, mean_diameter_um=None, sd_um=None, cv_percent=None,
                                                median_diameter_um=None, calibrated=False)})
    doubted = _specimen("ward-s", "run-s", [Flag(code="calibration_suspect", severity="warning",
                                                 message="the red cells point to 0.1 um/px")], now)
    drifted = _specimen("ward-d", "run-d", [Flag(code="calibration_drift_suspected", severity="warning",
                                                 message="a median of 0.70 over the last 18 checked fields")], now)
    mixed = _specimen("ward-m", "run-m", [Flag(code="sizes_from_calibrated_fields_only", severity="info",
                                               message="1800 of 4000 red cells came from fields at an estimated scale")], now)
    want = {
        "ward-k": "Scale: calibrated · red-cell diameter mean 7.4 µm, SD 0.6 µm, median 7.3 µm, 200 cells sized; "
                  "CV of diameters 8.1 % (not an RDW)",
        "ward-e": "Scale: estimated from the red cells (not calibrated): red-cell sizes, microcytes, macrocytes "
                  "and spherocytes not assessable",
        "ward-s": "Scale: calibrated, in doubt (see the flags): red-cell sizes, microcytes, macrocytes and "
                  "spherocytes not read",
        "ward-d": "Scale: calibrated, in doubt (see the flags): red-cell sizes, microcytes, macrocytes and "
                  "spherocytes not read",
        "ward-m": "Scale: calibrated on some fields, estimated on others (sizes from the calibrated fields' red cells) · "
                  "red-cell diameter mean 7.4 µm, SD 0.6 µm, median 7.3 µm, 200 cells sized; CV of diameters 8.1 % "
                  "(not an RDW)"}
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, calibrated, estimated, doubted, drifted, mixed)
        _lines_on_screen_and_paper(driver, ".size-line", want)


@pytest.mark.broker
@needs_chromium
def test_a_count_of_no_nucleated_red_cells_is_said_not_left_out(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A report counts nucleated red cells apart (counts.nrbc, nrbc_per_100_wbc): with none the
    counts line said nothing of them, as it does for a report from before they were counted, so
    "NRBC 0" (a result an analyzer prints) could not be told from "not counted". A report that
    counted them now says "NRBC 0 (0.0 per 100 WBC)"; one that did not (no nrbc_per_100_wbc) still
    says nothing."""
    from selenium.webdriver.common.by import By

    now = time.time()
    counted = _specimen("ward-z", "run-z", [], now).model_copy(update={"nrbc_per_100_wbc": 0.0})
    older = _specimen("ward-o", "run-o", [], now)
    assert older.nrbc_per_100_wbc is None and older.counts.nrbc == 0
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, counted, older)
        counts = lambda s: driver.find_element(By.CSS_SELECTOR, f"[data-station='{s}'] .counts").text
        assert counts("ward-z") == "RBC 4000 · WBC 112 · platelets 300 · NRBC 0 (0.0 per 100 WBC)", counts("ward-z")
        assert counts("ward-o") == "RBC 4000 · WBC 112 · platelets 300", counts("ward-o")


@pytest.mark.broker
@needs_chromium
def test_a_verified_report_says_what_the_technician_changed_and_a_report_signed_again_that_it_corrects_one(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A verified report counts the types a technician gave (verification.typed_cells, reclassified,
    counts.artefact) and, signed again, names the signature it replaces (supersedes_verified_by,
    _at; its FHIR bundle is `amended`, its HL7 result `C`). Its printout said "verified by EF" and
    nothing of that: a corrected report read as a first one, its figures not the ones on the
    patient's file, and no word of objects left out of every count as no cell. It now says them,
    on paper and on the run's line."""
    from selenium.webdriver.common.by import By

    from smearscope.service.analysis.report import Counts, Reclassified

    now = time.time()
    retyped = [Reclassified(field_id="f1", cell=3, machine_label="unidentified", label="monocyte"),
               Reclassified(field_id="f2", cell=9, machine_label="lymphocyte", label="artefact")]
    signed = lambda by, at, again: Verification(
        verified_by=by, verified_at=at, supersedes="r-0", typed_cells=5, reclassified=retyped, left_to_review=3,
        **({"supersedes_verified_by": "CD", "supersedes_verified_at": now - 3600} if again else {}))
    counts = Counts(rbc=4000, wbc=111, platelet=300, artefact=1)
    again = _specimen("ward-v", "run-v", [], now).model_copy(update={"verification": signed("EF", now - 60, True),
                                                                      "counts": counts})
    first = _specimen("ward-f", "run-f", [], now).model_copy(update={"verification": signed("CD", now - 3600, False),
                                                                      "counts": counts})
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, again, first)
        inside = lambda s, sel: driver.find_element(By.CSS_SELECTOR, f"[data-station='{s}'] {sel}")
        typed = (" The technician typed 5 cells, 2 of them otherwise than the analyzer; 1 object typed as no cell "
                 "(artefact) is in no count. 3 cells left as the analyzer called them.")
        assert re.fullmatch(r"verified specimen report \(verified by EF, .+; 3 cells left as the analyzer "
                            r"called them; corrected: replaces the report CD signed \d{4}-\d\d-\d\d .+\)",
                            inside("ward-v", ".run-line").text.split(" · ")[-1]), inside("ward-v", ".run-line").text
        assert "corrected" not in inside("ward-f", ".run-line").text
        with _print_media(driver):
            status = inside("ward-v", ".print-status").text
            assert re.fullmatch(r"CORRECTED specimen report: replaces the report CD signed \d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*"
                                r"\. Verified by EF, \d{4}-.+?\." + re.escape(typed), status), status
            status = inside("ward-f", ".print-status").text
            assert re.fullmatch(r"Verified specimen report: verified by CD, \d{4}-.+?\." + re.escape(typed), status), status


@pytest.mark.broker
@needs_chromium
def test_the_printed_models_name_their_calibration_and_the_stations_own_adaptation(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A report names each model's file and, apart, its calibration (manifest_sha256: the same file
    recalibrated types cells otherwise), and whether the WBC head types cells by this station's own
    class means (adapt-wbc) or with open-set thresholds tightened on its normal specimens
    (calibrate-atypical). The printout gave the file's digest alone, so two reports typed by
    different calibrations or station adaptations printed the same models. It now names them."""
    from selenium.webdriver.common.by import By

    from smearscope.service.analysis.report import StationMeansInfo

    models = {"seg": ModelInfo(name="seg", sha256="ab" * 32, backend="onnxruntime", manifest_sha256="12" * 32),
              "wbc_head": ModelInfo(name="wbc_head", sha256="cd" * 32, backend="tensorrt", manifest_sha256="34" * 32,
                                    open_set_thresholds={"energy": -4.2},
                                    station_means=StationMeansInfo(sha256="ef" * 32, cells={"neutrophil": 40},
                                                                   leave_one_out_accuracy=0.9, head_accuracy=0.8))}
    report = _specimen("ward-m", "run-m", [], time.time()).model_copy(update={"models": models})
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, report)
        with _print_media(driver):
            text = driver.find_element(By.CSS_SELECTOR, "[data-station='ward-m'] .print-models").text
        assert text == ("Models: seg " + "ab" * 6 + " (onnxruntime), calibration " + "12" * 6 + " · wbc_head " + "cd" * 6 +
                        " (tensorrt), calibration " + "34" * 6 + ", this station's class means " + "ef" * 6 +
                        " (adapt-wbc), this station's open-set thresholds (calibrate-atypical)"), text


@pytest.mark.broker
@needs_chromium
def test_a_differential_of_too_few_white_cells_says_so_above_its_table(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A run that closed with 11 white cells typed (46 more unidentified) lists its shares as any
    differential ("neutrophil 5, 8.8 %"), and the only word that it is none was a grey info flag at
    the foot of the other column: 8.8 % neutrophils read as neutropenia. The flag's words now stand
    above the differential (and the red-cell grades' above theirs), on screen and on paper; a run
    with enough cells has no such line."""
    from selenium.webdriver.common.by import By

    few_wbc = Flag(code="too_few_wbc_for_differential", severity="info",
                   message="11 WBC classified (46 more unidentified); a differential needs at least 100")
    few_rbc = Flag(code="too_few_rbc_for_morphology", severity="info",
                   message="132 red cells counted; morphology grades need at least 200 (read them with their "
                           "intervals, or over the specimen)")
    now = time.time()
    few = _specimen("ward-f", "run-f", [few_wbc, few_rbc], now)
    enough = _specimen("ward-e", "run-e", [], now)
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, few, enough)
        note = lambda s, which: driver.find_element(By.CSS_SELECTOR, f"[data-station='{s}'] .{which}-note")
        shown = lambda: {(s, w): note(s, w).text for s in ("ward-f", "ward-e") for w in ("diff", "morph")
                         if note(s, w).is_displayed()}
        want = {("ward-f", "diff"): "Not a differential: " + few_wbc.message + ". Read each share with its 95 % interval.",
                ("ward-f", "morph"): "Grades on few red cells: " + few_rbc.message + "."}
        _same_on_screen_and_paper(driver, shown, want)


@pytest.mark.broker
@needs_chromium
def test_the_red_cells_size_reads_as_smearscope_analyze_prints_it_at_an_exact_tie(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """The report keeps red-cell diameters to 0.001 um, so a mean of 7.250 um is an exact tie at one
    decimal: `smearscope analyze` prints it '7.2 um' (Python's rounding, to the even digit), and the
    dashboard's scale line said '7.3 µm' (toFixed, up) for the same report, on screen and on paper.
    Its sizes now round as its shares do, as the summary prints them."""

    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.report import ScaleInfo, SizeStats

    size = SizeStats(n=200, mean_diameter_um=7.25, sd_um=0.75, cv_percent=10.25, median_diameter_um=6.25)
    report = _specimen("ward-t", "run-t", [], time.time()).model_copy(update={"rbc_size": size})
    scaled = report.model_copy(update={"scale": ScaleInfo(microns_per_pixel=0.1, method="given",
                                                          canonical_microns_per_pixel=0.2)})
    assert "RBC diameter 7.2 um (CV 10.2%, n=200)" in summarize(scaled), summarize(scaled)
    want = ("Scale: calibrated · red-cell diameter mean 7.2 µm, SD 0.8 µm, median 6.2 µm, 200 cells sized; "
            "CV of diameters 10.2 % (not an RDW)")
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, report)
        _lines_on_screen_and_paper(driver, ".size-line", {"ward-t": want})


@pytest.mark.broker
@needs_chromium
def test_the_cells_awaiting_review_are_said_on_screen_and_on_paper_and_an_older_report_says_not_counted(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A preliminary printout did not say how many cells still wait for a technician (the gallery's
    count depends on `[review] white_cells`; older runs carry none). A report's `review` (schema 1.4)
    is now said below the run's line, on screen and on paper: preliminary, interim or verified (what
    is left, what the technician typed); a report of schema 1.3 says "not counted", never 0."""
    from selenium.webdriver.common.by import By

    from smearscope.service.analysis.report import ReviewSummary

    now = time.time()
    waiting = ReviewSummary(cells=44, wbc_unidentified=38, wbc_atypical=3, wbc_rare=0, nrbc=0, rbc_unidentified=0,
                            rbc_flagged=3)
    preliminary = _specimen("ward-p", "run-p", [], now).model_copy(update={"review": waiting})
    one = ReviewSummary(cells=1, wbc_unidentified=0, wbc_atypical=0, wbc_rare=0, nrbc=1, rbc_unidentified=0,
                        rbc_flagged=0)
    interim = _closed_run_state(_specimen("ward-i", "run-i", [], now).model_copy(update={"review": one}))
    interim = {**interim, "state": "open", "end_reason": None}
    done = ReviewSummary(cells=0, wbc_unidentified=0, wbc_atypical=0, wbc_rare=0, nrbc=0, rbc_unidentified=0,
                         rbc_flagged=0, reviewed=44)
    verified = _specimen("ward-v", "run-v", [], now).model_copy(update={"review": done, "verification": Verification(
        verified_by="AB", verified_at=now - 60, supersedes="r-0", typed_cells=44, reclassified=[])})
    older = _specimen("ward-o", "run-o", [], now).model_copy(update={"schema_version": "1.3"})
    assert older.review is None
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_runs(driver, send, log, url, preliminary, verified, older, interim)
        want = {"ward-p": "Preliminary: 41 white cells and 3 red cells await review (38 white cells unidentified, "
                          "3 white cells atypical, 3 red cells called sickle or schistocyte)",
                "ward-i": "Interim: 1 nucleated red cell awaits review (1 nucleated red cell)",
                "ward-v": "Verified: every cell sent to review was typed; 44 typed by a technician",
                "ward-o": "Cells awaiting review: not counted (report schema 1.3)"}
        _lines_on_screen_and_paper(driver, ".review-line", want)
        with _print_media(driver):
            status = driver.find_element(By.CSS_SELECTOR, "[data-station='ward-p'] .print-status")
            assert status.text.startswith("PRELIMINARY machine result, not verified")


@pytest.mark.broker
@needs_chromium
def test_a_reports_review_line_reads_the_same_on_the_dashboard_in_the_summary_and_in_fhir(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A verified report's summary and dashboard line said its cells "await review" where its FHIR
    conclusion said "left as the analyzer called them": a signed report read as if cells still
    waited. One wording now, from one function per side (service.fhir.report_view.review_line,
    runview.js reviewText): the page renders the same text as `smearscope analyze` for the same
    report, preliminary, interim, verified (cells left, every one typed, none sent) or older, and
    the FHIR (and HL7) conclusion of a verified report says the same words."""
    from smearscope.cli.summary import summarize
    from smearscope.service.analysis.report import ReviewSummary
    from smearscope.service.fhir.bundle import report_bundle
    from smearscope.service.fhir.report_view import review_line

    now = time.time()
    base = _specimen("ward-w", "run-w", [], now)
    rv = lambda cells, reviewed=0, **kw: ReviewSummary(**{"cells": cells, "wbc_unidentified": 0, "wbc_atypical": 0,
                                                          "wbc_rare": 0, "nrbc": 0, "rbc_unidentified": 0,
                                                          "rbc_flagged": 0, "reviewed": reviewed, **kw})
    sign = lambda typed, left: Verification(verified_by="AB", verified_at=now, supersedes="r-0", typed_cells=typed,
                                            reclassified=[], left_to_review=left)
    cases = {
        "preliminary": (base.model_copy(update={"review": rv(44, wbc_unidentified=38, wbc_atypical=3, rbc_flagged=3)}),
                        True),
        "interim": (base.model_copy(update={"review": rv(1, nrbc=1)}), False),
        "left": (base.model_copy(update={"review": rv(3, 44, rbc_flagged=3), "verification": sign(44, 3)}), True),
        "one left": (base.model_copy(update={"review": rv(1, 2, wbc_atypical=1), "verification": sign(2, 1)}), True),
        "all typed": (base.model_copy(update={"review": rv(0, 44), "verification": sign(44, 0)}), True),
        "none sent": (base.model_copy(update={"review": rv(0), "verification": sign(0, 0)}), True),
        "older verified": (base.model_copy(update={"schema_version": "1.3", "review": None,
                                                    "verification": sign(5, 2)}), True),
        "older": (base.model_copy(update={"schema_version": "1.3", "review": None}), True),
    }
    python = {k: review_line(r, "Preliminary" if final else "Interim") for k, (r, final) in cases.items()}
    assert python["left"] == ("Verified: 3 cells left as the analyzer called them (3 red cells called sickle or "
                              "schistocyte); 44 typed by a technician"), python
    assert python["all typed"] == "Verified: every cell sent to review was typed; 44 typed by a technician"
    assert python["one left"] == ("Verified: 1 cell left as the analyzer called it (1 white cell atypical); "
                                  "2 typed by a technician")
    assert not any("await" in t for k, t in python.items() if cases[k][0].verification is not None), python
    for k, (r, final) in cases.items():  # the summary prints the line itself
        if final:
            assert "  " + python[k] in summarize(r).splitlines(), (k, summarize(r))
        if r.verification is not None:
            conclusion = report_bundle(r)["entry"][0]["resource"]["conclusion"]
            assert conclusion.startswith("Verified by AB: " + python[k].removeprefix("Verified: ") + "; 0 reclassified"), (
                k, conclusion)
    with _page_and_a_station(tmp_path, ws_broker) as (driver, _send, log, url):
        driver.get(url)
        _wait("the page's scripts", lambda: driver.execute_script("return typeof reviewText === 'function'"), 20, [log])
        page = {k: driver.execute_script("return reviewText(arguments[0], arguments[1])",
                                         json.loads(r.model_dump_json()), final) for k, (r, final) in cases.items()}
    assert page == python
