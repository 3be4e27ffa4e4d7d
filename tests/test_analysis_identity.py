"""A report names the software and models that analysed its run, whatever version made or signed it.

Rendered fields through the shipped models, stored in a station's outbox file as the daemon stores
them; the "update" is an earlier smearscope version named by the field reports that version would
have published (their `software_version`), this process being the updated station. A run verified
after the update, closed by the updated station's start, or taken back by it (fields of both
versions) is sent, in FHIR and HL7, with the Device of its analysis, never the signing version's."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import cv2
import pytest
import tomllib
from realdata import needs_models
from test_fhir import resources, validate
from test_fhir_device import device, equipment
from test_hl7 import parsed, segments
from test_station_means import _fields
from test_typed_cells import _config_text, _station
from test_verify_run import store_run

from smearscope.device.frame import Frame
from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.analysis.report import NOT_RECORDED, Report, software_version
from smearscope.service.config import parse_config
from smearscope.service.fhir.bundle import report_bundle, software_text
from smearscope.service.hl7.oru import oru_r01
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.station.clinic import ClinicFeed
from smearscope.service.station.durable import StationState
from smearscope.service.station.specimen import ClosedRun, SpecimenRun

EARLIER = "0.0.9"  # the version the station ran before its update


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[FieldResult]:
    """Four rendered fields analysed by the shipped models (this version's field reports)."""
    tmp = tmp_path_factory.mktemp("identity")
    _, analyzer, feed = _station(tmp)
    try:
        return [analyzer.analyze(Frame(cv2.imread(str(image)), image.name, str(image), microns_per_pixel=0.1))
                for image, _ in _fields(tmp, range(500, 504))]
    finally:
        analyzer.close()
        feed.close()


def analysed_by(result: FieldResult, version: str) -> FieldResult:
    """The field as `version` of smearscope published it (its report names the version that analysed it)."""
    return replace(result, report=result.report.model_copy(update={"software_version": version}))


def a_run(run_id: str, fields: list[FieldResult]) -> SpecimenRun:
    run = SpecimenRun(target_wbc=10_000, started_at=0.0, started_by="command", run_id=run_id)
    for f in fields:
        assert run.add(f, 1.0)
    return run


def software_of(report: Report) -> tuple[list[str], list[str]]:
    """What the FHIR Device and the HL7 SFT segments say analysed the report: its software versions."""
    (dev,) = resources(report_bundle(report), "Device")
    sft = [s[2] for s in segments(oru_r01(report), "SFT") if s[3] == "smearscope"]
    return [v["value"] for v in dev["version"] if v["type"]["text"] == "software"], sft


def _feed(tmp_path: Path, state: StationState) -> ClinicFeed:
    """The updated station's clinic feed, reading closed runs' cells from the outbox file as the daemon's does."""
    feed = ClinicFeed(parse_config(tomllib.loads(_config_text(tmp_path, 'white_cells = "all"')), environ={}))
    feed.start(None, [], state.run_cells)
    return feed


@needs_models
def test_a_run_verified_after_an_update_names_the_device_that_analysed_it(results, tmp_path):
    """Analysed and closed by the earlier version; verified, then signed again, by the updated station: both
    signed reports name the earlier version's Device (FHIR id and identifier, HL7 OBX-18 and SFT), as the
    analyzer's report did; the signing version is the report's own `software_version`."""
    assert software_version() != EARLIER
    run = a_run("r", [analysed_by(r, EARLIER) for r in results])
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        # the earlier version's final report: it made it, from fields it analysed
        final = run.report(station_id="s", now=time.time(), end_reason="stopped").model_copy(
            update={"software_version": EARLIER})
        outbox.write(lambda conn: state.run_closed(final)(conn, []))
        assert final.analysis_software == [EARLIER] and software_of(final) == ([EARLIER], [EARLIER])
        url, key, _ = device(report_bundle(final))

        feed = _feed(tmp_path, state)  # the updated station, started on the same file
        try:
            made_now = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)
            feed.run_closed(ClosedRun("r", "stopped", 4, run.classified_wbc, 10_000, final, run), None, False)
            verified, _, answer = feed.verify("r", "AB", made_now, None)
            assert answer["ok"] and verified.report.verification is not None
            feed.run_closed(verified, None, False)
            amended, _, answer = feed.verify("r", "CD", made_now, None)
            assert answer["ok"] and amended.report.verification.supersedes_verified_by == "AB"
        finally:
            feed.close()
        for signed in (verified.report, amended.report):
            assert signed.software_version == software_version()  # the version that signed it
            assert signed.analysis_software == [EARLIER] and signed.models == final.models
            bundle = report_bundle(signed)
            validate(bundle)
            assert device(bundle)[:2] == (url, key)
            assert software_of(signed) == ([EARLIER], [EARLIER])
            message = oru_r01(signed)
            parsed(message)
            assert equipment(message) == equipment(oru_r01(final)) == {f"s^smearscope~{key}^smearscope"}
    finally:
        outbox.close()


@needs_models
def test_a_run_left_open_and_closed_by_the_updated_station_names_the_earlier_version(results, tmp_path):
    """A crash with a run open, then the update: the updated station's start closes the run (restart) and makes
    its final report; the fields it counts were analysed by the earlier version, which the report names."""
    run = a_run("r", [analysed_by(r, EARLIER) for r in results[:2]])
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (left,) = StationState(outbox).open_runs(run.models)
        report = left.report(station_id="s", now=time.time(), end_reason="restart")
        assert report.software_version == software_version() and report.analysis_software == [EARLIER]
        assert software_of(report) == ([EARLIER], [EARLIER])
    finally:
        outbox.close()


@needs_models
def test_a_run_taken_back_by_the_updated_station_names_both_versions_on_one_device(results, tmp_path):
    """Two fields analysed by the earlier version, the run taken back after the update (the same models) and
    two more analysed now: its report names both versions, in the order of their latest field, on one Device
    of its own (a note says why), every Observation pointing at it; two SFT segments name them."""
    run = a_run("r", [analysed_by(r, EARLIER) for r in results[:2]])
    now = software_version()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (back,) = StationState(outbox).open_runs(results[2].report.models)
        assert back.end_requested is None  # taken back: the same models
        for r in results[2:]:
            assert back.add(r, 2.0)
        report = back.report(station_id="s", now=time.time(), end_reason="stopped")
    finally:
        outbox.close()
    assert report.analysis_software == [EARLIER, now]
    assert software_of(report) == ([EARLIER, now], [EARLIER, now])
    bundle = report_bundle(report)
    validate(bundle)
    _, key, dev = device(bundle)
    assert dev["note"][0]["text"].startswith(f"The run's fields were analysed by smearscope {EARLIER} and {now}")
    # neither version's Device alone: the run analysed wholly by either names another
    for alone in ([analysed_by(r, EARLIER) for r in results], results):
        assert device(report_bundle(a_run("r", alone).report(station_id="s", now=1.0, end_reason="stopped")))[1] != key
    message = oru_r01(report)
    parsed(message)
    assert equipment(message) == {f"s^smearscope~{key}^smearscope"}


@needs_models
def test_a_run_stored_before_fields_named_their_version_is_verified_under_its_reports(results, tmp_path):
    """A run closed by a version before schema 1.5 (its rows name no version, its report no analysis_software)
    and verified after the update, then signed again: the version that made its analyzer's report analysed it,
    which the signature it amends names (its rows still name none). A run of such
    rows taken back says its version was not recorded rather than name the updated one."""
    run = a_run("r", [analysed_by(r, EARLIER) for r in results])
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        outbox.write(lambda conn: conn.execute("UPDATE specimen_fields SET software_version = NULL"))
        final = run.report(station_id="s", now=time.time(), end_reason="stopped").model_copy(
            update={"software_version": EARLIER, "analysis_software": None, "schema_version": "1.4"})
        outbox.write(lambda conn: state.run_closed(final)(conn, []))
        feed = _feed(tmp_path, state)
        try:
            feed.run_closed(ClosedRun("r", "stopped", 4, run.classified_wbc, 10_000, final, run), None, False)
            made_now = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)
            verified, _, answer = feed.verify("r", "AB", made_now, None)
            assert answer["ok"]
            feed.run_closed(verified, None, False)  # signed again: the verified report the one it amends
            amended, _, answer = feed.verify("r", "CD", made_now, None)
            assert answer["ok"] and amended.report.verification.supersedes_verified_by == "AB"
        finally:
            feed.close()
        for signed in (verified.report, amended.report):
            assert signed.analysis_software == [EARLIER]
            assert device(report_bundle(signed))[:2] == device(report_bundle(final))[:2]
        store_run(state, outbox, a_run("open", [analysed_by(r, EARLIER) for r in results[:1]]), "open")
        outbox.write(lambda conn: conn.execute("UPDATE specimen_fields SET software_version = NULL WHERE run_id = 'open'"))
        (left,) = state.open_runs()
        assert left.report(station_id="s", now=1.0, end_reason="restart").analysis_software == [NOT_RECORDED]
    finally:
        outbox.close()


def test_a_file_from_before_fields_named_their_version_gets_the_column(tmp_path):
    """The table as a version before 1.5 made it opens, and gets the column, NULL in its rows."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE specimen_fields (run_id TEXT NOT NULL, field_id TEXT NOT NULL, position INTEGER "
                     "NOT NULL, started_at REAL NOT NULL, started_by TEXT NOT NULL, target_wbc INTEGER NOT NULL, "
                     "models TEXT NOT NULL, cells TEXT NOT NULL, stored_at REAL NOT NULL, PRIMARY KEY (run_id, field_id))")
        conn.execute("INSERT INTO specimen_fields VALUES ('r0', 'f', 0, 1.0, 'auto', 100, '{}', '[]', 2.0)")
    outbox = Outbox(path)
    try:
        (run,) = StationState(outbox).open_runs()
        assert run.field_software == [NOT_RECORDED]
    finally:
        outbox.close()


@needs_models
def test_the_models_sft_names_the_version_that_analysed_most_recently_never_the_placeholder(results):
    """A run whose station went back and forth between versions (taken back after an update, then after a
    downgrade): `analysis_software` ends with the version of its latest field, and the model SFTs' SFT-2 names it;
    a field stored by a version that recorded none, `(not recorded)`, never takes the place of a known one."""
    now = software_version()
    for versions, latest in (([EARLIER, now, EARLIER], EARLIER), ([now, EARLIER, now], now),
                             ([now, None, now, None], now), ([None, now, None], now)):
        report = a_run("r", [analysed_by(r, v) for r, v in zip(results, versions, strict=False)]).report(
            station_id="s", now=1.0, end_reason="stopped")
        assert report.analysis_software is not None and len(report.analysis_software) == 2, report.analysis_software
        assert report.analysis_software[-1] == (versions[-1] or NOT_RECORDED), (versions, report.analysis_software)
        message = oru_r01(report)
        parsed(message)
        models = [s for s in segments(message, "SFT") if s[3] != "smearscope"]
        assert models and {s[2] for s in models} == {latest}, (versions, [s[2:4] for s in models])


@needs_models
def test_fields_of_a_version_that_recorded_none_are_said_in_words(results):
    """A run left open across the update to schema 1.5 and taken back: its first fields name no version. The FHIR
    Device note and the HL7 SFT-5 say so as a clinician reads it ("smearscope 0.1.0 (some fields by an earlier
    version that did not record its number)", the printed report's words too), never "smearscope (not recorded)
    and 0.1.0"."""
    now = software_version()
    report = a_run("r", [analysed_by(r, v) for r, v in zip(results, [None, None, now, now], strict=True)]).report(
        station_id="s", now=1.0, end_reason="stopped")
    assert report.analysis_software == [NOT_RECORDED, now]
    words = f"smearscope {now} (some fields by an earlier version that did not record its number)"
    assert software_text(report.analysis_software) == words
    note = device(report_bundle(report))[2]["note"][0]["text"]
    assert note.startswith(f"The run's fields were analysed by {words}, a run taken back"), note
    message = oru_r01(report)
    parsed(message)
    info = [s[5] for s in segments(message, "SFT") if s[3] == "smearscope"]
    assert info == ["smearscope (an earlier version that did not record its number)", f"smearscope {now}"], info
    assert NOT_RECORDED not in note + " ".join(info)
