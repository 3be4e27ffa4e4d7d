"""training.lolo_seg: a held-out lab's figure comes from the run without it, the comparison from the runs with it."""

from __future__ import annotations

import json

import pytest

from training.lolo_seg import held_out_rows, left_out, load


def _row(lab: str, figure: float, scale: str = "given") -> dict:
    key = {"chula": "centres_in_counted_rbc", "rpi": "wbc_found"}.get(lab, "counted_map50")
    return {"lab": lab, "scale": scale, "n": 10, key: figure}


TABLES = {
    "no_chula": [_row("chula", 0.40), _row("rpi", 0.90), _row("txl_575", 0.70)],
    "no_rpi": [_row("chula", 0.90), _row("rpi", 0.30), _row("txl_575", 0.72)],
    "no_txl": [_row("chula", 0.80), _row("rpi", 0.70), _row("txl_575", 0.50), _row("txl_416", 0.60)],
}


def test_without_from_the_run_that_left_it_out_and_with_from_the_others():
    rows = {(r["lab"], r["scale"]): r for r in held_out_rows(TABLES)}
    chula = rows[("chula", "given")]
    assert chula["held_out_by"] == "no_chula" and chula["without"] == 0.40
    assert chula["with_runs"] == {"no_rpi": 0.90, "no_txl": 0.80} and chula["with"] == pytest.approx(0.85)
    rpi = rows[("rpi", "given")]
    assert rpi["without"] == 0.30 and rpi["with"] == pytest.approx(0.80)
    txl = rows[("txl_575", "given")]
    assert txl["held_out_by"] == "no_txl" and txl["without"] == 0.50 and txl["with"] == pytest.approx(0.71)
    # no other run measured TXL 416: nothing to compare with, not a made-up figure
    assert rows[("txl_416", "given")]["with"] is None


def test_scales_are_compared_only_with_the_same_scale_and_the_start_is_reported():
    tables = {"no_chula": [_row("chula", 0.4, "estimated"), _row("chula", 0.5)],
              "no_rpi": [_row("chula", 0.9, "estimated"), _row("chula", 0.7)]}
    start = [_row("chula", 0.2), _row("chula", 0.1, "estimated")]
    rows = {r["scale"]: r for r in held_out_rows(tables, start)}
    assert rows["estimated"]["with"] == 0.9 and rows["given"]["with"] == 0.7
    assert rows["estimated"]["start"] == 0.1 and rows["given"]["start"] == 0.2


def test_run_names_say_what_was_left_out(tmp_path):
    assert left_out("no_txl") == ("txl_575", "txl_416", "txl_360")
    with pytest.raises(ValueError, match="no_LAB"):
        left_out("without_chula")
    (tmp_path / "lab_no_rpi.json").write_text(json.dumps(TABLES["no_rpi"]))
    tables, start = load(tmp_path)
    assert list(tables) == ["no_rpi"] and start is None
