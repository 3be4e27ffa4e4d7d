"""`smearscope schema` (the report JSON Schema) and `smearscope build-engines` (TensorRT).

The CLI is the only runtime code that reaches `export/`; the station never builds engines.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

#: The committed schema file (`smearscope schema --write` rewrites it).
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "report.schema.json"


def cmd_schema(args: argparse.Namespace) -> int:
    from smearscope.service.analysis.report import report_json_schema

    text = json.dumps(report_json_schema(), indent=2, sort_keys=True) + "\n"
    path = SCHEMA_FILE
    if args.write:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
        return 0
    print(text, end="")
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from smearscope.export.tensorrt_build import build_all

    cache = args.cache if args.cache is not None else args.models / "engines"
    return build_all(args.models, cache, precision=args.precision, calibration_dir=args.calibration,
                     cuda=args.cuda_api, lanes=args.lanes)
