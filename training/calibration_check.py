"""How often the calibration check (service.analysis.calibration_check) flags a right and a wrong
calibration, per lab.

    python -m training.calibration_check [--split val|test|val+test] [--limit 12] [--labs bccd,txl_575,...]
                                         [--factors 1,2.5,0.4] [--json out.json]
                                         [--watch-trials 2000 [--watch-runs 100] [--watch-fields 18]
                                          [--watch-min-runs 4] [--checks-from a.json,b.json]]

Each field of a lab's held-out part (a seeded sample of `--limit`) is analysed at its known scale
times each factor, as a station calibrated that way would with the check on; a row per lab and
factor gives how many fields were flagged `calibration_suspect`, of all and of those whose own
scale showed at least `MIN_RBC_FOR_SCALE` whole red cells (the check cannot speak for the others),
and the range of the fields' own estimates over their known scale. At factor 1 every flag is a
false alarm; at 2.5 (a 100x calibration used at 40x) and 0.4 (the reverse) every field should be
flagged, and at 4 and 0.25 (a calibration copied from another station, a camera binned 4x4).
`--json` also keeps each check (given and own whole red cells, own / calibrated scale), so another
rule can be scored on the same passes. PBC (single-cell crops) is left out of the default labs:
a crop is no station field (`--labs pbc` measures it: 297 of 400 held-out crops gave a check).

`--watch-trials N` then simulates N stations of `--watch-runs` runs per lab over the same checks
(training.watch_trials: the station's own calibration watch, calibrations right and 1.25, 1.5 and 2
times off either way): the share flagged by run 10, 25 and the last, and the run by which half and
95 % were; `--watch-fields` and `--watch-min-runs` set the stations' `[specimen]
calibration_watch_fields` and `calibration_watch_runs` (default the station's). `--checks-from` takes the checks of earlier `--json` files (factor 1 needed) instead of
analysing the fields again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import re
from pathlib import Path

import cv2
from tqdm import tqdm

from smearscope.device.frame import Frame
from smearscope.service.analysis.calibration_check import CalibrationCheck
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.scale_search import MIN_RBC_FOR_SCALE
from training.lab_table import lab_images
from training.labs import slide_frame
from training.watch_trials import (
    MIN_FIELDS,
    MIN_RUNS,
    MODES,
    FieldCheck,
    lab_median,
    render,
    watch_trials,
)

LABS = ("bccd", "txl_575", "txl_416", "txl_360", "chula", "rpi")


def check_lab(analyzer: Analyzer, lab: str, split: str, limit: int, factors: list[float]) -> list[dict]:
    images = [im for im in lab_images(lab, split) if im.known_mpp]
    random.Random(20261206).shuffle(images)
    rows = {f: {"lab": lab, "factor": f, "fields": 0, "flagged": 0, "measurable": 0, "flagged_measurable": 0,
                "own_over_known": [], "checks": []} for f in factors}
    for im in tqdm(images[:limit], desc=lab, unit="field"):
        frame = Frame(cv2.imread(str(im.path), cv2.IMREAD_COLOR), im.path.name, lab)
        for f in factors:
            check = analyzer.calibration_check(dataclasses.replace(frame, microns_per_pixel=im.known_mpp * f))
            assert check is not None
            measurable = check.own_mpp is not None and check.own_rbc >= MIN_RBC_FOR_SCALE
            r = rows[f]
            r["fields"] += 1
            r["flagged"] += check.suspect
            r["measurable"] += measurable
            r["flagged_measurable"] += check.suspect and measurable
            if check.own_mpp is not None:
                r["own_over_known"].append(round(check.own_mpp / im.known_mpp, 3))
            r["checks"].append(check_entry(im.path.name, check))
    return list(rows.values())


def check_entry(image: str, check: CalibrationCheck) -> dict:
    """A field's check as `--json` keeps it: given and own whole red cells, own / calibrated scale."""
    return {"image": image, "given_rbc": check.given_rbc, "own_rbc": check.own_rbc,
            "ratio": None if check.ratio is None else round(check.ratio, 4)}


def field_checks(lab: str, checks: list[dict]) -> list[FieldCheck]:
    """A lab's checks at factor 1 (`check_entry`) as the watch trials take them: an rpi field placed
    in its slide and frame; the others in their lab, by the number in their file name if any."""
    out = []
    for c in checks:
        stem = Path(c["image"]).stem
        if lab == "rpi":
            unit, order = slide_frame(stem)
        else:  # BCCD's BloodImage_00012, Chula's 12; TXL-PBC's names (UUIDs) tell no order
            numbered = re.fullmatch(r"(?:BloodImage_)?(\d+)", stem)
            unit, order = lab, int(numbered.group(1)) if numbered else 0
        out.append(FieldCheck(c["image"], unit, order, c["ratio"], int(c["own_rbc"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="val", choices=("val", "test", "val+test"))
    ap.add_argument("--limit", type=int, default=12, help="fields per lab (a seeded sample)")
    ap.add_argument("--labs", default=",".join(LABS))
    ap.add_argument("--factors", default="1,2.5,0.4", help="calibrations tried, as factors of the known scale")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--watch-trials", type=int, default=0, help="simulated stations per lab (0: none)")
    ap.add_argument("--watch-runs", type=int, default=100, help="runs of each simulated station")
    ap.add_argument("--watch-modes", default=",".join(MODES), help="how a run's fields are drawn: random, block")
    ap.add_argument("--watch-fields", type=int, default=MIN_FIELDS,
                    help="[specimen] calibration_watch_fields of the simulated stations")
    ap.add_argument("--watch-min-runs", type=int, default=MIN_RUNS,
                    help="[specimen] calibration_watch_runs of the simulated stations")
    ap.add_argument("--checks-from", default=None, help="earlier --json files (comma-separated): no analysis")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    factors = [float(f) for f in args.factors.split(",")]
    if args.watch_trials and 1.0 not in factors:
        factors.insert(0, 1.0)  # the trials read each field's own estimate at its known scale
    if args.checks_from:
        rows = [r for p in args.checks_from.split(",") for r in json.loads(Path(p).read_text())]
        rows = [r for r in rows if r["lab"] in args.labs.split(",")]
    else:
        analyzer = Analyzer.from_models_dir(warmup=False)
        rows = [r for lab in args.labs.split(",") for r in check_lab(analyzer, lab, args.split, args.limit, factors)]
    factors = [f for f in factors if any(r["factor"] == f for r in rows)]
    print(f"{'lab':9s} {'factor':>6s} {'fields':>6s} {'flagged':>7s} {'measurable':>10s} {'flagged of them':>15s} "
          f"{'own / known':>13s}")
    for f in factors:
        for r in (r for r in rows if r["factor"] == f):
            o = r["own_over_known"]
            span = f"{min(o):.2f}-{max(o):.2f}" if o else "-"
            print(f"{r['lab']:9s} {f:>6g} {r['fields']:>6d} {r['flagged']:>7d} {r['measurable']:>10d} "
                  f"{r['flagged_measurable']:>15d} {span:>13s}")
        print(f"{'all':9s} {f:>6g} {sum(r['fields'] for r in rows if r['factor'] == f):>6d} "
              f"{sum(r['flagged'] for r in rows if r['factor'] == f):>7d} "
              f"{sum(r['measurable'] for r in rows if r['factor'] == f):>10d} "
              f"{sum(r['flagged_measurable'] for r in rows if r['factor'] == f):>15d}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.watch_trials:
        watch(rows, args.watch_trials, args.watch_runs, args.watch_modes.split(","), args.watch_fields,
              args.watch_min_runs)


def watch(rows: list[dict], trials: int, horizon: int, modes: list[str], min_fields: int, min_runs: int) -> None:
    """The watch trials over the checks at factor 1 of each lab (merged across the rows given)."""
    by_lab: dict[str, list[dict]] = {}
    for r in rows:
        if r["factor"] == 1.0:
            by_lab.setdefault(r["lab"], []).extend(r["checks"])
    table = []
    for lab, checks in by_lab.items():
        fields = field_checks(lab, checks)
        median = lab_median(fields)
        print(f"{lab}: {len(fields)} fields, median own / known "
              f"{'-' if median is None else f'{median:.3f}'}, {len({f.unit for f in fields})} unit(s)")
        table += watch_trials(lab, fields, trials, horizon, modes=modes, min_fields=min_fields, min_runs=min_runs)
    print(render(table))


if __name__ == "__main__":
    main()
