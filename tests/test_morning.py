"""A technician's morning at one station, end to end with the real pieces: mosquitto as
config/mosquitto.conf.example and config/mosquitto.acl.example set it up (each part on its own
account; WebSockets listener for the dashboard, persistence), `smearscope run` on a watched folder (auto_start off)
fed rendered fields, `smearscope dashboard --run-control` in headless Chromium (selenium), and
`smearscope archive`. Three slides, each started from the dashboard's run form with a scanned
specimen id, ended (target reached, or Stop run), one cell typed in the review gallery, verified
and printed; the broker restarted while slide 2 runs and the station restarted (SIGTERM, start)
between slides 1 and 2. Each slide's dashboard card, printed paper, archive entry and FHIR bundle
must agree, and no report is lost or stored twice."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import cv2
import pytest
from broker import MQTT_USERS, MosquittoBroker, free_port, wait_for_port
from pdf_pages import page_texts
from test_dashboard import (
    CHROMEDRIVER,
    ROOT,
    _chromium_options,
    _Proc,
    _seen,
    _station_config,
    _wait,
    needs_chromium,
)

from smearscope.cli import main
from smearscope.device.synthetic import render_field

STATION = "lab-7"  # the station config/mosquitto.acl.example names
#: The lab's accounts, as config/mosquitto.acl.example names them.
USERS = {"station-lab-7": MQTT_USERS["station"], "dashboard": "dashboard-secret", "archive": "archive-secret"}


def _lab_broker(workdir: Path) -> MosquittoBroker:
    """mosquitto as config/mosquitto.conf.example sets it up (persistence, its message bounds, a
    WebSockets listener; plain listeners on free ports here) with config/mosquitto.acl.example, the
    dashboard's block given start_run and stop_run as the file says for --run-control."""
    example = (ROOT / "config" / "mosquitto.conf.example").read_text().splitlines()
    bounds = tuple(line for line in example if line.startswith(("max_packet_size", "max_queued_")))
    assert len(bounds) == 3, bounds
    acl = (ROOT / "config" / "mosquitto.acl.example").read_text().replace(
        "user dashboard\n", "user dashboard\ntopic write smearscope/+/cmd/start_run\ntopic write smearscope/+/cmd/stop_run\n")
    assert "cmd/start_run\ntopic write smearscope/+/cmd/stop_run" in acl
    return MosquittoBroker(workdir, USERS, websockets=True, persistence=True, acl=acl, extra=bounds)
SPECIMENS = ("H-2026-0501", "H-2026-0502", "H-2026-0503")


def _config(tmp_path: Path, broker: MosquittoBroker, inbox: Path) -> Path:
    """The lab's station: a watched folder, runs of 3 white cells, its own broker account."""
    folder = {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.1, "settle_s": 0.0, "microns_per_pixel": 0.2}
    return _station_config(tmp_path, broker, station_id=STATION, source=folder, target_wbc=3,
                           username="station-lab-7", telemetry_interval_s=5.0)


def _drop(inbox: Path, name: str, seed: int, n_wbc: int) -> None:
    """A field as a scanner writes it: whole, then renamed into the folder."""
    pixels = render_field(seed, width=480, height=360, n_wbc=n_wbc).frame.pixels
    partial = inbox.parent / f".{name}"
    cv2.imwrite(str(partial), pixels)
    os.replace(partial, inbox / name)


@pytest.mark.broker
@needs_chromium
@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_a_mornings_three_slides_agree_on_the_card_the_paper_the_archive_and_fhir(
    tmp_path: Path, credentials_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    broker = _lab_broker(tmp_path / "broker")
    broker.start()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    station_args = [sys.executable, "-m", "smearscope", "run", "--config", str(_config(tmp_path, broker, inbox))]
    env = {"CREDENTIALS_DIRECTORY": str(credentials_dir)}
    logs = [tmp_path / "station-1.log", tmp_path / "station-2.log", tmp_path / "dashboard.log",
            tmp_path / "archive.log"]
    station = _Proc(station_args, logs[0], env)
    password = tmp_path / "dashboard-password"
    password.write_text(USERS["dashboard"] + "\n")
    archive_password = tmp_path / "archive-password"
    archive_password.write_text(USERS["archive"] + "\n")
    archive_dir = tmp_path / "archive"
    archive = _Proc([sys.executable, "-m", "smearscope", "--log-level", "INFO", "archive", "--broker",
                     f"mqtt://127.0.0.1:{broker.port}", "--username", "archive", "--password-file", str(archive_password),
                     "--dir", str(archive_dir)], logs[3])
    http_port = free_port()
    dashboard = _Proc([sys.executable, "-m", "smearscope", "dashboard", "--port", str(http_port), "--broker",
                       f"ws://127.0.0.1:{broker.ws_port}", "--username", "dashboard", "--password-file",
                       str(password), "--run-control"], logs[2])
    driver = None
    try:
        wait_for_port(http_port, 20, dashboard.proc)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=_chromium_options(tmp_path))
        driver.get(f"http://127.0.0.1:{http_port}/")
        card = f"section.station[data-station='{STATION}']"

        seen = functools.partial(_seen, driver)

        def inside(sel: str) -> Any:
            return driver.find_element(By.CSS_SELECTOR, f"{card} {sel}")

        def archived(specimen: str) -> list[dict[str, Any]]:
            capsys.readouterr()
            if main(["archive", "find", "--specimen", specimen, "--dir", str(archive_dir), "--json"]) != 0:
                return []
            return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

        def one_slide(slide: int, specimen: str, seed: int) -> int:
            """One slide from the run form to the archive; the last seed used."""
            initials = f"T{slide}"
            _wait(f"slide {slide}: the run form", lambda: seen(f"{card} .status") == "online"
                  and inside(".start-run").is_displayed(), 90, logs)
            inside(".specimen-id").send_keys(specimen, Keys.ENTER)  # as the barcode scanner types it
            state = lambda: seen(f"{card} .run-control-state") or ""
            _wait(f"slide {slide}: started", lambda: f"started for specimen {specimen}" in state(), 30, logs)
            short = state().split()[1]
            if slide == 2:
                seed += 1
                _drop(inbox, f"s{slide}-f1.png", seed, n_wbc=1)
                _wait("slide 2's first field on the card", lambda: (seen(card, "data-run-id") or "").startswith(short)
                      and "1 field" in (seen(f"{card} .run-line") or ""), 60, logs)
                broker.restart()  # the fault: the broker goes away and back while the run is open
                seed += 1
                _drop(inbox, f"s{slide}-f2.png", seed, n_wbc=1)
                _wait("slide 2's second field after the broker restart",
                      lambda: "2 fields" in (seen(f"{card} .run-line") or ""), 90, logs)
                inside(".stop-run").click()
                assert inside(".stop-run").text == "Confirm stop"
                inside(".stop-run").click()
            else:
                final = lambda: (seen(card, "data-run-id") or "").startswith(short) and seen(card, "data-shown") == "final"
                for n in range(1, 9):  # a field at a time, as the stage moves, until the target is reached
                    seed += 1
                    _drop(inbox, f"s{slide}-f{n}.png", seed, n_wbc=2)
                    _wait(f"slide {slide}: field {n} on the card", lambda n=n: final() or f"· {n} field"
                          in (seen(f"{card} .run-line") or ""), 60, logs)
                    if final():
                        break
            _wait(f"slide {slide}: its final report on the card", lambda: (seen(card, "data-run-id") or "").startswith(short)
                  and seen(card, "data-shown") == "final", 120, logs)
            run_id = seen(card, "data-run-id")
            if slide != 2:  # the form's "run ... started for specimen ..." went with the run it spoke of
                assert seen(f"{card} .run-control-state") == "", slide
            # the last slide's signature is not carried over: no "verified" line, no initials left to sign with
            assert (seen(f"{card} .verify-state"), inside(".verify-by").get_attribute("value")) == ("", ""), slide
            _wait(f"slide {slide}: the review gallery", lambda: len(driver.find_elements(
                By.CSS_SELECTOR, f"{card} .gallery figure select.type[data-kind='wbc']")) > 0, 30, logs)
            first = driver.execute_script(
                "const s = document.querySelector(arguments[0]); return s && {field: s.dataset.field, cell: s.dataset.cell};",
                f"{card} .gallery figure select.type[data-kind='wbc']")
            for attempt in range(5):
                try:
                    Select(inside(f".gallery select.type[data-field='{first['field']}'][data-cell='{first['cell']}']")
                           ).select_by_value("monocyte")
                    break
                except StaleElementReferenceException:
                    time.sleep(0.2)
            _wait(f"slide {slide}: the typed cell stored",
                  lambda: seen(f"{card} .gallery select.type[data-state='saved']") is not None, 30, logs)
            inside(".verify-by").send_keys(initials)
            inside(".verify-run").click()
            try:
                _wait(f"slide {slide}: verified on the card", lambda: seen(card, "data-verified-by") == initials
                      and seen(card, "data-run-id") == run_id, 30, [])
            except AssertionError:
                driver.save_screenshot(str(tmp_path / "fail.png"))
                raise AssertionError(driver.execute_script(
                    "const c = document.querySelector(arguments[0]); return [JSON.stringify(c.dataset), c.innerText]", card))
            assert "verified: 1 typed" in (seen(f"{card} .verify-state") or "")
            shown_report = seen(card, "data-report-id")

            # the paper
            driver.execute_script("window.print = () => {};")
            driver.execute_script("window.scrollTo(0, 0)")  # back up to the card's top, as the technician scrolls
            inside(".print-run").click()
            pdf = base64.b64decode(driver.execute_cdp_cmd("Page.printToPDF", {"printBackground": False})["data"])
            (tmp_path / f"slide-{slide}.pdf").write_bytes(pdf)
            paper = unicodedata.normalize("NFKC", "".join(page_texts(pdf)))  # Skia's ligatures ("ﬁ") as letters
            for words in (f"Specimen{specimen}", f"Verifiedspecimenreport:verifiedby{initials}", "smearscope"):
                assert words in paper, (words, paper[:600])
            printed = re.search(r"report([0-9a-f-]{36})of", paper)
            assert printed and f"run{run_id}" in paper, paper[:600]

            # the archive: the verified report first, then the preliminary it replaced, once each
            _wait(f"slide {slide}: both reports archived", lambda: len(archived(specimen)) >= 2, 60, logs)
            found = archived(specimen)
            assert [(r["run_id"], r["verified"]) for r in found] == [(run_id, True), (run_id, False)], found
            assert found[1]["superseded_by"] == found[0]["report_id"]
            assert printed.group(1) == found[0]["report_id"]  # the paper is the verified report archived
            if shown_report is not None:
                assert shown_report == found[0]["report_id"]
            capsys.readouterr()
            assert main(["archive", "show", found[0]["report_id"], "--dir", str(archive_dir), "--fhir"]) == 0
            bundle = json.loads(capsys.readouterr().out)
            resources = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
            assert resources["Specimen"]["accessionIdentifier"]["value"] == specimen
            assert resources["DiagnosticReport"]["status"] == "final"
            assert resources["DiagnosticReport"]["performer"][0]["display"] == initials
            capsys.readouterr()
            assert main(["archive", "show", found[1]["report_id"], "--dir", str(archive_dir), "--fhir"]) == 0
            replaced = {e["resource"]["resourceType"]: e["resource"] for e in json.loads(capsys.readouterr().out)["entry"]}
            assert replaced["DiagnosticReport"]["status"] == "preliminary"
            assert replaced["Specimen"]["accessionIdentifier"]["value"] == specimen
            # the card's differential is the archived verified report's
            capsys.readouterr()
            assert main(["archive", "show", found[0]["report_id"], "--dir", str(archive_dir)]) == 0
            body = json.loads(capsys.readouterr().out)["body"]
            rows = driver.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map((r) => "
                "[r.dataset.label, r.querySelectorAll('td')[1].textContent])", f"{card} table.differential tbody tr")
            assert sorted((label, int(n)) for label, n in rows) == sorted(
                (share["label"], share["count"]) for share in body["wbc_differential"]), (rows, body["wbc_differential"])
            assert body["specimen_id"] == specimen and body["verification"]["verified_by"] == initials
            return seed

        seed = 100
        station_log = logs[0]
        for slide, specimen in enumerate(SPECIMENS, 1):
            seed = one_slide(slide, specimen, seed)
            if slide == 1:  # the station restarted between slides: SIGTERM, and started again
                station.stop()
                assert station.proc.returncode == 0, station_log.read_text()[-3000:]
                station = _Proc(station_args, logs[1], env)
                _wait("the station started again", lambda: "MQTT connected" in logs[1].read_text(), 60, logs)

        # nothing lost or stored twice over the morning: two reports a slide, no other specimen's
        assert all(len(archived(s)) == 2 for s in SPECIMENS)
        files = sorted(p.name for p in archive_dir.rglob("*.json"))
        assert len(files) == 12 and sum(n.endswith(".fhir.json") for n in files) == 6, files
        driver.save_screenshot(str(tmp_path / "morning.png"))
    finally:
        if driver is not None:
            driver.quit()
        station.stop()
        dashboard.stop()
        archive.stop()
        broker.stop()
