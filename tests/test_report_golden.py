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


@pytest.mark.slow
def test_default_reports_of_rendered_fields_are_exactly_as_recorded(analyzer):
    got = {}
    for width, height, seed in FIELDS:
        frame = render_field(seed, width=width, height=height, microns_per_pixel=0.1).frame
        got[_key(width, height, seed)] = json.loads(json.dumps(fingerprint(analyzer.analyze(frame))))
    if os.environ.get("SMEARSCOPE_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want)
    for key in want:
        assert len(got[key]["cells"]) > 50, key  # a real field, not an empty one
        for part in ("counts", "scale", "flags"):
            assert got[key][part] == want[key][part], f"{key}: {part} differ"
        for part in ("cells", "candidates"):
            _same_records(got[key][part], want[key][part], f"{key}: {part}")


#: What another CPU's floating point may move in a recorded box (px, 2 decimals) or score (4 decimals):
#: one unit in the last recorded place. Every label, kind and count must still be exactly the same.
BOX_NOISE, SCORE_NOISE = 0.011, 0.00011


def _same_records(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} against {len(want)} recorded"
    for i, (g, w) in enumerate(zip(got, want)):
        labels_g = [v for v in g if isinstance(v, str)]
        labels_w = [v for v in w if isinstance(v, str)]
        assert labels_g == labels_w, f"{what} {i}: {g} against {w}"
        boxes_g, boxes_w = [v for v in g if isinstance(v, list)], [v for v in w if isinstance(v, list)]
        for bg, bw in zip(boxes_g, boxes_w):
            assert max(abs(a - b) for a, b in zip(bg, bw)) <= BOX_NOISE, f"{what} {i}: {g} against {w}"
        scores_g = [v for v in g if isinstance(v, float | int) and not isinstance(v, bool)]
        scores_w = [v for v in w if isinstance(v, float | int) and not isinstance(v, bool)]
        assert len(scores_g) == len(scores_w), f"{what} {i}: {g} against {w}"
        for a, b in zip(scores_g, scores_w):
            assert (a is None) == (b is None) and abs(a - b) <= SCORE_NOISE, f"{what} {i}: {g} against {w}"
