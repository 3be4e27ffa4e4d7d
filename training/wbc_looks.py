"""WBC heads as the analyzer runs them, per lab, on crops as stored, through other labs' looks and out of focus.

    python -m training.wbc_looks models [other_models_dir ...] [--split val] [--seeds 7]

For each models folder and each lab (PBC, BCCD's typed white cells, the Raspberry Pi station's;
`training.wbc_data` contexts, lamp-corrected and cut as the analyzer does): accuracy and macro-F1
of the head's own calls (closed set), and the share the analyzer's classifier sends to review
(`unidentified`: its views, temperature, threshold and open-set tests; every cell here is of a
trained class, so each is a price), with the crops as stored; drawn through a random lab's look
(`training.look`, one column per seed, the same crops for every head); and through a random look
AND out of focus (`training.wbc_data.defocus_crops`, seed 11: the rings a slightly defocused
station shows around a nucleus). The looks stand in for a lab in no dataset. The last column is
each head's worst figure over the labs and columns, the one train_wbc chooses by (there with out
of focus as the labs' mean). A last row per head: the share of annotated red cells
(`training.wbc_negatives`: BCCD and TXL-PBC, the dense ones the nucleated-cell recheck sends the
head, and some others) the head types lymphocyte or erythroblast, typed and not atypical: the
recheck would count each as a white (or nucleated red) cell.
An earlier head: `git show <commit>:models/wbc_head.json` (and .onnx, .features.npz) into a folder
of its own, beside copies of the other models.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from smearscope.service.analysis.classify import UNIDENTIFIED
from smearscope.service.analysis.nucleated import accepts
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.records import Box, CellDetection, CellKind
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX
from training.head_data import PBC_CLASSES
from training.metrics import per_lab_report
from training.review_rate import classify_white_crops
from training.wbc_data import WBC_LABS, defocus_crops, load_contexts, to_crops
from training.wbc_negatives import red_cell_contexts

SEEDS = (7,)
#: The red-cell negatives' row.
RED = "red cells"
#: A red cell's detection as the nucleated-cell recheck judges it: 7.5 um across.
_RED_CELL = CellDetection(CellKind.RBC, Box(0, 0, 7.5 / CANONICAL_UM_PER_PX, 7.5 / CANONICAL_UM_PER_PX), 1.0)


def columns(split: str, seeds: tuple[int, ...]) -> tuple[list[str], dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """Column names; per lab, the crops of each column; per lab, the labels."""
    c = load_contexts(split)
    names = ["as stored", *(f"look seed {s}" for s in seeds), "look + out of focus"]
    crops, labels = {}, {}
    for lab in WBC_LABS:
        m = c.labs == lab
        images = c.images[m]
        crops[lab] = [to_crops(images), *(to_crops(images, rng=np.random.default_rng(s), p_look=1.0) for s in seeds),
                      defocus_crops(images)]
        labels[lab] = c.labels[m]
    red = red_cell_contexts(split)[0]
    crops[RED] = [to_crops(red), *(to_crops(red, rng=np.random.default_rng(s), p_look=1.0) for s in seeds),
                  defocus_crops(red)]
    return names, crops, labels


def measure(models: Path, crops: dict[str, list[np.ndarray]], labels: dict[str, np.ndarray]) -> dict[str, list[tuple]]:
    """Per lab, per column: (accuracy, macro-F1, share sent to review); for RED, per column: the
    share typed lymphocyte or erythroblast (what the recheck re-counts)."""
    analyzer = Analyzer.from_models_dir(models, warmup=False)
    head = analyzer.wbc_head
    assert head is not None, f"{models}: no WBC head"
    out: dict[str, list[tuple]] = {}
    try:
        for lab, sets in crops.items():
            for images in sets:
                results = classify_white_crops(head, images)
                if lab == RED:
                    out.setdefault(lab, []).append(
                        (float(np.mean([accepts(r, _RED_CELL) for r in results])),))
                    continue
                y = labels[lab]
                own = np.array([PBC_CLASSES.index(head.classes[int(np.argmax(r.probs))]) for r in results])
                rep = per_lab_report(y, own, np.full(len(y), lab), len(PBC_CLASSES))[lab]
                review = float(np.mean([r.label == UNIDENTIFIED for r in results]))
                out.setdefault(lab, []).append((rep["accuracy"], rep["macro_f1"], review))
    finally:
        analyzer.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="look seeds, comma-separated")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names, crops, labels = columns(args.split, tuple(int(v) for v in args.seeds.split(",")))
    print(f"{args.split}: accuracy / macro-F1 / sent to review, per lab ({', '.join(f'{k} {len(v)}' for k, v in labels.items())} "
          f"cells); {RED} ({len(crops[RED][0])}): share typed lymphocyte or erythroblast")
    print("| models | lab | " + " | ".join(names) + " | worst macro-F1 |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for models in args.models:
        figures = measure(models, crops, labels)
        red = figures.pop(RED)
        worst = min(f1 for cells in figures.values() for _, f1, _ in cells)
        for i, (lab, cells) in enumerate(figures.items()):
            text = " | ".join(f"{a:.3f} / {f:.3f} / {r:.3f}" for a, f, r in cells)
            print(f"| {models} | {lab} | {text} | {f'{worst:.3f}' if i == 0 else ''} |")
        print(f"| {models} | {RED} | " + " | ".join(f"{v:.3f}" for (v,) in red) + " | |")


if __name__ == "__main__":
    main()
