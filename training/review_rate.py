"""The price of the WBC head's open-set tests: normal held-out white cells sent to review, per lab.

    python -m training.review_rate [--models models] [--split test]

Each lab's held-out crops (PBC, BCCD's typed white cells, the Raspberry Pi station's; prepared
as the head's manifest says, `training.evaluate`'s sets) go through the analyzer's own classifier
(its views, temperature, thresholds and open-set tests). A crop comes back `unidentified` when its
top probability is below the analyzer's threshold or an open-set test calls it unlike every
trained class (`atypical`); every held-out cell is of a trained class, so each of them is a
normal cell sent to review. Issue 16's bar: at most 10 % of another lab's normal cells.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from smearscope.service.analysis.classify import UNIDENTIFIED
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.records import Box, CellCrop, CellDetection, CellKind
from training.evaluate import wbc_crop_sets


def classify_white_crops(head, images) -> list:
    """The analyzer's WBC classifier (`head`: `Analyzer.wbc_head`) on white-cell crops: its
    views, temperature, threshold and open-set tests; one HeadResult per crop."""
    det = CellDetection(kind=CellKind.WBC, box=Box(0, 0, 1, 1), score=1.0)  # the crop is all the head sees
    return head.classify([CellCrop(det, im) for im in images])


def review_rates(models: Path, split: str = "test") -> dict[str, tuple[int, float, float]]:
    """Per lab: (cells, share sent to review, share the open-set tests called atypical)."""
    analyzer = Analyzer.from_models_dir(models, warmup=False)
    head = analyzer.wbc_head
    assert head is not None, "no WBC head in the models folder"
    out = {}
    try:
        for lab, (images, _) in wbc_crop_sets(models / "wbc_head.json", split).items():
            results = classify_white_crops(head, images)
            review = float(np.mean([r.label == UNIDENTIFIED for r in results])) if results else float("nan")
            atypical = float(np.mean([bool(r.atypical) for r in results])) if results else float("nan")
            out[lab] = (len(results), review, atypical)
    finally:
        analyzer.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--split", default="test", choices=("val", "test"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{'lab':6s} {'cells':>5s} {'to review':>9s} {'open-set':>8s}")
    for lab, (n, review, atypical) in review_rates(args.models, args.split).items():
        print(f"{lab:6s} {n:>5d} {100 * review:>8.1f}% {100 * atypical:>7.1f}%")


if __name__ == "__main__":
    main()
