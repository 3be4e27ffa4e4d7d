"""The default analysis of fixed rendered fields gives the very reports recorded in
tests/data/golden_reports.json: every counted cell's kind, label, box and scores, every candidate
below the counting threshold, the counts, the scale and the flags (tools.report_fingerprint's
fingerprint). Changes made for speed (tiling, mask decoding, the merge, the views' fusion) must
leave them exactly as they were.

The fields are the bench's own (bench.bench_pipeline: 0.1 um/px, many tiles, so the cross-tile
merge, the packed windows of the extra detector views and their fusion all take part). The
figures depend on the ONNX Runtime build and the CPU's instruction set; after a change that is
meant to alter reports, or on another machine, regenerate them on purpose:

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
        for part in ("counts", "scale", "flags", "cells", "candidates"):
            assert got[key][part] == want[key][part], f"{key}: {part} differ"
