"""The default analysis of fixed rendered fields gives the very reports recorded in
tests/data/golden_reports.json: every counted cell's kind, label, box and scores, every candidate
below the counting threshold, the counts, the scale and the flags (tools.report_fingerprint's
fingerprint). Changes made for speed (tiling, mask decoding, the merge, the views' fusion) must
leave them exactly as they were.

The fields are the bench's own (bench.bench_pipeline: 0.1 um/px, many tiles, so the cross-tile
merge, the packed windows of the extra detector views and their fusion all take part). Boxes and
scores may move by one unit in their last recorded place (another CPU's floating point); kinds,
labels, counts and flags must be the same. After a change meant to alter reports, regenerate them:

    SMEARSCOPE_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_report_golden.py
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import Analyzer
from tools.report_fingerprint import fingerprint

GOLDEN = Path(__file__).parent / "data" / "golden_reports.json"
#: (width, height, seed) at 0.1 um/px: the bench's 1920x1080 fields and one 1280x960.
FIELDS = ((1920, 1080, 100), (1920, 1080, 101), (1920, 1080, 102), (1280, 960, 100))


@pytest.fixture(scope="module")
def analyzer():
    a = Analyzer.from_models_dir(warmup=False)
    yield a
    a.close()


def _key(width: int, height: int, seed: int) -> str:
    return f"rendered-{width}x{height}-{seed}"


@pytest.fixture(scope="module")
def fingerprints(analyzer) -> dict:
    """The default analysis of each of FIELDS, fingerprinted and passed through JSON as recorded."""
    got = {}
    for width, height, seed in FIELDS:
        frame = render_field(seed, width=width, height=height, microns_per_pixel=0.1).frame
        got[_key(width, height, seed)] = json.loads(json.dumps(fingerprint(analyzer.analyze(frame))))
    return got


@pytest.mark.slow
def test_default_reports_of_rendered_fields_are_exactly_as_recorded(fingerprints):
    if os.environ.get("SMEARSCOPE_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(fingerprints, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert sorted(fingerprints) == sorted(want)
    for key in want:
        _same_report(fingerprints[key], want[key], key)


@pytest.mark.slow
def test_a_report_value_moved_past_its_noise_fails_the_golden_comparison(fingerprints):
    """The comparison above catches each kind of change in a report: a score, a box side, a label,
    a count, and a value moved into a place recorded empty (a platelet's label score, None)."""
    if os.environ.get("SMEARSCOPE_REGENERATE_GOLDEN"):
        pytest.skip("regenerating")
    key = _key(*FIELDS[0])
    want = json.loads(GOLDEN.read_text())[key]
    _same_report(fingerprints[key], want, key)
    platelet = next(i for i, c in enumerate(want["cells"]) if c[1] is None and c[4] is None)

    def score(r):
        r["cells"][0][3] += 10 * SCORE_NOISE

    def candidate_score(r):
        r["candidates"][0][2] -= 10 * SCORE_NOISE

    def box(r):
        r["cells"][0][2][1] += 10 * BOX_NOISE

    def label(r):
        r["cells"][0][1] = "sickle" if r["cells"][0][1] != "sickle" else "normal"

    def count(r):
        r["counts"]["rbc"] += 1

    def score_into_empty_place(r):  # [kind, None, box, score, None] -> [kind, None, box, None, score]
        cell = r["cells"][platelet]
        cell[3], cell[4] = cell[4], cell[3]

    for mutate in (score, candidate_score, box, label, count, score_into_empty_place):
        changed = copy.deepcopy(fingerprints[key])
        mutate(changed)
        with pytest.raises(AssertionError):
            _same_report(changed, want, key)


#: What another CPU's floating point may move in a recorded box (px, 2 decimals) or score (4 decimals):
#: one unit in the last recorded place. Every label, kind and count must still be exactly the same.
BOX_NOISE, SCORE_NOISE = 0.011, 0.00011


def _same_report(got: dict, want: dict, key: str) -> None:
    assert len(got["cells"]) > 50, key  # a real field, not an empty one
    for part in ("counts", "scale", "flags"):
        assert got[part] == want[part], f"{key}: {part} differ"
    for part in ("cells", "candidates"):
        _same_records(got[part], want[part], f"{key}: {part}")


def _number(v) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool)


def _same_value(got, want) -> bool:
    """One recorded place: a box within BOX_NOISE on each side, a score within SCORE_NOISE, anything
    else (a kind, a label, an empty place: None) exactly, so a value never moves into an empty place."""
    if isinstance(want, list):
        return (isinstance(got, list) and len(got) == len(want)
                and all(abs(a - b) <= BOX_NOISE for a, b in zip(got, want)))
    if _number(want) and _number(got):
        return abs(got - want) <= SCORE_NOISE
    return got == want


def _same_records(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} against {len(want)} recorded"
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w) and all(map(_same_value, g, w)), f"{what} {i}: {g} against {w}"
