"""Evaluate every committed model on its held-out split and print the accuracy table.

    python -m training.evaluate [--models models] [--split test|val] [--stain macenko|none] [--json out.json] [--quick] [--heads-only]
                                [--backend onnxruntime|tensorrt]

Runs with the runtime dependencies only (ONNX Runtime), so it measures exactly what ships. On a
Jetson, `--backend tensorrt` measures the built engines instead (FP16/INT8 rounding included;
engines from `smearscope build-engines` in MODELS/engines).
Splits (`--split test`, the default): BCCD VOC test; TXL-PBC test; PBC seeded 10% test; Chula
RBC-12 seeded 10% test (by image); erythrocytesIDB1 test/. `--split val` prints the same table on
the validation splits (BCCD VOC val, TXL-PBC val, PBC and Chula seeded 10% val, the seeded 15% of
IDB1 train/): the figures used to choose between candidate models, so that choosing never
looks at a test split. The bars apply to the test split only.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.device.frame import Frame
from smearscope.engines.manifest import load_manifest
from smearscope.engines.registry import create_engine
from smearscope.service.analysis.classify import CropClassifier
from smearscope.service.analysis.crops import WBC_CROP, CropSpec
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
from smearscope.service.analysis.roi import RoiFilter
from smearscope.service.ingest import IngestError, load_image
from training import head_data as hd
from training.data import (
    bccd_boxes,
    bccd_image_path,
    bccd_microns_per_pixel,
    bccd_split,
    bccd_wbc_types,
    data_root,
    require_data_root,
    txl_boxes,
    txl_images,
)
from training.metrics import classification_report, detection_confusion, detection_map50, softmax

logger = logging.getLogger(__name__)
SEG_KINDS = ("rbc", "wbc", "platelet")


#: The calibrated confidence down to which the model-level figure ranks detections (as
#: ultralytics validates at conf 0.001): below what each class's calibration maps the detector's
#: raw floor to, so the figure ranks every raw detection whatever the calibration.
ALL_CONF = 0.001


def cli_analyze(paths: list[Path], models: Path, stain: str, mpp: float | None, desc: str,
                backend: str = "onnxruntime") -> tuple[list[dict], list[dict]]:
    """Run `smearscope analyze --json --detections` over `paths` in ONE process, as a user would.

    Returns the stdout lines (one report or error per image) and the `--detections` lines (every
    detection down to ALL_CONF, counted cells marked), both in the order of `paths`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        listing, dets = Path(tmp) / "images.txt", Path(tmp) / "detections.jsonl"
        listing.write_text("".join(f"{p}\n" for p in paths))
        cmd = [sys.executable, "-m", "smearscope", "analyze", f"@{listing}", "--json", "--models", str(models),
               "--stain", stain, "--detections", str(dets), "--detections-floor", str(ALL_CONF), "--backend", backend]
        if mpp is not None:
            cmd += ["--microns-per-pixel", str(mpp)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        assert proc.stdout is not None
        try:
            reports = [json.loads(line) for line in tqdm(proc.stdout, total=len(paths), desc=desc)]
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        records = [json.loads(line) for line in dets.read_text().splitlines()] if dets.exists() else []
    if rc not in (0, 2) or len(reports) != len(paths) or len(records) != len(paths):
        raise SystemExit(f"smearscope analyze failed (exit {rc}, {len(reports)} of {len(paths)} reports)")
    rejected = [r for r in reports if "error" in r]
    if rejected:  # scored as images with nothing found
        logger.warning("%d of %d images rejected by the CLI, e.g. %s", len(rejected), len(paths), rejected[0])
    return reports, records


def in_process_reports(analyzer: Analyzer, paths: list[Path], mpp: float | None, desc: str) -> list[dict]:
    """The same reports (as JSON dicts) from an Analyzer in this process, images decoded as the
    CLI decodes them (a rejected image gives its error, as the CLI prints it)."""
    out = []
    for p in tqdm(paths, desc=desc):
        try:
            pixels = load_image(str(p)).pixels
        except IngestError as exc:
            out.append({"error": {"code": str(getattr(exc.code, "value", exc.code)), "message": str(exc.message)}, "image": str(p)})
            continue
        rep = analyzer.analyze(Frame(pixels, p.name, "eval", microns_per_pixel=mpp)).report
        out.append(rep.model_dump(mode="json"))
    return out


def _cells(rep: dict) -> list[dict]:
    return rep.get("cells", [])  # a rejected image ({"error": ...}) found nothing


def _scored(items: list[dict]) -> list[tuple]:
    """(kind, bbox, score) of report cells or --detections entries, as detection_map50 reads them."""
    # a nucleated red cell is a white cell to the detector (the WBC head re-typed it)
    return [("wbc" if d["kind"] == "nrbc" else d["kind"], d["bbox"], d["score"]) for d in items]


def _truth(boxes) -> list[tuple]:
    return [(b.kind, [b.x0, b.y0, b.x1, b.y1]) for b in boxes]


def eval_bccd(ids: list[str], reports: list[dict], records: list[dict] | None = None) -> dict:
    """BCCD figures from reports; with `records` (--detections) also mAP over every detection."""
    types = bccd_wbc_types()
    per, ranked, wbc_ok, type_hits, rbc_labels = [], [], 0, [], []
    for i, rep, rec in zip(ids, reports, records or [None] * len(ids)):
        truth = _truth(bccd_boxes(i))
        cells = _cells(rep)
        per.append({"pred": _scored(cells), "truth": truth})
        if rec is not None:
            ranked.append({"pred": _scored(rec.get("detections", [])), "truth": truth})
        wbc_ok += sum(k == "wbc" for k, _ in truth) == sum(c["kind"] in ("wbc", "nrbc") for c in cells)
        rbc_labels += [c["label"] for c in cells if c["kind"] == "rbc"]
        wbcs = [c for c in cells if c["kind"] == "wbc"]
        if i in types and len(wbcs) == 1:  # the second lab's images, typed through the analyzer
            type_hits.append(wbcs[0]["label"] == types[i])
    m = detection_map50(per, SEG_KINDS)
    secs = [r["timing_ms"]["total_ms"] / 1000 for r in reports if "timing_ms" in r]
    out = {**m, "confusion": detection_confusion(per, SEG_KINDS), "wbc_count_agreement": wbc_ok / len(ids), "n": len(ids), "median_s_per_field": float(np.median(secs)),
           "wbc_type_accuracy_bccd": float(np.mean(type_hits)) if type_hits else None, "wbc_type_n": len(type_hits),
           # BCCD has no morphology labels: what the RBC head makes of a second lab's red cells
           "rbc_label_shares": {k: rbc_labels.count(k) / max(1, len(rbc_labels)) for k in sorted(set(rbc_labels), key=str)},
           "rejected": sum("error" in r for r in reports)}
    if records is not None:
        out["every_detection"] = detection_map50(ranked, SEG_KINDS)
    return out


def eval_txl(files: list[Path], split: str, reports: list[dict], records: list[dict]) -> dict:
    per, ranked, methods = [], [], []
    for p, rep, rec in zip(files, reports, records):
        if "error" in rep:  # scored as an image where nothing was found
            h, w = cv2.imread(str(p)).shape[:2]
        else:
            w, h = rep["source"]["image"]["width"], rep["source"]["image"]["height"]
            methods.append(rep["scale"]["method"])  # scale unknown: estimated per image
        truth = _truth(txl_boxes(p, split, w, h))
        per.append({"pred": _scored(_cells(rep)), "truth": truth})
        ranked.append({"pred": _scored(rec.get("detections", [])), "truth": truth})
    m = detection_map50(per, SEG_KINDS)
    return {**m, "every_detection": detection_map50(ranked, SEG_KINDS), "confusion": detection_confusion(per, SEG_KINDS),
            "n": len(per),
            "rejected": sum("error" in r for r in reports), "scale_methods": {k: methods.count(k) for k in set(methods)}}


def eval_pbc_pipeline(items: list[tuple[str, int]], reports: list[dict]) -> dict:
    """PBC held-out crops through `smearscope analyze`, scored from its JSON reports.

    The cell of interest is the detection nearest the crop centre; for the seven WBC-like classes
    it must be found as a WBC and labelled correctly; platelet crops must yield a platelet.
    """
    labels, preds, found = [], [], 0
    for (_, ci), rep in zip(items, reports):
        cls = hd.PBC_CLASSES[ci]
        cells = _cells(rep)
        if cells:
            img = rep["source"]["image"]
            w, h = img["width"], img["height"]
            cells = sorted(cells, key=lambda c: ((c["bbox"][0] + c["bbox"][2]) / 2 - w / 2) ** 2
                           + ((c["bbox"][1] + c["bbox"][3]) / 2 - h / 2) ** 2)
        if cls == "platelet":
            pred = "platelet" if cells and cells[0]["kind"] == "platelet" else "missed"
        else:
            wbc = next((c for c in cells if c["kind"] in ("wbc", "nrbc")), None)
            pred = wbc["label"] if wbc is not None else "missed"
        found += pred != "missed"
        labels.append(cls)
        preds.append(pred)
    names = list(hd.PBC_CLASSES) + ["unidentified", "missed"]
    rep = classification_report(np.array([names.index(x) for x in labels]), np.array([names.index(x) for x in preds]), names)
    return {"accuracy": rep["accuracy"], "macro_f1_over_pbc_classes": float(np.mean([rep["per_class"][c]["f1"] for c in hd.PBC_CLASSES])),
            "detected_fraction": found / max(1, len(items)), "n": len(items), "rejected": sum("error" in r for r in reports)}


def eval_head(manifest: Path, images: np.ndarray, labels: np.ndarray, classes,
              backend: str = "onnxruntime") -> tuple[dict, np.ndarray, list[str]]:
    """Head metrics by class NAME, so a model whose class list differs from the adapter's still
    evaluates honestly (a label the model cannot output counts as an error). The crops run as
    the analyzer runs them (service.analysis.classify: the manifest's test-time views, its temperature)."""
    eng = create_engine(backend, manifest).load()
    logits = CropClassifier(eng, 0.0).logits(images)
    eng.close()
    names = list(eng.manifest.classes) + [c for c in classes if c not in eng.manifest.classes]
    logits = np.concatenate([logits, np.full((len(logits), len(names) - logits.shape[1]), -1e9, logits.dtype)], axis=1)
    y = np.array([names.index(classes[i]) for i in labels], np.int64)
    rep = classification_report(y, logits.argmax(1), names, logits=logits / eng.manifest.temperature)
    return rep, softmax(logits / eng.manifest.temperature), names


def confusion_table(rep: dict) -> str:
    """Confusion matrix (rows: truth, columns: prediction) for the classes with any count."""
    names = list(rep["per_class"])
    cm = np.array(rep["confusion_matrix"])
    keep = [i for i in range(len(names)) if cm[i].sum() or cm[:, i].sum()]
    short = [names[i][:5] for i in keep]
    lines = ["  confusion (rows truth, columns predicted):", "  " + " " * 18 + "".join(f"{n:>6}" for n in short)]
    lines += ["  " + f"{names[i]:<18}" + "".join(f"{cm[i, j]:>6}" for j in keep) for i in keep]
    return "\n".join(lines)


def detection_confusion_table(conf: dict) -> str:
    names = conf["classes"]
    lines = ["  confusion (rows annotated, columns counted; background: missed / not annotated):",
             "  " + " " * 12 + "".join(f"{n[:10]:>11}" for n in names)]
    for n, row in zip(names, conf["matrix"]):
        lines.append(f"  {n:<12}" + "".join(f"{v:>11}" for v in row))
    return "\n".join(lines)


def head_crop(manifest: Path) -> CropSpec:
    """The crop a head was trained on, from its manifest (the analyzer cuts the same one)."""
    m = load_manifest(manifest, verify_hash=False)
    if m.crop is None:
        raise SystemExit(f"{manifest}: a head manifest without crop geometry")
    return CropSpec(m.crop.extent_um, m.crop.input_size)


def idb1_set(split: str, crop: CropSpec) -> tuple[hd.CropSet, np.ndarray]:
    """IDB1 test/, or for `val` the seeded 15% of train/ that the RBC head validates on."""
    mpp = hd.idb1_microns_per_pixel()
    if split == "test":
        return hd.idb1_crops("test", mpp, spec=crop)
    full, is_sickle = hd.idb1_crops("train", mpp, spec=crop)
    _, val_idx = hd.idb1_train_val_split(len(full.labels))
    out = hd.CropSet(full.images[:0], full.labels[:0], [])
    out.extend(full, val_idx)
    return out, is_sickle[val_idx]


def wbc_crop_sets(manifest: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(crops, labels) per lab, prepared as the head's manifest says (lamp-corrected or raw)."""
    if load_manifest(manifest, verify_hash=False).preprocessing.illumination == "flatfield":
        from training.wbc_data import load_contexts, to_crops

        c = load_contexts(split)
        return {lab: (to_crops(c.images[c.labs == lab]), c.labels[c.labs == lab]) for lab in ("pbc", "bccd", "rpi")}
    from training.wbc_data import rpi_contexts, to_crops

    pbc, bccd, rpi = hd.pbc_crops(split), hd.bccd_wbc_crops(split), rpi_contexts(split)
    return {"pbc": (pbc.images, pbc.labels), "bccd": (bccd.images, bccd.labels),
            "rpi": (to_crops(rpi.images, illumination=False), rpi.labels)}


def rbc_crop_sets(manifest: Path, crop: CropSpec, split: str) -> dict[str, tuple]:
    """Chula (crops, labels) and IDB1 (crops, labels, is_sickle), prepared as the manifest says."""
    if load_manifest(manifest, verify_hash=False).preprocessing.illumination == "flatfield":
        from training.rbc_data import CLASSES, build_sets
        from training.wbc_data import to_crops

        sets = build_sets()
        labs, y, x = sets[f"{split}_labs"], sets[f"{split}_labels"], sets[f"{split}_images"]
        ch, ib = labs == "chula", labs == "idb1"
        return {"chula": (to_crops(x[ch], crop), y[ch]),
                "idb1": (to_crops(x[ib], crop), y[ib], y[ib] == CLASSES.index("sickle"))}
    chula = hd.chula_crops(split, crop)
    idb, is_sickle = idb1_set(split, crop)
    return {"chula": (chula.images, chula.labels), "idb1": (idb.images, idb.labels, is_sickle)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--split", default="test", choices=["test", "val"],
                    help="held-out test splits (the bars), or the validation splits (for choosing models)")
    ap.add_argument("--stain", default="auto", choices=["auto", "macenko", "none"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="20 images per detection set")
    ap.add_argument("--heads-only", action="store_true", help="the two heads on their crops; no detector or pipeline rows")
    ap.add_argument("--no-labs", action="store_true", help="skip the lab table (training.lab_table)")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                    help="engines to measure (tensorrt: the engines built on this machine)")
    args = ap.parse_args()
    require_data_root()
    logging.basicConfig(level=logging.WARNING)
    limit = 20 if args.quick else None
    sp = args.split
    res: dict = {"split": sp}
    wbc_m, rbc_m = args.models / "wbc_head.json", args.models / "rbc_head.json"
    wbc_crop, rbc_crop = head_crop(wbc_m), head_crop(rbc_m)
    if wbc_crop != WBC_CROP:
        raise SystemExit(f"{wbc_m}: crop {wbc_crop} differs from the one the WBC adapters cut ({WBC_CROP})")
    wbc_sets, rbc_sets = wbc_crop_sets(wbc_m, sp), rbc_crop_sets(rbc_m, rbc_crop, sp)
    wbc_rep, _, _ = eval_head(wbc_m, *wbc_sets["pbc"], hd.PBC_CLASSES, args.backend)
    res[f"wbc_head_pbc_{sp}"] = wbc_rep
    res[f"wbc_head_bccd_{sp}"], _, _ = eval_head(wbc_m, *wbc_sets["bccd"], hd.PBC_CLASSES, args.backend)
    if "rpi" in wbc_sets:
        res[f"wbc_head_rpi_{sp}"], _, _ = eval_head(wbc_m, *wbc_sets["rpi"], hd.PBC_CLASSES, args.backend)
    rbc_rep, _, _ = eval_head(rbc_m, *rbc_sets["chula"], hd.RBC_CLASSES, args.backend)
    res[f"rbc_head_chula_{sp}"] = rbc_rep
    idb_images, idb_labels, is_sickle = rbc_sets["idb1"]
    _, probs, names = eval_head(rbc_m, idb_images, idb_labels, hd.RBC_CLASSES, args.backend)
    res[f"rbc_head_idb1_{sp}_sickle_vs_not_accuracy"] = float(((probs.argmax(1) == names.index("sickle")) == is_sickle).mean())
    rows = [
        ("WBC head", f"BCCD {sp} crops (2nd lab, GT boxes): accuracy", res[f"wbc_head_bccd_{sp}"]["accuracy"], "report"),
        *([("WBC head", f"rpi {sp} crops (3rd lab, GT boxes): accuracy", res[f"wbc_head_rpi_{sp}"]["accuracy"], "report")]
          if f"wbc_head_rpi_{sp}" in res else []),
        ("WBC head", f"PBC {sp} accuracy", wbc_rep["accuracy"], ">= 0.95"),
        ("WBC head", f"PBC {sp} macro-F1", wbc_rep["macro_f1"], ">= 0.95"),
        ("WBC head", f"PBC {sp} ECE (calibrated)", wbc_rep["ece"], "report"),
        ("RBC head", f"Chula {sp} macro-F1", rbc_rep["macro_f1"], ">= 0.87"),
        ("RBC head", f"Chula {sp} accuracy", rbc_rep["accuracy"], "report"),
        ("RBC head", f"Chula {sp} ECE (calibrated)", rbc_rep["ece"], "report"),
        ("RBC head", f"IDB1 {sp} sickle-vs-not accuracy", res[f"rbc_head_idb1_{sp}_sickle_vs_not_accuracy"], ">= 0.96"),
    ]
    if not args.heads_only:
        ids = bccd_split(sp)[:limit]
        bccd_paths = [bccd_image_path(i) for i in ids]
        mpp = bccd_microns_per_pixel()
        # The model level, as published detectors report mAP: the models as the analyzer runs them
        # (views, fusion, calibration, the heads' re-assignments), in this process, every
        # detection down to a confidence of ALL_CONF ranked on the precision-recall curve.
        everything = AnalyzerOptions(stain_method=args.stain, detector_conf=ALL_CONF, roi=RoiFilter.every_kind_from(ALL_CONF))
        analyzer_all = Analyzer.from_models_dir(args.models, backend=args.backend, options=everything, warmup=False)
        res[f"seg_bccd_{sp}_model_level"] = bccd_all = eval_bccd(
            ids, in_process_reports(analyzer_all, bccd_paths, mpp, f"BCCD {sp} model level"))
        analyzer_all.close()
        # The whole pipeline: `smearscope analyze` in a subprocess, scored from what it prints
        # (the counted cells, conf >= 0.5) and from its --detections output (every detection).
        res[f"seg_bccd_{sp}"] = bccd = eval_bccd(ids, *cli_analyze(bccd_paths, args.models, args.stain, mpp,
                                                                    f"BCCD {sp} via smearscope analyze", args.backend))
        files = txl_images(sp)[:limit]
        res[f"seg_txl_{sp}"] = txl = eval_txl(files, sp, *cli_analyze(files, args.models, args.stain, None,
                                                                       f"TXL-PBC {sp} via smearscope analyze", args.backend))
        items = hd.pbc_splits()[sp][: 100 if args.quick else None]
        pbc_reports, _ = cli_analyze([data_root() / "pbc" / rel for rel, _ in items], args.models, args.stain,
                                     hd.PBC_MICRONS_PER_PIXEL, f"PBC {sp} via smearscope analyze", args.backend)
        res[f"pipeline_pbc_{sp}"] = pbc = eval_pbc_pipeline(items, pbc_reports)
        cli_all = bccd["every_detection"]
        rows = [
            ("segmentation", f"BCCD {sp} box mAP50, model level", bccd_all["mAP50"], ">= 0.92"),
            ("segmentation", "  rbc / wbc / platelet AP50", "{rbc:.3f} / {wbc:.3f} / {platelet:.3f}".format(**bccd_all), ""),
            ("CLI", f"BCCD {sp} mAP50, every detection (--detections)", cli_all["mAP50"], "within 3 pts of model level"),
            ("CLI", "  rbc / wbc / platelet AP50", "{rbc:.3f} / {wbc:.3f} / {platelet:.3f}".format(**cli_all), ""),
            ("CLI", f"BCCD {sp} mAP50, counted cells (as reported)", bccd["mAP50"], ">= 0.80"),
            ("CLI", "  rbc / wbc / platelet AP50", "{rbc:.3f} / {wbc:.3f} / {platelet:.3f}".format(**bccd), ""),
            ("CLI", f"BCCD {sp} WBC count agreement", bccd["wbc_count_agreement"], ">= 0.90"),
            rows[0],
            ("CLI", f"BCCD {sp} WBC type via analyzer", bccd["wbc_type_accuracy_bccd"], "report"),
            ("CLI", f"BCCD {sp} red cells typed normal (no truth)", bccd["rbc_label_shares"].get("normal", 0.0), "report"),
            ("CLI", f"TXL-PBC {sp} mAP50, counted (scale estimated)", txl["mAP50"], "report"),
            ("CLI", f"TXL-PBC {sp} mAP50, every detection", txl["every_detection"]["mAP50"], "report"),
            *rows[1:4],
            ("CLI", f"PBC {sp} crops via analyzer: WBC accuracy", pbc["accuracy"], "within 3 pts of head"),
            ("CLI", f"PBC {sp} crops via analyzer: cell found", pbc["detected_fraction"], "report"),
            *rows[4:],
            ("CLI", "median s per BCCD field (this CPU)", bccd["median_s_per_field"], "report"),
        ]
        rejected = bccd["rejected"] + txl["rejected"] + pbc["rejected"]
        if rejected:
            rows.append(("CLI", "images the CLI rejected (scored as misses)", rejected, "0"))
    print(f"\nsplit: {sp}{' (validation: for choosing models; the bars apply to test)' if sp == 'val' else ''}"
          f"; stain normalization: {args.stain}; backend: {args.backend}{' (QUICK: subsets)' if args.quick else ''}"
          f"{' (heads only)' if args.heads_only else ''}")
    views = {name: "+".join(load_manifest(m, verify_hash=False).tta) for name, m in
             (("detector", args.models / "seg.json"), ("WBC head", wbc_m), ("RBC head", rbc_m))}
    print("test-time views (manifests): " + "; ".join(f"{k} {v}" for k, v in views.items()))
    print(f"{'model':<14}{'figure':<44}{'value':>22}  bar")
    for model, fig, val, bar in rows:
        v = f"{val:.4f}" if isinstance(val, float) else str(val)
        print(f"{model:<14}{fig:<44}{v:>22}  {bar}")
    if not args.heads_only:
        shares = sorted(bccd["rbc_label_shares"].items(), key=lambda kv: -kv[1])[:6]
        print(f"BCCD {sp} red cells by RBC-head label: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares))
    if not args.heads_only:
        for name, conf in ((f"BCCD {sp}", bccd["confusion"]), (f"TXL-PBC {sp}", txl["confusion"])):
            print(f"\n{name} counted cells against annotations (IoU >= 0.5; precision / recall / counted / annotated):")
            for c, m in conf["per_class"].items():
                print(f"  {c:<18}{m['precision']:.3f} / {m['recall']:.3f} / {m['n_pred']} / {m['n_truth']}")
            print(detection_confusion_table(conf))
    for name, rep in (("WBC", wbc_rep), ("RBC", rbc_rep)):
        print(f"\n{name} head per class (precision / recall / F1 / n):")
        for c, m in rep["per_class"].items():
            print(f"  {c:<18}{m['precision']:.3f} / {m['recall']:.3f} / {m['f1']:.3f} / {m['support']}")
        print(confusion_table(rep))
    if sp == "test":
        res["plausibility"] = plausibility_section(args.models)
    if not args.heads_only and not args.no_labs:
        res["lab_table"] = lab_section(args, sp, limit)
    res["held_out_runs"] = held_out_runs_section()
    res["detector_held_out_labs"] = detector_held_out_section()
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


def plausibility_section(models: Path) -> dict:
    """Does the RBC morphology point to the diagnosis (training.plausibility): virtual smears from
    Chula test cells, BCCD test's spherocyte share and confident sickle cells, Chula per-class recall."""
    from training.plausibility import run as plausibility

    r = plausibility(models, 20, 400)
    print(f"\nRBC plausibility (python -m training.plausibility): virtual-smear comparisons {r['checks_passed']}; "
          f"BCCD test red cells (annotated boxes) typed spherocyte {r['bccd_test_spherocyte_share']:.3f}, "
          f"confident sickle cells {r['bccd_test_sickle_confident_cells']}")
    for name, ok in r["checks"].items():
        print(f"  {'pass' if ok else 'FAIL'}  {name}")
    print("  Chula test recall: " + ", ".join(f"{c} {v:.2f}" for c, v in r["chula_test_recall"].items()))
    return r


def lab_section(args, split: str, limit: int | None) -> list[dict]:
    """Every lab on its own (training.lab_table), uncalibrated and calibrated scale."""
    from training.lab_table import DETECTOR_LABS, format_table, run_lab

    analyzer = Analyzer.from_models_dir(args.models, backend=args.backend,
                                        options=AnalyzerOptions(stain_method=args.stain))
    try:
        rows = [run_lab(analyzer, lab, split, mode, limit) for lab in DETECTOR_LABS for mode in ("estimated", "given")]
    finally:
        analyzer.close()
    print(f"\nLab table ({split}; python -m training.lab_table):")
    print(format_table(rows))
    return rows


def detector_held_out_section(root: Path = Path("build/lolo")) -> list[dict]:
    """Leave-one-lab-out detectors (training.lolo_seg: one lab table per run), if present."""
    from training.lolo_seg import format_rows, held_out_rows, load

    tables, start = load(root) if root.is_dir() else ({}, None)
    if not tables:
        print(f"\nDetectors trained without one lab: none in {root} (they are trained by python -m training.lolo_seg; "
              "hours on 2 CPU cores); the model card holds their last figures")
        return []
    rows = held_out_rows(tables, start)
    print(f"\nDetectors trained without one lab (validation lab tables in {root}; python -m training.lolo_seg):")
    print(format_rows(rows))
    return rows


def held_out_runs_section(root: Path = Path("build/wbc")) -> dict:
    """Leave-one-lab-out and leave-one-class-out WBC heads (training.train_wbc runs), if present."""
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/result.json"))}
    if not found:
        print(f"\nWBC heads held out from a lab or a class: none in {root} (they are trained by python -m "
              "training.train_wbc --exclude-lab/--exclude-class); the model card holds their last figures")
        return {}
    print("\nWBC heads held out from a lab or a class (python -m training.train_wbc --exclude-lab/--exclude-class; "
          "test splits, review = unidentified):")
    for r in found.values():
        if r.get("exclude_lab"):
            lab = r["exclude_lab"]
            cs, wr = r["test_closed_set"].get(lab, {}), r["test_with_review"].get(lab, {})
            print(f"  trained without lab {lab:<6}: on {lab} accuracy {cs.get('accuracy')} macro-F1 {cs.get('macro_f1')}"
                  f" (with review: {wr.get('accuracy')}); review rate {r['test_review_rate_known'].get(lab)}")
        for cls, h in (r.get("held_out_class") or {}).items():
            rates = r["test_review_rate_known"]
            print(f"  trained without {cls:<10}: typed as a known class {h['typed_as_known']} (softmax alone "
                  f"{h['typed_as_known_softmax_only']}); normal cells to review {rates}")
    return found


if __name__ == "__main__":
    main()
