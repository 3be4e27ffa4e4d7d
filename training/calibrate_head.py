"""Choose a head's test-time views on validation, refit its temperature for them, update its manifest.

    python -m training.calibrate_head --head rbc
    python -m training.calibrate_head --head rbc --candidates identity identity,hflip --write

Each candidate view set (service.analysis.tta: each crop flipped, logits averaged, as the analyzer runs
it) is scored on the head's validation crops by macro-F1, prepared as the head's manifest says
(`preprocessing.illumination`: lamp-corrected or raw) and from the labs `training.evaluate`
measures it on (RBC: Chula val and IDB1 train's seeded 15 %; WBC: PBC, BCCD and the Raspberry Pi
station's val). The choice is the SMALLEST set
within `--tolerance` of the best one (every view costs one more head run per cell). With
`--write`, the manifest gets that set as `tta`, a temperature fitted on validation for those
views, and held-out figures measured with them (`metrics.test`, IDB1 / BCCD test); the ONNX
file is untouched. Test figures are computed only for the chosen set, after the choice.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from smearscope.engines.manifest import load_manifest
from smearscope.engines.registry import create_engine
from smearscope.export.onnx_export import write_manifest
from smearscope.service.analysis.classify import CropClassifier
from smearscope.service.analysis.crops import CropSpec
from training import head_data as hd
from training.metrics import classification_report, fit_temperature

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("identity", "identity,hflip", "identity,hflip,vflip", "identity,hflip,vflip,rot180")


def choose(scores: dict[tuple[str, ...], float], tolerance: float) -> tuple[str, ...]:
    """The smallest view set whose score is within `tolerance` of the best (ties: the better score)."""
    best = max(scores.values())
    ok = [v for v, s in scores.items() if s >= best - tolerance]
    return min(ok, key=lambda v: (len(v), -scores[v]))


def manifest_sets(head: str, manifest: Path, crop: CropSpec) -> dict:
    """Validation and held-out crop sets prepared as the head's manifest says (training.evaluate's
    sets), in the form `head_data.held_out_metrics` reads: RBC Chula val + IDB1 val, Chula test and
    IDB1 test; WBC every lab's val, PBC test and BCCD test."""
    from training.evaluate import rbc_crop_sets, wbc_crop_sets

    def joined(parts: list[tuple]) -> hd.CropSet:
        return hd.CropSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), [])

    if head == "rbc":
        val, test = rbc_crop_sets(manifest, crop, "val"), rbc_crop_sets(manifest, crop, "test")
        return {"val": joined([val["chula"], val["idb1"]]), "test": joined([test["chula"]]),
                "idb1_test": joined([test["idb1"]]), "idb1_test_is_sickle": test["idb1"][2]}
    val, test = wbc_crop_sets(manifest, "val"), wbc_crop_sets(manifest, "test")
    return {"val": joined([val["pbc"], val["bccd"], val["rpi"]]), "test": joined([test["pbc"]]),
            "bccd_test": joined([test["bccd"]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", choices=("rbc", "wbc"), required=True)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES),
                    help="view sets, each comma-separated (service.analysis.tta views)")
    ap.add_argument("--tolerance", type=float, default=0.002, help="macro-F1 a smaller view set may give up")
    ap.add_argument("--write", action="store_true", help="update the manifest (tta, temperature, test metrics)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # every candidate runs off the manifest's calibration on purpose: that is what is being refitted
    logging.getLogger("smearscope.service.analysis.classify").setLevel(logging.ERROR)
    path = args.models / f"{args.head}_head.json"
    engine = create_engine("onnxruntime", path).load()
    m = engine.manifest
    if m.name != f"{args.head}_head":
        raise SystemExit(f"{path}: manifest name {m.name!r}, expected {args.head}_head (it is rewritten under its name)")
    crop = CropSpec(m.crop.extent_um, m.crop.input_size)
    sets = manifest_sets(args.head, path, crop)
    val = sets["val"]
    classes = list(m.classes)
    if classes != list(hd.PBC_CLASSES if args.head == "wbc" else hd.RBC_CLASSES):
        raise SystemExit(f"{path}: classes {classes} differ from the adapters' class list")

    scores, logits = {}, {}
    for cand in args.candidates:
        views = tuple(cand.split(","))
        clf = CropClassifier(engine, 0.0, views=views)
        logits[views] = clf.logits(val.images)
        rep = classification_report(val.labels, logits[views].argmax(1), classes)
        scores[views] = rep["macro_f1"]
        print(f"{'+'.join(views):<32} val macro-F1 {rep['macro_f1']:.4f}  accuracy {rep['accuracy']:.4f}  ({len(val.labels)} crops)")
    views = choose(scores, args.tolerance)
    temperature = fit_temperature(logits[views], val.labels)
    print(f"chosen: {'+'.join(views)} (smallest within {args.tolerance} of the best); temperature {temperature:.4f}")
    if not args.write:
        return
    clf = CropClassifier(engine, 0.0, views=views)
    held_out = hd.held_out_metrics(args.head, sets, clf.logits, temperature)
    t = held_out["test"]
    print(f"held-out test with {'+'.join(views)}: accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f}  ECE {t['ece']:.4f}")
    data = m.model_dump()
    data["tta"] = list(views)
    data["temperature"] = temperature
    prev = m.metrics.get("test", {})
    data["metrics"] = {**m.metrics, **held_out, "temperature": temperature,
                       "test_time_views": {
                           "chosen": list(views), "tolerance": args.tolerance,
                           "val_macro_f1": {"+".join(v): s for v, s in scores.items()},
                           # the test figures the manifest held before, and the views they were measured in
                           "before": {"views": list(m.tta), **{k: prev[k] for k in ("accuracy", "macro_f1", "ece") if k in prev}}}}
    manifest = type(m).model_validate(data)
    write_manifest(manifest, args.models)
    load_manifest(path)  # the hash still matches the untouched ONNX file
    logger.info("%s: tta %s, temperature %.4f", path, json.dumps(list(views)), temperature)


if __name__ == "__main__":
    main()
