"""Re-measure committed heads the way the analyzer runs them now, and write the figures into their manifests.

    python -m training.remeasure_heads                  # models/wbc_head.json and models/rbc_head.json
    python -m training.remeasure_heads --dry-run        # print only
    python -m training.remeasure_heads --keep-as test_with_copies   # the held-out parts changed

A head's manifest figures must be what `service.analysis.classify` gives with that head: when the
runtime changes how it runs a head (e.g. the other test-time views only for crops the first view is
unsure of, `classify.EXTRA_VIEWS_BELOW`), the figures are measured again on the same held-out split.
The figures they replace stay in the manifest under `metrics.test_every_view` for audit, or under
`metrics.<KEEP_AS>` with `--keep-as` (when the held-out parts changed: training.overlap); the
manifest's `split_hashes` become those of the held-out lists measured.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from smearscope.engines.manifest import load_manifest
from smearscope.service.analysis.classify import EXTRA_VIEWS_BELOW
from training import head_data as hd
from training.evaluate import eval_head, head_crop, rbc_crop_sets, wbc_crop_sets
from training.metrics import per_lab_report
from training.review_rate import review_rates

logger = logging.getLogger(__name__)

MODELS = Path(__file__).resolve().parents[1] / "models"


def remeasure(models: Path) -> dict[str, dict]:
    """{manifest name: {metric path: new value}} for the committed heads found in `models`."""
    out: dict[str, dict] = {}
    wbc = models / "wbc_head.json"
    if wbc.exists() and load_manifest(wbc, verify_hash=False).preprocessing.illumination == "flatfield":
        # the multi-lab head: per-lab closed-set figures on lamp-corrected crops (training.export_head)
        closed = {}
        for lab, (images, labels) in wbc_crop_sets(wbc, "test").items():
            _, probs, _ = eval_head(wbc, images, labels, hd.PBC_CLASSES)
            closed |= per_lab_report(labels, probs.argmax(1), np.full(len(labels), lab), len(hd.PBC_CLASSES))
        rates = review_rates(models)  # every held-out cell is of a trained class: each sent to review is a price
        out["wbc_head.json"] = {"test_closed_set": closed,
                                "test_review_rate": {lab: round(r, 4) for lab, (_, r, _) in rates.items()},
                                "test_review_rate_command": "python -m training.review_rate (test parts cleared "
                                                            "of copies: training.overlap)"}
    elif wbc.exists():
        pbc = hd.pbc_crops("test")
        rep, _, _ = eval_head(wbc, pbc.images, pbc.labels, hd.PBC_CLASSES)
        new = {"test": rep}
        bccd = hd.bccd_wbc_crops("test")
        if len(bccd.labels):
            new["bccd_test"], _, _ = eval_head(wbc, bccd.images, bccd.labels, hd.PBC_CLASSES)
        out["wbc_head.json"] = new
    rbc = models / "rbc_head.json"
    if rbc.exists():
        sets = rbc_crop_sets(rbc, head_crop(rbc), "test")  # lamp-corrected where the manifest says
        rep, _, _ = eval_head(rbc, *sets["chula"], hd.RBC_CLASSES)
        idb_images, idb_labels, is_sickle = sets["idb1"]
        _, probs, names = eval_head(rbc, idb_images, idb_labels, hd.RBC_CLASSES)
        acc = float(((probs.argmax(1) == names.index("sickle")) == is_sickle).mean())
        out["rbc_head.json"] = {"test": rep, "idb1_test_sickle_vs_not_accuracy": acc}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=MODELS)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--keep-as", default=None, metavar="KEY",
                    help="keep the figures replaced under metrics[KEY] (e.g. test_with_copies, when the held-out "
                    "parts changed) instead of metrics.test_every_view")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    for name, new in tqdm(remeasure(args.models).items(), desc="manifests"):
        path = args.models / name
        m = json.loads(path.read_text())
        old = m["metrics"]
        for key, value in new.items():
            was = old.get(key, {})
            if key == "test_closed_set":
                logger.info("%s %s: %s -> %s", name, key, {k: v["accuracy"] for k, v in was.items()},
                            {k: v["accuracy"] for k, v in value.items()})
            elif isinstance(was, dict) and "accuracy" in was:
                logger.info("%s %s: accuracy %.4f -> %.4f, macro-F1 %.4f -> %.4f", name, key, was["accuracy"],
                            value["accuracy"], was.get("macro_f1", float("nan")), value["macro_f1"])
            else:
                logger.info("%s %s: %s -> %s", name, key, was, value)
            if args.keep_as:  # kept once: a second run must not overwrite what it kept with its own figures
                old.setdefault(args.keep_as, {}).setdefault(key, was)
            elif key == "test" and "test_every_view" not in old:
                old["test_every_view"] = was
            old[key] = value
        old["extra_views_below"] = EXTRA_VIEWS_BELOW
        m["split_hashes"] = hd.split_manifest()
        if not args.dry_run:
            path.write_text(json.dumps(m, indent=2) + "\n")


if __name__ == "__main__":
    main()
