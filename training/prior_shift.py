"""Fit the RBC head's prior shifts on validation and write them into the manifest.

    python -m training.prior_shift [--models models] [--max-f1-cost 0.01] [--dry-run]

The head is trained on a class-balanced mix (square-root sampling), in which spherocytes and
schistocytes are far commoner than on a normal smear; on BCCD, a mostly normal-looking lab, the
unshifted head typed 26 % of the red cells spherocyte and 6 % schistocyte. A constant subtracted
from a class's calibrated log-odds (`class_log_prior_shift`, applied by
service.analysis.classify) is the prior shift from that mix toward what a station meets. Each is
chosen on **validation** only, class after class (`RULES`, swept until they settle): among shifts 0 .. 5 in steps of 0.25,
the smallest that brings the share of BCCD val red cells (annotated boxes) whose top class is that class to
at most its ceiling, provided Chula val macro-F1 stays within `--max-f1-cost` (0.01) of the
unshifted head's (all shifts together) and IDB1 val sickle-vs-not does not drop. The ceilings: spherocyte 10 % (issue
17's bar); schistocyte 2 %, twice ICSH's 1 % above which schistocytes are reported as
significant, so a normal smear does not read schistocytic. Every shift's val figures go into the
manifest (`metrics.class_log_prior_shift`).

Each shift is scored exactly as the analyzer runs the head: every view's logits are computed
once, then the shift and the classifier's gating (other views only for crops whose shifted
first-view top probability is below `extra_views_below`) are replayed in numpy.

In each sweep, after the ceiling classes, the normal class: the balanced mix also under-weights
it against every abnormal class, so the head calls a share of Chula's normal cells stomatocyte,
microcyte or spherocyte (normal recall 0.74 on test with the earlier shifts, spherocyte -0.75 and
schistocyte -2.25 alone). A constant added
to normal's log-odds (steps of 0.25, 0 to 2) is kept where it gives the best Chula val macro-F1
(the smallest such shift), at least `NORMAL_MIN_GAIN` above none, with IDB1 val sickle-vs-not not
lower and the ceilings met; being swept with them, the ceiling classes' shifts stay the smallest
that meet their ceilings given the normal one. One parameter, unlike a shift per class fitted by
coordinate ascent (training.logit_adjust), which gained on validation and lost on test.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from smearscope.service.analysis.classify import CHUNK_CROPS, CropClassifier, softmax
from smearscope.service.analysis.crops import CropSpec
from training.head_data import head_engine
from training.plausibility import _crops_for
from training.rbc_data import CLASSES, build_sets, figures

logger = logging.getLogger(__name__)

#: (class, ceiling on the share of BCCD val red cells typed that class), fitted in this order.
RULES = (("spherocyte", 0.10), ("schistocyte", 0.02))
MAX_F1_COST = 0.01
SHIFTS = np.arange(0.0, 5.001, 0.25)
#: The normal class's shift toward a station's prior (added, not subtracted), chosen last.
NORMAL_SHIFTS = np.arange(0.0, 2.001, 0.25)
#: A normal shift is kept only when Chula val macro-F1 gains at least this much over none.
NORMAL_MIN_GAIN = 0.002


def view_logits(clf: CropClassifier, crops: np.ndarray) -> np.ndarray:
    """Raw logits (views, N, classes) of every view, without any shift."""
    saved = clf.logit_shift
    clf.logit_shift = np.zeros_like(saved)
    try:
        return np.concatenate([clf.views_out(crops[i : i + CHUNK_CROPS], clf.views)[0]
                               for i in range(0, len(crops), CHUNK_CROPS)], axis=1)
    finally:
        clf.logit_shift = saved


def gated_probs(vl: np.ndarray, shift_calibrated: np.ndarray, temperature: float, below: float | None) -> np.ndarray:
    """Calibrated probabilities as CropClassifier gives them with this shift (calibrated units)."""
    shift = shift_calibrated * temperature
    logits = vl[0] + shift
    if below is not None and len(vl) > 1:
        unsure = softmax(logits / temperature).max(1) < below
        logits[unsure] = vl[:, unsure].mean(0) + shift
    return softmax(logits / temperature)


def score(vl: dict, shift: np.ndarray, sets: dict, split: str, temperature: float, below: float | None) -> dict:
    """training.rbc_data.figures for `split` (Chula, IDB1) and BCCD's red cells of that split."""
    f = figures(gated_probs(vl[split], shift, temperature, below), sets, split,
                gated_probs(vl[f"bccd_{split}"], shift, temperature, below))
    f["bccd_schistocyte_share"] = f["bccd_label_shares"].get("schistocyte", 0.0)
    return f


def load_view_logits(models: Path, splits=("val", "test")) -> tuple[dict, dict, object, float | None]:
    """Every view's logits of Chula + IDB1 and BCCD red cells per split, the sets, the manifest
    and the classifier's gating threshold."""
    with head_engine(models / "rbc_head.json", CLASSES) as eng:
        m = eng.manifest
        clf = CropClassifier(eng, 0.0)
        spec = CropSpec(m.crop.extent_um, m.crop.input_size)
        sets = build_sets()
        vl = {k: view_logits(clf, _crops_for(m.preprocessing, sets[f"{k}_images"], spec))
              for split in splits for k in (split, f"bccd_{split}")}
        return vl, sets, m, clf.extra_views_below


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--max-f1-cost", type=float, default=MAX_F1_COST,
                    help="Chula val macro-F1 the shifts together may cost against the unshifted head")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    path = args.models / "rbc_head.json"
    vl, sets, m, below = load_view_logits(args.models)
    t = m.temperature
    shift = np.zeros(len(CLASSES), np.float32)
    keys = ("chula_macro_f1", "idb1_sickle_vs_not", "bccd_spherocyte_share", "bccd_schistocyte_share")
    base = score(vl, shift, sets, "val", t, below)
    rows: dict[str, dict] = {}
    # One class's shift moves cells into the others (a schistocyte pushed out may become a
    # spherocyte, a normal pulled in takes cells from both), so the rules are swept until no
    # shift changes: each time, per ceiling class, the smallest shift meeting its ceiling given
    # the others' current shifts, then normal's best given theirs.
    normal = CLASSES.index("normal")
    for sweep in range(1, 6):
        before = shift.copy()
        for name, ceiling in RULES:
            c = CLASSES.index(name)
            rows[name] = {}
            for s in SHIFTS:
                trial = shift.copy()
                trial[c] = -s
                f = score(vl, trial, sets, "val", t, below)
                rows[name][f"{s:.2f}"] = {k: f[k] for k in keys}
            ok = [k for k, r in rows[name].items() if r[f"bccd_{name}_share"] <= ceiling
                  and r["chula_macro_f1"] >= base["chula_macro_f1"] - args.max_f1_cost
                  and r["idb1_sickle_vs_not"] >= base["idb1_sickle_vs_not"]]
            if not ok:
                raise SystemExit(f"no {name} shift meets the rule on validation; manifest left unchanged")
            shift[c] = -float(min(ok, key=float))
        rows["normal"] = {}
        for s in NORMAL_SHIFTS:
            trial = shift.copy()
            trial[normal] = s
            f = score(vl, trial, sets, "val", t, below)
            rows["normal"][f"{s:.2f}"] = {k: f[k] for k in keys}
        none_f1 = rows["normal"]["0.00"]["chula_macro_f1"]
        ok = [k for k, r in rows["normal"].items() if float(k) > 0
              and r["chula_macro_f1"] >= none_f1 + NORMAL_MIN_GAIN
              and r["idb1_sickle_vs_not"] >= base["idb1_sickle_vs_not"]
              and all(r[f"bccd_{n}_share"] <= c for n, c in RULES)]
        # the best F1; among equal ones the smallest shift
        shift[normal] = float(max(ok, key=lambda k: (rows["normal"][k]["chula_macro_f1"], -float(k)))) if ok else 0.0
        final = score(vl, shift, sets, "val", t, below)
        logger.info("sweep %d: shifts %s, val %s", sweep,
                    {n: float(shift[CLASSES.index(n)]) for n in (*(r for r, _ in RULES), "normal")},
                    {k: final[k] for k in keys})
        if (shift == before).all() and all(final[f"bccd_{n}_share"] <= c for n, c in RULES):
            break
    else:
        raise SystemExit("the prior shifts did not settle in 5 sweeps; manifest left unchanged")
    test_before = score(vl, np.zeros_like(shift), sets, "test", t, below)
    test_after = score(vl, shift, sets, "test", t, below)
    for label, f in (("unshifted", test_before), ("shifted", test_after)):
        logger.info("test, %s: %s", label, {k: f[k] for k in (*keys, "chula_accuracy")})
    if args.dry_run:
        return
    doc = json.loads(path.read_text())
    doc["class_log_prior_shift"] = {c: float(v) for c, v in zip(CLASSES, shift) if v}
    doc["metrics"]["class_log_prior_shift"] = {
        "rule": "swept until settled: per class in turn, the smallest shift (steps of 0.25) with the BCCD val "
                f"share of that class at most its ceiling ({', '.join(f'{n} {c}' for n, c in RULES)}), Chula val "
                f"macro-F1 within {args.max_f1_cost} of the unshifted head, IDB1 val sickle-vs-not not lower; then "
                f"normal's (added, 0 to 2 in steps of 0.25): the best Chula val macro-F1 (the smallest such shift), "
                f"at least {NORMAL_MIN_GAIN} above none, IDB1 val not lower, the ceilings met (training.prior_shift)",
        "chosen": doc["class_log_prior_shift"], "max_f1_cost": args.max_f1_cost, "val_unshifted": {k: base[k] for k in keys},
        "val_shifted": {k: final[k] for k in keys}, "val_by_shift_last_sweep": rows}
    path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
