"""How often the calibration check (service.analysis.calibration_check) flags a right and a wrong
calibration, per lab.

    python -m training.calibration_check [--split val] [--limit 12] [--labs bccd,txl_575,...]
                                         [--factors 1,2.5,0.4] [--json out.json]

Each field of a lab's held-out part (a seeded sample of `--limit`) is analysed at its known scale
times each factor, as a station calibrated that way would with the check on; a row per lab and
factor gives how many fields were flagged `calibration_suspect`, of all and of those whose own
scale showed at least `MIN_RBC_FOR_SCALE` whole red cells (the check cannot speak for the others),
and the range of the fields' own estimates over their known scale. At factor 1 every flag is a
false alarm; at 2.5 (a 100x calibration used at 40x) and 0.4 (the reverse) every field should be
flagged, and at 4 and 0.25 (a calibration copied from another station, a camera binned 4x4).
`--json` also keeps each check (given and own whole red cells, own / calibrated scale), so another
rule can be scored on the same passes. PBC (single-cell crops) is left out: a crop holds too few
red cells to measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
from pathlib import Path

import cv2
from tqdm import tqdm

from smearscope.device.frame import Frame
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.scale_search import MIN_RBC_FOR_SCALE
from training.lab_table import lab_images

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
            r["checks"].append({"image": im.path.name, "given_rbc": check.given_rbc, "own_rbc": check.own_rbc,
                                "ratio": None if check.ratio is None else round(check.ratio, 4)})
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--limit", type=int, default=12, help="fields per lab (a seeded sample)")
    ap.add_argument("--labs", default=",".join(LABS))
    ap.add_argument("--factors", default="1,2.5,0.4", help="calibrations tried, as factors of the known scale")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    analyzer = Analyzer.from_models_dir(warmup=False)
    factors = [float(f) for f in args.factors.split(",")]
    rows = [r for lab in args.labs.split(",") for r in check_lab(analyzer, lab, args.split, args.limit, factors)]
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


if __name__ == "__main__":
    main()
