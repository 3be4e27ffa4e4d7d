"""`adapt-wbc` refuses typed cells the head contradicts as a consistent typing mistake would
(smearscope.cli.adapt_guard): a class the head confidently calls one other class, or two classes
swapped. Judged on a real lab the head was not trained on, typed by its own annotations: the
Raspberry Pi station's (chula_wbc_rpi) fields, and BCCD's and rpi's white-cell crops. A lab
manager who accepts a disagreement signs it (--by), and a refusal says which classes kept the
head's mean for want of cells: on the project's rendered fields typed in a station's gallery."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tomllib
from realdata import DATA, needs_models
from test_typed_cells import typed_station  # noqa: F401 (a fixture)

from smearscope.cli.adapt_guard import (
    JUDGED_CELLS,
    confusion,
    disagreements,
    parse_accepted,
    table_text,
)
from smearscope.service.config import parse_config
from smearscope.service.station.clinic import ClinicFeed

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"

needs_rpi = pytest.mark.skipif(not (DATA / "chula_wbc_rpi" / "train" / "images").is_dir(),
                               reason=f"chula_wbc_rpi not found under {DATA} (set SMEARSCOPE_DATA)")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smearscope", *args], check=False, capture_output=True,
                          text=True, timeout=900, cwd=REPO)


def _swap(types: list[str], a: str, b: str) -> list[str]:
    return [b if t == a else a if t == b else t for t in types]


# -- the rule, on counts --------------------------------------------------------------------------


def test_a_class_the_head_confidently_calls_another_is_refused_an_unsure_head_is_not():
    types = ["neutrophil"] * 20 + ["lymphocyte"] * 20
    # a lab the head is unsure of: half the neutrophils called lymphocytes, 8 of them failing the
    # head's open-set tests (sent to review): 2 of 20 confident, a shift
    heads = ["lymphocyte"] * 10 + ["neutrophil"] * 10 + ["neutrophil"] * 5 + ["lymphocyte"] * 15
    confident = [False] * 8 + [True] * 32
    assert disagreements(confusion(types, heads, confident)) == []
    assert confusion(types, heads, confident)["neutrophil"] == {"(review)": 8, "lymphocyte": 2, "neutrophil": 10}
    assert [d.cells for d in disagreements(confusion(types, heads, [True] * 40))] == [10]
    # confident calls: 6 of 20 (30 %) is a shift, 8 of 20 (40 %) refused
    heads[6:10] = ["neutrophil"] * 4
    assert disagreements(confusion(types, heads, [True] * 40)) == []
    heads[6:8] = ["lymphocyte"] * 2
    found = disagreements(confusion(types, heads, [True] * 40))
    assert [(d.typed, d.head, d.cells, d.of, d.kind) for d in found] == [("neutrophil", "lymphocyte", 8, 20,
                                                                          "relabelled")]
    # a class typed fewer times than a station mean needs keeps the head's mean: not judged
    few = disagreements(confusion(types[:JUDGED_CELLS - 1], ["lymphocyte"] * (JUDGED_CELLS - 1),
                                  [True] * (JUDGED_CELLS - 1)))
    assert few == []


def test_two_classes_each_called_the_other_by_a_third_are_a_swap():
    types = ["neutrophil"] * 10 + ["lymphocyte"] * 10
    heads = ["lymphocyte"] * 3 + ["neutrophil"] * 7 + ["neutrophil"] * 3 + ["lymphocyte"] * 7
    found = disagreements(confusion(types, heads, [True] * 20))
    assert {(d.key, d.kind) for d in found} == {("neutrophil->lymphocyte", "swapped"),
                                                ("lymphocyte->neutrophil", "swapped")}
    table = table_text(confusion(types, heads, [True] * 20))
    assert table[1].split() == ["lymphocyte", "7", "3", "0"] and "(review)" in table[0]


def test_an_accepted_disagreement_names_two_of_the_heads_classes():
    classes = ["lymphocyte", "neutrophil"]
    assert parse_accepted([" Neutrophil -> lymphocyte "], classes) == ({"neutrophil->lymphocyte"}, None)
    for bad in ("neutrophil", "neutrophil->blast", "neutrophil->neutrophil"):
        assert parse_accepted([bad], classes)[1] and bad in parse_accepted([bad], classes)[1]


# -- real labs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crop_sets():
    """Per lab and split (val, test: crops no model trained on), the true types, the head's own
    classes and whether each passed the head's open-set tests, as adapt-wbc takes them."""
    from smearscope.engines.manifest import load_manifest
    from smearscope.engines.registry import create_engine
    from smearscope.service.analysis.classify import CropClassifier
    from training import head_data as hd
    from training.evaluate import wbc_crop_sets

    manifest = load_manifest(MODELS / "wbc_head.json")
    thresholds = np.array([t.threshold for t in manifest.open_set])
    eng = create_engine("onnxruntime", MODELS / "wbc_head.json").load()
    out = {}
    try:
        for split in ("val", "test"):
            for lab, (images, labels) in wbc_crop_sets(MODELS / "wbc_head.json", split).items():
                if lab == "pbc":
                    continue
                logits, scores, _, _ = CropClassifier(eng, 0.0)._forward(images)
                out[f"{split}/{lab}"] = ([hd.PBC_CLASSES[int(k)] for k in labels],
                                         [manifest.classes[k] for k in logits.argmax(1)],
                                         (scores <= thresholds).all(1).tolist())
    finally:
        eng.close()
    return out


@needs_rpi
@needs_models
@pytest.mark.realdata
def test_real_labs_typed_right_pass_and_swapped_or_renamed_classes_are_refused(crop_sets):
    """BCCD's and rpi's crops of the val and test splits (57 to 65 cells, 31 to 35): typed by their
    annotations, none is refused (the largest share of a judged class the head confidently calls one
    other class: BCCD test's eosinophils, 4 of 18 called neutrophil); every pair of judged classes
    swapped, and every judged class typed as a class the lab has none of, is."""
    swaps = renames = 0
    for name, (truth, heads, inside) in crop_sets.items():
        assert disagreements(confusion(truth, heads, inside)) == [], (name, table_text(confusion(truth, heads, inside)))
        judged = sorted(c for c in set(truth) if truth.count(c) >= JUDGED_CELLS)
        for i, a in enumerate(judged):
            for b in judged[i + 1:]:
                assert disagreements(confusion(_swap(truth, a, b), heads, inside)), (name, a, b)
                swaps += 1
            for b in {"ig", "erythroblast", "basophil", "monocyte"} - set(truth):
                assert disagreements(confusion([b if t == a else t for t in truth], heads, inside)), (name, a, b)
                renames += 1
    assert swaps >= 3 and renames >= 18, (swaps, renames)


def _rpi_labels(folder: Path, swap: tuple[str, str] | None = None) -> Path:
    """A typed-cells CSV of the rpi val and test fields, each white cell typed by its annotation."""
    from training.labs import rpi_boxes, rpi_dir, rpi_splits

    splits = rpi_splits()
    path = folder / ("typed.csv" if swap is None else f"typed-{swap[0]}-{swap[1]}.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "type"])
        for stem in splits["val"] + splits["test"]:
            image = rpi_dir() / "images" / f"{stem}.jpg"
            h, w_ = cv2.imread(str(image)).shape[:2]
            for t in rpi_boxes(stem, w_, h):
                kind = t.cls if swap is None else _swap([t.cls], *swap)[0]
                w.writerow([str(image), round((t.box.x0 + t.box.x1) / 2, 1), round((t.box.y0 + t.box.y1) / 2, 1), kind])
    return path


@needs_rpi
@needs_models
@pytest.mark.realdata
@pytest.mark.slow
def test_adapt_wbc_refuses_a_swapped_typing_of_a_real_lab_unless_a_lab_manager_accepts_it(tmp_path):
    """The Raspberry Pi station's val and test fields typed by their annotations: not refused as
    contradicted (59 cells matched; its 3 basophils the head calls monocyte are too few to judge).
    Neutrophils and lymphocytes swapped on every cell: leave-one-out is as good (the means
    are only renamed) and was the only check; with one direction accepted still refused for the
    other, naming the classes and counts, the confusion table on stderr, nothing written; written
    when a lab manager accepts both directions, which the file records. (Refused with none
    accepted: the rendered station's test below.)"""
    from training.labs import RPI_MICRONS_PER_PIXEL

    scale = ("--microns-per-pixel", str(RPI_MICRONS_PER_PIXEL), "--json")
    out = tmp_path / "station.json"
    run = _cli("adapt-wbc", "--labels", str(_rpi_labels(tmp_path)), "--out", str(out), *scale)
    right = json.loads(run.stdout)
    # past this check: the head as trained already types them as well (86 %), which the fit says
    assert right.get("error", {}).get("code") in (None, "head_better"), run.stdout
    assert right["accepted_disagreements"] == [] and right["confusion"]["neutrophil"]["neutrophil"] >= 10
    # the cells the head's open-set tests sent to review are their own column, not its calls
    assert right["confusion"]["monocyte"].get("(review)", 0) > 0, right["confusion"]
    swapped = _rpi_labels(tmp_path, ("neutrophil", "lymphocyte"))
    out2 = tmp_path / "swapped.json"
    # one direction accepted is not enough: refused for the other, naming it with its counts
    run = _cli("adapt-wbc", "--labels", str(swapped), "--out", str(out2), *scale,
               "--accept-disagreement", "neutrophil->lymphocyte", "--by", "AB")
    line = json.loads(run.stdout)
    assert run.returncode == 2 and line["error"]["code"] == "typing_contradicts_head", run.stdout
    assert not out2.exists()
    (d,) = line["disagreements"]
    assert (d["typed"], d["head"]) == ("lymphocyte", "neutrophil"), line["disagreements"]
    assert f"{d['cells']} of {d['of']} cells typed lymphocyte the head calls neutrophil" in line["error"]["message"]
    assert line["confusion"]["lymphocyte"]["neutrophil"] == d["cells"]
    assert "typed \\ head" in run.stderr and "(review)" in run.stderr
    run = _cli("adapt-wbc", "--labels", str(swapped), "--out", str(out2), *scale, "--by", "AB",
               "--accept-disagreement", "neutrophil->lymphocyte", "--accept-disagreement", "lymphocyte->neutrophil")
    assert run.returncode == 0, run.stdout
    line = json.loads(run.stdout)
    assert sorted(line["accepted_disagreements"]) == ["lymphocyte->neutrophil", "neutrophil->lymphocyte"]
    fitted = json.loads(out2.read_text())["fitted"]
    n = line["confusion"]["neutrophil"]["lymphocyte"]
    assert "accepted by a lab manager, AB" in fitted, fitted
    assert re.search(rf"\b{n} of \d+ cells typed neutrophil the head calls lymphocyte", fitted), fitted
    assert n >= 10, line["confusion"]


# -- the station's gallery: rendered fields typed through type_cells ------------------------------


def _retyped(typed_station, name: str, type_of) -> tuple[Path, list[str]]:  # noqa: F811
    """A station config whose typed-cells file (beside its own outbox) holds the white cells of the
    typed station's gallery typed `type_of(crop, head's class)` (None: left untyped) through the
    type_cells command of a station reading that gallery; the config and the types given."""
    tmp, path, feed, crops, *_ = typed_station
    text = path.read_text().replace(str(tmp / "state" / "outbox.sqlite3"), str(tmp / name / "outbox.sqlite3"))
    text = text.replace("[review]\n", f'[review]\ndirectory = "{tmp / "state" / "review"}"\n')
    config = tmp / f"{name}.toml"
    config.write_text(text)
    station = ClinicFeed(parse_config(tomllib.loads(text), environ={}))
    try:
        assert station.gallery.run_ids() == ["run-1"]
        station.gallery.set_wbc_typing(feed.gallery.typing)
        cells = []
        for c in crops:
            cell = station.gallery.typeable("run-1", c["field_id"], c["cell"]) if c["typeable"] else None
            if cell is not None and cell.kind == "wbc" and (kind := type_of(c, cell.head_type)) is not None:
                cells.append({"field_id": c["field_id"], "cell": c["cell"], "type": kind})
        answer = station.type_cells({"run_id": "run-1", "cells": cells})
        assert answer["ok"] and answer["stored"] == len(cells), answer
    finally:
        station.close()
    return config, [c["type"] for c in cells]


def test_a_lab_manager_who_accepts_a_disagreement_signs_it_and_the_means_file_names_them(typed_station):  # noqa: F811
    """The white cells the head confidently called neutrophil or lymphocyte (at least 2 of each in the
    rendered lab) typed each as the other in the gallery: refused as swapped. Accepting both directions
    takes --by, who accepted, checked as verify_run's verified_by is (a bidi override refused, named
    with its place; a Persian name's zero-width non-joiner kept); --by without an accepted
    disagreement is refused too; nothing is written on a refusal. Accepted and signed: the file's
    fitted line and --json (`accepted_by`) name them, spaces at either end dropped."""
    tmp = typed_station[0]
    swap = {"neutrophil": "lymphocyte", "lymphocyte": "neutrophil"}
    config, types = _retyped(typed_station, "swapped", lambda c, head: swap.get(head) if c["label"] == head else None)
    n_lymph, n_neut = types.count("lymphocyte"), types.count("neutrophil")  # typed lymphocyte: the head's neutrophils
    assert n_lymph >= 2 and n_neut >= 2 and n_lymph + n_neut == len(types), types
    out = tmp / "swapped_wbc.json"
    fit = ("adapt-wbc", "--station", "--config", str(config), "--out", str(out), "--min-cells", "2", "--json")
    accept = ("--accept-disagreement", "neutrophil->lymphocyte", "--accept-disagreement", "lymphocyte->neutrophil")
    run = _cli(*fit)
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["code"] == "typing_contradicts_head", run.stdout
    for extra, said in ((accept, "--accept-disagreement needs --by NAME"),
                        ((*accept, "--by", "Dr A\u202eBC"), "--by holds U+202E (RIGHT-TO-LEFT OVERRIDE) at character 5"),
                        ((*accept, "--by", "A\u200b"), "--by holds U+200B (ZERO WIDTH SPACE) at character 2"),
                        ((*accept, "--by", "  "), "--by must be a name or initials: 1 to 64 characters"),
                        ((*accept, "--by", "A" * 65), "--by must be a name or initials: 1 to 64 characters"),
                        (("--by", "AB"), "--by names who accepted a disagreement")):
        run = _cli(*fit, *extra)
        error = json.loads(run.stdout)["error"]
        assert run.returncode == 2 and error["code"] == "bad_arguments", (extra, run.stdout)
        assert error["message"].startswith(said), (extra, error)
        assert not out.exists()
    for by in ("  Dr A. Okafor ", "زین\u200cالعابدین"):
        run = _cli(*fit, *accept, "--by", by)
        assert run.returncode == 0, run.stdout
        line = json.loads(run.stdout)
        assert line["accepted_by"] == by.strip(), line
        assert sorted(line["accepted_disagreements"]) == ["lymphocyte->neutrophil", "neutrophil->lymphocyte"]
        fitted = json.loads(out.read_text())["fitted"]
        assert f"accepted by a lab manager, {by.strip()} (--accept-disagreement): " in fitted, fitted
        assert f"{n_lymph} of {n_lymph} cells typed lymphocyte the head calls neutrophil" in fitted, fitted
    printed = _cli(*fit[:-1], *accept, "--by", "AB").stdout
    assert (f"# accepted by AB (--accept-disagreement neutrophil->lymphocyte): {n_neut} of {n_neut} cells typed "
            "neutrophil") in printed, printed


def test_a_refusal_for_the_head_lists_as_kept_only_the_classes_typed_too_few_times(typed_station):  # noqa: F811
    """Every white cell of the gallery typed as the head called it: the head is right on all of
    them, the station's means each left out less (70 %): head_better, nothing written. Its
    `kept_heads_mean` names the classes typed fewer than --min-cells times (they keep the head's
    mean for want of cells), not those that reached it (`cells_per_class`), as a written fit's does."""
    tmp = typed_station[0]
    config, types = _retyped(typed_station, "as_head", lambda c, head: head)
    per_class = {t: types.count(t) for t in set(types)}
    few = {t: n for t, n in per_class.items() if n < 10}
    assert few and len(few) < len(per_class), per_class
    out = tmp / "as_head_wbc.json"
    run = _cli("adapt-wbc", "--station", "--config", str(config), "--out", str(out), "--json")
    line = json.loads(run.stdout)
    assert run.returncode == 2 and line["error"]["code"] == "head_better" and not out.exists(), run.stdout
    assert line["head_accuracy"] == 1.0 and line["leave_one_out_accuracy"] < 1.0
    assert line["kept_heads_mean"] == dict(sorted(few.items())), line
    assert line["cells_per_class"] == {t: n for t, n in sorted(per_class.items()) if n >= 10}, line
