"""Simulated stations over measured calibration checks (training.watch_trials, the `--watch-trials`
of training.calibration_check): the checks go through the station's own watch, so a right
calibration of rendered fields is never flagged and one 1.5 or 2 times off is, at the run its 18th
check comes in; a run gives 3 checks however many fields it checks, and fields without enough red
cells give none. Rendered fields only: no dataset needed."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import subprocess
import sys
from pathlib import Path

from realdata import ROOT

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.station.calibration_watch import HIGH_MEDIAN, LOW_MEDIAN
from training.calibration_check import check_entry, field_checks
from training.watch_trials import FieldCheck, first_flag, render, run_sampler, watch_trials

TRUE_MPP = 0.1  # the rendered fields' scale


@functools.cache
def rendered_checks() -> tuple[dict, ...]:
    """Six rendered fields' calibration checks at their true scale, as `--json` keeps them."""
    analyzer = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    out = []
    for seed in range(100, 106):
        frame = render_field(seed, width=480, height=360, microns_per_pixel=TRUE_MPP).frame
        check = analyzer.calibration_check(dataclasses.replace(frame, microns_per_pixel=TRUE_MPP))
        assert check is not None
        out.append(check_entry(f"field-{seed}.png", check))
    return tuple(out)


def test_a_right_calibration_is_never_flagged_and_one_1_5_or_2_times_off_is_at_its_6th_run():
    fields = field_checks("rendered", list(rendered_checks()))
    assert all(f.ratio_at(1.0) is not None and LOW_MEDIAN < f.ratio_at(1.0) < HIGH_MEDIAN for f in fields)
    rows = {(r.mode, r.factor): r for r in watch_trials("rendered", fields, trials=20, horizon=12,
                                                        factors=(1.0, 1.5, 0.667, 2.0, 0.5))}
    for mode in ("random", "block"):
        assert rows[mode, 1.0].flagged_by(12) == 0 and rows[mode, 1.0].run_quantile(0.5) is None
        for factor in (1.5, 0.667, 2.0, 0.5):  # 18 checks (3 a run) of 4 runs or more: the 6th run
            r = rows[mode, factor]
            assert r.flagged_by(5) == 0 and r.flagged_by(6) == 1.0, (mode, factor, r.firsts)
            assert r.run_quantile(0.5) == r.run_quantile(0.95) == 6
    table = render(list(rows.values()), early=(5, 10))
    assert table.splitlines()[0].split() == ["lab", "mode", "factor", "fields", "checks", "by", "5", "by", "10",
                                             "by", "12", "run", "50%", "run", "95%"]
    lines = [line.split() for line in table.splitlines()[1:]]
    assert ["rendered", "random", "1.5", "6", "6", "0.0%", "100.0%", "100.0%", "6", "6"] in lines
    assert ["rendered", "block", "1", "6", "6", "0.0%", "0.0%", "0.0%", "-", "-"] in lines


def test_a_run_gives_3_checks_however_many_fields_it_checks():
    """5 checked fields a run: the watch keeps 3 of each, so 18 checks still take 6 runs (4 without the cap)."""
    fields = field_checks("rendered", list(rendered_checks()))
    (row,) = watch_trials("rendered", fields, trials=10, horizon=10, factors=(1.5,), modes=("random",),
                          checks_per_run=5)
    assert set(row.firsts) == {6}


def test_a_specimen_of_abnormal_red_cells_reading_1_30_is_not_flagged_and_1_5_times_too_fine_still_is():
    """Chula RBC-12's groups of fields (red-cell disorders) read 1.3-1.5 at their true scale, and a
    station whose last runs were such specimens was flagged at a right calibration with the upper
    bound 1.27; at 1.32 a station of nothing but specimens reading 1.29-1.31 is never flagged. A lab
    reading 0.95 (the Raspberry Pi station's median) calibrated 1.5 times too fine reads 1.42 and
    is flagged at its 6th run, as it was at 1.27."""
    abnormal = [FieldCheck(f"a{i}", f"slide{i // 6}", i, 1.30 * (1 + (i % 3 - 1) * 0.01), 20) for i in range(24)]
    pi_like = [dataclasses.replace(f, own_over_known=f.own_over_known / 1.30 * 0.95) for f in abnormal]
    for mode in ("random", "block"):
        (right,) = watch_trials("abnormal", abnormal, trials=20, horizon=30, factors=(1.0,), modes=(mode,))
        assert right.flagged_by(30) == 0, right.firsts
        (fine,) = watch_trials("pi", pi_like, trials=20, horizon=30, factors=(0.667,), modes=(mode,))
        assert set(fine.firsts) == {6}, fine.firsts


def test_fields_without_enough_red_cells_give_no_check():
    """A field whose own scale showed 4 whole red cells (or none measured) is not kept, however far off it reads."""
    few = [FieldCheck(f"f{i}", "lab", i, 0.5, 4) for i in range(6)] + [FieldCheck("g", "lab", 9, None, 0)]
    assert all(f.ratio_at(1.0) is None for f in few)
    runs = [[few[i % 6], few[(i + 1) % 6], few[6]] for i in range(30)]
    assert first_flag(runs, 1.0) is None
    counted = [dataclasses.replace(f, own_rbc=5) for f in few[:6]]
    assert first_flag([[counted[i % 6]] * 3 for i in range(30)], 1.0) == 6


def test_block_runs_are_consecutive_fields_of_one_slide():
    checks = [{"image": f"{slide}_{frame}.jpg", "given_rbc": 20, "own_rbc": 20, "ratio": 1.0}
              for slide in ("N-3B", "M-8") for frame in (7, 2, 5, 11, 3)]
    fields = field_checks("rpi", checks)
    assert {(f.unit, f.order) for f in fields} == {(s, n) for s in ("N-3B", "M-8") for n in (7, 2, 5, 11, 3)}
    draw = run_sampler(fields, "block", 3)
    rng = random.Random(1)
    for _ in range(20):
        run = draw(rng)
        frames = [f.order for f in run]
        assert len({f.unit for f in run}) == 1 and frames in ([2, 3, 5], [3, 5, 7], [5, 7, 11])
    numbered = field_checks("bccd", [dict(checks[0], image="BloodImage_00012.jpg")])
    named = field_checks("txl_575", [dict(checks[0], image="00dae381-fd8c-5369-ab10-be3e7ef84b2b.jpg")])
    assert (numbered[0].unit, numbered[0].order, named[0].order) == ("bccd", 12, 0)


def test_the_command_simulates_from_earlier_checks(tmp_path: Path):
    """`--checks-from` a `--json` of rendered checks: the table, without analysing any field again;
    `--watch-fields 24` (the station's calibration_watch_fields) waits for the 8th run."""
    saved = tmp_path / "checks.json"
    saved.write_text(json.dumps([{"lab": "rpi", "factor": 1.0, "fields": 6, "flagged": 0, "measurable": 6,
                                  "flagged_measurable": 0, "own_over_known": [],
                                  "checks": [dict(c, image=f"S-1_{i}.jpg") for i, c in enumerate(rendered_checks())]}]))

    def table(*extra: str) -> list[list[str]]:
        out = subprocess.run([sys.executable, "-m", "training.calibration_check", "--checks-from", str(saved),
                              "--labs", "rpi", "--watch-trials", "10", "--watch-runs", "10", *extra],
                             check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert any(line.startswith("rpi: 6 fields, median own / known 1.") and line.endswith("1 unit(s)")
                   for line in lines)
        return [r for r in (line.split() for line in lines) if r[:1] == ["rpi"] and r[1] in ("random", "block")]

    rows = table()
    assert [r[2] for r in rows] == ["1", "0.8", "1.25", "0.667", "1.5", "0.5", "2"] * 2  # two ways of drawing runs
    # lab mode factor fields checks by-10 run-50% run-95%
    assert [r[5:] for r in rows if r[2] in ("1", "1.5", "0.5")] == [["0.0%", "-", "-"], ["100.0%", "6", "6"],
                                                                    ["100.0%", "6", "6"]] * 2
    later = table("--watch-fields", "24")
    assert [r[5:] for r in later if r[2] in ("1.5", "2")] == [["100.0%", "8", "8"]] * 4
