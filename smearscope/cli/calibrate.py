"""`smearscope calibrate-scale`: a station's micrometres per pixel from a stage micrometer image."""

from __future__ import annotations

import argparse
import json


def cmd_calibrate_scale(args: argparse.Namespace) -> int:
    from smearscope.service.analysis.micrometer import MicrometerError, measure_micrometer
    from smearscope.service.ingest import IngestError, load_image

    try:
        image = load_image(str(args.image)).pixels
        r = measure_micrometer(image, args.division_um)
    except IngestError as exc:
        print(json.dumps({"error": {"code": str(getattr(exc.code, "value", exc.code)), "message": str(exc)}}))
        return 2
    except MicrometerError as exc:
        print(json.dumps({"error": {"code": "no_ruling", "message": str(exc)}}))
        return 2
    if args.json:
        print(json.dumps({"microns_per_pixel": round(r.microns_per_pixel, 6), "period_px": round(r.period_px, 3),
                          "angle_deg": round(r.angle_deg, 2), "periods_seen": round(r.periods_seen, 1),
                          "prominence": round(r.prominence, 2), "division_um": args.division_um}))
    else:
        print(f"{r.microns_per_pixel:.5f} um/px  ({r.period_px:.2f} px per {args.division_um:g} um division, "
              f"lines at {r.angle_deg:.1f} deg, {r.periods_seen:.1f} divisions measured)")
        print("put in the station config, [analysis] section:")
        print(f"microns_per_pixel = {r.microns_per_pixel:.5f}")
    return 0
