"""Technicians type white cells in the review gallery; the station fits its means from them.

The typed-cells file (store, retype, remove, bounds, filters by head and views), the gallery
keeping each white cell's features beside its crop (`[review] white_cells = "all"`), the
`type_cells` command's answers, and `smearscope adapt-wbc --station` end to end on rendered
fields: a lab the committed head never saw, typed through the gallery, then typed right by the
station's means."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tomllib
from test_station_means import MIX, _fields, _typed

from smearscope.device.frame import Frame
from smearscope.engines.manifest import load_manifest
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR, Analyzer, AnalyzerOptions
from smearscope.service.config import parse_config
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.station.clinic import ClinicFeed
from smearscope.service.station.review import needs_review
from smearscope.service.station.startup import build_analyzer
from smearscope.service.station.typed_cells import (
    TypeableCell,
    TypedCellsError,
    TypedCellStore,
    default_path,
)

SHA = "a" * 64


def _cell(head_type="lymphocyte", sha=SHA, views=("identity", "hflip"), value=1.0) -> TypeableCell:
    feats = np.full(4, value, np.float32)
    return TypeableCell(feats, np.stack([feats - 0.5, feats + 0.5]), head_type, {"mahalanobis": 3.0, "energy": -5.0},
                        sha, views, 0.1)


def test_the_store_keeps_one_type_per_cell_and_filters_by_head_and_views(tmp_path):
    tmp_path = tmp_path / "a folder #1 ?%"  # the read-only URI must not take these for its own syntax
    store = TypedCellStore(tmp_path / "typed.sqlite3", max_rows=3)
    try:
        assert store.put("r1", "f1", 0, "neutrophil", _cell(value=1.0))
        assert store.put("r1", "f1", 0, "monocyte", _cell(value=1.0))  # typed again: replaced
        assert store.put("r1", "f2", 4, "lymphocyte", _cell(value=2.0))
        assert store.put("r2", "f1", 0, "lymphocyte", _cell(sha="b" * 64))
        assert store.counts(SHA) == {"lymphocyte": 1, "monocyte": 1}
        # full: a new cell is refused, a known one may still be retyped
        assert not store.put("r3", "f9", 1, "eosinophil", _cell())
        assert store.put("r1", "f2", 4, "eosinophil", _cell(value=2.0))
        assert store.remove("r1", "f1", 0) and not store.remove("r1", "f1", 0)
        assert store.put("r1", "f3", 2, "basophil", _cell(views=("identity",), value=3.0))
        assert store.retype("r2", "f1", 0, "neutrophil", "wbc") and not store.retype("r9", "f1", 0, "neutrophil", "wbc")
        assert not store.retype("r2", "f1", 0, "normal", "rbc")  # a white cell is not retyped a red one
    finally:
        store.close()
    reader = TypedCellStore(tmp_path / "typed.sqlite3", read_only=True)
    try:
        got = reader.load(SHA, ("identity", "hflip"))
    finally:
        reader.close()
    assert got.types == ["eosinophil"] and got.head_types == ["lymphocyte"]
    assert got.other_head == 1 and got.other_views == 1 and got.runs == 1
    assert got.features.tolist() == [[2.0] * 4]
    assert got.view_features[0].tolist() == [[1.5] * 4, [2.5] * 4]
    assert got.open_set_scores == [{"mahalanobis": 3.0, "energy": -5.0}] and got.scales == [pytest.approx(0.1)]
    # a calibrated station takes only cells analysed at its scale (within 1 %)
    reader = TypedCellStore(tmp_path / "typed.sqlite3", read_only=True)
    try:
        assert reader.load(SHA, ("identity", "hflip"), 0.1005).types == ["eosinophil"]
        other = reader.load(SHA, ("identity", "hflip"), 0.2)
        assert other.types == [] and other.other_scale == 1 and other.features.shape == (0, 0)
        assert reader.counts("b" * 64) == {"neutrophil": 1}
    finally:
        reader.close()
    with pytest.raises(TypedCellsError) as exc:
        TypedCellStore(tmp_path / "none.sqlite3", read_only=True)
    assert exc.value.code == "no_typed_cells"


# -- the gallery, the command and adapt-wbc --station on rendered fields ----------------------

def _config_text(tmp_path: Path, review: str) -> str:
    return f"""
station_id = "bench-1"
[source]
kind = "simulated"
microns_per_pixel = 0.1
[analysis]
models_dir = "{DEFAULT_MODELS_DIR}"
microns_per_pixel = 0.1
[review]
{review}
[mqtt.outbox]
path = "{tmp_path / 'state' / 'outbox.sqlite3'}"
"""


def _station(tmp_path: Path, review: str = 'white_cells = "all"'):
    text = _config_text(tmp_path, review)
    path = tmp_path / "station.toml"
    path.write_text(text)
    cfg = parse_config(tomllib.loads(text), environ={})
    analyzer = build_analyzer(cfg)
    feed = ClinicFeed(cfg)
    feed.attach_wbc_head(analyzer.wbc_head, analyzer.rbc_head)
    return path, analyzer, feed


def _gallery_cells(feed: ClinicFeed, run_id: str) -> tuple[list[dict], dict]:
    cells, offset, first = [], 0, None
    while offset is not None:
        page = feed.get_review({"run_id": run_id, "offset": offset})
        assert page["ok"], page
        first = first or page
        cells += page["cells"]
        offset = page["next_offset"]
    return cells, first


def _truth_type(crop: dict, truths) -> str | None:
    x0, y0, x1, y1 = crop["bbox"]
    inside = [t for t in truths if x0 <= t.center[0] <= x1 and y0 <= t.center[1] <= y1]
    return inside[0].subtype if len(inside) == 1 else None


@pytest.fixture(scope="module")
def typed_station(tmp_path_factory):
    """A station whose technician typed every white cell of 12 rendered fields in the gallery."""
    tmp = tmp_path_factory.mktemp("typing")
    path, analyzer, feed = _station(tmp)
    train, test = _fields(tmp, range(500, 512)), _fields(tmp, range(600, 606))
    try:
        truths, wbc_cells = {}, []
        for image, cells in train:
            pixels = cv2.imread(str(image))
            result = analyzer.analyze(Frame(pixels, image.name, str(image), microns_per_pixel=0.1), run_id="run-1")
            feed.gallery.add_field("run-1", pixels, result)
            truths[image.name] = cells
            wbc_cells += [c for c in result.report.cells if c.kind in ("wbc", "nrbc") and c.label is not None]
        crops, first = _gallery_cells(feed, "run-1")
        typed = [{"field_id": c["field_id"], "cell": c["cell"], "type": t} for c in crops
                 if c["typeable"] and (t := _truth_type(c, truths[c["field_id"]])) is not None]
        answer = feed.type_cells({"run_id": "run-1", "cells": typed})
    finally:
        analyzer.close()
    yield tmp, path, feed, crops, first, typed, answer, test, wbc_cells
    feed.close()


def test_every_white_cell_is_offered_with_the_heads_types_and_typed_ones_are_stored(typed_station):
    tmp, _, feed, crops, first, typed, answer, _, wbc_cells = typed_station
    classes = list(feed.gallery.typing.classes)
    assert first["wbc_types"] == [*classes, "artefact"] and "lymphocyte" in classes  # or no cell at all
    wbc = [c for c in crops if c["kind"] in ("wbc", "nrbc")]
    # white_cells = "all": every white cell, the confident ones too, not only those to review
    assert len(wbc) == len(wbc_cells) >= 30 and sum(needs_review(c) is None for c in wbc_cells) >= 3
    assert all(c["typeable"] for c in wbc)
    # red cells to review are typed with the RBC head's classes
    assert first["rbc_types"] and "sickle" in first["rbc_types"]
    assert all(c["typeable"] == (c["label"] is not None) for c in crops if c["kind"] == "rbc")
    assert answer["ok"] and answer["stored"] == len(typed) >= 20 and answer["errors"] == []
    assert answer["typed_per_type"] == {t: sum(c["type"] == t for c in typed) for t in {c["type"] for c in typed}}
    # the file beside the outbox holds them, with the head's sha256 and views
    store = TypedCellStore(default_path(tmp / "state" / "outbox.sqlite3"), read_only=True)
    try:
        got = store.load(feed.gallery.typing.model_sha256, feed.gallery.typing.views)
    finally:
        store.close()
    assert sorted(got.types) == sorted(c["type"] for c in typed) and got.other_head == 0
    # a later page shows what was typed, and the first page the station's counts
    page, head = _gallery_cells(feed, "run-1")
    assert head["typed_per_type"] == answer["typed_per_type"]
    shown = {(c["field_id"], c["cell"]): c.get("typed") for c in page if c["typeable"]}
    assert all(shown[(c["field_id"], c["cell"])] == c["type"] for c in typed)


def test_an_object_typed_artefact_is_stored_and_left_out_of_the_station_means(typed_station, monkeypatch):
    from smearscope.cli.doctor import typed_cells_checks
    from smearscope.service.analysis import station_means
    from smearscope.service.config import load_config

    tmp, config, feed, crops, _, typed, _, _, _ = typed_station
    done = {(c["field_id"], c["cell"]) for c in typed}
    spare = next(c for c in crops if c["typeable"] and c["kind"] == "wbc" and (c["field_id"], c["cell"]) not in done)
    key = {"field_id": spare["field_id"], "cell": spare["cell"]}
    path = default_path(tmp / "state" / "outbox.sqlite3")

    def loaded() -> list[str]:
        store = TypedCellStore(path, read_only=True)
        try:
            return store.load(feed.gallery.typing.model_sha256, feed.gallery.typing.views).types
        finally:
            store.close()

    before = loaded()
    answer = feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": "artefact"}]})
    try:
        assert answer["ok"] and answer["stored"] == 1 and "artefact" not in answer["typed_per_type"]  # no class
        assert loaded() == before  # no class of the head: the station means never see it
        assert feed.run_types("run-1")[(spare["field_id"], spare["cell"])] == ("wbc", "artefact")
        monkeypatch.setattr(station_means, "MIN_CELLS", 1)  # doctor: every typed class is ready, no artefact
        (_, _, detail), = typed_cells_checks(load_config(config))
        assert "ready for a station mean" in detail and "artefact" not in detail
    finally:  # the cell untyped again for the module's other tests, whatever failed above
        removed = feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": None}]})["removed"]
    assert removed == 1


def test_the_command_answers_each_bad_cell_and_retypes_or_removes(typed_station):
    _, _, feed, crops, _, typed, _, _, _ = typed_station
    one = typed[0]
    key = {"field_id": one["field_id"], "cell": one["cell"]}
    before = feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": one["type"]}]})["typed_per_type"]
    rbc = next(c for c in crops if c["kind"] == "rbc") if any(c["kind"] == "rbc" for c in crops) else None
    bad = [{**key, "type": "blast"}, {"field_id": "nope", "cell": 0, "type": "lymphocyte"}, {"cell": "x"},
           {"field_id": one["field_id"], "cell": 10**30, "type": "lymphocyte"},  # beyond SQLite's integers
           {**key, "type": one["type"], "typ": "lymphocyte"}]  # a misspelt key is not ignored
    if rbc is not None:
        bad.append({"field_id": rbc["field_id"], "cell": rbc["cell"], "type": "lymphocyte"})
    answer = feed.type_cells({"run_id": "run-1", "cells": bad})
    assert not answer["ok"] and answer["stored"] == 0
    # a red cell takes the RBC head's types only
    assert [e["error"] for e in answer["errors"]] == ["unknown_type", "not_typeable", "bad_cell", "bad_cell",
                                                      "bad_cell"] + (
        ["unknown_type"] if rbc is not None else [])
    assert answer["typed_per_type"] == before
    for args, code in (({"run_id": "run-1"}, "bad_arguments"), ({"run_id": 3, "cells": [key]}, "bad_arguments"),
                       ({"run_id": "run-1", "cells": [key] * 501}, "bad_arguments")):
        got = feed.type_cells(args)
        assert not got["ok"] and got["error"] == code
    other = next(t for t in feed.gallery.typing.classes if t != one["type"])
    moved = feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": other}]})
    assert moved["ok"] and moved["typed_per_type"][other] == before.get(other, 0) + 1
    removed = feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": None}]})
    assert removed["removed"] == 1 and sum(removed["typed_per_type"].values()) == sum(before.values()) - 1
    back = feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": one["type"]}]})
    assert back["typed_per_type"] == before


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smearscope", *args], check=False, capture_output=True,
                          text=True, timeout=600)


def test_adapt_wbc_station_fits_the_means_from_the_gallerys_typed_cells(typed_station):
    tmp, path, feed, _, _, typed, _, test, _ = typed_station
    out = tmp / "station_wbc.json"
    run = _cli("adapt-wbc", "--station", "--config", str(path), "--out", str(out), "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    line = json.loads(run.stdout)
    assert line["written"] == str(out) and line["typed"] == len(typed) and line["runs"] == 1
    assert set(line["cells_per_class"]) == set(MIX)
    assert line["leave_one_out_accuracy"] > line["head_accuracy"]
    # the head's calls against the types (adapt_guard): on this lab a third or more sent to review, not held
    # against the typing (the typed cells' stored open-set scores beyond the model's thresholds)
    assert {t: sum(row.values()) for t, row in line["confusion"].items()} == {t: sum(c["type"] == t for c in typed)
                                                                             for t in MIX}
    assert sum(row.get("(review)", 0) for row in line["confusion"].values()) >= len(typed) / 3, line["confusion"]
    plain = Analyzer.from_models_dir(options=AnalyzerOptions(), warmup=False)
    adapted = Analyzer.from_models_dir(options=AnalyzerOptions(wbc_station_means=out), warmup=False)
    try:
        found, right_plain, _ = _typed(plain, test)
        found2, right_adapted, review_adapted = _typed(adapted, test)
    finally:
        plain.close()
        adapted.close()
    assert found == found2 >= 10
    # the head as trained types fewer than 8 in 10 of this lab's cells right, the station's means at least 8
    assert right_adapted / found >= 0.8 > right_plain / found and review_adapted / found < 0.2
    # too few per class for a mean: refused with its code, nothing written
    out2 = tmp / "none.json"
    few = _cli("adapt-wbc", "--station", "--config", str(path), "--out", str(out2), "--min-cells", "500")
    assert few.returncode == 2 and json.loads(few.stdout)["error"]["code"] == "too_few_cells" and not out2.exists()
    per_class = {t: sum(c["type"] == t for c in typed) for t in MIX}
    message = json.loads(few.stdout)["error"]["message"]  # how many each class has, not the CSV's "marks"
    assert all(f"{t} {n}" in message for t, n in per_class.items()) and "marks" not in message, message
    # a class under --min-cells keeps the head's mean: said, with its count (one of its cells untyped
    # for the while, so that it has fewer than the other)
    fewest, most = min(per_class, key=per_class.get), max(per_class, key=per_class.get)
    if fewest == most:
        most = next(t for t in per_class if t != fewest)
    one = next(c for c in typed if c["type"] == fewest)
    assert feed.type_cells({"run_id": "run-1", "cells": [{**one, "type": None}]})["removed"] == 1
    try:
        some = _cli("adapt-wbc", "--station", "--config", str(path), "--out", str(out2), "--min-cells",
                    str(per_class[most]))
    finally:
        assert feed.type_cells({"run_id": "run-1", "cells": [one]})["ok"]
    assert some.returncode == 0, some.stdout
    assert f"keeping the head's mean: {fewest} {per_class[fewest] - 1}\n" in some.stdout, some.stdout
    bad = _cli("adapt-wbc", "--station", "--out", str(out2))
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["code"] == "bad_arguments"
    # the scale where calibrate-scale tells it to go, [source], without an [analysis] override: the
    # cells typed at 0.1 are the station's at 0.1 and left out at 0.2 (once read from [analysis] only)
    for source_mpp, kept in (("0.1", len(typed)), ("0.2", 0)):
        text = path.read_text().replace("microns_per_pixel = 0.1\n[review]", "[review]")
        source_only = tmp / f"source_{source_mpp}.toml"
        source_only.write_text(text.replace("microns_per_pixel = 0.1", f"microns_per_pixel = {source_mpp}"))
        assert text.count("microns_per_pixel") == 1
        got = _cli("adapt-wbc", "--station", "--config", str(source_only), "--out", str(tmp / "s.json"), "--json")
        answer = json.loads(got.stdout)
        assert (answer.get("typed", 0), answer.get("error", {}).get("code")) == (
            (kept, None) if kept else (0, "too_few_cells")), answer
        assert answer["other_scale"] == len(typed) - kept
        if not kept:  # the cells are there: said why they were left out
            assert f"left out: {len(typed)} typed at another scale" in answer["error"]["message"], answer


def test_nothing_typed_yet_and_typing_off_say_so(tmp_path):
    path, analyzer, feed = _station(tmp_path, "typing = false")
    try:
        image = _fields(tmp_path, [500])[0][0]  # a field whose review offers red cells to type
        pixels = cv2.imread(str(image))
        result = analyzer.analyze(Frame(pixels, "f", str(image), microns_per_pixel=0.1), run_id="run-1")
        assert all(c.head_features is None for c in result.cells)
        feed.gallery.add_field("run-1", pixels, result)
        answer = feed.type_cells({"run_id": "run-1", "cells": [{"field_id": "f", "cell": 0, "type": "lymphocyte"}]})
        assert not answer["ok"] and answer["error"] == "typing_off"
        assert feed.get_review({"run_id": "run-1"})["wbc_types"] is None
    finally:
        analyzer.close()
        feed.close()
    none = _cli("adapt-wbc", "--station", "--config", str(path), "--out", str(tmp_path / "x.json"))
    assert none.returncode == 2 and json.loads(none.stdout)["error"]["code"] == "no_typed_cells"


def test_doctor_counts_the_typed_cells_per_type(typed_station, tmp_path):
    from smearscope.cli.doctor import typed_cells_checks
    from smearscope.service.config import load_config

    _, path, _, _, _, typed, _, _, _ = typed_station
    (status, what, detail), = typed_cells_checks(load_config(path))
    counts = {t: sum(c["type"] == t for c in typed) for t in {c["type"] for c in typed}}
    assert status == "OK" and what == "typed cells"
    assert all(f"{t} {n}" in detail for t, n in counts.items())
    assert ("adapt-wbc --station" in detail) == any(n >= 10 for n in counts.values())
    # recalibrated since: the cells typed at 0.1 are none a fit at 0.2 takes, and doctor says so
    recalibrated = tmp_path / "recalibrated.toml"
    recalibrated.write_text(path.read_text().replace("microns_per_pixel = 0.1", "microns_per_pixel = 0.2"))
    (status, _, detail), = typed_cells_checks(load_config(recalibrated))
    assert status == "WARN" and "ready for a station mean" not in detail, detail
    assert f"left out of a fit: {len(typed)} typed at another scale" in detail, detail
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(_config_text(tmp_path, ""))
    (status, _, detail), = typed_cells_checks(load_config(fresh))
    assert status == "OK" and "none yet" in detail
    off = tmp_path / "off.toml"
    off.write_text(_config_text(tmp_path, "typing = false"))
    (status, _, detail), = typed_cells_checks(load_config(off))
    assert status == "OK" and "typing off" in detail


def test_a_cell_typed_before_is_retyped_or_removed_after_its_run_left_the_gallery(typed_station):
    _, path, feed, _, _, typed, _, _, _ = typed_station
    one = typed[0]
    key = {"field_id": one["field_id"], "cell": one["cell"]}
    before = feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": one["type"]}]})["typed_per_type"]
    # a station whose gallery no longer holds the run (another review folder), the same typed-cells file
    cfg = parse_config(tomllib.loads(path.read_text()), environ={})
    restarted = ClinicFeed(cfg.model_copy(update={"review": cfg.review.model_copy(
        update={"directory": path.parent / "elsewhere"})}))
    assert restarted.gallery.run_ids() == []
    restarted.gallery.set_wbc_typing(feed.gallery.typing)
    try:
        other = next(t for t in feed.gallery.typing.classes if t != one["type"])
        moved = restarted.type_cells({"run_id": "run-1", "cells": [{**key, "type": other}]})
        assert moved["ok"] and moved["stored"] == 1 and moved["typed_per_type"][other] == before.get(other, 0) + 1
        never = restarted.type_cells({"run_id": "run-1", "cells": [{"field_id": one["field_id"], "cell": 9999,
                                                                    "type": other}]})
        assert [e["error"] for e in never["errors"]] == ["not_typeable"]
        red = restarted.type_cells({"run_id": "run-1", "cells": [{"field_id": one["field_id"], "cell": 9999,
                                                                  "type": feed.gallery.typing.rbc_classes[0]}]})
        assert [e["error"] for e in red["errors"]] == ["not_typeable"]  # not "unknown_type" for a white cell
        gone = restarted.type_cells({"run_id": "run-1", "cells": [{**key, "type": None}]})
        assert gone["ok"] and gone["removed"] == 1 and sum(gone["typed_per_type"].values()) == sum(before.values()) - 1
    finally:
        restarted.close()
    back = feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": one["type"]}]})
    assert back["typed_per_type"] == before


def test_a_restarted_station_shows_the_gallery_with_its_types_and_types_from_it(typed_station):
    """Stopped between analysis and review (a power cut, the end of a day): the next process shows
    the same crops, the types given before it, and takes new types for the crops it read back."""
    _, path, feed, _, _, typed, _, _, _ = typed_station
    before, first = _gallery_cells(feed, "run-1")
    assert sum(c.get("typed") is not None for c in before) >= 3
    cfg = parse_config(tomllib.loads(path.read_text()), environ={})
    restarted, analyzer = ClinicFeed(cfg), build_analyzer(cfg)
    try:
        restarted.attach_wbc_head(analyzer.wbc_head, analyzer.rbc_head)
        after, first_after = _gallery_cells(restarted, "run-1")
        assert after == before and first_after["overlay"] == first["overlay"]
        assert first_after["typed_per_type"] == first["typed_per_type"]
        one = typed[0]
        a, b = (g.gallery.typeable("run-1", one["field_id"], one["cell"]) for g in (feed, restarted))
        assert np.array_equal(a.features, b.features) and np.array_equal(a.view_features, b.view_features)
        assert (a.head_type, dict(a.open_set_scores), a.model_sha256, a.views, a.microns_per_pixel, a.kind,
                a.types) == (b.head_type, dict(b.open_set_scores), b.model_sha256, b.views, b.microns_per_pixel,
                             b.kind, b.types)
        current = next(c["typed"] for c in after if (c["field_id"], c["cell"]) == (one["field_id"], one["cell"]))
        other = next(t for t in feed.gallery.typing.classes if t != current)
        moved = restarted.type_cells({"run_id": "run-1", "cells": [{**one, "type": other}]})
        assert moved["ok"] and moved["stored"] == 1
        shown = next(c for c in _gallery_cells(restarted, "run-1")[0]
                     if (c["field_id"], c["cell"]) == (one["field_id"], one["cell"]))
        assert shown["typed"] == other
        back = restarted.type_cells({"run_id": "run-1", "cells": [{**one, "type": current}]})
        assert back["typed_per_type"] == first["typed_per_type"]
    finally:
        analyzer.close()
        restarted.close()
    # a WBC head installed since: the crops read back are not typeable with it (another feature space)
    other = ClinicFeed(cfg)
    try:
        other.gallery.set_wbc_typing(dataclasses.replace(feed.gallery.typing, model_sha256="0" * 64))
        crops = _gallery_cells(other, "run-1")[0]
        assert not any(c["typeable"] for c in crops if c["kind"] in ("wbc", "nrbc"))
        assert any(c["typeable"] for c in crops if c["kind"] == "rbc")  # the RBC head is the same
        assert other.gallery.typeable("run-1", one["field_id"], one["cell"]) is None
    finally:
        other.close()


def test_a_size_based_type_is_refused_for_a_red_cell_the_gallery_no_longer_holds(typed_station):
    """Whether the red cell's scale was calibrated is known from its crop only: without it a
    size-based type (which the signed report would then drop) is refused; a shape type is taken."""
    _, path, feed, crops, _, _, _, _, _ = typed_station
    red = next(c for c in crops if c["kind"] == "rbc" and c["typeable"])
    key = {"field_id": red["field_id"], "cell": red["cell"]}
    assert feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": "target"}]})["ok"]
    cfg = parse_config(tomllib.loads(path.read_text()), environ={})
    elsewhere = ClinicFeed(cfg.model_copy(update={"review": cfg.review.model_copy(
        update={"directory": path.parent / "elsewhere-2"})}))
    elsewhere.gallery.set_wbc_typing(feed.gallery.typing)
    try:
        sized = elsewhere.type_cells({"run_id": "run-1", "cells": [{**key, "type": "macrocyte"}]})
        assert [e["error"] for e in sized["errors"]] == ["unknown_type"] and "size-based" in sized["errors"][0]["message"]
        assert elsewhere.type_cells({"run_id": "run-1", "cells": [{**key, "type": "stomatocyte"}]})["ok"]
    finally:
        elsewhere.close()
        assert feed.type_cells({"run_id": "run-1", "cells": [{**key, "type": None}]})["removed"] == 1


def test_a_large_command_gets_an_answer_that_lists_a_few_and_counts_the_rest(typed_station):
    """A dashboard that sends a whole run's types at once, some entries bad: the answer lists the
    first MAX_LISTED cells typed and errors and counts them all, so it stays one small message
    whatever was sent."""
    from smearscope.service.station.type_cells_command import MAX_LISTED

    _, _, feed, _, _, typed, answer, _, _ = typed_station
    again = typed * 2  # the same types again: nothing changes in the file
    bad = [{"cell": "x"}] * (MAX_LISTED + 5)
    assert MAX_LISTED < len(again) and len(again) + len(bad) <= 500
    got = feed.type_cells({"run_id": "run-1", "cells": again + bad})
    assert got["stored"] == got["cells_count"] == len(again) and got["errors_count"] == len(bad)
    assert got["cells"] == again[:MAX_LISTED]
    assert [e["index"] for e in got["errors"]] == list(range(len(again), len(again) + MAX_LISTED))
    assert got["typed_per_type"] == answer["typed_per_type"]


def test_a_full_file_refuses_new_cells_with_its_code(typed_station, tmp_path):
    _, _, feed, _, _, typed, _, _, _ = typed_station
    full = TypedCellStore(tmp_path / "full.sqlite3", max_rows=1)
    saved, feed._store = feed._store, full
    try:
        answer = feed.type_cells({"run_id": "run-1", "cells": typed[:2]})
    finally:
        feed._store = saved
        full.close()
    assert answer["stored"] == 1 and [e["error"] for e in answer["errors"]] == ["typed_cells_full"]
    assert answer["errors_count"] == 1 and answer["cells_count"] == 1


def test_below_the_disks_floor_no_cell_is_typed_and_the_file_gets_no_row(typed_station, tmp_path):
    """While the disk has less than `[review] min_free_disk_mb` free (a floor above what this disk
    has: a disk the outbox needs), typing a cell answers typed_cells_disk_low and stores nothing;
    with room again it is stored, and a removal (which takes no room) goes below the floor too."""
    _, path, feed, _, _, typed, _, _, _ = typed_station
    cfg = parse_config(tomllib.loads(path.read_text()), environ={})
    file = tmp_path / "typed.sqlite3"
    floor_mb = shutil.disk_usage(tmp_path).free / 2**20 + 1024
    low = ClinicFeed(cfg.model_copy(update={"review": cfg.review.model_copy(update={
        "directory": tmp_path / "review", "typed_cells_path": file, "min_free_disk_mb": floor_mb})}))
    low.gallery.close()
    low.gallery = feed.gallery  # the typed station's gallery, its white cells typeable
    cells = typed[:3]
    try:
        refused = low.type_cells({"run_id": "run-1", "cells": cells})
        assert not refused["ok"] and refused["stored"] == 0 and refused["cells_count"] == 0
        assert [e["error"] for e in refused["errors"]] == ["typed_cells_disk_low"] * 3
        assert "min_free_disk_mb" in refused["errors"][0]["message"]
        with sqlite3.connect(file) as conn:
            assert conn.execute("SELECT count(*) FROM typed_white_cells").fetchone()[0] == 0
        low._store.min_free_bytes = 0  # room again
        assert low.type_cells({"run_id": "run-1", "cells": cells})["stored"] == 3
        low._store.min_free_bytes = floor_mb * 2**20
        gone = low.type_cells({"run_id": "run-1", "cells": [{**cells[0], "type": None}]})
        assert gone["ok"] and gone["removed"] == 1
    finally:
        low.gallery = None  # the typed station's, closed with it
        low.close()
        feed.type_cells({"run_id": "run-1", "cells": cells[:1]})  # its gallery's mark back


def test_a_file_from_before_red_cells_were_typed_is_read_by_doctor_and_adapt_wbc_before_the_station_writes_it(
        tmp_path):
    """A typed-cells file without the `kind` column (an earlier version's; the station adds it when it next
    writes the file, at a cell typed or a run verified) read-only, as `doctor` and `adapt-wbc --station` read
    it after an update: every row is a white cell, as the station will read it, and the file is left as it is
    (they stopped with 'no such column: kind')."""
    path = tmp_path / "typed.sqlite3"
    store = TypedCellStore(path)
    assert store.put("r1", "f1", 0, "neutrophil", _cell(value=1.0)) and store.put("r1", "f2", 3, "monocyte", _cell())
    store.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("ALTER TABLE typed_white_cells DROP COLUMN kind")  # the earlier version's layout
    db.close()
    old = TypedCellStore(path, read_only=True)
    try:
        typed = old.load(SHA, ("identity", "hflip"), 0.1)
        assert (typed.types, typed.runs, old.counts(SHA)) == (["neutrophil", "monocyte"], 1,
                                                              {"monocyte": 1, "neutrophil": 1})
        assert old.types_of_run("r1") == {("f1", 0): ("wbc", "neutrophil"), ("f2", 3): ("wbc", "monocyte")}
    finally:
        old.close()
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    assert "kind" not in [r[1] for r in db.execute("PRAGMA table_info(typed_white_cells)")]  # left as it is
    db.close()
    station = TypedCellStore(path)  # the station's open adds the column: the same cells
    try:
        assert station.types_of_run("r1") == {("f1", 0): ("wbc", "neutrophil"), ("f2", 3): ("wbc", "monocyte")}
        assert station.load(SHA, ("identity", "hflip"), 0.1).types == typed.types
    finally:
        station.close()


OPEN_AT_GO = """
import sys, time
from pathlib import Path
from smearscope.service.station.typed_cells import TypedCellsError, TypedCellStore
path, go = Path(sys.argv[1]), Path(sys.argv[2])
Path(sys.argv[3]).touch()  # imported: ready
while not go.exists():
    time.sleep(0.0005)
if sys.argv[4] == "station":
    TypedCellStore(path).close()
    print("made")
else:  # doctor's and adapt-wbc's open, as soon as the station's has made the file
    while not path.exists():
        pass
    try:
        TypedCellStore(path, read_only=True).close()
        print("read")
    except TypedCellsError as exc:
        print(exc.code, exc.message)
"""


def test_a_reader_opening_the_file_as_the_station_makes_it_finds_no_typed_cell_yet(tmp_path):
    """`doctor` or `adapt-wbc --station` opening the typed-cells file in the moment the station's first typed
    cell makes it (the file there, its table not yet): nothing typed yet, as with no file (they said
    typed_cells_unavailable, 'no such table', a doctor FAIL: 7 of 10 tries)."""
    for trial in range(5):
        path, go = tmp_path / f"typed{trial}.sqlite3", tmp_path / f"go{trial}"
        ready = [tmp_path / f"ready{trial}-{who}" for who in ("station", "reader")]
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_GO, str(path), str(go), str(r), who],
                                  cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for who, r in zip(("station", "reader"), ready, strict=True)]
        while not all(r.exists() for r in ready):
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
            time.sleep(0.001)
        go.touch()
        made, read = (p.communicate(timeout=60)[0].strip() for p in procs)
        assert made == "made"
        assert read == "read" or read.startswith(f"no_typed_cells {path}: no cell typed yet"), read
    # the file as the station's open leaves it before its table: the same, every time
    db = sqlite3.connect(tmp_path / "new.sqlite3")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    with pytest.raises(TypedCellsError) as exc:
        TypedCellStore(tmp_path / "new.sqlite3", read_only=True)
    assert exc.value.code == "no_typed_cells"


def test_a_full_file_gives_up_red_cell_types_of_runs_no_longer_verifiable(typed_station, tmp_path):
    """Red cells' types count in a verified report only, and only the gallery's runs can be
    verified: in a file full of them from runs long gone, a technician's new types are stored (the
    oldest such row gives its place); white cells' types (the station's means) are never given up."""
    _, _, feed, crops, _, _, _, _, _ = typed_station
    reds = [c for c in crops if c["kind"] == "rbc" and c["typeable"]]
    assert len(reds) >= 2
    gone = TypeableCell(np.zeros(0, np.float32), np.zeros((0, 0), np.float32), "normal", {}, "b" * 64, (), 0.1,
                        kind="rbc")
    full = TypedCellStore(tmp_path / "full.sqlite3", max_rows=2)
    saved, feed._store = feed._store, full
    try:
        assert full.put("run-gone", "f0", 1, "target", gone) and full.put("run-gone", "f0", 2, "target", gone)
        first = feed.type_cells({"run_id": "run-1", "cells": [
            {"field_id": reds[0]["field_id"], "cell": reds[0]["cell"], "type": "stomatocyte"}]})
        assert first["ok"] and first["stored"] == 1, first
        assert full.types_of_run("run-gone") == {("f0", 2): ("rbc", "target")}  # the oldest gave its place
        assert full.kind_of("run-1", reds[0]["field_id"], reds[0]["cell"]) == "rbc"
        assert full.remove("run-gone", "f0", 2) and full.put("run-gone", "f0", 3, "lymphocyte", _cell())
        second = feed.type_cells({"run_id": "run-1", "cells": [
            {"field_id": reds[1]["field_id"], "cell": reds[1]["cell"], "type": "stomatocyte"}]})
        assert [e["error"] for e in second["errors"]] == ["typed_cells_full"]  # a white cell's type stays
    finally:
        feed._store = saved
        full.close()


def test_with_every_white_cell_shown_the_cells_to_review_keep_their_place_at_the_cap(tmp_path):
    from smearscope.service.config import ReviewConfig
    from smearscope.service.station.review import ReviewGallery, cell_crop

    _, analyzer, _ = _station(tmp_path)
    try:
        results = []
        for image, _ in _fields(tmp_path, range(500, 512)):
            pixels = cv2.imread(str(image))
            results.append((pixels, analyzer.analyze(Frame(pixels, image.name, str(image), microns_per_pixel=0.1))))
    finally:
        analyzer.close()
    # the cells with a crop (a box cut by the frame's edge may have none)
    cells = [(r.report.source.frame_id, i, c) for pixels, r in results for i, c in enumerate(r.report.cells)
             if cell_crop(pixels, c.bbox, 80) is not None]
    review = [(f, i) for f, i, c in cells if needs_review(c) is not None]
    others = [(f, i) for f, i, c in cells if needs_review(c) is None and c.kind in ("wbc", "nrbc") and c.label is not None]
    assert len(others) >= 3 and len(review) >= 3
    cap = len(review) + 2
    gallery = ReviewGallery(ReviewConfig(white_cells="all", max_cells_per_run=cap), tmp_path / "review")
    for pixels, r in results:
        gallery.add_field("run", pixels, r)
    page = gallery.page("run")
    crops = [(c["field_id"], c["cell"]) for c in page["cells"]]
    while page["next_offset"] is not None:
        page = gallery.page("run", page["next_offset"])
        crops += [(c["field_id"], c["cell"]) for c in page["cells"]]
    # every cell to review of every field is kept; two of the others fill the rest, the earliest;
    # in arrival order (per field: review cells first)
    arrival = [(r.report.source.frame_id, i) for _, r in results
               for _, i in sorted((needs_review(c) if needs_review(c) is not None else 2, i)
                                  for i, c in enumerate(r.report.cells))]
    assert crops == [k for k in arrival if k in set(review) | set(others[:2])]
    assert page["not_kept"] == len(others) - 2
    # read back after a restart: the same crops, those displaced at the cap not among them
    again = ReviewGallery(ReviewConfig(white_cells="all", max_cells_per_run=cap), tmp_path / "review")
    offset, pages = 0, []
    while offset is not None:
        pages.append(again.page("run", offset))
        offset = pages[-1]["next_offset"]
    assert [(c["field_id"], c["cell"]) for p in pages for c in p["cells"]] == crops
    assert pages[-1]["not_kept"] == len(others) - 2


def test_an_open_run_does_not_hold_the_white_cells_features(tmp_path):
    from smearscope.service.station.specimen import SpecimenRun

    _, analyzer, _ = _station(tmp_path)
    try:
        image = _fields(tmp_path, [503])[0][0]
        pixels = cv2.imread(str(image))
        result = analyzer.analyze(Frame(pixels, image.name, str(image), microns_per_pixel=0.1))
    finally:
        analyzer.close()
    assert sum(c.head_features is not None for c in result.cells) >= 2  # typing on: the field has them
    run = SpecimenRun(run_id="r", started_at=0.0, started_by="command", target_wbc=100)
    assert run.add(result, 1.0)
    assert len(run.cells) == len(result.cells) and all(c.head_features is None for c in run.cells)
    assert [c.label for c in run.cells] == [c.label for c in result.cells]


def test_a_red_cell_to_review_is_typed_with_the_rbc_heads_classes_and_kept_out_of_the_means(typed_station):
    tmp, _, feed, crops, _, _, _, _, _ = typed_station
    rbc = [c for c in crops if c["kind"] == "rbc" and c["typeable"]]
    assert rbc, "the rendered fields hold red cells to review"
    c = rbc[0]
    new = "normal" if c["label"] != "normal" else "target"
    wbc_before = feed.type_cells({"run_id": "run-1", "cells": [{"field_id": c["field_id"], "cell": c["cell"],
                                                                "type": new}]})
    assert wbc_before["ok"] and wbc_before["stored"] == 1
    store = TypedCellStore(default_path(tmp / "state" / "outbox.sqlite3"), read_only=True)
    try:
        assert store.types_of_run("run-1")[(c["field_id"], c["cell"])] == ("rbc", new)
        got = store.load(feed.gallery.typing.model_sha256, feed.gallery.typing.views)
        assert new not in got.types  # the WBC means never see a red cell
        assert new not in (wbc_before["typed_per_type"] or {})
    finally:
        store.close()
    gone = feed.type_cells({"run_id": "run-1", "cells": [{"field_id": c["field_id"], "cell": c["cell"], "type": None}]})
    assert gone["removed"] == 1


def test_a_file_from_before_red_cells_were_typed_gets_its_kind_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("""CREATE TABLE typed_white_cells (
        run_id TEXT NOT NULL, field_id TEXT NOT NULL, cell INTEGER NOT NULL,
        type TEXT NOT NULL, head_type TEXT NOT NULL, model_sha256 TEXT NOT NULL, views TEXT NOT NULL,
        dim INTEGER NOT NULL, features BLOB NOT NULL, view_features BLOB NOT NULL,
        open_set_scores TEXT NOT NULL, microns_per_pixel REAL, typed_at REAL NOT NULL,
        PRIMARY KEY (run_id, field_id, cell))""")
    feats = np.ones(4, np.float32)
    db.execute("INSERT INTO typed_white_cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
               ("r", "f", 1, "monocyte", "lymphocyte", SHA, '["identity", "hflip"]', 4, feats.tobytes(),
                np.stack([feats, feats]).tobytes(), "{}", 0.1, 1.0))
    db.commit()
    db.close()
    store = TypedCellStore(path)
    try:
        assert store.counts(SHA) == {"monocyte": 1} and store.kind_of("r", "f", 1) == "wbc"
        assert store.put("r", "f", 2, "neutrophil", _cell())
        assert store.types_of_run("r") == {("f", 1): ("wbc", "monocyte"), ("f", 2): ("wbc", "neutrophil")}
    finally:
        store.close()


def test_red_cells_at_an_estimated_scale_are_offered_no_size_based_type(tmp_path):
    _, analyzer, feed = _station(tmp_path)
    plain = ClinicFeed(parse_config(tomllib.loads(_config_text(tmp_path, 'white_cells = "all"')), environ={}))
    plain.attach_wbc_head(analyzer.wbc_head)  # no RBC head: red cells are not typeable
    try:
        image = _fields(tmp_path, [500])[0][0]
        pixels = cv2.imread(str(image))
        result = analyzer.analyze(Frame(pixels, image.name, str(image)))  # no scale: estimated
        assert result.report.scale.method != "given"
        feed.gallery.add_field("est", pixels, result)
        plain.gallery.add_field("est", pixels, result)
    finally:
        analyzer.close()
    crops, first = _gallery_cells(feed, "est")
    rbc = [c for c in crops if c["kind"] == "rbc" and c["typeable"]]
    assert rbc and all(set(c["types"]) == set(first["rbc_types"]) - {"microcyte", "macrocyte", "spherocyte"}
                       for c in rbc)
    answer = feed.type_cells({"run_id": "est", "cells": [{"field_id": rbc[0]["field_id"], "cell": rbc[0]["cell"],
                                                          "type": "spherocyte"}]})
    assert [e["error"] for e in answer["errors"]] == ["unknown_type"]
    other, page = _gallery_cells(plain, "est")
    assert page["rbc_types"] is None and not any(c["typeable"] for c in other if c["kind"] == "rbc")
    feed.close()
    plain.close()



def test_red_cells_cut_by_the_frame_edge_are_offered_no_size_based_type(tmp_path):
    """At the station's given scale, a red cell the frame's edge cuts has no size to judge (the
    analyzer gives it no size-based type): the gallery offers it its shape types only, and refuses
    a size-based one; a whole red cell is offered every type."""
    from smearscope.device.synthetic import render_field

    _, analyzer, feed = _station(tmp_path)
    try:
        field = render_field(3, width=960, height=720, microns_per_pixel=0.1,
                             rbc_mix={"normal": 0.6, "sickle": 0.4}, n_wbc=1).frame
        result = analyzer.analyze(field)
        assert result.report.scale.method == "given"
        feed.gallery.add_field("cut", field.pixels, result)
    finally:
        analyzer.close()
    crops, first = _gallery_cells(feed, "cut")
    rbc = [c for c in crops if c["kind"] == "rbc" and c["typeable"]]
    cut = [c for c in rbc if result.cells[c["cell"]].touches_frame_edge]
    whole = [c for c in rbc if not result.cells[c["cell"]].touches_frame_edge]
    assert cut and whole
    assert all(set(c["types"]) == set(first["rbc_types"]) - {"microcyte", "macrocyte", "spherocyte"} for c in cut)
    assert all(c.get("types") in (None, first["rbc_types"]) for c in whole), whole[0]
    answer = feed.type_cells({"run_id": "cut", "cells": [{"field_id": cut[0]["field_id"], "cell": cut[0]["cell"],
                                                          "type": "spherocyte"}]})
    assert [e["error"] for e in answer["errors"]] == ["unknown_type"]
    feed.close()

def test_a_station_says_at_start_when_its_typed_cells_file_is_unusable(tmp_path, caplog):
    """A corrupt file (or a directory) is told at start, not at a technician's first typed cell."""
    cfg = parse_config(tomllib.loads(_config_text(tmp_path, 'white_cells = "all"')), environ={})
    feed = ClinicFeed(cfg)
    feed.typed_cells_path.parent.mkdir(parents=True, exist_ok=True)
    feed.typed_cells_path.write_bytes(b"not a database" * 100)
    with caplog.at_level("WARNING"):
        feed.start(None, [])
    assert any("typed cells" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records), caplog.text
    caplog.clear()
    feed.typed_cells_path.unlink()
    feed.typed_cells_path.mkdir()
    with caplog.at_level("WARNING"):
        feed.start(None, [])
    assert any("is not a file" in r.getMessage() for r in caplog.records), caplog.text
    feed.close()


def test_a_recalibrated_station_counts_only_the_cells_typed_at_its_scale(typed_station):
    """The counts the dashboard shows (get_review, type_cells) are those adapt-wbc --station fits:
    after a recalibration the cells typed at the old scale are not 'typed' towards a station mean."""
    _, path, feed, _, _, _, answer, _, _ = typed_station
    assert answer["typed_per_type"] and _gallery_cells(feed, "run-1")[1]["typed_per_type"] == answer["typed_per_type"]
    text = path.read_text().replace("microns_per_pixel = 0.1", "microns_per_pixel = 0.2")
    cfg = parse_config(tomllib.loads(text), environ={})
    restarted, analyzer = ClinicFeed(cfg), build_analyzer(cfg)
    try:
        restarted.attach_wbc_head(analyzer.wbc_head, analyzer.rbc_head)
        assert restarted.get_review({"run_id": "run-1", "offset": 0})["typed_per_type"] == {}
        crop = next(c for c in _gallery_cells(restarted, "run-1")[0] if c["typeable"] and c.get("typed"))
        again = restarted.type_cells({"run_id": "run-1", "cells": [
            {"field_id": crop["field_id"], "cell": crop["cell"], "type": crop["typed"]}]})
        assert again["ok"] and again["typed_per_type"] == {}, again
    finally:
        restarted.close()
        analyzer.close()
    store = TypedCellStore(default_path(cfg.mqtt.outbox.path), read_only=True)
    try:
        assert store.counts(analyzer.models["wbc_head"].sha256) == answer["typed_per_type"]  # all, unfiltered
    finally:
        store.close()


def test_a_refit_says_when_the_configs_open_set_section_was_fitted_with_other_means(typed_station):
    """Means refitted (more cells typed) under a config whose [analysis.wbc_open_set] was fitted
    with the earlier means: the station refuses to start with that section, and the fit says so."""
    tmp, path, _, _, _, _, _, _, _ = typed_station
    sha = load_manifest(DEFAULT_MODELS_DIR / "wbc_head.json").sha256
    section = (f'\n[analysis.wbc_open_set]\nthresholds = {{ energy = -3.0 }}\nmodel_sha256 = "{sha}"\n'
               f'station_means_sha256 = "{"0" * 64}"\n')
    for name, text, stale in (("plain", path.read_text(), False), ("section", path.read_text() + section, True)):
        config = tmp / f"refit_{name}.toml"
        config.write_text(text)
        out = tmp / f"refit_{name}.json"
        got = _cli("adapt-wbc", "--station", "--config", str(config), "--out", str(out), "--json")
        assert got.returncode == 0 and json.loads(got.stdout)["open_set_section_stale"] is stale, got.stdout
        printed = _cli("adapt-wbc", "--station", "--config", str(config), "--out", str(out)).stdout
        assert ("refit [analysis.wbc_open_set]" in printed) is stale, printed


def test_means_fitted_at_one_scale_are_flagged_on_a_station_recalibrated_since(typed_station, caplog):
    """The means file records the calibrated scale its cells were analysed at; a station at another
    (recalibrated since) still loads it, but doctor WARNs and the start logs it: never silent."""
    from smearscope.cli.doctor import station_means_checks

    tmp, path, _, _, _, _, _, _, _ = typed_station
    out = tmp / "scaled_wbc.json"
    assert _cli("adapt-wbc", "--station", "--config", str(path), "--out", str(out)).returncode == 0
    assert json.loads(out.read_text())["microns_per_pixel"] == pytest.approx(0.1)
    for scale, flagged in (("0.1", False), ("0.1005", False), ("0.2", True)):
        text = path.read_text().replace("microns_per_pixel = 0.1", f"microns_per_pixel = {scale}")
        text = text.replace("[analysis]\n", f'[analysis]\nwbc_station_means = "{out}"\n', 1)
        cfg = parse_config(tomllib.loads(text), environ={})
        (status, _, detail), = station_means_checks(cfg.analysis, cfg.microns_per_pixel)
        assert (status == "WARN") == flagged and ("analysed at 0.1 um/px" in detail) == flagged, detail
        caplog.clear()
        build_analyzer(cfg).close()
        warned = [r for r in caplog.records if "wbc_station_means" in r.getMessage() and r.levelname == "WARNING"]
        assert bool(warned) == flagged, [r.getMessage() for r in caplog.records]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_type_answered_as_stored_is_synced_to_the_disk_before_the_answer(tmp_path: Path) -> None:
    """A power cut after type_cells answered 'stored' must not take the type back: verify_run would
    then sign the run with the analyzer's label. In WAL mode SQLite's synchronous=NORMAL syncs only
    at checkpoints; the typed-cells file syncs its WAL at each commit (seen with strace: an fsync or
    fdatasync of typed.sqlite3-wal between the put's start and its return, in a real process)."""
    child = """
import os, sys
from pathlib import Path
import numpy as np
from smearscope.service.station.typed_cells import TypeableCell, TypedCellStore
store = TypedCellStore(Path(sys.argv[1]))
cell = TypeableCell(np.zeros(4, np.float32), np.zeros((2, 4), np.float32), "lymphocyte", {}, "sha", ("a", "b"), 0.1)
os.write(2, b"PUT\\n")
assert store.put("run", "file:f1.png@3a9c", 3, "monocyte", cell)
os.write(2, b"DONE\\n")
"""
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=write,fsync,fdatasync", "-o", str(trace),
                    sys.executable, "-c", child, str(tmp_path / "typed.sqlite3")], check=True, timeout=120)
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "write(2" in line and "PUT" in line)
    end = next(i for i, line in enumerate(lines) if "write(2" in line and "DONE" in line)
    synced = [line for line in lines[start:end] if re.search(r"f(data)?sync\(\d+<[^>]*typed\.sqlite3-wal>", line)]
    assert synced, lines[start:end]
    assert sqlite3.connect(tmp_path / "typed.sqlite3").execute("SELECT type FROM typed_white_cells").fetchall() == [
        ("monocyte",)]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_one_type_cells_command_is_synced_to_the_disk_once_not_once_a_cell(typed_station, tmp_path: Path) -> None:
    """A command typing many cells (the dashboard's 'type all', up to hundreds) is one transaction:
    one sync of the typed-cells file's WAL, not one a cell (about 5 ms each on an x86 VM's disk,
    more on an SD card), and every cell answered stored is on the disk before the answer. Seen
    with strace in a real process: a restarted station's ClinicFeed retyping 8 cells of the
    gallery it read back."""
    tmp, _, feed, _, _, typed, _, _, _ = typed_station
    shutil.copytree(tmp / "state", tmp_path / "state")
    (tmp_path / "station.toml").write_text(_config_text(tmp_path, 'white_cells = "all"'))
    (tmp_path / "typing.pickle").write_bytes(pickle.dumps(feed.gallery.typing))
    classes = feed.gallery.typing.classes
    cells = [{"field_id": c["field_id"], "cell": c["cell"], "type": next(t for t in classes if t != c["type"])}
             for c in typed[:8]]
    assert len(cells) == 8
    child = """
import json, os, pickle, sys, tomllib
from pathlib import Path
from smearscope.service.config import parse_config
from smearscope.service.station.clinic import ClinicFeed
tmp = Path(sys.argv[1])
feed = ClinicFeed(parse_config(tomllib.loads((tmp / "station.toml").read_text()), environ={}))
feed.gallery.set_wbc_typing(pickle.loads((tmp / "typing.pickle").read_bytes()))
cells = json.loads(sys.argv[2])
os.write(2, b"COMMAND\\n")
answer = feed.type_cells({"run_id": "run-1", "cells": cells})
os.write(2, b"ANSWERED\\n")
print(json.dumps(answer))
"""
    trace = tmp_path / "trace"
    done = subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=write,fsync,fdatasync", "-o", str(trace),
                           sys.executable, "-c", child, str(tmp_path), json.dumps(cells)],
                          check=True, timeout=300, capture_output=True, text=True)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["ok"] and answer["stored"] == 8, answer
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "write(2" in line and "COMMAND" in line)
    end = next(i for i, line in enumerate(lines) if "write(2" in line and "ANSWERED" in line)
    synced = [line for line in lines[start:end]
              if re.search(r"f(data)?sync\(\d+<[^>]*typed_cells\.sqlite3-wal>", line)]
    assert len(synced) == 1, synced
    on_disk = {(f, c): t for f, c, t in sqlite3.connect(tmp_path / "state" / "typed_cells.sqlite3").execute(
        "SELECT field_id, cell, type FROM typed_white_cells WHERE run_id='run-1'")}
    assert all(on_disk[(c["field_id"], c["cell"])] == c["type"] for c in cells)


def test_a_batch_whose_transaction_sqlite_rolled_back_stores_nothing_and_says_so(tmp_path: Path) -> None:
    """SQLite rolls a whole transaction back on some errors (a disk I/O error, a full disk): the
    cells written before it in a command's batch are then gone, and a cell written after it must
    not open a transaction of its own and be answered stored alone. Both the write and the batch
    raise; the file holds none of the batch's cells. (The rollback is SQLite's own ROLLBACK on
    the store's connection, as an I/O error leaves it.)"""
    store = TypedCellStore(tmp_path / "typed.sqlite3")
    assert store.put("run", "f", 0, "monocyte", _cell())  # before the batch: committed
    with pytest.raises(sqlite3.OperationalError), store.batch():
        assert store.put("run", "f", 1, "monocyte", _cell())
        store._db.execute("ROLLBACK")
        with pytest.raises(sqlite3.OperationalError):
            store.put("run", "f", 2, "monocyte", _cell())
    store.close()
    rows = sqlite3.connect(tmp_path / "typed.sqlite3").execute("SELECT cell FROM typed_white_cells").fetchall()
    assert rows == [(0,)]


def test_closing_the_feed_while_a_type_cells_command_is_under_way_does_not_deadlock(typed_station, tmp_path: Path) -> None:
    """The station's stop closes the clinic feed (the typed-cells file) after the publisher's
    join, which gives up after its bound: a type_cells command still writing its batch then meets
    the close. The batch holds the file's lock and asks which runs are live (the feed's lock);
    the close held the feed's lock while it waited for the file's: both threads hung, and the stop
    with them, until the unit's SIGKILL. The close now lets the batch end, then closes the file.
    The interleaving is made, not waited for: the batch's first gallery look goes on once the
    close is waiting for the file."""
    import threading

    tmp, _, feed, _, _, typed, _, _, _ = typed_station
    shutil.copytree(tmp / "state", tmp_path / "state")
    restarted = ClinicFeed(parse_config(tomllib.loads(_config_text(tmp_path, 'white_cells = "all"')), environ={}))
    restarted.gallery.set_wbc_typing(feed.gallery.typing)
    classes = feed.gallery.typing.classes
    cells = [{"field_id": c["field_id"], "cell": c["cell"], "type": next(t for t in classes if t != c["type"])}
             for c in typed[:3]]
    store = restarted._open_store()
    in_batch, closing, found = threading.Event(), threading.Event(), []
    real_close, real_typeable = store.close, restarted.gallery.typeable

    def close_seen() -> None:
        closing.set()
        real_close()

    def typeable_once_closing(run_id, field_id, cell):
        in_batch.set()
        assert closing.wait(60), "the close never reached the typed-cells file"
        found.append(real_typeable(run_id, field_id, cell))
        return found[-1]

    store.close, restarted.gallery.typeable = close_seen, typeable_once_closing
    answers: list[dict] = []
    command = threading.Thread(target=lambda: answers.append(restarted.type_cells({"run_id": "run-1", "cells": cells})),
                               daemon=True)
    closer = threading.Thread(target=restarted.close, daemon=True)
    command.start()
    assert in_batch.wait(60)  # the command holds the file for its batch: now the stop's close comes
    closer.start()
    command.join(60)
    closer.join(60)
    assert not command.is_alive() and not closer.is_alive(), "type_cells and the close hung on each other"
    assert found and all(f is not None for f in found)  # stored with their features (put: the live runs asked)
    assert answers[0]["stored"] == 3, answers
    on_disk = {(f, c): t for f, c, t in sqlite3.connect(tmp_path / "state" / "typed_cells.sqlite3").execute(
        "SELECT field_id, cell, type FROM typed_white_cells WHERE run_id='run-1'")}
    assert all(on_disk[(c["field_id"], c["cell"])] == c["type"] for c in cells)


def test_the_ids_of_a_command_whose_cells_cannot_be_stored_are_logged_escaped(typed_station, tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The run and field ids come from the command as sent: when the typed-cells file refuses the
    write (a file open read-only: the cell's write fails; another writer holding the file: the
    command's transaction fails), the ERROR line shows a line break as \\x0a and a bidi override
    as \\u202e, so a command can neither forge a journal line nor reverse what follows in it."""
    _, _, feed, _, _, _, _, _, _ = typed_station
    path = tmp_path / "typed.sqlite3"
    TypedCellStore(path).close()
    run_id, field_id = "run\n2026-12-07 ERROR forged\u202e", "f\u202egnp\n.png"
    saved = feed._store
    feed._store = TypedCellStore(path, read_only=True)
    try:
        with caplog.at_level(logging.ERROR, logger="smearscope.service.station"):
            answer = feed.type_cells({"run_id": run_id, "cells": [{"field_id": field_id, "cell": 0, "type": None}]})
        assert [e["error"] for e in answer["errors"]] == ["typed_cells_unavailable"], answer
        feed._store.close()
        feed._store = TypedCellStore(path)
        feed._store._db.execute("PRAGMA busy_timeout = 0")  # the other writer's lock refuses at once
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with caplog.at_level(logging.ERROR, logger="smearscope.service.station"):
                answer = feed.type_cells({"run_id": run_id, "cells": [{"field_id": field_id, "cell": 0, "type": None}]})
        finally:
            other.rollback()
            other.close()
        assert [e["error"] for e in answer["errors"]] == ["typed_cells_unavailable"], answer
    finally:
        feed._store.close()
        feed._store = saved
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "typed cells" in r.getMessage()]
    assert len(said) == 2, said
    assert all("\n" not in m and "\u202e" not in m and "run\\x0a2026-12-07 ERROR forged\\u202e" in m for m in said), said
    assert "f\\u202egnp\\x0a.png" in said[0], said


def test_a_station_where_nothing_was_typed_yet_says_so_and_how_to_type(tmp_path):
    """The station made its typed-cells file (typing on) but nobody typed a cell: adapt-wbc
    --station said "no class has 10 typed white cells usable for this fit (none)": it says that
    nothing was typed yet, and how to type."""
    path, analyzer, feed = _station(tmp_path)
    try:
        assert feed.run_types("run-1") == {}  # what the gallery asks of a run: the file made, empty
    finally:
        analyzer.close()
        feed.close()
    assert list(tmp_path.rglob("typed_cells.sqlite3"))
    out = tmp_path / "x.json"
    got = _cli("adapt-wbc", "--station", "--config", str(path), "--out", str(out), "--json")
    answer = json.loads(got.stdout)
    assert got.returncode == 2 and answer["error"]["code"] == "no_typed_cells" and answer["typed"] == 0, answer
    message = answer["error"]["message"]
    assert ": no white cell has been typed on this station yet. Type them on the dashboard: with [review] " \
        'white_cells = "all" every white cell of a run is in its review gallery, with a type to pick under ' \
        "its crop" in message, message
    assert f"once a class has 10 typed, run smearscope adapt-wbc --station --config {path} --out {out} again" in message
    assert not out.exists()


def test_the_command_to_run_again_is_quoted_for_a_path_with_a_space(tmp_path):
    """The no_typed_cells answer's command to run again, pasted into a shell, runs the same command:
    an --out path with a space in it is quoted ('station wbc.json' was cut in two)."""
    path, analyzer, feed = _station(tmp_path)
    try:
        assert feed.run_types("run-1") == {}
    finally:
        analyzer.close()
        feed.close()
    out = tmp_path / "station wbc.json"
    got = _cli("adapt-wbc", "--station", "--config", str(path), "--out", str(out), "--json")
    message = json.loads(got.stdout)["error"]["message"]
    command = message.split(" typed, run ", 1)[1].removesuffix(" again")
    assert shlex.split(command) == ["smearscope", "adapt-wbc", "--station", "--config", str(path), "--out", str(out)], \
        message


def test_a_typed_cells_path_naming_another_of_the_stations_files_is_not_read_as_nothing_typed_yet(tmp_path):
    """[review] typed_cells_path naming the station's outbox (a file of other tables, without typed cells)
    is no typed-cells file being made: unavailable, as doctor says it (FAIL), not 'none yet' (OK)."""
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.close()
    with pytest.raises(TypedCellsError) as exc:
        TypedCellStore(tmp_path / "outbox.sqlite3", read_only=True)
    assert exc.value.code == "typed_cells_unavailable", exc.value.message
    assert "not a typed-cells file" in exc.value.message
