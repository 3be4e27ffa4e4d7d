"""Station calibration: `calibrate-scale` (micrometres per pixel from a stage micrometer image) and
`calibrate-atypical` (the WBC head's open-set thresholds from the station's own normal specimens)."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


#: What --config with another --models says: the config's models are the ones that would run.
MODELS_WITH_CONFIG = ("--models names the models when there is no --config; with --config the station's "
                      "analysis.models_dir is used: give one of them")


def models_with_config(args: argparse.Namespace) -> bool:
    """--config and a --models other than the packaged models (argparse's default): the folder
    named would be ignored for the config's, and the fit made for another model than meant."""
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    return args.config is not None and Path(args.models).resolve() != DEFAULT_MODELS_DIR.resolve()


def outside_shown(value: float, lo: float, hi: float) -> str:
    """A scale outside lo..hi as a message shows it: never rounded onto the bound it is outside of."""
    shown = f"{value:.5g}"
    if float(shown) in (lo, hi):
        shown = f"{'just under' if value < lo else 'just over'} {shown}"
    return shown


def cmd_calibrate_scale(args: argparse.Namespace) -> int:
    from smearscope.service.analysis.micrometer import MicrometerError, measure_micrometer
    from smearscope.service.ingest import IngestError, load_image

    try:
        image = load_image(str(args.image)).pixels
        r = measure_micrometer(image, args.division_um)
    except IngestError as exc:
        print(json.dumps({"error": {"code": exc.code.value, "message": exc.message}}))  # as analyze says it
        return 2
    except MicrometerError as exc:
        print(json.dumps({"error": {"code": "no_ruling", "message": str(exc)}}))
        return 2
    from smearscope.cli import SCALE_RANGE_UM

    lo, hi = SCALE_RANGE_UM
    if not lo <= r.microns_per_pixel <= hi:  # a wrong --division-um, or not a micrometer at this magnification
        print(json.dumps({"error": {"code": "implausible_scale", "message": (
            f"{outside_shown(r.microns_per_pixel, lo, hi)} um/px ({r.period_px:.2f} px per "
            f"{args.division_um:g} um division) is outside "
            f"{lo}..{hi}, the scales the analyzer accepts: check --division-um against the micrometer's ruling")}}))
        return 2
    # what a lab's calibration record keeps: when, from which image, the ruling and what was measured
    measured_at = datetime.datetime.now(datetime.timezone.utc)
    image_sha256 = hashlib.sha256(Path(args.image).read_bytes()).hexdigest()
    if args.json:
        print(json.dumps({"microns_per_pixel": round(r.microns_per_pixel, 6), "period_px": round(r.period_px, 3),
                          "angle_deg": round(r.angle_deg, 2), "periods_seen": round(r.periods_seen, 1),
                          "prominence": round(r.prominence, 2), "contrast": round(r.contrast, 3),
                          "division_um": args.division_um, "warnings": list(r.warnings),
                          "config_key": "source.microns_per_pixel",
                          "calibrated_on": datetime.date.today().isoformat(),
                          "measured_at": measured_at.isoformat(timespec="seconds"), "image": str(args.image),
                          "image_sha256": image_sha256}))
    else:
        print(f"{r.microns_per_pixel:.5f} um/px  ({r.period_px:.2f} px per {args.division_um:g} um division, "
              f"lines at {r.angle_deg:.1f} deg, {r.periods_seen:.1f} divisions measured)")
        for w in r.warnings:
            print(f"warning: {w}")
        print(f"record: measured {measured_at.isoformat(timespec='seconds')} from {args.image} (sha256 "
              f"{image_sha256}), {args.division_um:g} um divisions, {r.period_px:.3f} px per division over "
              f"{r.periods_seen:.1f} divisions; add the micrometer's identity and certificate, the "
              "objective, the camera and its resolution")
        print("put in the station config, [source] section (the camera through this objective):")
        print(f"microns_per_pixel = {r.microns_per_pixel:.5f}")
        print(f"microns_per_pixel_calibrated_on = {datetime.date.today().isoformat()}")
    return 0


def cmd_calibrate_atypical(args: argparse.Namespace) -> int:
    """Fit the station's WBC open-set thresholds on fields of normal specimens; print the TOML section."""
    import time

    import numpy as np

    from smearscope.cli.analyze_io import (
        InputError,
        expand_inputs,
        models_option_problem,
        no_images_message,
        shown,
    )
    from smearscope.device.frame import Frame
    from smearscope.service.analysis.open_set_fit import fit_station_thresholds
    from smearscope.service.analysis.records import CellKind
    from smearscope.service.analysis.wording import counted
    from smearscope.service.ingest import IngestError, load_image

    def error(code: str, message: str) -> int:
        print(json.dumps({"error": {"code": code, "message": message}}))
        return 2

    if not 0.0 < args.budget < 0.5:
        return error("bad_budget", f"--budget {args.budget} outside (0, 0.5)")
    if models_with_config(args):
        return error("bad_arguments", MODELS_WITH_CONFIG)
    try:
        images, _ = expand_inputs(args.images)
    except InputError as exc:
        return error(exc.code, exc.message)
    if not images:
        return error("no_images", no_images_message(args.images))
    from smearscope.engines.base import EngineError
    from smearscope.engines.manifest import ManifestError
    from smearscope.service.config import ConfigError
    from smearscope.service.station.startup import StartupError

    if args.config is None and (missing := models_option_problem(args.models)) is not None:
        return error("engine_unavailable", missing)
    try:
        analyzer, mpp = _station_analyzer(args)
    except (ConfigError, StartupError) as exc:
        return error("bad_config", str(exc))
    except (EngineError, ManifestError, OSError) as exc:
        return error("engine_unavailable", f"{type(exc).__name__}: {exc}")
    head = analyzer.wbc_head
    if head is None or not head.open_sets:
        analyzer.close()
        return error("no_open_set", "the WBC head has no open-set test to calibrate")
    scores: list[tuple[float, ...]] = []
    unsure: list[bool] = []
    fields = skipped = 0
    try:
        for item in images:
            if item.error is not None:
                skipped += 1
                logger.warning("%s: %s", shown(item.path), item.error.message)
                continue
            try:
                img = load_image(item.path)
                result = analyzer.analyze(Frame(img.pixels, shown(item.path.name), shown(item.path),
                                                microns_per_pixel=mpp))
            except IngestError as exc:
                skipped += 1
                logger.warning("%s: %s: %s", shown(item.path), exc.code.value, exc.message)
                continue
            fields += 1
            for c in result.cells:
                # white cells the WBC head typed (or could not type), not re-counted red cells
                if c.detection.kind is CellKind.WBC and c.detected_as is None and c.open_set_scores:
                    scores.append(c.open_set_scores)
                    unsure.append((c.label_score or 0.0) < head.min_confidence)
    finally:
        analyzer.close()
    methods = [t.method for t in head.open_sets]
    model = [t.threshold for t in head.open_sets]
    fit = fit_station_thresholds(np.array(scores, np.float64).reshape(len(scores), len(methods)),
                                 np.array(unsure, bool), methods, model, args.budget, args.min_cells)
    sha = analyzer.models["wbc_head"].sha256
    station = head.station[1] if head.station is not None else None
    summary = {"white_cells": fit.n_cells, "fields": fields, "skipped": skipped, "budget": args.budget,
               "review_share_model": round(fit.review_share_model, 4), "model_thresholds": dict(zip(methods, model)),
               "model_sha256": sha, "station_means_sha256": station.file_sha256 if station else None}
    if fit.thresholds is None:
        reason = {"too_few_white_cells": f"{counted(fit.n_cells, 'white cell')} in {counted(fields, 'field')}; "
                                         f"at least {args.min_cells} "
                                         "are needed (add fields of normal specimens)",
                  "over_budget": f"with the model's own thresholds {fit.review_share_model:.1%} of these normal white "
                                 f"cells already go to review, over the budget of {args.budget:.1%}: nothing to "
                                 "tighten; keep the model's thresholds (leave [analysis.wbc_open_set] out)",
                  "nothing_tighter": f"with the model's own thresholds {fit.review_share_model:.1%} of these normal "
                                     f"white cells go to review, within the budget of {args.budget:.1%}, and no "
                                     "tighter threshold keeps within it: keep the model's thresholds (leave "
                                     "[analysis.wbc_open_set] out)"}[fit.reason or ""]
        print(json.dumps({"error": {"code": fit.reason, "message": reason}, **summary}))
        return 2
    fitted = (f"{time.strftime('%Y-%m-%d')}: {fit.n_cells} white cells in {fields} fields of normal specimens, "
              f"review budget {args.budget:.0%} ({fit.review_share:.1%} of them to review; model's thresholds "
              f"{fit.review_share_model:.1%}), quantile {fit.quantile}")
    if args.json:
        print(json.dumps({"thresholds": fit.thresholds, "quantile": fit.quantile,
                          "review_share": round(fit.review_share, 4), "fitted": fitted, **summary}))
        return 0
    print(f"# {fitted}")
    print("# put in the station config:")
    print("[analysis.wbc_open_set]")
    print("thresholds = { " + ", ".join(f"{m} = {v}" for m, v in fit.thresholds.items()) + " }")
    print(f'model_sha256 = "{sha}"')
    if station is not None:
        print(f'station_means_sha256 = "{station.file_sha256}"')
    print(f'fitted = "{fitted}"')
    return 0


def _station_analyzer(args: argparse.Namespace):
    """The analyzer the station runs (its config's analysis settings and models), and the scale to give."""
    if args.config is None:
        from smearscope.service.analysis.pipeline import Analyzer

        return Analyzer.from_models_dir(args.models, warmup=False), args.microns_per_pixel
    from smearscope.service.config import load_config
    from smearscope.service.station.startup import build_analyzer

    config = load_config(args.config)
    # scores do not depend on thresholds; a section fitted for an earlier head must not stop a refit
    config = config.model_copy(update={"analysis": config.analysis.model_copy(update={"wbc_open_set": None})})
    mpp = args.microns_per_pixel if args.microns_per_pixel is not None else config.microns_per_pixel
    return build_analyzer(config), mpp
