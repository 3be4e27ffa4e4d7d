"""`smearscope analyze`: images (files, folders, @lists) in, one report or error line each out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

from smearscope.cli import EXIT_OUTPUT, SCALE_RANGE_UM
from smearscope.cli.analyze_io import (
    FHIR_SUFFIX,
    IMAGE_SUFFIXES,
    OVERLAY_SUFFIX,
    InputError,
    OutputGuard,
    expand_inputs,
    list_files,
    models_option_problem,
    no_images_message,
    output_path,
    shown,
)
from smearscope.cli.fhir_out import (
    FhirOutputError,
    check_fhir_output,
    is_directory,
    write_bundle,
)
from smearscope.cli.summary import summarize
from smearscope.device.config_fields import scale_advice

logger = logging.getLogger(__name__)

EXIT_REJECTED = 2
#: What --detections writes down to by default: every detection above the detector's raw floor, as mAP ranks them.
DETECTIONS_FLOOR = 0.001


class OutputFailed(Exception):
    """stdout or the --detections file refused a write (full device, closed pipe...)."""


def _error(code: str, message: str, as_json: bool) -> int:
    payload = {"error": {"code": code, "message": message}}
    _write(sys.stdout, json.dumps(payload), "stdout")
    if not as_json:
        print(f"rejected: {code}: {message}", file=sys.stderr)
    return EXIT_REJECTED


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
    return {"image": shown(path), "report_id": rep.report_id, "width": w, "height": h,
            "microns_per_pixel": rep.scale.microns_per_pixel if rep.scale else None, "detections": dets}


def _check_outputs(args: argparse.Namespace, folder: bool, guard: OutputGuard):
    """Check --overlay and open --detections before any work; a bad path is a usage error."""
    if args.overlay is not None:
        if folder:
            try:
                args.overlay.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError("bad_output", f"--overlay {shown(args.overlay)}: not a usable directory ({exc})") from exc
            guard.check_directory(args.overlay, "--overlay")
        elif args.overlay.suffix.lower() not in IMAGE_SUFFIXES or not args.overlay.parent.is_dir():
            raise InputError("bad_output", f"--overlay {shown(args.overlay)}: an existing directory, or a file name "
                             f"with an image suffix ({', '.join(sorted(IMAGE_SUFFIXES))}) in one")
        else:
            guard.check(args.overlay, "--overlay")
            guard.check_directory(args.overlay.parent, "--overlay")
    if args.detections is None:
        return None
    guard.check(args.detections, "--detections")
    try:
        return args.detections.open("w", encoding="utf-8")
    except OSError as exc:
        why = "its folder does not exist" if not args.detections.parent.is_dir() else exc.strerror or str(exc)
        raise InputError("bad_output", f"--detections {shown(args.detections)}: cannot be written ({why})") from exc


def _write(stream, line: str, what: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputFailed(f"cannot write {what}: {exc.strerror or exc}") from exc


def cmd_analyze(args: argparse.Namespace) -> int:
    try:
        return _analyze(args)
    except OutputFailed as exc:
        print(f"smearscope analyze: {exc}; stopped", file=sys.stderr)
        return EXIT_OUTPUT


def _analyze(args: argparse.Namespace) -> int:
    from smearscope.device.frame import Frame
    from smearscope.service.ingest import IngestError, load_image

    lo, hi = SCALE_RANGE_UM
    if args.microns_per_pixel is not None and not (lo <= args.microns_per_pixel <= hi):
        return _error("bad_scale", f"--microns-per-pixel {args.microns_per_pixel:g} is outside {lo}..{hi}"
                      f"{scale_advice(args.microns_per_pixel)}", args.json)
    from smearscope.service.analysis.pipeline import AnalyzerOptions

    defaults = AnalyzerOptions(stain_method=args.stain)
    counting = defaults.roi.lowest_threshold
    if args.specimen and args.microns_per_pixel is not None:
        return _error("bad_arguments", "--specimen agrees a scale over the fields from their red cells; with "
                      "--microns-per-pixel every field has that scale: give one of them", args.json)
    if args.detections_floor is not None and args.detections is None:
        return _error("bad_arguments", "--detections-floor sets what --detections writes: give --detections too",
                      args.json)
    args.detections_floor = DETECTIONS_FLOOR if args.detections_floor is None else args.detections_floor
    if args.detections is not None and not (0.0 < args.detections_floor < counting):
        return _error("bad_floor", f"--detections-floor {args.detections_floor} outside (0, {counting})", args.json)
    try:
        images, folder = expand_inputs(args.images)
        if not images:
            raise InputError("no_images", no_images_message(args.images))
        guard = OutputGuard(images, list_files(args.images))
        # a set of images writes its overlays and bundles into directories; one image into a file, or
        # into a directory named that already exists
        overlay_dir = folder or (args.overlay is not None and is_directory(args.overlay))
        fhir_dir = folder or (args.fhir is not None and is_directory(args.fhir))
        if args.fhir is not None:  # before --detections is opened
            check_fhir_output(args.fhir, fhir_dir)
            if not fhir_dir:
                guard.check(args.fhir, "--fhir")
            guard.check_directory(args.fhir if fhir_dir else args.fhir.parent, "--fhir")
        det_out = _check_outputs(args, overlay_dir, guard)
    except FhirOutputError as exc:
        return _error("bad_output", str(exc), args.json)
    except InputError as exc:
        return _error(exc.code, exc.message, args.json)
    from smearscope.engines.base import EngineError
    from smearscope.engines.manifest import ManifestError
    from smearscope.service.analysis.pipeline import Analyzer

    # Candidates for --detections come from the same detector pass: the raw scores are thresholded
    # at a fixed floor whatever detector_conf is, so a lower detector_conf adds detections under
    # the counting threshold and changes nothing at or above it (the counted cells are the same).
    options = defaults
    if det_out is not None:
        options = dataclasses.replace(defaults, detector_conf=min(defaults.detector_conf, args.detections_floor))
    if (missing := models_option_problem(args.models)) is not None:
        if det_out is not None:
            det_out.close()
        return _error("engine_unavailable", missing, args.json)
    try:
        analyzer = Analyzer.from_models_dir(args.models, backend=args.backend, options=options, warmup=False)
    except (EngineError, ManifestError, OSError) as exc:
        if det_out is not None:
            det_out.close()
        return _error("engine_unavailable", f"{type(exc).__name__}: {exc}", args.json)
    from smearscope.service.analysis.specimen_scale import SpecimenScale

    specimen = SpecimenScale() if args.specimen else None
    failed = analysed = 0
    used: set[Path] = set()
    fhir_used: set[Path] = set()
    try:
        for item in images:
            path = item.path
            if item.error is not None:
                failed += 1
                _batch_error(path, item.error.code, item.error.message, args.json, det_out)
                continue
            try:
                img = load_image(path)
            except IngestError as exc:
                failed += 1
                _batch_error(path, exc.code.value, str(exc.message), args.json, det_out)
                continue
            frame = Frame(pixels=img.pixels, frame_id=shown(path.name), source=shown(path),
                          microns_per_pixel=args.microns_per_pixel)
            try:
                result = analyzer.analyze(frame, specimen_scale=specimen.scale() if specimen else None,
                                          check_calibration=analysed < args.check_calibration)
                analysed += 1
            except IngestError as exc:  # e.g. too_large_at_scale: judged once the scale is known
                failed += 1
                _batch_error(path, exc.code.value, str(exc.message), args.json, det_out)
                continue
            except Exception as exc:  # a bug, not bad input: say so for this image and go on
                logger.exception("analysis of %s failed", shown(path))
                failed += 1
                _batch_error(path, "analysis_failed", f"{type(exc).__name__}: {exc}", args.json, det_out)
                continue
            if specimen is not None:
                specimen.add_report(result.report.scale)
            if args.overlay is not None and not _overlay(args, path, img.pixels, result, overlay_dir, used, guard,
                                                         defaults.detector_conf):
                failed += 1  # the report below stands; the exit status says something failed
            if args.fhir is not None and not _fhir(args, path, result, fhir_dir, fhir_used, guard):
                failed += 1  # the report below stands; the exit status says something failed
            if det_out is not None:
                _write(det_out, json.dumps(detections_record(path, result, args.detections_floor)), "--detections")
            _write(sys.stdout, result.report.model_dump_json() if args.json else summarize(result.report), "stdout")
    finally:
        if det_out is not None:
            try:
                det_out.close()
            except OSError:
                pass  # the write that failed has been reported
        analyzer.close()
    return EXIT_REJECTED if failed else 0


def _overlay(args, path: Path, pixels, result, folder: bool, used: set[Path], guard: OutputGuard,
             detector_conf: float) -> bool:
    """Write one overlay; False (logged) when it could not be written."""
    from smearscope.service.analysis.overlay import draw_overlay

    out = output_path(args.overlay, path, OVERLAY_SUFFIX, folder, used)
    # the candidates the station would show (>= its own detector threshold, 0.25)
    candidates = [d for d in result.candidates if d.score >= detector_conf]
    try:
        guard.write_image(out, draw_overlay(pixels, result.cells, result.input_to_canonical, candidates), "--overlay")
    except (OSError, ValueError, InputError) as exc:
        logger.error("could not write the overlay of %s to %s: %s", shown(path), shown(out), exc)
        return False
    return True


def _fhir(args, path: Path, result, folder: bool, used: set[Path], guard: OutputGuard) -> bool:
    """Write one FHIR bundle, never over an input or into a FIFO; False (logged) when it failed."""
    out = output_path(args.fhir, path, FHIR_SUFFIX, folder, used)
    try:
        guard.check(out, "--fhir")
    except InputError as exc:
        logger.error("%s", exc.message)
        return False
    return write_bundle(out, result.report)


def _batch_error(path: Path, code: str, message: str, as_json: bool, det_out) -> None:
    """One image rejected: its error line where its report would be; the batch goes on."""
    payload = {"error": {"code": code, "message": message}, "image": shown(path)}
    _write(sys.stdout, json.dumps(payload), "stdout")
    if not as_json:
        print(f"rejected: {shown(path)}: {code}: {message}", file=sys.stderr)
    if det_out is not None:
        _write(det_out, json.dumps(payload), "--detections")
