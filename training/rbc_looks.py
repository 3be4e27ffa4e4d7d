"""RBC heads as the analyzer runs them, on their crops as stored and drawn through other labs' looks.

    python -m training.rbc_looks models [other_models_dir ...] [--seeds 7,8] [--defocus]

For each models folder: Chula macro-F1 and IDB1 sickle-vs-not on val and test, with the crops as
stored and with every crop drawn through a random lab's look (`training.look`; seeds 7 and 8
unless `--seeds` says otherwise, the same crops for every head), each cut as the head's manifest says (lamp-corrected or raw) and
classified with its views gated and its prior shifts (`training.prior_shift.gated_probs`), plus
the shares of BCCD's annotated red cells typed normal, spherocyte and schistocyte. The looks are
a stand-in for a lab in no dataset (and the augmentation a head trained with looks has seen).
With `--defocus`, one more column: every crop through a random lab's look AND out of focus
(`training.rbc_data.defocus_crops`, seed 11), with the share of Chula's normal cells typed target
there (a nearly transparent cell's defocus rings read as a target cell's).
An earlier head: `git show <commit>:models/rbc_head.json` and `.onnx` into a folder of its own.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from smearscope.service.analysis.classify import CropClassifier
from training.head_data import head_engine
from training.prior_shift import gated_probs, view_logits
from training.rbc_data import CLASSES, CROP, build_sets, defocus_crops, figures
from training.wbc_data import to_crops

SEEDS = (7, 8)


def measure(models: Path, sets: dict, seeds: tuple[int, ...] = SEEDS, defocus: bool = False) -> list[str]:
    lines = []
    with head_engine(models / "rbc_head.json", CLASSES) as eng:
        m = eng.manifest
        clf = CropClassifier(eng, 0.0)
        illum = m.preprocessing.illumination == "flatfield"
        shift = np.array(clf.logit_shift / m.temperature, np.float32)  # calibrated units, as gated_probs takes
        for split in ("val", "test"):
            bccd = view_logits(clf, to_crops(sets[f"bccd_{split}_images"], CROP, illumination=illum))
            cells = []
            for seed in (None, *seeds):
                rng = None if seed is None else np.random.default_rng(seed)
                crops = to_crops(sets[f"{split}_images"], CROP, rng=rng, p_look=1.0, illumination=illum)
                f = figures(gated_probs(view_logits(clf, crops), shift, m.temperature, clf.extra_views_below),
                            sets, split, gated_probs(bccd, shift, m.temperature, clf.extra_views_below))
                cells.append(f"{f['chula_macro_f1']:.3f} / {f['idb1_sickle_vs_not']:.3f}")
            if defocus:
                probs = gated_probs(view_logits(clf, defocus_crops(sets[f"{split}_images"], illumination=illum)),
                                    shift, m.temperature, clf.extra_views_below)
                f = figures(probs, sets, split, gated_probs(bccd, shift, m.temperature, clf.extra_views_below))
                y = sets[f"{split}_labels"]
                normal = (sets[f"{split}_labs"] == "chula") & (y == CLASSES.index("normal"))
                target = float((probs.argmax(1)[normal] == CLASSES.index("target")).mean())
                cells.append(f"{f['chula_macro_f1']:.3f} / {f['idb1_sickle_vs_not']:.3f} (normal typed target {target:.3f})")
            sh = f["bccd_label_shares"]
            lines.append(f"| {models} | {split} | {' | '.join(cells)} | {sh.get('normal', 0):.3f} / "
                         f"{sh.get('spherocyte', 0):.3f} / {sh.get('schistocyte', 0):.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="look seeds, comma-separated")
    ap.add_argument("--defocus", action="store_true", help="a column with every crop also out of focus")
    args = ap.parse_args()
    seeds = tuple(int(v) for v in args.seeds.split(","))
    logging.basicConfig(level=logging.WARNING)
    sets = build_sets()
    print("| models | split | Chula macro-F1 / IDB1, as stored | " + " | ".join(f"looks seed {s}" for s in seeds)
          + (" | out of focus, seed 11" if args.defocus else "") + " | BCCD red cells normal / spherocyte / schistocyte |")
    print("|---|---|---|" + "---|" * (len(seeds) + args.defocus) + "---|")
    for models in args.models:
        for line in measure(models, sets, seeds, args.defocus):
            print(line)


if __name__ == "__main__":
    main()
