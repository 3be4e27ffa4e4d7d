"""`smearscope analyze`: images (files, folders, @lists) in, one report or error line each out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

from smearscope.cli.fhir_out import FhirOutputError, bundle_path, check_fhir_output, write_bundle
from smearscope.cli.summary import summarize

logger = logging.getLogger(__name__)

EXIT_REJECTED = 2


def _error(code: str, message: str, as_json: bool) -> int:
    payload = {"error": {"code": code, "message": message}}
    print(json.dumps(payload))
    if not as_json:
        print(f"rejected: {code}: {message}", file=sys.stderr)
    return EXIT_REJECTED


#: Files a directory given to `analyze` contributes (named files are always tried, and rejected if bad).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})


class InputError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def expand_inputs(items: list[str]) -> tuple[list[Path], bool]:
    """The images to analyze, in order, and whether the inputs name a set (not one image file).

    A directory adds its image files (by suffix), sorted by name; `@LIST` adds the paths a text
    file lists, one per line, taken literally (blank lines skipped; `./@name` names a file whose
    name starts with @). Named files are always tried (and rejected if bad).
    """
    out: list[Path] = []
    is_set = len(items) > 1
    for item in items:
        if item.startswith("@"):
            is_set = True
            try:
                lines = Path(item[1:]).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError("bad_list", f"cannot read image list {item[1:]}: {exc}") from exc
            out += [Path(ln.strip()) for ln in lines if ln.strip()]
            continue
        p = Path(item)
        if p.is_dir():
            is_set = True
            out += sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out, is_set


def detections_record(path: Path, result, floor: float) -> dict:
    """One line of `--detections`: every detection of one image down to `floor`.

    Counted cells are the report's cells (kind after the heads, label); the others are the
    plausible cells (the ROI filter's size and shape rules) under the counting threshold, as the
    detector saw them (no label). Boxes are in the input image's pixels; sorted by score, as a
    ranking metric reads them.
    """
    from smearscope.service.analysis.pipeline import input_bbox

    rep = result.report
    w, h = rep.source.image.width, rep.source.image.height
    dets = [{"kind": c.kind, "bbox": c.bbox, "score": c.score, "counted": True, "label": c.label} for c in rep.cells]
    # rounded DOWN, so that a candidate never reads as reaching the counting threshold (0.49996 -> 0.4999)
    below = [(d, math.floor(d.score * 1e4) / 1e4) for d in result.candidates]
    dets += [{"kind": d.kind.value, "bbox": input_bbox(d.box, result.input_to_canonical, w, h),
              "score": score, "counted": False, "label": None} for d, score in below if score >= floor]
    dets.sort(key=lambda d: -d["score"])
    return {"image": str(path), "report_id": rep.report_id, "width": w, "height": h,
            "microns_per_pixel": rep.scale.microns_per_pixel if rep.scale else None, "detections": dets}


def _overlay_path(overlay: Path, image: Path, folder: bool, used: set[Path]) -> Path:
    if not folder:
        return overlay
    out = overlay / f"{image.stem}.overlay.png"
    n = 1
    while out in used:
        n += 1
        out = overlay / f"{image.stem}-{n}.overlay.png"
    used.add(out)
    return out


def _check_outputs(args: argparse.Namespace, folder: bool):
    """Open --detections and prepare --overlay before any work; a bad path is a usage error."""
    if args.overlay is not None:
        if folder:
            try:
                args.overlay.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError("bad_output", f"--overlay {args.overlay}: not a usable directory ({exc})") from exc
        elif args.overlay.suffix.lower() not in IMAGE_SUFFIXES or not args.overlay.parent.is_dir():
            raise InputError("bad_output", f"--overlay {args.overlay}: needs an existing directory and an image "
                             f"suffix ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if args.detections is None:
        return None
    try:
        return args.detections.open("w")
    except OSError as exc:
        raise InputError("bad_output", f"--detections {args.detections}: {exc}") from exc


def cmd_analyze(args: argparse.Namespace) -> int:
    from smearscope.device.frame import Frame
    from smearscope.service.ingest import IngestError, load_image

    if args.microns_per_pixel is not None and not (0.01 <= args.microns_per_pixel <= 2.0):
        return _error("bad_scale", f"--microns-per-pixel {args.microns_per_pixel} outside 0.01..2.0", args.json)
    from smearscope.service.analysis.pipeline import AnalyzerOptions

    defaults = AnalyzerOptions(stain_method=args.stain)
    counting = defaults.roi.min_confidence
    if args.detections is not None and not (0.0 < args.detections_floor < counting):
        return _error("bad_floor", f"--detections-floor {args.detections_floor} outside (0, {counting})", args.json)
    try:
        images, folder = expand_inputs(args.images)
        if not images:
            raise InputError("no_images", f"no image files in {' '.join(args.images)}")
        if args.fhir is not None:  # before --detections is opened
            check_fhir_output(args.fhir, folder)
        det_out = _check_outputs(args, folder)
    except FhirOutputError as exc:
        return _error("bad_output", str(exc), args.json)
    except InputError as exc:
        return _error(exc.code, exc.message, args.json)
    from smearscope.engines.base import EngineError
    from smearscope.service.analysis.pipeline import Analyzer

    # Candidates for --detections come from the same detector pass: the raw scores are thresholded
    # at a fixed floor whatever detector_conf is, so a lower detector_conf adds detections under
    # the counting threshold and changes nothing at or above it (the counted cells are the same).
    options = defaults
    if det_out is not None:
        options = dataclasses.replace(defaults, detector_conf=min(defaults.detector_conf, args.detections_floor))
    try:
        analyzer = Analyzer.from_models_dir(args.models, backend=args.backend, options=options, warmup=False)
    except EngineError as exc:
        if det_out is not None:
            det_out.close()
        return _error("engine_unavailable", str(exc), args.json)
    failed = 0
    used: set[Path] = set()
    fhir_used: set[Path] = set()
    try:
        for path in images:
            try:
                img = load_image(str(path))
            except IngestError as exc:
                failed += 1
                code = exc.code.value if hasattr(exc.code, "value") else str(exc.code)
                _batch_error(path, code, str(exc.message), args.json, det_out)
                continue
            frame = Frame(pixels=img.pixels, frame_id=path.name, source=str(path),
                          microns_per_pixel=args.microns_per_pixel)
            try:
                result = analyzer.analyze(frame)
            except Exception as exc:  # a bug, not bad input: say so for this image and go on
                logger.exception("analysis of %s failed", path)
                failed += 1
                _batch_error(path, "analysis_failed", f"{type(exc).__name__}: {exc}", args.json, det_out)
                continue
            if args.overlay is not None:
                import cv2

                from smearscope.service.analysis.overlay import draw_overlay

                out = _overlay_path(args.overlay, path, folder, used)
                # the candidates the station would show (>= its own detector threshold, 0.25)
                candidates = [d for d in result.candidates if d.score >= defaults.detector_conf]
                if not cv2.imwrite(str(out), draw_overlay(img.pixels, result.cells, result.input_to_canonical, candidates)):
                    failed += 1  # the report below stands; the exit status says something failed
                    logger.error("could not write the overlay of %s to %s", path, out)
            if args.fhir is not None and not write_bundle(bundle_path(args.fhir, path, folder, fhir_used),
                                                          result.report):
                failed += 1  # the report below stands; the exit status says something failed
            if det_out is not None:
                det_out.write(json.dumps(detections_record(path, result, args.detections_floor)) + "\n")
                det_out.flush()
            print(result.report.model_dump_json() if args.json else summarize(result.report), flush=True)
    finally:
        if det_out is not None:
            det_out.close()
        analyzer.close()
    return EXIT_REJECTED if failed else 0


def _batch_error(path: Path, code: str, message: str, as_json: bool, det_out) -> None:
    """One image rejected: its error line where its report would be; the batch goes on."""
    payload = {"error": {"code": code, "message": message}, "image": str(path)}
    print(json.dumps(payload), flush=True)
    if not as_json:
        print(f"rejected: {path}: {code}: {message}", file=sys.stderr)
    if det_out is not None:
        det_out.write(json.dumps(payload) + "\n")
        det_out.flush()
