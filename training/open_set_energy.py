"""Give a committed WBC head the energy open-set test next to its distance, fitted on validation.

    python -m training.open_set_energy [--models models] [--quantile 0.99] [--dry-run]

A crop is atypical (sent to review as `unidentified`, flag `atypical_wbc_present`) when any of
the manifest's open-set tests is beyond its threshold. This tool keeps the graph-output tests
(the Mahalanobis distance, output `ood`) and adds or refits the energy test: the free energy of
the crop's logits, -logsumexp (Liu et al. 2020), which the classifier computes from the logits
averaged over the views the crop ran in. Its threshold is set as the distance's was: each
training lab's `--quantile` of its validation crops' energies, the largest of them. Crops are cut
as the analyzer cuts them (each lab's context, lamp correction, `crop_cell`) and run through the
analyzer's own classifier; the test review rates with and without the energy test go into the
manifest's metrics.

Why both (heads trained without one class, `training.train_wbc --exclude-class`, compared by
`training.openset_compare`): energy separates a class the head never saw better than the
distance (AUROC 0.80 / 0.69 / 0.88 against 0.63 / 0.71 / 0.69 for basophil / monocyte /
immature granulocyte), but alone it let another lab's white cells (TXL-PBC 575, never seen by the
head) through to be typed platelet, which the distance had caught (counted mAP50 at the given
scale 0.836 with the distance, 0.767 with energy alone). At the 99th percentile, both tests
together typed the held-out class as known 0.92 / 0.91 / 0.79 (distance alone 0.93 / 0.94 /
0.89) with the worst lab's review rate unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from smearscope.engines.manifest import OpenSet
from smearscope.service.analysis.classify import CropClassifier, energy, softmax
from training.head_data import PBC_CLASSES, head_engine
from training.metrics import per_lab_report
from training.wbc_data import load_contexts, to_crops

logger = logging.getLogger(__name__)


def fit(models: Path, quantile: float) -> tuple[list[dict], dict]:
    """(new open_set tests, metrics) for the head in `models`, measured as the analyzer runs it:
    the manifest's graph-output tests (the Mahalanobis distance) kept as they are, the energy
    test fitted and added (or refitted)."""
    with head_engine(models / "wbc_head.json", PBC_CLASSES) as eng:
        m = eng.manifest
        illum = m.preprocessing.illumination == "flatfield"
        clf = CropClassifier(eng, 0.5)
        val, test = load_contexts("val"), load_contexts("test")
        vl, _ = clf.outputs(to_crops(val.images, illumination=illum))
        tl, tscores = clf.outputs(to_crops(test.images, illumination=illum))
    graph = [(k, t) for k, t in enumerate(m.open_set) if t.method != "energy"]
    shift = clf.logit_shift
    ve, te = energy(vl - shift), energy(tl - shift)
    labs = sorted(set(val.labs.tolist()))
    per_lab_q = {lab: float(np.quantile(ve[val.labs == lab], quantile)) for lab in labs}
    threshold = max(per_lab_q.values())
    test_energy = OpenSet(method="energy", threshold=threshold,
                          calibration=f"largest per-lab {quantile:.2f} quantile of validation energies (views "
                                      f"{'+'.join(clf.views)}, the other views only for unsure crops): "
                                      f"{json.dumps({k: round(v, 3) for k, v in per_lab_q.items()})} "
                                      "(training.open_set_energy)")
    probs = softmax(tl / clf.temperature)
    pred = probs.argmax(1)
    beyond_graph = np.zeros(len(tl), bool)
    for k, t in graph:
        beyond_graph |= tscores[:, k] > t.threshold
    beyond_energy = te > threshold
    unsure = probs.max(1) < clf.min_confidence
    review = unsure | beyond_graph | beyond_energy
    final = np.where(review, -1, pred)

    def rate(mask: np.ndarray) -> dict:
        return {lab: round(float(mask[test.labs == lab].mean()), 4) for lab in labs}
    metrics = {"test_with_review": per_lab_report(test.labels, final, test.labs, len(PBC_CLASSES)),
               "test_review_rate": rate(review), "test_review_rate_without_energy": rate(unsure | beyond_graph),
               "test_review_rate_energy_alone": rate(beyond_energy)}
    tests = [t.model_dump(exclude_none=True) for _, t in graph] + [test_energy.model_dump(exclude_none=True)]
    return tests, metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    open_set, metrics = fit(args.models, args.quantile)
    logger.info("open_set %s", json.dumps(open_set))
    logger.info("test %s", json.dumps({k: v for k, v in metrics.items() if k.startswith("test_review_rate")}))
    if args.dry_run:
        return
    path = args.models / "wbc_head.json"
    doc = json.loads(path.read_text())
    before = {"open_set": doc.get("open_set"), "test_review_rate": doc["metrics"].get("test_review_rate"),
              "test_with_review": doc["metrics"].get("test_with_review")}
    doc["open_set"] = open_set
    doc["metrics"].update(metrics)
    doc["metrics"]["open_set_before"] = before
    path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
