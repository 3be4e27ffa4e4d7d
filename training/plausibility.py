"""Does the morphology point to the diagnosis? Virtual smears from labelled cells, graded as the report grades.

    python -m training.plausibility [--models models] [--smears 20] [--cells 400] [--looks 1,2,3,4,5,6,7,8]

For five diagnoses a virtual smear is a sample of Chula RBC-12 **test** cells drawn to a typical
morphology mix (below; every mix also holds normal cells and a little of everything). The RBC
head types every cell as the analyzer does (its manifest's lamp correction, views and
temperature, at Chula's calibrated scale), the shares are graded with ICSH thresholds, and five
comparisons are checked, as a hematologist would read the reports side by side:

1. hereditary spherocytosis shows the most spherocytes;
2. hereditary elliptocytosis the most elliptocytes + ovalocytes;
3. megaloblastic anaemia the most macrocytes;
4. iron deficiency and thalassaemia the most microcytic / hypochromic cells;
5. thalassaemia more target cells than every other diagnosis.

With `--looks`, the comparisons are made again once per seed with every Chula test cell drawn
through that seed's one random lab look (training.look: stain, lamp, focus, camera; then the
analyzer's lamp correction and crop), as a lab in no dataset would show all its cells: how many of
the five still point the right way, per look. Every draw of a look, its sensor noise included,
comes from the seed (training.look), so a seed's figures repeat in any `--looks` list.

It also prints, for a normal-looking lab, the share of BCCD test red cells (annotated boxes) typed
spherocyte and how many BCCD test images would raise the critical sickle flag at the default
evidence threshold, and Chula test per-class recall.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from smearscope.engines.registry import create_engine
from smearscope.service.analysis.aggregate import AggregateThresholds
from smearscope.service.analysis.classify import CropClassifier, softmax
from smearscope.service.analysis.morphology import icsh_grade
from training.data import require_data_root

logger = logging.getLogger(__name__)

#: Typical morphology mixes (share of red cells); the rest of each smear is normal cells.
DIAGNOSES: dict[str, dict[str, float]] = {
    "hereditary_spherocytosis": {"spherocyte": 0.30, "microcyte": 0.03, "target": 0.01},
    "hereditary_elliptocytosis": {"elliptocyte": 0.35, "ovalocyte": 0.15, "teardrop": 0.02},
    "megaloblastic_anaemia": {"macrocyte": 0.30, "ovalocyte": 0.08, "teardrop": 0.03, "schistocyte": 0.01},
    "iron_deficiency": {"microcyte": 0.30, "hypochromia": 0.25, "ovalocyte": 0.04, "target": 0.02},
    "thalassaemia": {"microcyte": 0.25, "hypochromia": 0.15, "target": 0.20, "teardrop": 0.02, "schistocyte": 0.02},
}
MICRO_HYPO = ("microcyte", "hypochromia")


def _crops_for(manifest_preprocessing, contexts: np.ndarray, spec) -> np.ndarray:
    from training.wbc_data import to_crops

    if manifest_preprocessing.illumination == "flatfield":
        return to_crops(contexts, spec)
    from smearscope.service.analysis.crops import crop_cell

    c = contexts.shape[1]
    return np.stack([crop_cell(x, (c / 2, c / 2), spec) for x in contexts])


def _lab_look_crops(contexts: np.ndarray, seed: int, manifest_preprocessing, spec) -> np.ndarray:
    """Every context through ONE random lab's look (training.look, the same draw for each: a
    fresh generator from `seed` per cell), then cut as the analyzer cuts for this head."""
    from training.look import randomize_look

    looked = np.stack([randomize_look(x, np.random.default_rng(seed)) for x in contexts])
    return _crops_for(manifest_preprocessing, looked, spec)


def virtual_smears(labels: np.ndarray, truth: np.ndarray, n_smears: int, n_cells: int, seed: int = 0) -> dict:
    """The five diagnoses' virtual smears from cells typed `labels` (true classes `truth`, indices
    into training.rbc_data.CLASSES): mean shares (percent), ICSH grades and the five comparisons."""
    from training.rbc_data import CLASSES

    rng = np.random.default_rng(seed)
    by_class = {c: np.nonzero(truth == CLASSES.index(c))[0] for c in CLASSES if (truth == CLASSES.index(c)).any()}
    shares: dict[str, dict[str, float]] = {}
    grades: dict[str, dict[str, str]] = {}
    for dx, mix in DIAGNOSES.items():
        acc: dict[str, list[float]] = {}
        for _ in range(n_smears):
            idx = []
            for c, share in mix.items():
                if c in by_class:
                    idx += list(rng.choice(by_class[c], round(share * n_cells)))
            idx += list(rng.choice(by_class["normal"], n_cells - len(idx)))
            got = labels[np.array(idx)]
            for c in CLASSES:
                acc.setdefault(c, []).append(100.0 * float((got == c).mean()))
        shares[dx] = {c: round(float(np.mean(v)), 2) for c, v in acc.items()}
        grades[dx] = {c: icsh_grade(c, p) for c, p in shares[dx].items() if c in ("spherocyte", "elliptocyte", "ovalocyte",
                                                                                   "macrocyte", "microcyte", "hypochromia",
                                                                                   "target")}

    def most(feature_sum, winner: tuple[str, ...]) -> bool:
        vals = {dx: sum(shares[dx][f] for f in feature_sum) for dx in DIAGNOSES}
        top = max(v for dx, v in vals.items() if dx not in winner)
        return all(vals[w] > top for w in winner)

    checks = {
        "spherocytosis_most_spherocytes": most(("spherocyte",), ("hereditary_spherocytosis",)),
        "elliptocytosis_most_elliptocytes_ovalocytes": most(("elliptocyte", "ovalocyte"), ("hereditary_elliptocytosis",)),
        "megaloblastic_most_macrocytes": most(("macrocyte",), ("megaloblastic_anaemia",)),
        "iron_deficiency_and_thalassaemia_most_microcytic_hypochromic": most(MICRO_HYPO, ("iron_deficiency", "thalassaemia")),
        "thalassaemia_most_target_cells": most(("target",), ("thalassaemia",)),
    }
    return {"virtual_smear_shares_percent": shares, "virtual_smear_grades": grades, "checks": checks,
            "checks_passed": f"{sum(checks.values())} of {len(checks)}"}


def run(models: Path, n_smears: int, n_cells: int, seed: int = 0, look_seeds: tuple[int, ...] = ()) -> dict:
    """The section; with `look_seeds`, the five comparisons again for each seed's lab look (every
    Chula test cell drawn through that one look): a stand-in for a lab in no dataset."""
    from smearscope.service.analysis.crops import CropSpec
    from training.rbc_data import CLASSES, build_sets

    eng = create_engine("onnxruntime", models / "rbc_head.json").load()
    m = eng.manifest
    clf = CropClassifier(eng, 0.0)
    spec = CropSpec(m.crop.extent_um, m.crop.input_size)
    sets = build_sets()
    chula = sets["test_labs"] == "chula"
    contexts = sets["test_images"][chula]
    crops = _crops_for(m.preprocessing, contexts, spec)
    truth = sets["test_labels"][chula]
    probs = softmax(clf.logits(crops) / m.temperature)
    labels = np.array([m.classes[i] for i in probs.argmax(1)])
    conf = probs.max(1)
    out: dict = {"chula_test_recall": {}}
    for i, c in enumerate(CLASSES):
        sel = truth == i
        if sel.any():
            out["chula_test_recall"][c] = round(float((labels[sel] == c).mean()), 4)
    out.update(virtual_smears(labels, truth, n_smears, n_cells, seed))
    if look_seeds:
        per_look = {}
        for s in look_seeds:
            looked = softmax(clf.logits(_lab_look_crops(contexts, s, m.preprocessing, spec)) / m.temperature)
            looked_labels = np.array([m.classes[i] for i in looked.argmax(1)])
            r = virtual_smears(looked_labels, truth, n_smears, n_cells, seed)
            per_look[str(s)] = {"checks_passed": r["checks_passed"],
                                "failed": [k for k, ok in r["checks"].items() if not ok],
                                "chula_test_accuracy": round(float((looked_labels == np.array(CLASSES)[truth]).mean()), 4),
                                "typed_normal": round(float((looked_labels == "normal").mean()), 4)}
        passed = [int(v["checks_passed"].split()[0]) for v in per_look.values()]
        out["lab_looks"] = {"per_look": per_look, "comparisons_passed": f"{sum(passed)} of {5 * len(passed)}",
                            "looks_with_at_least_4_of_5": f"{sum(p >= 4 for p in passed)} of {len(passed)}"}
    # A normal-looking lab: BCCD test red cells (annotated boxes), per image for the sickle flag.
    bcrops = _crops_for(m.preprocessing, sets["bccd_test_images"], spec)
    bprobs = softmax(clf.logits(bcrops) / m.temperature)
    blabels = np.array([m.classes[i] for i in bprobs.argmax(1)])
    out["bccd_test_spherocyte_share"] = round(float((blabels == "spherocyte").mean()), 4)
    out["bccd_test_label_shares"] = {c: round(float((blabels == c).mean()), 4) for c in sorted(set(blabels.tolist()))}
    th = AggregateThresholds()
    sure_sickle = (blabels == "sickle") & (bprobs.max(1) >= th.sickle_min_confidence)
    out["bccd_test_sickle_cells"] = int((blabels == "sickle").sum())
    out["bccd_test_sickle_confident_cells"] = int(sure_sickle.sum())
    out["note"] = (f"the critical sickle flag needs >= {th.sickle_critical_min_cells} confident sickle cells in a report; "
                   f"BCCD test has {int(sure_sickle.sum())} confident ones in {len(blabels)} red cells over 72 images")
    out["chula_conf_mean"] = round(float(conf.mean()), 4)
    eng.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--smears", type=int, default=20)
    ap.add_argument("--cells", type=int, default=400)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--looks", default="", help="comma-separated seeds: the comparisons again with every "
                    "Chula test cell through that one random lab look (training.look), e.g. 1,2,3,4,5,6,7,8")
    args = ap.parse_args()
    require_data_root()
    logging.basicConfig(level=logging.WARNING)
    res = run(args.models, args.smears, args.cells, look_seeds=tuple(int(v) for v in args.looks.split(",") if v))
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
