"""`smearscope` command line: analyze, demo, run, validate-config, schema, build-engines."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("smearscope")

EXIT_REJECTED = 2
EXIT_USAGE = 64


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _error(code: str, message: str, as_json: bool) -> int:
    payload = {"error": {"code": code, "message": message}}
    print(json.dumps(payload))
    if not as_json:
        print(f"rejected: {code}: {message}", file=sys.stderr)
    return EXIT_REJECTED


def summarize(report) -> str:
    """A few lines a technician can read at a glance."""
    r = report
    lines = [
        f"field {r.source.frame_id if r.source else r.report_id}: RBC {r.counts.rbc}, WBC {r.counts.wbc}, "
        f"platelets {r.counts.platelet}  (scale {r.scale.microns_per_pixel:.4f} um/px, {r.scale.method}; "
        f"{r.timing_ms.get('total_ms', 0):.0f} ms)" if r.scale else f"report {r.report_id}",
    ]
    if r.wbc_differential:
        lines.append("  WBC: " + ", ".join(f"{s.label} {s.count} ({s.percent:.0f}%)" for s in r.wbc_differential))
    if r.rbc_morphology:
        lines.append("  RBC: " + ", ".join(f"{s.label} {s.percent:.1f}%" for s in r.rbc_morphology[:6]))
    if r.rbc_size.n:
        lines.append(f"  RBC diameter {r.rbc_size.mean_diameter_um:.2f} um (CV {r.rbc_size.cv_percent:.1f}%, n={r.rbc_size.n})")
    for f in r.flags:
        lines.append(f"  [{f.severity}] {f.code}: {f.message}")
    return "\n".join(lines)


def cmd_analyze(args: argparse.Namespace) -> int:
    from device.frame import Frame
    from service.ingest import IngestError, load_image

    if args.microns_per_pixel is not None and not (0.01 <= args.microns_per_pixel <= 2.0):
        return _error("bad_scale", f"--microns-per-pixel {args.microns_per_pixel} outside 0.01..2.0", args.json)
    try:
        img = load_image(args.image)
    except IngestError as exc:
        return _error(exc.code.value if hasattr(exc.code, "value") else str(exc.code), str(exc.message), args.json)
    from engines.base import EngineError
    from service.pipeline import Analyzer, AnalyzerOptions

    try:
        analyzer = Analyzer.from_models_dir(args.models, backend=args.backend,
                                            options=AnalyzerOptions(stain_method=args.stain), warmup=False)
    except EngineError as exc:
        return _error("engine_unavailable", str(exc), args.json)
    frame = Frame(pixels=img.pixels, frame_id=Path(args.image).name, source=str(args.image),
                  microns_per_pixel=args.microns_per_pixel)
    result = analyzer.analyze(frame)
    if args.overlay:
        import cv2

        from service.overlay import draw_overlay

        cv2.imwrite(str(args.overlay), draw_overlay(img.pixels, result.cells, result.input_to_canonical))
    if args.json:
        print(result.report.model_dump_json())
    else:
        print(summarize(result.report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(fields=args.fields, seed=args.seed, models=args.models, backend=args.backend)


def cmd_schema(args: argparse.Namespace) -> int:
    from service.report import report_json_schema

    text = json.dumps(report_json_schema(), indent=2, sort_keys=True) + "\n"
    path = Path(__file__).resolve().parents[1] / "schemas" / "report.schema.json"
    if args.write:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
        return 0
    print(text, end="")
    return 0


def cmd_validate_config(args: argparse.Namespace) -> int:
    from service.config import validate_config_main

    return validate_config_main(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from service.daemon import run_daemon

    return run_daemon(args.config, max_fields=args.max_fields, log_level=args.log_level)


def cmd_build_engines(args: argparse.Namespace) -> int:
    from export.tensorrt_build import build_all

    return build_all(args.models, args.cache, precision=args.precision, calibration_dir=args.calibration)


def build_parser() -> argparse.ArgumentParser:
    from service.pipeline import DEFAULT_MODELS_DIR

    ap = argparse.ArgumentParser(prog="smearscope", description="Point-of-care blood-smear analyzer")
    ap.add_argument("--log-level", default=None,
                    help="log threshold (DEBUG, INFO, WARNING, ERROR); default WARNING, and for "
                    "`run` the config's log_level, which an explicit --log-level overrides")
    sub = ap.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="analyze one image and print its report")
    a.add_argument("image")
    a.add_argument("--microns-per-pixel", type=float, default=None, help="input scale; estimated when omitted")
    a.add_argument("--json", action="store_true", help="print exactly one JSON report on stdout")
    a.add_argument("--overlay", type=Path, help="write the input with outlines and labels to this PNG")
    a.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    a.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    a.add_argument("--stain", default="auto", choices=["auto", "macenko", "none"],
                   help="auto: as each model was trained (manifest); macenko/none: force for all models")
    a.set_defaults(func=cmd_analyze)

    d = sub.add_parser("demo", help="analyze fields from the built-in synthetic microscope")
    d.add_argument("--fields", type=int, default=3)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    d.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("schema", help="print (or --write) the report JSON Schema")
    s.add_argument("--write", action="store_true")
    s.set_defaults(func=cmd_schema)

    v = sub.add_parser("validate-config", help="check a station config file and exit")
    v.add_argument("config", type=Path)
    v.set_defaults(func=cmd_validate_config)

    r = sub.add_parser("run", help="run the station daemon")
    r.add_argument("--config", type=Path, default=None, help="station TOML (default: the embedded simulated station)")
    r.add_argument("--max-fields", type=int, default=None, help="stop after this many analysed fields")
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("build-engines", help="build TensorRT engines for the models (Jetson only)")
    b.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    b.add_argument("--cache", type=Path, default=DEFAULT_MODELS_DIR / "engines")
    b.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    b.add_argument("--calibration", type=Path, default=None, help="folder of canonical tiles/crops for INT8")
    b.set_defaults(func=cmd_build_engines)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    _setup_logging(args.log_level or "WARNING")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `smearscope analyze ... | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
